"""The documented interface for external checks, exactly as docs/model.md shows it."""

from __future__ import annotations

import torch

import owl2
from tests.conftest import OFFICIAL_TINY


@torch.no_grad()
def test_documented_interface(oracle):
    model = owl2.load_model(str(OFFICIAL_TINY), dtype=torch.float32)
    assert isinstance(model, torch.nn.Module) and not model.training
    batch = owl2.prepare_official_inputs(oracle["input_ids_image"], attention_mask=None, pixel_values=oracle["image"],
                                         config=model.config)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values"}
    out = model(**batch)
    assert out.logits.shape == (1, 14 - 1 + 9, 320)
    new_ids = model.generate(**batch, max_new_tokens=8, eos_token_id=None)
    assert torch.equal(new_ids, oracle["generate_new_tokens"])


def test_inference_interface(tmp_path):
    from tests.conftest import FIXTURES

    tok = owl2.load_tokenizer(FIXTURES / "llama2-tokenizer")
    assert tok.encode_prompt("USER: <|image|>Describe. ASSISTANT:")[:6] == [1, 3148, 1001, 29901, 29871, -200]
    proc = owl2.load_image_processor(FIXTURES / "preproc")
    pixels = proc.preprocess(FIXTURES / "preproc" / "astronaut.png", policy="crop")
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 448, 448)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}},
                                             {"type": "text", "text": "Describe."}]}]
    assert owl2.render_conversation(messages, template="mplug_owl2") == "USER: <|image|>Describe. ASSISTANT:"
    assert callable(owl2.load) and owl2.SamplingParams().max_new_tokens == 256
