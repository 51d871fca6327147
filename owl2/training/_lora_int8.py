"""A peft LoRA layer over our frozen int8 weight-only linear (QLoRA-style training without bitsandbytes).

Imported only by :mod:`owl2.training.lora` once peft is known to be installed: the class derives from peft's
``LoraLayer`` and is registered through ``LoraConfig._register_custom_module``.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import LoraConfig, LoraLayer
from torch import nn


class Int8LoraLinear(nn.Module, LoraLayer):
    """``base(x) + B(A(dropout(x))) * scaling`` with ``base`` a frozen :class:`WeightOnlyInt8Linear`.

    ``x`` [..., in_features] -> [..., out_features] in the dtype of ``base(x)``. The LoRA matrices keep their own
    dtype (float32 unless cast); the input is cast to it for the adapter path. Merging is not offered: an int8
    weight cannot absorb a float update without requantising, so merge the adapter into the float base instead
    (:func:`owl2.training.lora.merge_adapter` does).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # peft only knows the feature sizes of layer types it ships; ours carries them as attributes.
        return module.in_features, module.out_features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        # The base is differentiable in x (WeightOnlyInt8Linear avoids its backward-less kernel when grad is needed).
        result = self.get_base_layer()(x)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](x.to(lora_a.weight.dtype))
            result = result + (lora_b(lora_a(h)) * self.scaling[name]).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "cannot merge a LoRA adapter into an int8 base layer; merge it into the float checkpoint with "
            "owl2.training.lora.merge_adapter (or `owl2 merge`)"
        )

    def unmerge(self) -> None:
        # Nothing is ever merged (see merge), so there is nothing to undo.
        return None

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
