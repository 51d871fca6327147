"""owl2: mPLUG-Owl2 in plain PyTorch.

The model and checkpoint I/O need only torch, numpy and safetensors. The tokenizer, image processor, templates and
the pipeline (``owl2.load``) also need the ``processing`` extra; they are imported on first use.
"""

import sys
from typing import Any

from owl2.checkpoint import CheckpointError, convert_checkpoint, load_model, save_model
from owl2.model import KVCache, Owl2Config, Owl2ForCausalLM, prepare_official_inputs

__version__ = "0.1.0"

_LAZY = {
    "load": "owl2.api",
    "Pipeline": "owl2.api",
    "default_model": "owl2.api",
    "load_tokenizer": "owl2.processing",
    "load_image_processor": "owl2.processing",
    "load_image": "owl2.processing",
    "render_conversation": "owl2.processing",
    "SamplingParams": "owl2.generation",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'owl2' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "KVCache",
    "Owl2Config",
    "Owl2ForCausalLM",
    "convert_checkpoint",
    "load_model",
    "prepare_official_inputs",
    "save_model",
    *_LAZY,
]

if "transformers" in sys.modules:
    # Someone already works with transformers here: make every mPLUG-Owl2 checkpoint load through its Auto classes.
    # Not otherwise: importing transformers' Auto classes takes seconds that `import owl2` (and every CLI call)
    # should not pay; `import owl2.integrations.transformers` registers explicitly.
    import contextlib

    # a transformers that cannot load its Auto classes is skipped here; the explicit import says why
    with contextlib.suppress(ImportError):
        import owl2.integrations.transformers  # noqa: F401
