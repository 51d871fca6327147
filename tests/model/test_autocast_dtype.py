"""Under bf16 autocast every modality path of the MAM K/V projections gives one dtype (the branches' own), so image
batches train like text batches. Checked with CPU autocast; the same code runs under CUDA autocast."""

from __future__ import annotations

import pytest
import torch

import owl2
from owl2.model import init_weights
from owl2.model.llama import ModalityRoute, MultiwayLinear
from tests.conftest import TINY_CONFIG, official, random_official_ids

pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
MASKS = {"text": None, "image": torch.ones(2, 4, dtype=torch.bool), "mixed": MIXED}


def _layer() -> MultiwayLinear:
    torch.manual_seed(0)
    return MultiwayLinear(8, 6, bias=True)


@pytest.mark.parametrize("autocast", [True, False])
def test_every_modality_path_returns_the_branch_dtype(autocast):
    layer, x = _layer(), torch.randn(2, 4, 8)
    expected = torch.bfloat16 if autocast else torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        dtypes = {name: layer(x, ModalityRoute.from_image_mask(mask)).dtype for name, mask in MASKS.items()}
    assert dtypes == dict.fromkeys(MASKS, expected)


def test_mixed_rows_equal_each_branch_under_autocast():
    layer, x = _layer(), torch.randn(2, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = layer(x, ModalityRoute.from_image_mask(MIXED))
        text, image = layer.multiway[0](x), layer.multiway[1](x)
    assert torch.equal(mixed[MIXED], image[MIXED]) and torch.equal(mixed[~MIXED], text[~MIXED])


def test_mixed_path_backpropagates_to_both_branches_under_autocast():
    layer, x = _layer(), torch.randn(2, 4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, ModalityRoute.from_image_mask(MIXED))
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    assert x.grad is not None and x.grad.dtype == torch.float32


def test_model_kv_projections_keep_one_dtype_for_text_and_image_batches():
    """The whole model in training mode, as the trainer runs it: every K/V projection of an image batch returns
    what it returns for a text batch."""
    model = init_weights(owl2.Owl2ForCausalLM(TINY_CONFIG), seed=0).train()
    seen: dict[str, set[torch.dtype]] = {"text": set(), "image": set()}
    current = ["text"]

    def record(_module, _inputs, output):
        seen[current[0]].add(output.dtype)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, MultiwayLinear)]
    g = torch.Generator().manual_seed(0)
    size = TINY_CONFIG.vision.image_size
    batches = {"text": official(random_official_ids(g, 10, 0, TINY_CONFIG.vocab_size)[None]),
               "image": official(random_official_ids(g, 10, 1, TINY_CONFIG.vocab_size)[None],
                                 pixel_values=torch.randn(1, 3, size, size, generator=g))}
    try:
        for name, batch in batches.items():
            current[0] = name
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(**batch).logits
            logits.float().sum().backward()
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {"text": {torch.bfloat16}, "image": {torch.bfloat16}}
