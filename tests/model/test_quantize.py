"""int8 quantisation of the LLM's linear layers: what is replaced, and its accuracy cost on the fixtures."""

from __future__ import annotations

import pytest
import torch

import owl2
from owl2.model.quantize import DynamicInt8Linear, WeightOnlyInt8Linear
from tests.conftest import OFFICIAL_TINY, max_abs, official

# Measured cost on the fixture model: logits within 0.21 of fp32 (int8-dynamic's 7-bit activations; weight-only int8
# 0.08; bf16 alone: 0.03-0.06); greedy tokens unchanged.
LOGIT_TOL = 0.25


@pytest.mark.parametrize(("mode", "dtype", "kind"), [("int8-dynamic", torch.float32, DynamicInt8Linear),
                                                     ("int8", torch.bfloat16, WeightOnlyInt8Linear),
                                                     ("int8", torch.float32, WeightOnlyInt8Linear)])
@torch.no_grad()
def test_quantised_model_stays_close_and_keeps_greedy_tokens(oracle, mode, dtype, kind):
    model = owl2.load_model(OFFICIAL_TINY, dtype=dtype, show_progress=False, quantize=mode)
    quantised = [name for name, m in model.named_modules() if isinstance(m, kind)]
    # per layer: q, k (text, image), v (text, image), o, gate, up, down; plus the LM head
    assert len(quantised) == 9 * model.config.num_hidden_layers + 1
    assert not any(name.startswith(("model.vision_model", "model.visual_abstractor")) for name in quantised)
    for case, batch in [
        ("logits_image", official(oracle["input_ids_image"], pixel_values=oracle["image"])),
        ("logits_text", official(oracle["input_ids_text"])),
        ("logits_batch", official(oracle["input_ids_batch"], pixel_values=oracle["images_batch"])),
    ]:
        assert max_abs(model(**batch).logits, oracle[case]) < LOGIT_TOL
    image = official(oracle["input_ids_image"], pixel_values=oracle["image"])
    assert torch.equal(model.generate(**image, max_new_tokens=8), oracle["generate_new_tokens"])
    text = official(oracle["input_ids_text"])
    assert torch.equal(model.generate(**text, max_new_tokens=8), oracle["generate_text_new_tokens"])


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown quantisation 'int4'"):
        owl2.load_model(OFFICIAL_TINY, show_progress=False, quantize="int4")
