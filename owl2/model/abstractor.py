"""The visual abstractor (``model.visual_abstractor``).

``num_learnable_queries`` queries attend, in every layer, to themselves and to all ViT tokens; the result is
projected to the LLM width and a learned end token (``vit_eos``) is appended, giving ``queries + 1`` visual tokens
per image. Details the checkpoint depends on:

* the queries and the ViT tokens are LayerNorm-ed (``norm1``/``normk``, eps 1e-5) before every layer, and the
  attention residual is taken from the *normalised* queries;
* fixed sin-cos positions are added to queries and keys only (1-D for the queries, 2-D with a zero cls row for
  the ViT tokens), computed in float32 numpy exactly as MAE does;
* the MLP is SwiGLU with a LayerNorm (``ffn_ln``, eps from the config) over its hidden units.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from owl2.model.config import AbstractorConfig

# The official code builds norm1/normk/norm2 with nn.LayerNorm's default eps, not the config value.
_ATTENTION_NORM_EPS = 1e-5


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[len(positions), dim] table: sin block then cos block, frequencies ``10000^(-i/(dim/2))``."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float32), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool) -> np.ndarray:
    """[(1 if cls_token) + grid_size^2, dim]; for patch ``h*grid+w`` the first half encodes ``w``, the second ``h``."""
    grid = np.arange(grid_size, dtype=np.float32)
    grid_w, grid_h = np.meshgrid(grid, grid)  # meshgrid(w, h): the first array varies along w
    emb = np.concatenate([sincos_1d(dim // 2, grid_w), sincos_1d(dim // 2, grid_h)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim], dtype=emb.dtype), emb], axis=0)
    return emb


class AbstractorAttention(nn.Module):
    def __init__(self, config: AbstractorConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.encoder_hidden_size, config.hidden_size)
        self.value = nn.Linear(config.encoder_hidden_size, config.hidden_size)
        # Recomputed, never loaded (the official checkpoint may or may not carry them).
        self.register_buffer("q_pos_embed", torch.empty(config.num_learnable_queries, config.hidden_size),
                             persistent=False)
        self.register_buffer("k_pos_embed", torch.empty(config.grid_size**2 + 1, config.hidden_size),
                             persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        c = self.config
        device = self.q_pos_embed.device
        if device.type == "meta":
            return
        q_pos = sincos_1d(c.hidden_size, np.arange(c.num_learnable_queries, dtype=np.float32))
        k_pos = sincos_2d(c.hidden_size, c.grid_size, cls_token=c.use_cls_token)
        self.q_pos_embed = torch.from_numpy(q_pos).float().to(device)
        self.k_pos_embed = torch.from_numpy(k_pos).float().to(device)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, queries: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """``queries`` [N, Q, D] and ``visual`` [N, V, D], both normalised -> [N, Q, D]."""
        dtype = queries.dtype
        q_pos = self.q_pos_embed.to(dtype)
        kv = torch.cat([queries, visual], dim=1)
        k_pos = torch.cat([q_pos, self.k_pos_embed.to(dtype)], dim=0)
        q = self._heads(self.query(queries + q_pos))
        k = self._heads(self.key(kv + k_pos))
        v = self._heads(self.value(kv))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(queries.shape)


class AbstractorMLP(nn.Module):
    """SwiGLU with a LayerNorm over the hidden units."""

    def __init__(self, config: AbstractorConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_ln = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ffn_ln(F.silu(self.w1(x)) * self.w3(x)))


class AbstractorOutput(nn.Module):
    def __init__(self, config: AbstractorConfig) -> None:
        super().__init__()
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=_ATTENTION_NORM_EPS)
        self.mlp = AbstractorMLP(config)

    def forward(self, attention: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x = residual + self.out_proj(attention)
        return x + self.mlp(self.norm2(x))


class AbstractorCrossAttention(nn.Module):
    def __init__(self, config: AbstractorConfig) -> None:
        super().__init__()
        self.attention = AbstractorAttention(config)
        self.output = AbstractorOutput(config)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=_ATTENTION_NORM_EPS)
        self.normk = nn.LayerNorm(config.hidden_size, eps=_ATTENTION_NORM_EPS)

    def forward(self, queries: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        queries = self.norm1(queries)
        return self.output(self.attention(queries, self.normk(visual)), residual=queries)


class AbstractorLayer(nn.Module):
    def __init__(self, config: AbstractorConfig) -> None:
        super().__init__()
        self.crossattention = AbstractorCrossAttention(config)

    def forward(self, queries: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return self.crossattention(queries, visual)


class AbstractorEncoder(nn.Module):
    def __init__(self, config: AbstractorConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(AbstractorLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, queries: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                queries = torch.utils.checkpoint.checkpoint(layer, queries, visual, use_reentrant=False)
            else:
                queries = layer(queries, visual)
        return queries


class VisualAbstractor(nn.Module):
    """ViT output [N, V, D_vis] -> visual tokens [N, Q + 1, D_llm] (queries projected, then ``vit_eos``)."""

    def __init__(self, config: AbstractorConfig, language_hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.query_embeds = nn.Parameter(torch.zeros(1, config.num_learnable_queries, config.hidden_size))
        self.encoder = AbstractorEncoder(config)
        self.visual_fc = nn.Linear(config.hidden_size, language_hidden_size)
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, language_hidden_size))

    def query_states(self, visual: torch.Tensor) -> torch.Tensor:
        """ViT output [N, V, D_vis] -> the learned queries after the abstractor layers [N, Q, D_abs]: the visual
        tokens before their projection to the LLM width (``visual_fc``) and the end token."""
        return self.encoder(self.query_embeds.expand(visual.shape[0], -1, -1), visual)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        tokens = self.visual_fc(self.query_states(visual))
        return torch.cat([tokens, self.vit_eos.expand(visual.shape[0], -1, -1)], dim=1)
