"""Load-time swaps of the language model's linear layers for faster inference: weight quantisation (int8, int4),
and oneDNN's prepacked CPU linear for unquantised weights.

The model is written with plain ``nn.Linear``; these functions replace, in place, the decoder's linear layers
(Q/K/V/O including both MAM branches, the MLP) and the LM head, and nothing else: the embeddings, the norms, the
vision encoder and the abstractor keep theirs. Parameter names stay those of the checkpoint.

Decoding reads every LLM weight once per step, so on a CPU its speed is set by the weight bytes and by how close
to the memory bandwidth the matmul kernel streams them. Quantisation modes (:func:`quantize_language_model`;
:func:`quantization` tells which one a model has):

* ``"int8-dynamic"``: int8 weights per output channel, and activations quantised to int8 per call
  (PyTorch's fbgemm dynamic linear). Runs in float32 around the int8 matmul.
* ``"int8"``: weight-only int8 per output channel (:class:`WeightOnlyInt8Linear`); activations stay in the model
  dtype.
* ``"int4"``: weight-only group-wise int4 (:class:`WeightOnlyInt4Linear`, group size 64 by default, about 4.5
  bits per weight); activations stay in the model dtype.

The weight-only modes run torch's packed CPU kernels for decode steps (a few rows) and dequantise layer by layer
for prefill, where a float GEMM is faster. They can be saved (``owl2 convert --quantize``) and loaded back directly
(:func:`quantized_modules`). Quantised models are for inference; int8 also serves as the frozen base of LoRA
training (``owl2.training.lora``).

:func:`pack_for_cpu_inference` (applied by :func:`owl2.load` on the CPU to unquantised weights) gives each linear
layer oneDNN's prepacked weight (:class:`CpuPackedLinear`): the same values, read 1.3-1.8x faster by decode steps.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int8-dynamic", "int8", "int4")
SAVABLE_MODES = ("int8", "int4")


def _per_channel_int8(weight: torch.Tensor, rows_per_chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight ~= q * scale[:, None]``. Works on ``rows_per_chunk`` rows at a
    time, so that the float32 temporaries stay in cache (a whole 7B matrix would need 180 MB of them)."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, device=weight.device)
    for start in range(0, n, rows_per_chunk):
        w = weight[start:start + rows_per_chunk].detach().to(torch.float32, copy=True)
        low, high = torch.aminmax(w, dim=1)
        chunk_scale = (torch.maximum(-low, high) / 127.0).clamp_(min=1e-12)
        w.div_(chunk_scale[:, None]).round_().clamp_(-127, 127)
        q[start:start + rows_per_chunk] = w
        scale[start:start + rows_per_chunk] = chunk_scale
    return q, scale


class DynamicInt8Linear(nn.Module):
    """int8 weights and per-call int8 activations (fbgemm); float32 inside, the input dtype outside."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = _per_channel_int8(linear.weight)
        zero = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():
            # fbgemm's dynamic linear still takes a qint8 tensor; its creation functions are marked deprecated.
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        # reduce_range: 7-bit activations, as torch's own dynamic Linear uses; with 8 bits, AVX2 CPUs without VNNI
        # saturate fbgemm's 16-bit pair sums (logits off by 1.3 on the fixture model, wrong greedy tokens)
        out = torch.ops.quantized.linear_dynamic(flat, self._packed, True)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


# Past this many rows (long prefills) a weight-only layer dequantises its weight into the activation dtype and runs
# the float GEMM: torch's packed int8/int4 CPU kernels stream the weights near the memory bandwidth for a few rows
# but take time in proportion to the rows, while dequantising costs one pass over the weight whatever the rows
# (crossovers measured with benchmarks/quantized_layers.py; int4's unpacking is the costlier, so it switches later).
INT8_KERNEL_MAX_ROWS = 16
INT4_KERNEL_MAX_ROWS = 128

INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_INT4_GROUP_SIZE = 64
# torch's CPU int4 kernel lays out 64 output channels per block on AVX-512 (see _pack_int4).
_INT4_BLOCK = 64


class DequantWorkspace:
    """Scratch memory that the weight-only layers of one model share to dequantise their weights, one layer at a
    time, for inputs of many rows.

    A fresh tensor the size of a 7B layer's weight costs more to fault in than to fill (40 ms for 90 MB on a virtual
    machine), so the layers write into buffers kept here, grown to the largest layer. The dequantised weight is only
    valid until the next layer's forward; a forward that records it for backward gets its own copy instead.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat tensor of ``numel`` elements, reused across calls with the same name, dtype and device."""
        key = (name, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]


class WeightOnlyInt8Linear(nn.Module):
    """int8 weights with per-channel scales; the matmul runs in the activation dtype.

    Buffers: ``qweight`` int8 [out, in], ``scale`` float32 [out] (``weight ~= qweight * scale[:, None]``), ``bias``.
    On the CPU, inputs of at most :data:`INT8_KERNEL_MAX_ROWS` rows use ``torch._weight_int8pack_mm``; larger inputs and
    other devices dequantise the weight and call ``F.linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.workspace: DequantWorkspace | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, workspace: DequantWorkspace | None = None) -> WeightOnlyInt8Linear:
        new = cls(linear.in_features, linear.out_features, device="meta")
        new.workspace = workspace
        new.qweight, new.scale = _per_channel_int8(linear.weight)
        new.bias = None if linear.bias is None else linear.bias.detach().clone()
        return new

    def dequantize(self, dtype: torch.dtype, workspace: DequantWorkspace | None = None) -> torch.Tensor:
        """The weight [out, in] in ``dtype``, written into ``workspace`` when one is given."""
        if workspace is None:
            return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]
        weight = workspace.get("weight", self.qweight.numel(), dtype, self.qweight.device).view(self.qweight.shape)
        return weight.copy_(self.qweight).mul_(self.scale.to(dtype)[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        # torch._weight_int8pack_mm has no backward: when a gradient must flow to x (LoRA adapters training over the
        # frozen int8 base, owl2.training.lora) the dequantising matmul is used.
        needs_grad = torch.is_grad_enabled() and flat.requires_grad
        if flat.device.type == "cpu" and flat.shape[0] <= INT8_KERNEL_MAX_ROWS and not needs_grad:
            out = torch._weight_int8pack_mm(flat, self.qweight, self.scale.to(flat.dtype))
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
        else:
            weight = self.dequantize(flat.dtype, None if needs_grad else self.workspace)
            out = F.linear(flat, weight, None if self.bias is None else self.bias.to(flat.dtype))
        return out.reshape(*x.shape[:-1], self.out_features)


@functools.cache
def _int4_layout_matches_torch() -> bool:
    """Whether torch's CPU int4 packing on this machine is :func:`_pack_int4`'s layout (it is on AVX-512 CPUs; AVX2
    and other CPUs use another one). Checked by packing a small random matrix both ways."""
    q = torch.randint(0, 16, (_INT4_BLOCK, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    return torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).reshape(-1),
                       _pack_int4(q.to(torch.uint8)).reshape(-1))



def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] -> [ceil(N/64), K, 32] uint8, zero rows padding N to a multiple of 64. Byte
    ``(b, k, j)`` holds row ``64b + j`` of column ``k`` in its low nibble and row ``64b + 32 + j`` in its high one:
    the layout of torch's AVX-512 int4 kernel, so that the kernel reads the stored tensor as it is."""
    n, k = q.shape
    q = F.pad(q, (0, 0, 0, -n % _INT4_BLOCK))
    blocks = q.view(-1, _INT4_BLOCK, k).transpose(1, 2)  # [N/64, K, 64]
    half = _INT4_BLOCK // 2
    return (blocks[..., :half] | (blocks[..., half:] << 4)).contiguous()


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """:func:`_pack_int4`'s inverse: [B, K, 32] uint8 -> [64 B, K] uint8 values 0..15 (padding rows included)."""
    blocks = torch.cat([packed & 15, packed >> 4], dim=-1)  # [B, K, 64]
    return blocks.transpose(1, 2).reshape(-1, packed.shape[1])


def _group_int4(weight: torch.Tensor, group_size: int, dtype: torch.dtype,
                rows_per_chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric int4 per group of ``group_size`` inputs:
    ``weight[n, k] ~= (q[n, k] - 8) * scale[n, g] + zero[n, g]``, ``g = k // group_size``.

    Scales and zeros are rounded to bfloat16 before ``q`` is computed, so that a bf16 kernel reproduces exactly the
    weights the stored ``q``, scales and zeros describe. Works on ``rows_per_chunk`` output rows at a time, so that the
    float32 temporaries stay in cache. Returns ``q`` [N, K] uint8 and
    ``scales_and_zeros`` [K / group_size, ceil(N/64) * 64, 2] in ``dtype``.
    """
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
    groups = k // group_size
    scales_and_zeros = torch.zeros(groups, n + (-n % _INT4_BLOCK), 2, dtype=dtype, device=weight.device)
    for start in range(0, n, rows_per_chunk):
        w = weight[start:start + rows_per_chunk].detach().to(torch.float32, copy=True).view(-1, groups, group_size)
        low, high = torch.aminmax(w, dim=-1, keepdim=True)
        scale = ((high - low) / 15).clamp_(min=1e-8).to(torch.bfloat16).float()
        zero = (low + 8 * scale).to(torch.bfloat16).float()
        # q = round((w - zero) / scale + 8), written as one multiply-add on the reciprocal
        inverse = scale.reciprocal()
        torch.addcmul(8 - zero * inverse, w, inverse, out=w).round_().clamp_(0, 15)
        q[start:start + rows_per_chunk] = w.view(-1, k)
        end = start + w.shape[0]
        scales_and_zeros[:, start:end, 0] = scale.squeeze(-1).t().to(dtype)
        scales_and_zeros[:, start:end, 1] = zero.squeeze(-1).t().to(dtype)
    return q, scales_and_zeros


class WeightOnlyInt4Linear(nn.Module):
    """Group-wise int4 weights (round-to-nearest, asymmetric); the matmul runs in the activation dtype.

    Buffers: ``qweight`` uint8 [ceil(out/64), in, 32], two 4-bit values per byte in the layout of
    :func:`_pack_int4`; ``scales_and_zeros`` [in / group_size, ceil(out/64) * 64, 2] in the model dtype
    (``weight[n, k] = (q - 8) * scale + zero`` of group ``k // group_size``); ``bias``. About 4.5 bits per weight
    at group size 64.

    On the CPU, inputs of at most :data:`INT4_KERNEL_MAX_ROWS` rows use ``torch._weight_int4pack_mm_for_cpu`` (on CPUs
    whose torch kernel uses another packing, a repacked copy of the weight is kept for it); larger inputs and other
    devices dequantise the weight into the activation dtype and call ``F.linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int =
                 DEFAULT_INT4_GROUP_SIZE, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        check_int4_shape(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        padded = out_features + (-out_features % _INT4_BLOCK)
        self.register_buffer("qweight", torch.empty(padded // _INT4_BLOCK, in_features, _INT4_BLOCK // 2,
                                                     dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group_size, padded, 2, dtype=dtype,
                                                             device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self._repacked: torch.Tensor | None = None
        self._torch_layout = _int4_layout_matches_torch()  # asked once, not per call (and not inside a compiled graph)
        self.workspace: DequantWorkspace | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_INT4_GROUP_SIZE,
                    workspace: DequantWorkspace | None = None) -> WeightOnlyInt4Linear:
        weight = linear.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        new = cls(linear.in_features, linear.out_features, group_size=group_size, device="meta")
        new.workspace = workspace
        q, new.scales_and_zeros = _group_int4(weight, group_size, dtype)
        new.qweight = _pack_int4(q)
        new.bias = None if linear.bias is None else linear.bias.detach().clone()
        return new

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"

    def dequantize(self, dtype: torch.dtype, workspace: DequantWorkspace | None = None) -> torch.Tensor:
        """The weight [out, in] in ``dtype``, written into ``workspace`` when one is given."""
        blocks, k, half = self.qweight.shape
        padded, device = blocks * _INT4_BLOCK, self.qweight.device
        scale, zero = self.scales_and_zeros.to(dtype).permute(2, 1, 0).contiguous()  # [padded out, groups] each
        offset = zero - 8 * scale
        if workspace is None:
            weight = _unpack_int4(self.qweight).to(dtype)
        else:  # the same steps as _unpack_int4, into reused buffers
            nibbles = workspace.get("nibbles", padded * k, torch.uint8, device).view(blocks, k, 2 * half)
            torch.bitwise_and(self.qweight, 15, out=nibbles[..., :half])
            torch.bitwise_right_shift(self.qweight, 4, out=nibbles[..., half:])
            weight = workspace.get("weight", padded * k, dtype, device).view(blocks, _INT4_BLOCK, k)
            weight.copy_(nibbles.transpose(1, 2))
        grouped = weight.view(padded, -1, self.group_size)
        grouped.mul_(scale[..., None]).add_(offset[..., None])
        return grouped.view(padded, k)[: self.out_features]

    def _kernel_weight(self) -> torch.Tensor:
        """``qweight`` as torch's CPU kernel takes it: [padded out, in / 2] uint8."""
        if self._torch_layout:
            return self.qweight.view(-1, self.in_features // 2)
        if self._repacked is None or self._repacked.device != self.qweight.device:
            self._repacked = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                _unpack_int4(self.qweight).to(torch.int32), 1)
        return self._repacked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        needs_grad = torch.is_grad_enabled() and flat.requires_grad
        bias = None if self.bias is None else self.bias.to(flat.dtype)
        if flat.device.type == "cpu" and flat.shape[0] <= INT4_KERNEL_MAX_ROWS and not needs_grad:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.contiguous(), self._kernel_weight(), self.group_size, self.scales_and_zeros.to(flat.dtype))
            out = out[:, : self.out_features]
            if bias is not None:
                out = out + bias
        else:
            out = F.linear(flat, self.dequantize(flat.dtype, None if needs_grad else self.workspace), bias)
        return out.reshape(*x.shape[:-1], self.out_features)


def check_int4_shape(in_features: int, group_size: int) -> None:
    """Raise ValueError unless int4 groups of ``group_size`` can tile ``in_features`` inputs."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size} is not supported; use one of "
                         f"{', '.join(map(str, INT4_GROUP_SIZES))}")
    if in_features % group_size:
        raise ValueError(f"int4 with group size {group_size} needs layers whose input size is a multiple of it; "
                         f"this model has a layer of {in_features} inputs (choose a smaller group size)")


class CpuPackedLinear(nn.Module):
    """``nn.Linear`` for inference on the CPU with oneDNN's prepacked weight (``torch.ops.mkldnn``).

    The weight is held once, in oneDNN's blocked layout, which decode steps read at 21-28 GB/s where ``F.linear``
    reads the plain layout at 15-18 GB/s (fp32 and bf16, 1-8 rows; docs/benchmarks.md); results equal ``F.linear``
    (bit-equal in bf16). ``state_dict`` gives the plain weight back, so a packed model still saves as it was loaded.
    Inputs that need a gradient, or of another dtype or device, go through ``F.linear`` on the unpacked weight.
    Input [..., in_features], output [..., out_features].
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach()))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight.to_dense()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
            return
        dense = state_dict[prefix + "weight"].to(self.weight.dtype)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(dense)
        if self.bias is not None and prefix + "bias" in state_dict:
            self.bias = state_dict[prefix + "bias"].to(self.bias.dtype).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        if x.device.type != "cpu" or x.dtype != self.weight.dtype or needs_grad:
            return F.linear(x, self.weight.to_dense().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


def language_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers the swaps here replace: every linear of ``model.model.layers`` and
    ``lm_head`` (unless it shares the token embeddings' tensor)."""
    names = [f"model.layers.{name}" for name, module in model.model.layers.named_modules()
             if isinstance(module, nn.Linear)]
    if isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is not model.model.embed_tokens.weight:
        names.append("lm_head")
    return names


def quantizer(mode: str, group_size: int = DEFAULT_INT4_GROUP_SIZE) -> Callable[[nn.Linear], nn.Module]:
    """A function turning one ``nn.Linear`` into its quantised layer of ``mode``; the layers it makes share one
    :class:`DequantWorkspace`."""
    if mode not in MODES:
        raise ValueError(f"unknown quantisation {mode!r}; use one of {', '.join(MODES)}")
    if mode == "int8-dynamic":
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            raise ValueError("int8-dynamic needs PyTorch's fbgemm engine (x86 CPUs); use quantize='int8'")
        return DynamicInt8Linear
    if mode == "int8":
        return functools.partial(WeightOnlyInt8Linear.from_linear, workspace=DequantWorkspace())
    check_int4_shape(0, group_size)
    return functools.partial(WeightOnlyInt4Linear.from_linear, group_size=group_size, workspace=DequantWorkspace())


def check_quantizable(model: nn.Module, mode: str, group_size: int = DEFAULT_INT4_GROUP_SIZE) -> None:
    """Raise ValueError, before any weight is read, when ``mode`` cannot quantise ``model``'s layers."""
    quantizer(mode, group_size)
    if mode == "int4":
        for name in language_linear_names(model):
            check_int4_shape(model.get_submodule(name).in_features, group_size)


def quantize_language_model(model: nn.Module, mode: str = "int8-dynamic", *,
                            group_size: int = DEFAULT_INT4_GROUP_SIZE) -> nn.Module:
    """Replace, in place, the linear layers of ``model.model.layers`` and ``model.lm_head``; returns ``model``.
    ``group_size`` applies to ``"int4"``."""
    check_quantizable(model, mode, group_size)
    make = quantizer(mode, group_size)
    for name in language_linear_names(model):
        model.set_submodule(name, make(model.get_submodule(name)))
    return model


class LayerQuantizer:
    """Quantises the language model's linear layers of ``model`` (built on the meta device) as a checkpoint's tensors
    stream past: :meth:`add` keeps each tensor of such a layer until the layer is complete (for the LLaMA decoder,
    the weight alone: its linears have no bias), then returns the quantised layer. The loader and ``owl2 convert``
    use it, so that the float weights of the whole model are never held at once. Raises ValueError, before any
    tensor is read, when ``mode`` cannot quantise the model's layers."""

    def __init__(self, model: nn.Module, mode: str, group_size: int = DEFAULT_INT4_GROUP_SIZE) -> None:
        check_quantizable(model, mode, group_size)
        self._make = quantizer(mode, group_size)
        self._templates: dict[str, nn.Module] = {name: model.get_submodule(name)
                                                 for name in language_linear_names(model)}
        self._layer_of = {f"{name}.{param}": (name, param)
                          for name, layer in self._templates.items() for param, _ in layer.named_parameters()}
        self._arrived: dict[str, dict[str, torch.Tensor]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._layer_of

    def add(self, key: str, tensor: torch.Tensor) -> tuple[str, nn.Module] | None:
        """Take the float tensor ``key`` of a layer (already in its dtype and device); once the layer is complete,
        return its name and its quantised layer, else None."""
        name, param = self._layer_of[key]
        arrived = self._arrived.setdefault(name, {})
        arrived[param] = tensor
        template = self._templates[name]
        if len(arrived) < len(dict(template.named_parameters())):
            return None
        del self._arrived[name]
        linear = nn.Linear(template.in_features, template.out_features, bias=template.bias is not None, device="meta")
        for param_name, value in arrived.items():
            setattr(linear, param_name, nn.Parameter(value, requires_grad=False))
        return name, self._make(linear)


def quantized_modules(model: nn.Module, mode: str, group_size: int = DEFAULT_INT4_GROUP_SIZE) -> nn.Module:
    """Replace the language model's linear layers of ``model`` (built on the meta device) with empty quantised layers
    of ``mode``, so that a checkpoint saved quantised loads into them key by key; returns ``model``."""
    if mode not in SAVABLE_MODES:
        raise ValueError(f"a checkpoint cannot hold {mode!r} weights; saved quantisations: {', '.join(SAVABLE_MODES)}")
    check_quantizable(model, mode, group_size)
    workspace = DequantWorkspace()
    for name in language_linear_names(model):
        linear = model.get_submodule(name)
        bias = linear.bias is not None
        if mode == "int8":
            new: nn.Module = WeightOnlyInt8Linear(linear.in_features, linear.out_features, bias, device="meta")
        else:
            new = WeightOnlyInt4Linear(linear.in_features, linear.out_features, bias, group_size, device="meta")
        new.workspace = workspace
        model.set_submodule(name, new)
    return model


def quantization_settings(model: nn.Module) -> dict[str, object] | None:
    """What a saved checkpoint records of ``model``'s quantisation (``{"mode": ..., "group_size": ...}``), or None
    when it is not quantised. Raises ValueError for a mode that cannot be saved (fbgemm's packed int8-dynamic)."""
    mode = quantization(model)
    if mode is None:
        return None
    if mode not in SAVABLE_MODES:
        raise ValueError(f"a model quantised {mode!r} cannot be saved; use int8 or int4")
    if mode == "int8":
        return {"mode": mode}
    sizes = {m.group_size for m in model.modules() if isinstance(m, WeightOnlyInt4Linear)}
    return {"mode": mode, "group_size": sizes.pop()}


def pack_for_cpu_inference(model: nn.Module) -> nn.Module:
    """Give the language model's unquantised linear layers oneDNN's prepacked weight (:class:`CpuPackedLinear`)
    when they are float32 or bfloat16 on the CPU and oneDNN is available; otherwise leave ``model`` as it is.
    Returns ``model``. For inference: the packed layers hold no ``nn.Parameter`` for an optimizer to train."""
    if not torch.backends.mkldnn.is_available():
        return model
    for name in language_linear_names(model):
        linear = model.get_submodule(name)
        if (type(linear) is nn.Linear and linear.weight.device.type == "cpu"
                and linear.weight.dtype in (torch.float32, torch.bfloat16)):
            model.set_submodule(name, CpuPackedLinear(linear))
    return model


def quantization(model: nn.Module) -> str | None:
    """The mode :func:`quantize_language_model` gave ``model``, read from the types of its layers (adapters wrapped
    around them included); None when it is not quantised."""
    for module in model.modules():
        for kind, mode in ((DynamicInt8Linear, "int8-dynamic"), (WeightOnlyInt8Linear, "int8"),
                           (WeightOnlyInt4Linear, "int4")):
            if isinstance(module, kind):
                return mode
    return None

