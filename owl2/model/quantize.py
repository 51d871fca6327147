"""Load-time swaps of the language model's linear layers for faster CPU decoding: int8 quantisation, and the bf16
kernel choice for a few rows.

The model is written with plain ``nn.Linear``; these functions replace, in place, the decoder's linear layers
(Q/K/V/O including both MAM branches, the MLP) and the LM head, and nothing else: the embeddings, the norms, the
vision encoder and the abstractor keep theirs. Parameter names do not change.

:func:`use_cpu_bf16_kernels` (applied by :func:`owl2.load_model` to a bf16 model on the CPU) keeps the bf16 weights
and changes only the kernel of inputs of a few rows (:class:`CpuBf16Linear`).

Decoding reads every LLM weight once per step, so on a CPU its speed is set by weight bytes. Two quantisation modes
(:func:`quantize_language_model`; :func:`quantization` tells which one a model has):

* ``"int8-dynamic"``: int8 weights per output channel, and activations quantised to int8 per call
  (PyTorch's fbgemm dynamic linear). Fastest on x86 CPUs. Runs in float32 around the int8 matmul.
* ``"int8"``: weight-only int8 per output channel; activations stay in the model dtype. With bf16 activations on
  the CPU it uses ``torch._weight_int8pack_mm``; elsewhere it dequantises in the matmul.

The quantised model is for inference: it cannot be trained or saved as a checkpoint. The accuracy cost on the
fixture model and the speed are in the README and ``benchmarks/decode.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int8-dynamic", "int8")


def _per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight ~= q * scale[:, None]``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
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


class WeightOnlyInt8Linear(nn.Module):
    """int8 weights with per-channel scales; the matmul runs in the activation dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = _per_channel_int8(linear.weight)
        self.register_buffer("qweight", q.to(linear.weight.device))
        self.register_buffer("scale", scale.to(linear.weight.device))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        # torch._weight_int8pack_mm has no backward; when a gradient must flow to x (LoRA adapters training over
        # the frozen int8 base, owl2.training.lora) the dequantising matmul below is used instead.
        needs_grad = torch.is_grad_enabled() and flat.requires_grad
        if flat.device.type == "cpu" and flat.dtype == torch.bfloat16 and not needs_grad:
            out = torch._weight_int8pack_mm(flat, self.qweight, self.scale.to(flat.dtype))
        else:
            out = F.linear(flat, self.qweight.to(flat.dtype)) * self.scale.to(flat.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


# At or below this many rows, bf16 matmuls on the CPU avoid F.linear (see CpuBf16Linear).
_FEW_ROWS = 8


class CpuBf16Linear(nn.Linear):
    """``nn.Linear`` that picks a faster CPU kernel for bf16 inputs of a few rows (decode steps).

    With torch 2.13 on the CPU, ``F.linear`` streams bf16 weights at about 16 GB/s for 1-8 rows, and on a strided
    [B, 1, D] view it copies the whole weight first. ``torch.mv`` (one row) and ``weight @ x.T`` (2-8 rows) read
    the same weights 25-40 % faster (measured on Zen 4 with weights that do not fit in cache). Other dtypes,
    devices and larger inputs use ``F.linear`` unchanged, so a swapped model moved elsewhere still computes as
    ``nn.Linear`` does. Input [..., in_features], output [..., out_features].
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> CpuBf16Linear:
        """The same layer, sharing ``linear``'s parameters (a tied LM head stays tied to the embeddings)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if x.dtype != torch.bfloat16 or x.device.type != "cpu" or not 0 < rows <= _FEW_ROWS:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1])
        out = torch.mv(self.weight, flat[0])[None] if rows == 1 else (self.weight @ flat.T).T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def _swap_language_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Replace each ``nn.Linear`` of ``model.model.layers`` and ``model.lm_head`` by ``make(linear)``, in place."""
    for parent in [*model.model.layers, model]:
        targets = [(name, module) for name, module in parent.named_modules()
                   if isinstance(module, nn.Linear) and (parent is not model or name == "lm_head")]
        for name, module in targets:
            owner_name, _, attr = name.rpartition(".")
            owner = parent.get_submodule(owner_name) if owner_name else parent
            setattr(owner, attr, make(module))


def use_cpu_bf16_kernels(model: nn.Module) -> nn.Module:
    """Give the language model's linear layers the few-row bf16 kernel (:class:`CpuBf16Linear`) when its weights
    (read from the token embeddings, which are never swapped) are bf16 on the CPU; otherwise leave ``model`` as it
    is. Returns ``model``. Layers already swapped or quantised are left alone."""
    weight = model.model.embed_tokens.weight
    if weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
        _swap_language_linears(model, lambda linear: linear if isinstance(linear, CpuBf16Linear)
                               else CpuBf16Linear.from_linear(linear))
    return model


def quantize_language_model(model: nn.Module, mode: str = "int8-dynamic") -> nn.Module:
    """Replace, in place, the linear layers of ``model.model.layers`` and ``model.lm_head``; returns ``model``."""
    if mode not in MODES:
        raise ValueError(f"unknown quantisation {mode!r}; use one of {', '.join(MODES)}")
    if mode == "int8-dynamic" and "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ValueError("int8-dynamic needs PyTorch's fbgemm engine (x86 CPUs); use quantize='int8'")
    _swap_language_linears(model, DynamicInt8Linear if mode == "int8-dynamic" else WeightOnlyInt8Linear)
    return model


def quantization(model: nn.Module) -> str | None:
    """The mode :func:`quantize_language_model` gave ``model``, read from the types of its layers (adapters wrapped
    around them included); None when it is not quantised."""
    for module in model.modules():
        if isinstance(module, DynamicInt8Linear):
            return "int8-dynamic"
        if isinstance(module, WeightOnlyInt8Linear):
            return "int8"
    return None
