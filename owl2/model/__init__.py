"""The mPLUG-Owl2 architecture in plain PyTorch.

Read top to bottom: ``config`` (one config object), ``vision`` (ViT), ``abstractor`` (visual abstractor), ``llama``
(decoder with the Modality-Adaptive Module), ``cache`` (KV cache), ``modeling`` (everything wired together) and
``inputs`` (official-style ids -> owl2 inputs); ``init`` (random initialisation for training from scratch).
"""

from owl2.constants import IGNORE_INDEX, OFFICIAL_IMAGE_TOKEN
from owl2.model.cache import KVCache
from owl2.model.config import AbstractorConfig, ConfigError, Owl2Config, VisionConfig
from owl2.model.init import copy_text_branch_to_image_branch, init_weights
from owl2.model.inputs import prepare_official_inputs
from owl2.model.modeling import GenerateOutput, Owl2ForCausalLM, Owl2Model, Owl2Output

__all__ = [
    "IGNORE_INDEX",
    "OFFICIAL_IMAGE_TOKEN",
    "AbstractorConfig",
    "ConfigError",
    "GenerateOutput",
    "KVCache",
    "Owl2Config",
    "Owl2ForCausalLM",
    "Owl2Model",
    "Owl2Output",
    "VisionConfig",
    "copy_text_branch_to_image_branch",
    "init_weights",
    "prepare_official_inputs",
]
