"""A tiny random-init model with the real LLaMA-2 tokenizer, and a small image/text data set, for training tests."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from owl2.model.config import AbstractorConfig, Owl2Config, VisionConfig

TOKENIZER_DIR = Path(__file__).parents[1] / "fixtures" / "llama2-tokenizer"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "ocean"]


def tiny_config(image_size: int = 28) -> Owl2Config:
    """LLM 64 wide, 2 layers; ViT 32 wide at 28 px (2x2 patches); abstractor 8 queries: 9 positions per image."""
    return Owl2Config(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512,
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=image_size, patch_size=14),
        abstractor=AbstractorConfig(hidden_size=32, encoder_hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=4, intermediate_size=64, num_learnable_queries=8),
    )


def write_model_dir(directory: Path) -> Path:
    """A directory with the tiny config and the tokenizer (no weights: recipes use ``model.init_config``)."""
    directory.mkdir(parents=True, exist_ok=True)
    tiny_config().save(directory)
    for file in TOKENIZER_DIR.iterdir():
        if file.name != "README.md":
            shutil.copy(file, directory / file.name)
    return directory


def write_dataset(directory: Path, multimodal: int = 12, text_only: int = 6) -> Path:
    """Solid-colour images asked about their colour, plus text-only "repeat the word" samples (LLaVA JSON)."""
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    names = list(COLORS)
    for i in range(multimodal):
        name = names[i % len(names)]
        Image.new("RGB", (32 + 4 * (i % 3), 28), COLORS[name]).save(images / f"{i}.png")
        records.append({"id": f"img-{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<|image|>\nWhat colour is the picture?"},
            {"from": "gpt", "value": name}]})
    for i in range(text_only):
        word = WORDS[i % len(WORDS)]
        records.append({"id": f"txt-{i}", "conversations": [
            {"from": "human", "value": f"Repeat the word {word}."}, {"from": "gpt", "value": word}]})
    path = directory / "train.json"
    path.write_text(json.dumps(records))
    return path


def write_recipe(directory: Path, model_dir: Path, data: Path, **sections: dict) -> Path:
    """A TOML recipe for the tiny model; ``sections`` override or add keys (``train={"max_steps": 4}``, ``top`` for
    the top-level keys; a value of ``None`` removes the key)."""
    values = {
        "": {"stage": "stage2", "output_dir": str(directory / "run"), "seed": 0},
        "model": {"init_config": str(model_dir / "config.json"), "tokenizer": str(model_dir)},
        "data": {"path": str(data), "max_length": 128},
        "train": {"batch_size": 2, "grad_accum": 2, "max_steps": 6, "bf16": False, "progress": False,
                  "tensorboard": False},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "weight_decay": 0.0},
    }
    for name, extra in sections.items():
        values.setdefault("" if name == "top" else name, {}).update(extra)
    lines = []
    for name, table in values.items():
        if name:
            lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items() if value is not None]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "recipe.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> tuple[Path, Path]:
    """(model directory, data file), shared by the training tests."""
    root = tmp_path_factory.mktemp("tiny-world")
    return write_model_dir(root / "model"), write_dataset(root / "data")


PYTHON = sys.executable
