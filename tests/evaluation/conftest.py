"""A tiny random-init checkpoint (real LLaMA-2 tokenizer, 28 px images) for running every task end to end."""

from __future__ import annotations

import json
from pathlib import Path

import owl2
from owl2.model import init_weights
from owl2.processing.image import PREPROCESSOR_CONFIG_NAME, ImageProcessor
from owl2.utils import atomic_write_text
from tests.training.conftest import tiny_config, write_model_dir


def write_tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    write_model_dir(directory)
    model = init_weights(owl2.Owl2ForCausalLM(tiny_config()), seed=seed)
    owl2.save_model(model, directory)
    atomic_write_text(directory / PREPROCESSOR_CONFIG_NAME,
                      json.dumps(ImageProcessor(size=28, crop_size=28).to_dict()))
    return directory
