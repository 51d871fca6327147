"""Parity with the official code on the recorded tiny model (tests/fixtures/official-tiny).

fp32 must agree within 1e-4. In bf16 the official code and owl2 round differently (owl2 keeps RoPE tables and
softmax in fp32), so bf16 results are held to the official bf16 run's own distance from the fp32 truth.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import max_abs, official

FP32_TOL = 1e-4
# owl2-bf16 vs official-fp32 may be at most this multiple of official-bf16 vs official-fp32.
BF16_FACTOR = 1.5


def image_batch(oracle, labels: bool = False) -> dict[str, torch.Tensor]:
    ids = oracle["input_ids_image"]
    return official(ids, pixel_values=oracle["image"], labels=ids if labels else None)


CASES = {
    "logits_image": lambda o: official(o["input_ids_image"], pixel_values=o["image"]),
    "logits_text": lambda o: official(o["input_ids_text"]),
    "logits_two_images": lambda o: official(o["input_ids_two_images"], pixel_values=o["images_two"]),
    "logits_batch": lambda o: official(o["input_ids_batch"], pixel_values=o["images_batch"]),
}


@torch.no_grad()
def test_vision_encoder_output(tiny_fp32, oracle):
    out = tiny_fp32.model.vision_model(oracle["image"])
    assert out.shape == oracle["vision_last_hidden_state"].shape
    assert max_abs(out, oracle["vision_last_hidden_state"]) < FP32_TOL


@torch.no_grad()
def test_image_features(tiny_fp32, oracle):
    features = tiny_fp32.model.encode_images(oracle["image"])
    assert features.shape == (1, tiny_fp32.config.tokens_per_image, tiny_fp32.config.hidden_size)
    assert max_abs(features, oracle["image_features"]) < FP32_TOL


@torch.no_grad()
def test_spliced_embeddings_modality_and_hidden_states(tiny_fp32, oracle):
    batch = image_batch(oracle)
    is_image = batch["input_ids"] == tiny_fp32.config.image_token_index
    assert torch.equal(is_image.long(), oracle["modality_indicators"])
    out = tiny_fp32(**batch, output_hidden_states=True)
    assert max_abs(out.hidden_states[0], oracle["inputs_embeds"]) < FP32_TOL
    assert len(out.hidden_states) == oracle["hidden_states_image"].shape[0]
    for ours, theirs in zip(out.hidden_states, oracle["hidden_states_image"], strict=True):
        assert max_abs(ours, theirs) < FP32_TOL


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_logits_fp32(tiny_fp32, oracle, case):
    logits = tiny_fp32(**CASES[case](oracle)).logits
    assert logits.shape == oracle[case].shape
    assert max_abs(logits, oracle[case]) < FP32_TOL


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_logits_bf16(tiny_bf16, oracle, oracle_bf16, case):
    logits = tiny_bf16(**CASES[case](oracle)).logits
    assert logits.dtype == torch.bfloat16
    official_error = max_abs(oracle_bf16[case], oracle[case])
    assert max_abs(logits, oracle[case]) <= BF16_FACTOR * official_error


@torch.no_grad()
def test_loss(tiny_fp32, tiny_bf16, oracle, oracle_bf16):
    loss = tiny_fp32(**image_batch(oracle, labels=True)).loss
    assert loss.item() == pytest.approx(oracle["loss_image"].item(), abs=1e-5)
    loss_bf16 = tiny_bf16(**image_batch(oracle, labels=True)).loss
    official_gap = abs(oracle_bf16["loss_image"].item() - oracle["loss_image"].item())
    assert abs(loss_bf16.item() - oracle["loss_image"].item()) <= max(BF16_FACTOR * official_gap, 1e-2)


@pytest.mark.parametrize("use_cache", [True, False])
@torch.no_grad()
def test_greedy_generation_fp32(tiny_fp32, oracle, use_cache):
    suffix = "" if use_cache else "_nocache"
    out = tiny_fp32.generate(**image_batch(oracle), max_new_tokens=8, use_cache=use_cache, return_dict=True)
    assert torch.equal(out.sequences, oracle[f"generate_new_tokens{suffix}"])
    assert max_abs(out.scores, oracle[f"generate_scores{suffix}"]) < FP32_TOL


@torch.no_grad()
def test_text_only_generation(tiny_fp32, tiny_bf16, oracle, oracle_bf16):
    batch = official(oracle["input_ids_text"])
    out = tiny_fp32.generate(**batch, max_new_tokens=8, return_dict=True)
    assert torch.equal(out.sequences, oracle["generate_text_new_tokens"])
    assert max_abs(out.scores, oracle["generate_text_scores"]) < FP32_TOL
    assert torch.equal(tiny_bf16.generate(**batch, max_new_tokens=8), oracle_bf16["generate_text_new_tokens"])


@pytest.mark.parametrize("use_cache", [True, False])
@torch.no_grad()
def test_greedy_generation_bf16(tiny_bf16, oracle_bf16, use_cache):
    suffix = "" if use_cache else "_nocache"
    new = tiny_bf16.generate(**image_batch(oracle_bf16), max_new_tokens=8, use_cache=use_cache)
    assert torch.equal(new, oracle_bf16[f"generate_new_tokens{suffix}"])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@torch.no_grad()
def test_left_padded_batch_gives_rows_alone_answer(tiny_fp32, tiny_bf16, oracle, oracle_bf16, dtype):
    model, reference = (tiny_fp32, oracle) if dtype == "fp32" else (tiny_bf16, oracle_bf16)
    batch = official(
        oracle["input_ids_leftpad"], oracle["attention_mask_leftpad"], pixel_values=oracle["images_batch"]
    )
    new = model.generate(**batch, max_new_tokens=8)
    # In bf16 a near-tie late in row 1 goes either way with the CPU's bf16 kernels (AVX2 without native bf16 picks
    # the fp32 answer): either rows-alone answer is right, the official padded answer is not.
    alone = [reference["generate_leftpad_rows_alone_new_tokens"], oracle["generate_leftpad_rows_alone_new_tokens"]]
    assert any(torch.equal(new, tokens) for tokens in alone)
    # The official code gets the padded row wrong; make sure the fixture really tells the two apart.
    assert not torch.equal(new, reference["generate_leftpad_official_new_tokens"])


@torch.no_grad()
def test_left_padded_unpadded_row_matches_official(tiny_fp32, oracle):
    batch = official(
        oracle["input_ids_leftpad"], oracle["attention_mask_leftpad"], pixel_values=oracle["images_batch"]
    )
    logits = tiny_fp32(**batch).logits
    assert max_abs(logits[0], oracle["logits_leftpad_official"][0]) < FP32_TOL


def test_sincos_tables_equal_official_buffers(tiny_fp32):
    from safetensors.torch import load_file

    from tests.conftest import OFFICIAL_TINY

    saved = load_file(OFFICIAL_TINY / "model.safetensors")
    for i, layer in enumerate(tiny_fp32.model.visual_abstractor.encoder.layers):
        attention = layer.crossattention.attention
        prefix = f"model.visual_abstractor.encoder.layers.{i}.crossattention.attention."
        assert torch.equal(attention.q_pos_embed, saved[prefix + "q_pos_embed"])
        assert torch.equal(attention.k_pos_embed, saved[prefix + "k_pos_embed"])
    assert torch.equal(tiny_fp32.model.rotary_emb.inv_freq, saved["model.layers.0.self_attn.rotary_emb.inv_freq"])
