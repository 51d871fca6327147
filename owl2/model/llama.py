"""The LLaMA-2 decoder with the Modality-Adaptive Module (MAM).

Per layer, the MAM gives image positions their own input and post-attention RMSNorm gains and their own K/V
projections (``multiway.1``); text positions use ``multiway.0``. Q, O and the MLP are shared. Which positions are
image positions is decided once per forward (:class:`ModalityRoute`) and reused by every layer, so no layer syncs
with the host:

* all-text input (every decode step, text-only prompts) runs branch 0 directly;
* mixed input gathers the text rows and the image rows once and runs each K/V branch only on its own rows; the norms
  share one normalisation and pick the gain per position.

The linear layers are plain ``nn.Linear``; faster CPU kernels (bf16 decode steps, int8) are swapped in when a model
is loaded (:mod:`owl2.model.quantize`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from owl2.model.config import Owl2Config

TEXT, IMAGE = 0, 1

@dataclass(frozen=True)
class ModalityRoute:
    """Where the image positions of the current chunk are, shared by every layer of one forward.

    ``image_mask`` is ``None`` when every position is text. Otherwise ``text_index``/``image_index`` hold the flat
    (``batch * time``) positions of each modality, found once per forward by one ``nonzero`` per modality: two host
    syncs (one when the mask holds no image position, none without a mask).
    """

    image_mask: torch.Tensor | None = None
    text_index: torch.Tensor | None = None
    image_index: torch.Tensor | None = None

    @classmethod
    def from_image_mask(cls, image_mask: torch.Tensor | None) -> ModalityRoute:
        if image_mask is None:
            return cls()
        flat = image_mask.reshape(-1)
        image_index = flat.nonzero().squeeze(1)
        if image_index.numel() == 0:
            return cls()
        return cls(image_mask, (~flat).nonzero().squeeze(1), image_index)

    @property
    def text_only(self) -> bool:
        return self.image_mask is None


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalise in float32, cast back, then scale (``w * norm(x).to(dtype)``)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self.normalize(x)


class MultiwayRMSNorm(nn.Module):
    """Two RMSNorms (``multiway.0`` text, ``multiway.1`` image) that differ only in their gains.

    ``branches=1`` (the MAM ablation) keeps only ``multiway.0``, shared by every position."""

    def __init__(self, dim: int, eps: float, branches: int = 2) -> None:
        super().__init__()
        self.multiway = nn.ModuleList([RMSNorm(dim, eps) for _ in range(branches)])

    def forward(self, x: torch.Tensor, route: ModalityRoute) -> torch.Tensor:
        text = self.multiway[0]
        normed = text.normalize(x)
        if route.text_only or len(self.multiway) == 1:
            return text.weight * normed
        gain = torch.where(route.image_mask[..., None], self.multiway[1].weight, text.weight)
        return gain * normed


class MultiwayLinear(nn.Module):
    """Two linear maps (``multiway.0`` text, ``multiway.1`` image); each position goes through its own branch::

        y_t = W_0 x_t + b_0   where position t is text
        y_t = W_1 x_t + b_1   where position t is an image's

    ``branches=1`` (the MAM ablation) keeps only ``multiway.0``, shared by every position.

    The output has the dtype the branches compute in on every path (text-only, image-only, mixed): the input's
    outside autocast, the autocast dtype inside it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, branches: int = 2) -> None:
        super().__init__()
        self.out_features = out_features
        self.multiway = nn.ModuleList([nn.Linear(in_features, out_features, bias=bias) for _ in range(branches)])

    def forward(self, x: torch.Tensor, route: ModalityRoute) -> torch.Tensor:
        if route.text_only or len(self.multiway) == 1:
            return self.multiway[0](x)
        text, image = self.multiway
        flat = x.reshape(-1, x.shape[-1])
        text_out = text(flat.index_select(0, route.text_index))
        image_out = image(flat.index_select(0, route.image_index))
        # The buffer takes the branches' dtype, not the input's: under bf16 autocast an fp32 buffer would make image
        # batches fp32 where text batches are bf16, and CUDA autocast does not cast index_copy's source to match.
        out = text_out.new_zeros(flat.shape[0], self.out_features)
        out = out.index_copy(0, route.text_index, text_out)
        out = out.index_copy(0, route.image_index, image_out.to(text_out.dtype))
        return out.view(*x.shape[:-1], self.out_features)


class RotaryEmbedding(nn.Module):
    """RoPE tables in float32 from explicit per-row positions (HF ``rotate_half`` convention)."""

    def __init__(self, config: Owl2Config) -> None:
        super().__init__()
        self.dim = config.head_dim
        self.base = config.rope_theta
        scaling = config.rope_scaling or {}
        self.position_scale = 1.0 / float(scaling.get("factor", 1.0))
        self.register_buffer("inv_freq", torch.empty(self.dim // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        device = self.inv_freq.device
        if device.type == "meta":
            return
        self.inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` [B, T] -> ``cos``, ``sin`` [B, 1, T, head_dim], computed in float32, returned in ``dtype``."""
        t = positions.float()
        if self.position_scale != 1.0:
            t = t * self.position_scale
        freqs = t[..., None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


@dataclass
class AttentionContext:
    """Per-forward inputs shared by all layers."""

    route: ModalityRoute
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None  # bool [B, 1, T, S] (True = attend) or None
    is_causal: bool  # use SDPA's causal mode (only when mask is None and the chunk starts at 0)
    cache_start: int  # where this chunk's keys go in the cache


class Attention(nn.Module):
    def __init__(self, config: Owl2Config) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        d, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        branches = 2 if config.modality_adaptive else 1
        self.k_proj = MultiwayLinear(d, kv, bias=bias, branches=branches)
        self.v_proj = MultiwayLinear(d, kv, bias=bias, branches=branches)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttentionContext,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``x`` [B, T, D] -> [B, T, D]. ``cache`` is this layer's (keys, values) [B, kv_heads, S_max, head_dim]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x, ctx.route).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x, ctx.route).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if cache is not None:
            keys, values = cache
            end = ctx.cache_start + t
            keys[:, :, ctx.cache_start:end] = k
            values[:, :, ctx.cache_start:end] = v
            k, v = keys[:, :, :end], values[:, :, :end]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: Owl2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """LLaMA block whose norms and K/V projections are modality-adaptive (the MAM); x and the output are
    [B, T, hidden]. Parts marked ``text | image`` hold one weight per modality, picked per position by ``ctx.route``;
    the others are shared by every position::

        x ----------------------------------+
        |                                   | residual
        RMSNorm (text | image)              |
        +-- q_proj (shared)                 |
        +-- k_proj (text | image)           |
        +-- v_proj (text | image)           |
        attention (causal, RoPE, KV cache)  |
        o_proj (shared)                     |
        (+) <-------------------------------+
        |-----------------------------------+
        |                                   | residual
        RMSNorm (text | image)              |
        MLP (shared): down(silu(gate(h)) * up(h))
        (+) <-------------------------------+
        output
    """

    def __init__(self, config: Owl2Config) -> None:
        super().__init__()
        branches = 2 if config.modality_adaptive else 1
        self.input_layernorm = MultiwayRMSNorm(config.hidden_size, config.rms_norm_eps, branches)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = MultiwayRMSNorm(config.hidden_size, config.rms_norm_eps, branches)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttentionContext,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x, ctx.route), ctx, cache)
        return x + self.mlp(self.post_attention_layernorm(x, ctx.route))
