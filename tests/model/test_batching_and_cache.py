"""Mixed batches, left padding, the KV cache and the MAM routing."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import owl2
from owl2.model.config import Owl2Config
from owl2.model.llama import ModalityRoute, MultiwayLinear, MultiwayRMSNorm
from tests.conftest import OFFICIAL_TINY, left_pad, max_abs, official, random_official_ids, randomize_

ROW_TOL = 2e-5


def mixed_rows(model: owl2.Owl2ForCausalLM, seed: int = 0):
    """Three rows: text only, one image, two images; different lengths."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    size = model.config.vision.image_size
    rows = [random_official_ids(g, n_text, n_images, vocab) for n_text, n_images in ((12, 0), (7, 1), (4, 2))]
    images = [torch.randn(n, 3, size, size, generator=g) for n in (0, 1, 2)]
    return rows, images


def row_alone(model, row, images):
    return official(row[None], pixel_values=images if len(images) else None, config=model.config)


@torch.no_grad()
def test_mixed_left_padded_batch_equals_each_row_alone(tiny_fp32):
    rows, images = mixed_rows(tiny_fp32)
    ids, mask = left_pad(rows)
    batch = official(ids, mask, pixel_values=torch.cat(images))
    logits = tiny_fp32(**batch).logits
    new = tiny_fp32.generate(**batch, max_new_tokens=6)
    for i, (row, imgs) in enumerate(zip(rows, images, strict=True)):
        alone = row_alone(tiny_fp32, row, imgs)
        length = alone["input_ids"].shape[1]
        assert max_abs(logits[i, -length:], tiny_fp32(**alone).logits[0]) < ROW_TOL
        assert torch.equal(new[i], tiny_fp32.generate(**alone, max_new_tokens=6)[0])


@torch.no_grad()
def test_right_padding_in_forward_gives_row_logits(tiny_fp32):
    rows, images = mixed_rows(tiny_fp32, seed=1)
    batch = official(
        torch.nn.utils.rnn.pad_sequence(rows, batch_first=True),
        torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True),
        pixel_values=torch.cat(images),
        config=tiny_fp32.config,
    )
    logits = tiny_fp32(**batch).logits
    for i, (row, imgs) in enumerate(zip(rows, images, strict=True)):
        alone = tiny_fp32(**row_alone(tiny_fp32, row, imgs)).logits[0]
        assert max_abs(logits[i, : alone.shape[0]], alone) < ROW_TOL
    with pytest.raises(ValueError, match="left-padded"):
        tiny_fp32.generate(**batch, max_new_tokens=2)


class CountCalls:
    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, *args) -> None:
        self.calls += 1


@torch.no_grad()
def test_text_only_input_never_runs_the_vision_tower(tiny_fp32):
    counter = CountCalls(tiny_fp32.model.vision_model)
    try:
        batch = official(torch.tensor([[1, 5, 6, 7, 8]]))
        tiny_fp32(**batch)
        tiny_fp32.generate(**batch, max_new_tokens=3)
        assert counter.calls == 0
        rows, images = mixed_rows(tiny_fp32)
        ids, mask = left_pad(rows)
        tiny_fp32.generate(**official(ids, mask, torch.cat(images)),
                           max_new_tokens=3)
        assert counter.calls == 1  # one batched encode of the 3 images for the whole generation
    finally:
        counter.handle.remove()


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def test_routing_needs_no_per_layer_host_sync(tiny_fp32):
    rows, images = mixed_rows(tiny_fp32)
    ids, mask = left_pad(rows)
    batch = official(ids, mask, torch.cat(images))
    cache = tiny_fp32.new_cache(3, batch["input_ids"].shape[1] + 2)
    with OpCounter() as prefill:
        out = tiny_fp32(**batch, cache=cache, logits_to_keep=1)
    # Two nonzero calls for the whole forward (text rows, image rows), not per layer or per module.
    assert prefill.counts.get("nonzero", 0) == 2
    with OpCounter() as step:
        tiny_fp32(out.logits[:, -1].argmax(-1, keepdim=True), cache=cache, logits_to_keep=1)
    assert step.counts.get("nonzero", 0) == 0
    assert step.counts.get("_local_scalar_dense", 0) == 0  # no .item()/bool() sync in a decode step


def test_multiway_routing_equals_per_token_selection():
    g = torch.Generator().manual_seed(0)
    linear = randomize_(MultiwayLinear(8, 6, bias=True))
    norm = randomize_(MultiwayRMSNorm(8, 1e-6))
    x = torch.randn(3, 5, 8, generator=g)
    image_mask = torch.rand(3, 5, generator=g) > 0.5
    route = ModalityRoute.from_image_mask(image_mask)
    m = image_mask[..., None]
    expected = torch.where(m, linear.multiway[1](x), linear.multiway[0](x))
    assert max_abs(linear(x, route), expected) < 1e-6
    expected = torch.where(m, norm.multiway[1](x), norm.multiway[0](x))
    assert max_abs(norm(x, route), expected) == 0.0
    text = ModalityRoute.from_image_mask(torch.zeros(3, 5, dtype=torch.bool))
    assert text.text_only
    assert torch.equal(linear(x, text), linear.multiway[0](x))


@torch.no_grad()
def test_cache_keeps_modality_and_is_reused(tiny_fp32, oracle):
    batch = official(oracle["input_ids_image"], pixel_values=oracle["image"])
    length = batch["input_ids"].shape[1]
    cache = tiny_fp32.new_cache(1, length + 8)
    first = tiny_fp32.generate(**batch, max_new_tokens=8, cache=cache)
    assert cache.length == length + 7 and int(cache.next_position[0]) == length + 7
    storage = cache.keys.data_ptr()
    second = tiny_fp32.generate(**batch, max_new_tokens=8, cache=cache)
    assert torch.equal(first, second) and torch.equal(first, oracle["generate_new_tokens"])
    assert cache.keys.data_ptr() == storage


@torch.no_grad()
def test_chunked_prefill_equals_single_pass(tiny_fp32):
    rows, images = mixed_rows(tiny_fp32, seed=3)
    full = official(rows[2][None], pixel_values=images[2])
    ids = full["input_ids"]
    expected = tiny_fp32(**full).logits
    per_image = tiny_fp32.config.tokens_per_image
    split = 1 + per_image + 1  # BOS, the first image, one text token; the second image arrives in chunk two
    cache = tiny_fp32.new_cache(1, ids.shape[1])
    a = tiny_fp32(ids[:, :split], pixel_values=images[2][:1], cache=cache).logits
    b = tiny_fp32(ids[:, split:], pixel_values=images[2][1:], cache=cache).logits
    assert max_abs(torch.cat([a, b], 1), expected) < ROW_TOL


@torch.no_grad()
def test_left_padded_cache_decode_with_full_attention_mask(tiny_fp32):
    """HF-style callers pass the mask of cached + new positions; only the new part is read."""
    rows, images = mixed_rows(tiny_fp32, seed=4)
    ids, mask = left_pad(rows)
    batch = official(ids, mask, torch.cat(images))
    cache = tiny_fp32.new_cache(3, batch["input_ids"].shape[1] + 1)
    out = tiny_fp32(**batch, cache=cache)
    step_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    full_mask = torch.cat([batch["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1)
    step = tiny_fp32(step_ids, full_mask, cache=cache).logits
    no_cache = tiny_fp32(torch.cat([batch["input_ids"], step_ids], 1), full_mask, batch["pixel_values"]).logits
    assert max_abs(step[:, -1], no_cache[:, -1]) < ROW_TOL


def gqa_config() -> Owl2Config:
    config = Owl2Config.from_json(OFFICIAL_TINY)
    config.num_key_value_heads = 2
    config.validate()
    return config


@torch.no_grad()
def test_grouped_query_attention_config():
    model = randomize_(owl2.Owl2ForCausalLM(gqa_config()), seed=5).eval()
    assert model.model.layers[0].self_attn.k_proj.multiway[1].weight.shape == (2 * 16, 64)
    rows, images = mixed_rows(model, seed=5)
    ids, mask = left_pad(rows)
    batch = official(ids, mask, torch.cat(images), config=model.config)
    new = model.generate(**batch, max_new_tokens=4)
    nocache = model.generate(**batch, max_new_tokens=4, use_cache=False)
    assert torch.equal(new, nocache)
    for i, (row, imgs) in enumerate(zip(rows, images, strict=True)):
        assert torch.equal(new[i], model.generate(**row_alone(model, row, imgs), max_new_tokens=4)[0])


@torch.no_grad()
def test_fp16_weights_run_close_to_fp32(tiny_fp32, oracle):
    model = owl2.load_model(OFFICIAL_TINY, dtype=torch.float16, show_progress=False)
    assert model.dtype == torch.float16
    batch = official(oracle["input_ids_image"], pixel_values=oracle["image"])
    logits = model(**batch).logits
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()
    assert max_abs(logits, oracle["logits_image"]) < 0.05


@torch.no_grad()
def test_eos_stops_rows_and_pads(tiny_fp32, oracle):
    batch = official(oracle["input_ids_image"], pixel_values=oracle["image"])
    expected = oracle["generate_new_tokens"][0]
    eos = int(expected[2])  # the third greedy token
    new = tiny_fp32.generate(**batch, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert new.tolist() == [expected[:3].tolist()]


@torch.no_grad()
def test_bad_inputs_raise_clear_errors(tiny_fp32, oracle):
    cfg = tiny_fp32.config
    batch = official(oracle["input_ids_image"], pixel_values=oracle["image"])
    with pytest.raises(ValueError, match=r"2 image\(s\) but 9 image positions"):
        tiny_fp32(batch["input_ids"], pixel_values=torch.cat([oracle["image"]] * 2))
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny_fp32(batch["input_ids"])
    with pytest.raises(ValueError, match=r"pixel_values must have shape \[num_images, 3, 56, 56\]"):
        tiny_fp32(batch["input_ids"], pixel_values=torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\) but 0 image"):
        official(oracle["input_ids_image"], config=cfg)
    with pytest.raises(ValueError, match="negative ids"):
        official(torch.tensor([[1, -5, 3]]), config=cfg)
    cache = tiny_fp32.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache overflow"):
        tiny_fp32(torch.tensor([[1, 2, 3, 4, 5]]), cache=cache)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 320\): \[400\]"):
        tiny_fp32(torch.tensor([[1, 400, 3]]))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        tiny_fp32(torch.tensor([[1, 2, 3]]), torch.ones(1, 2))
