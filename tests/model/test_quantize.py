"""Quantisation of the LLM's linear layers (int8, int4) and the prepacked CPU layers: what is replaced, the kernels
against the plain arithmetic they stand for, and the accuracy cost on the fixtures."""

from __future__ import annotations

import pytest
import torch

import owl2
from owl2.model import quantize as q
from owl2.model.quantize import (
    CpuPackedLinear,
    DequantWorkspace,
    DynamicInt8Linear,
    WeightOnlyInt4Linear,
    WeightOnlyInt8Linear,
)
from tests.conftest import OFFICIAL_TINY, left_pad, max_abs, official, random_official_ids

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
    with pytest.raises(ValueError, match="unknown quantisation 'int3'"):
        owl2.load_model(OFFICIAL_TINY, show_progress=False, quantize="int3")
    with pytest.raises(ValueError, match="group size 48 is not supported"):
        owl2.load_model(OFFICIAL_TINY, show_progress=False, quantize="int4", group_size=48)
    with pytest.raises(ValueError, match="layer of 64 inputs"):
        owl2.load_model(OFFICIAL_TINY, show_progress=False, quantize="int4", group_size=128)


# Measured on the fixture model (random weights, logits up to 4.1): int4 at group 64 moves logits by up to 0.84 and
# group 32 by up to 0.67, against 0.06 for bf16 alone. Random weights spread evenly over their range, which is
# the worst case for 4 bits, and the model's logits are nearly flat: the first greedy token of the image prompt
# changes in bf16 (the text prompt keeps 7 of 8). owl2-tiny's held-out accuracy is in docs/benchmarks.md.
INT4_LOGIT_TOL = {32: 0.75, 64: 0.95}


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_int4_stays_within_its_measured_error(oracle, group_size, dtype):
    model = owl2.load_model(OFFICIAL_TINY, dtype=dtype, show_progress=False, quantize="int4", group_size=group_size)
    layers = [m for m in model.modules() if isinstance(m, WeightOnlyInt4Linear)]
    assert len(layers) == 9 * model.config.num_hidden_layers + 1
    assert {m.group_size for m in layers} == {group_size}
    errors = []
    for case, batch in [
        ("logits_image", official(oracle["input_ids_image"], pixel_values=oracle["image"])),
        ("logits_text", official(oracle["input_ids_text"])),
        ("logits_batch", official(oracle["input_ids_batch"], pixel_values=oracle["images_batch"])),
    ]:
        errors.append(max_abs(model(**batch).logits, oracle[case]))
    assert max(errors) < INT4_LOGIT_TOL[group_size]
    assert min(errors) > 0.1  # the weights really are 4-bit: bf16 alone stays under 0.07


def _linear(out_features: int, in_features: int, dtype: torch.dtype, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features, bias=True).to(dtype)


def test_int4_quantisation_is_round_to_nearest_per_group():
    linear = _linear(100, 128, torch.float32)
    layer = WeightOnlyInt4Linear.from_linear(linear, group_size=32)
    weight = linear.weight.detach().view(100, 4, 32)
    dequantised = layer.dequantize(torch.float32).view(100, 4, 32)
    # each group's 16 levels span its own range: error at most half a level (plus the bf16 rounding of the scale)
    step = (weight.amax(-1) - weight.amin(-1)) / 15
    assert ((dequantised - weight).abs().amax(-1) <= step * 0.5 * 1.01 + 1e-6).all()
    assert dequantised.shape == (100, 4, 32)  # the 28 padding rows (to 128) are cut off
    scale_and_zero = layer.scales_and_zeros
    assert torch.equal(scale_and_zero, scale_and_zero.to(torch.bfloat16).float())  # what a bf16 kernel reads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["int8", "int4"])
@torch.no_grad()
def test_kernel_rows_and_dequantised_rows_compute_the_same_layer(kind, dtype):
    linear = _linear(200, 256, dtype)
    workspace = DequantWorkspace()
    layer = (WeightOnlyInt8Linear.from_linear(linear, workspace) if kind == "int8"
             else WeightOnlyInt4Linear.from_linear(linear, 64, workspace))
    limit = q.INT8_KERNEL_MAX_ROWS if kind == "int8" else q.INT4_KERNEL_MAX_ROWS
    x = torch.randn(limit + 5, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    reference = torch.nn.functional.linear(x.float(), layer.dequantize(torch.float32), linear.bias.float())
    tol = 1e-4 if dtype == torch.float32 else 0.05
    for rows in (1, 3, limit, limit + 1, limit + 5):  # the packed kernel up to the limit, dequantised past it
        out = layer(x[:rows, None])
        assert out.shape == (rows, 1, 200) and out.dtype == dtype
        assert max_abs(out.squeeze(1), reference[:rows]) < tol * reference.abs().max().item()
    assert torch.equal(layer.dequantize(dtype, workspace), layer.dequantize(dtype))  # reused buffers, same values


def test_int4_layers_share_one_workspace_and_a_gradient_gets_its_own_weight():
    model = owl2.load_model(OFFICIAL_TINY, show_progress=False, quantize="int4", group_size=32)
    workspaces = {id(m.workspace) for m in model.modules() if isinstance(m, WeightOnlyInt4Linear)}
    assert len(workspaces) == 1
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(300, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    # d(sum(x W^T))/dx = column sums of W for every row, computed from a weight no later layer overwrote
    expected = layer.dequantize(torch.float32).sum(0).expand(300, -1)
    model.model.layers[0].mlp.up_proj(torch.randn(300, layer.out_features))  # reuses the workspace
    assert torch.allclose(x.grad, expected, atol=1e-5)


def test_the_int4_layout_is_torchs_on_avx512_cpus():
    if not q._int4_layout_matches_torch():
        pytest.skip("this CPU's torch int4 kernel packs another layout (the layer keeps a repacked copy)")
    values = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(2))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
    assert torch.equal(q._pack_int4(values.to(torch.uint8)).view(128, 32), packed)
    assert torch.equal(q._unpack_int4(q._pack_int4(values[:100].to(torch.uint8)))[:100], values[:100].to(torch.uint8))


@torch.no_grad()
def test_streamed_quantisation_equals_quantising_the_loaded_model():
    streamed = owl2.load_model(OFFICIAL_TINY, dtype=torch.bfloat16, show_progress=False, quantize="int4",
                               group_size=32)
    after = q.quantize_language_model(owl2.load_model(OFFICIAL_TINY, dtype=torch.bfloat16, show_progress=False),
                                      "int4", group_size=32)
    a, b = streamed.state_dict(), after.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert q.quantization_settings(streamed) == {"mode": "int4", "group_size": 32}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_packed_cpu_layers_compute_and_save_as_the_plain_model(oracle, dtype):
    plain = owl2.load_model(OFFICIAL_TINY, dtype=dtype, show_progress=False)
    packed = q.pack_for_cpu_inference(owl2.load_model(OFFICIAL_TINY, dtype=dtype, show_progress=False))
    names = [name for name, m in packed.named_modules() if isinstance(m, CpuPackedLinear)]
    assert len(names) == 9 * packed.config.num_hidden_layers + 1
    assert not any(name.startswith(("model.vision_model", "model.visual_abstractor")) for name in names)
    a, b = plain.state_dict(), packed.state_dict()  # same names, same values: a packed model saves as loaded
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    batch = official(oracle["input_ids_batch"], pixel_values=oracle["images_batch"])
    if dtype == torch.bfloat16:  # oneDNN's bf16 kernel accumulates as F.linear does
        assert torch.equal(packed(**batch).logits, plain(**batch).logits)
    else:
        assert max_abs(packed(**batch).logits, plain(**batch).logits) < 1e-4
    image = official(oracle["input_ids_image"], pixel_values=oracle["image"])
    assert torch.equal(packed.generate(**image, max_new_tokens=8), plain.generate(**image, max_new_tokens=8))


@torch.no_grad()
def test_batched_bf16_rows_compute_as_they_do_alone():
    """bf16 rows in a batch on the packed CPU layers (prefill, then decode steps of 8 rows, where the few-row
    kernels and SDPA's batched path run) get the logits they get alone, to bf16 precision."""
    model = q.pack_for_cpu_inference(owl2.load_model(OFFICIAL_TINY, dtype=torch.bfloat16, show_progress=False))
    g = torch.Generator().manual_seed(3)
    rows = [random_official_ids(g, 6 + 2 * i, 0, model.config.vocab_size) for i in range(8)]
    fed = torch.randint(3, model.config.vocab_size, (8, 4), generator=g)  # the same next tokens in both runs

    def run(ids: torch.Tensor, mask: torch.Tensor | None, tokens: torch.Tensor) -> list[torch.Tensor]:
        cache = model.new_cache(ids.shape[0], ids.shape[1] + 4)
        logits = [model(**official(ids, attention_mask=mask), cache=cache, logits_to_keep=1).logits[:, -1]]
        for step in range(3):
            logits.append(model(tokens[:, step, None], cache=cache, logits_to_keep=1).logits[:, -1])
        return logits

    together = run(*left_pad(rows), fed)
    for i, row in enumerate(rows):
        alone = run(row[None], None, fed[i:i + 1])
        for step in range(4):
            assert max_abs(together[step][i:i + 1], alone[step]) < 0.08, (i, step)


@torch.no_grad()
def test_int4_layers_repack_for_cpus_whose_kernel_takes_another_layout():
    """On CPUs without AVX-512 torch's int4 kernel packs another layout; the layer then hands it a copy packed by
    torch itself, from the stored values. Forced here on one layer: the kernel path must compute what it computes
    on the stored layout, and the stored tensors stay as they were (so the model saves the same)."""
    linear = _linear(200, 256, torch.bfloat16)
    native = WeightOnlyInt4Linear.from_linear(linear, 64)
    other = WeightOnlyInt4Linear.from_linear(linear, 64)
    if not native._torch_layout:
        pytest.skip("this CPU already takes the repacked path")
    other._torch_layout = False
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    assert torch.equal(other(x), native(x))
    assert other._repacked is not None and other._repacked.data_ptr() != other.qweight.data_ptr()
    assert torch.equal(other.qweight, native.qweight)
