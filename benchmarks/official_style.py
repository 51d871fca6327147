"""A baseline decoder that runs owl2's weights the way the official code does, for same-run speed ratios.

It reproduces the costs of the official inference path (transformers 4.31 LLaMA patched by mPLUG-Owl2), not its
bugs: every MultiwayNetwork call runs ``nonzero`` for both branches and gathers/scatters tokens into
``empty_like``; attention is eager (matmul, additive mask, float32 softmax, matmul); the KV cache is a tuple grown
with ``torch.cat`` every step; RoPE reads a cos/sin table cast to the model dtype; the prefill computes logits for
every position. The vision tower and abstractor are shared with owl2 (they are not on the decode path).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from owl2.model.llama import rotate_half
from owl2.model.modeling import Owl2ForCausalLM


def _linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # plain F.linear, as transformers' nn.Linear runs it (owl2's Linear picks other CPU kernels for bf16)
    return F.linear(x, module.weight, module.bias)


def _mlp(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _linear(mlp.down_proj, F.silu(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))


def _multiway(branches: torch.nn.ModuleList, x: torch.Tensor, indicators: torch.Tensor, out_dim: int) -> torch.Tensor:
    out = x.new_empty(*x.shape[:-1], out_dim)
    for idx, branch in enumerate(branches):
        sel = (indicators == idx).nonzero(as_tuple=True)
        if sel[0].numel():
            run = (lambda t, b=branch: _linear(b, t)) if isinstance(branch, torch.nn.Linear) else branch
            out[sel] = run(x[sel].unsqueeze(1)).squeeze(1)
    return out


class OfficialStyleDecoder:
    """Greedy decoding with the official algorithm on an :class:`Owl2ForCausalLM`'s weights."""

    def __init__(self, model: Owl2ForCausalLM) -> None:
        self.model = model
        c = model.config
        self.heads, self.head_dim = c.num_attention_heads, c.head_dim
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        t = torch.arange(c.max_position_embeddings, dtype=torch.float32)
        emb = torch.cat([torch.outer(t, inv_freq)] * 2, dim=-1)
        self.cos, self.sin = emb.cos().to(model.dtype), emb.sin().to(model.dtype)

    def _layer(self, layer, h, indicators, positions, mask, past):
        b, t, _ = h.shape
        attn = layer.self_attn
        residual = h
        # the official MultiwayNetwork: nonzero + gather/scatter per branch, for the norm and for k and v
        h = _multiway(layer.input_layernorm.multiway, h, indicators, h.shape[-1])
        q = _linear(attn.q_proj, h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = _multiway(attn.k_proj.multiway, h, indicators, attn.k_proj.out_features)
        v = _multiway(attn.v_proj.multiway, h, indicators, attn.v_proj.out_features)
        k = k.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim) + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, t, -1)
        h = residual + _linear(attn.o_proj, out)
        residual = h
        h = _multiway(layer.post_attention_layernorm.multiway, h, indicators, h.shape[-1])
        return residual + _mlp(layer.mlp, h), (k, v)

    def _forward(self, embeds, indicators, positions, past):
        t = embeds.shape[1]
        past_len = 0 if past is None else past[0][0].shape[2]
        min_value = torch.finfo(embeds.dtype).min
        mask = torch.full((t, past_len + t), min_value, dtype=embeds.dtype).triu(past_len + 1)[None, None]
        h, new_past = embeds, []
        for i, layer in enumerate(self.model.model.layers):
            h, kv = self._layer(layer, h, indicators, positions, mask, None if past is None else past[i])
            new_past.append(kv)
        return _linear(self.model.lm_head, self.model.model.norm(h)), new_past

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """``input_ids`` in owl2's expanded form (equal-length rows, no padding) -> [B, max_new_tokens]."""
        m = self.model.model
        embeds, image_mask = m.embed(input_ids, pixel_values, None, check_text=True)
        indicators = image_mask.long() if image_mask is not None else torch.zeros_like(input_ids)
        b, t = input_ids.shape
        positions = torch.arange(t)[None].expand(b, t)
        logits, past = self._forward(embeds, indicators, positions, None)
        tokens = []
        for step in range(max_new_tokens):
            next_ids = logits[:, -1].argmax(-1)
            tokens.append(next_ids)
            if step == max_new_tokens - 1:
                break
            position = torch.full((b, 1), t + step)
            logits, past = self._forward(m.embed_tokens(next_ids[:, None]), torch.zeros(b, 1, dtype=torch.long),
                                         position, past)
        return torch.stack(tokens, 1)
