"""Values shared by processing, data, the model, evaluation and the experiments, defined once.

This module imports nothing, so any part of owl2 can use it without pulling in torch or the tokenizer.
"""

from __future__ import annotations

__all__ = ["DEFAULT_TEMPLATE", "IGNORE_INDEX", "IMAGE_PLACEHOLDER", "IMAGE_TOKEN_INDEX", "OFFICIAL_IMAGE_TOKEN"]

IGNORE_INDEX = -100
"""Label of positions that are not trained on (PyTorch's cross-entropy default)."""

IMAGE_PLACEHOLDER = "<|image|>"
"""The literal the official prompts use where an image goes (not a vocabulary token)."""

OFFICIAL_IMAGE_TOKEN = -200
"""The id the official ``tokenizer_image_token`` puts in place of each ``<|image|>``: official-form ids hold one per
image. owl2's model expands each into ``config.tokens_per_image`` positions holding ``config.image_token_index``."""

IMAGE_TOKEN_INDEX = OFFICIAL_IMAGE_TOKEN
"""The upstream name of :data:`OFFICIAL_IMAGE_TOKEN`."""

DEFAULT_TEMPLATE = "mplug_owl2"
"""owl2's conversation template: the one the official CLI and evaluation use at inference. The official trainer's
``--version v1`` (``vicuna_v1`` with a system prompt) trains on a prompt the model never sees at inference; pass
``template="vicuna_v1"`` to reproduce it anyway."""
