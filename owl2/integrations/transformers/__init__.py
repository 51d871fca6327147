"""mPLUG-Owl2 in transformers: the config, the model and its cache, registered with the Auto classes.

Importing this package (it needs the ``transformers`` extra) registers ``model_type: "mplug_owl2"`` with
``AutoConfig``, ``AutoModelForCausalLM`` and ``AutoModelForImageTextToText`` (and the processing classes with
``AutoTokenizer``, ``AutoImageProcessor`` and ``AutoProcessor``), so every mPLUG-Owl2 checkpoint loads with no
remote code::

    import owl2.integrations.transformers
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained("MAGAer13/mplug-owl2-llama2-7b", dtype="bfloat16")

A checkpoint whose ``config.json`` points at remote code through ``auto_map`` (Q-Align, DeQA-Score) loads these
classes too: transformers prefers a class registered for the config's ``model_type`` to remote code, and uses the
registered one even with ``trust_remote_code=True``.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as exc:  # say which extra brings it rather than only the module's name
    raise ImportError("owl2.integrations.transformers needs transformers: pip install 'owl2[transformers]'") from exc

from owl2.integrations.transformers.cache import Owl2Cache
from owl2.integrations.transformers.configuration import MPLUGOwl2Config
from owl2.integrations.transformers.modeling import MPLUGOwl2LlamaForCausalLM, MPLUGOwl2PreTrainedModel


def register() -> None:
    """Register the config and the model with transformers' Auto classes, and the tokenizer, image processor and
    processor (:mod:`owl2.integrations.transformers.processing`) when the processing extra is installed; registering
    again is harmless."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    AutoConfig.register(MPLUGOwl2Config.model_type, MPLUGOwl2Config, exist_ok=True)
    AutoModelForCausalLM.register(MPLUGOwl2Config, MPLUGOwl2LlamaForCausalLM, exist_ok=True)
    AutoModelForImageTextToText.register(MPLUGOwl2Config, MPLUGOwl2LlamaForCausalLM, exist_ok=True)
    try:
        from owl2.integrations.transformers.processing import register_processing
    except ImportError:  # the processing extra (Pillow, sentencepiece, tokenizers) is missing: the model still loads
        return
    register_processing(MPLUGOwl2Config)


register()

__all__ = ["MPLUGOwl2Config", "MPLUGOwl2LlamaForCausalLM", "MPLUGOwl2PreTrainedModel", "Owl2Cache", "register"]
