"""int8 quantisation of the language model's linear layers, for faster CPU decoding.

Decoding reads every LLM weight once per step, so on a CPU its speed is set by weight bytes. Two modes replace the
decoder's linear layers (Q/K/V/O including both MAM branches, the MLP) and the LM head; the embeddings, the norms,
the vision encoder and the abstractor stay in floating point:

* ``"int8-dynamic"``: int8 weights per output channel, and activations quantised to int8 per call
  (PyTorch's fbgemm dynamic linear). Fastest on x86 CPUs. Runs in float32 around the int8 matmul.
* ``"int8"``: weight-only int8 per output channel; activations stay in the model dtype. With bf16 activations on
  the CPU it uses ``torch._weight_int8pack_mm``; elsewhere it dequantises in the matmul.

The quantised model is for inference: it cannot be trained or saved as a checkpoint. The accuracy cost on the
fixture model and the speed are in the README and ``benchmarks/decode.py``.
"""

from __future__ import annotations

import warnings

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


def quantize_language_model(model: nn.Module, mode: str = "int8-dynamic") -> nn.Module:
    """Replace, in place, the linear layers of ``model.model.layers`` and ``model.lm_head``; returns ``model``."""
    if mode not in MODES:
        raise ValueError(f"unknown quantisation {mode!r}; use one of {', '.join(MODES)}")
    if mode == "int8-dynamic" and "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ValueError("int8-dynamic needs PyTorch's fbgemm engine (x86 CPUs); use quantize='int8'")
    make = DynamicInt8Linear if mode == "int8-dynamic" else WeightOnlyInt8Linear
    for parent in [*model.model.layers, model]:
        targets = [(name, module) for name, module in parent.named_modules()
                   if isinstance(module, nn.Linear) and (parent is not model or name == "lm_head")]
        for name, module in targets:
            owner_name, _, attr = name.rpartition(".")
            owner = parent.get_submodule(owner_name) if owner_name else parent
            setattr(owner, attr, make(module))
    model.quantization = mode
    return model
