"""owl2: mPLUG-Owl2 in plain PyTorch."""

from owl2.checkpoint import CheckpointError, convert_checkpoint, load_model, save_model
from owl2.model import KVCache, Owl2Config, Owl2ForCausalLM, prepare_official_inputs

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "KVCache",
    "Owl2Config",
    "Owl2ForCausalLM",
    "convert_checkpoint",
    "load_model",
    "prepare_official_inputs",
    "save_model",
]
