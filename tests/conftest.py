"""Shared fixtures: the official tiny checkpoint and what the official code computed with it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import owl2

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL_TINY = FIXTURES / "official-tiny"
TINY_CONFIG = owl2.Owl2Config.from_json(OFFICIAL_TINY)


def official(input_ids, attention_mask=None, pixel_values=None, *, config=TINY_CONFIG, **kwargs) -> dict:
    """``prepare_official_inputs`` with the tiny fixture's layout unless another config is given."""
    return owl2.prepare_official_inputs(input_ids, attention_mask, pixel_values, config=config, **kwargs)


class Oracle:
    """Arrays recorded from the official code (``oracle_outputs*.npz``), as torch tensors."""

    def __init__(self, path: Path) -> None:
        self._data = np.load(path)

    def __getitem__(self, key: str) -> torch.Tensor:
        return torch.from_numpy(self._data[key])


@pytest.fixture(scope="session")
def oracle() -> Oracle:
    return Oracle(OFFICIAL_TINY / "oracle_outputs.npz")


@pytest.fixture(scope="session")
def oracle_bf16() -> Oracle:
    return Oracle(OFFICIAL_TINY / "oracle_outputs_bf16.npz")


@pytest.fixture(scope="session")
def tiny_fp32() -> owl2.Owl2ForCausalLM:
    return owl2.load_model(OFFICIAL_TINY, dtype=torch.float32, show_progress=False)


@pytest.fixture(scope="session")
def tiny_bf16() -> owl2.Owl2ForCausalLM:
    return owl2.load_model(OFFICIAL_TINY, dtype=torch.bfloat16, show_progress=False)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def random_official_ids(generator: torch.Generator, text_tokens: int, images: int, vocab: int) -> torch.Tensor:
    """BOS, then ``text_tokens`` random ids with ``images`` official placeholders (-200) spread among them."""
    ids = torch.randint(3, vocab, (text_tokens,), generator=generator).tolist()
    for k in range(images):
        ids.insert(1 + k * (len(ids) // max(images, 1)), -200)
    return torch.tensor([1, *ids])


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return ids, mask


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter distinct random values (norm gains near 1), so wrong branches or positions show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_gain = param.ndim == 1 and ("norm" in name or "ln" in name)
            param.copy_(1.0 + 0.1 * noise if is_gain else 0.2 * noise)
    return model


# A tiny random-init checkpoint (real LLaMA-2 tokenizer, 28 px images) for the evaluation and serving tests.
@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from tests.evaluation.conftest import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("eval-model") / "tiny")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint):
    torch.manual_seed(0)
    return owl2.load(tiny_checkpoint, dtype="fp32", device="cpu", show_progress=False)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a shared 2-core
    machine two threads made the small training runs up to 20 times slower (each thread waits on the other's core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def in_thread(function: Callable[[], Any], limit: float = 20.0) -> Any:
    """``function()`` in a thread with a time limit, so that a regression fails instead of hanging the suite; what it
    raised is returned, for the test to check."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(function())
        except BaseException as exc:  # handed to the test
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"still running after {limit} s"
    return result[0]
