"""A transformers ``Cache`` over owl2's :class:`~owl2.model.cache.KVCache`, for ``generate``.

owl2's decoder writes each chunk's keys and values into a preallocated :class:`KVCache` and keeps, per cached
position, whether it is a real token, and per row its next RoPE position; this class gives that cache the interface
``generate`` drives (the cached length, beam reordering, cropping, batch expansion) and grows it when a chunk does
not fit. Nothing else is needed for the modality-adaptive module: a cached position's keys and values were
projected by its own branch (text or image) when it was written, so they keep their modality, and the tokens
``generate`` adds are text, routed through the text branch by the model's forward.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from owl2.model.cache import KVCache
from owl2.model.config import Owl2Config

GROWTH_STEP = 256
"""Positions a cache is allocated beyond what the first chunk needs, and the least it grows by when full."""


class Owl2Cache(Cache):
    """Keys/values [layers, B, kv_heads, capacity, head_dim] with owl2's per-position bookkeeping.

    Created empty (``Owl2Cache()``, or by the model's forward when ``use_cache`` and no cache is given); the first
    forward through it allocates the buffers for its batch, dtype and device. Rows stay aligned: every row has the
    same cached length, left padding is recorded as invalid positions.
    """

    is_compileable = False  # it grows by reallocation: torch.compile would retrace at every growth

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.kv: KVCache | None = None

    # -------------------------------------------------------------------------------------------- the model's side
    def reserve(self, config: Owl2Config, batch_size: int, new_tokens: int, *, dtype: torch.dtype,
                device: torch.device) -> KVCache:
        """The :class:`KVCache` a forward of ``new_tokens`` positions for ``batch_size`` rows writes into:
        allocated on first use, reallocated (the cached positions copied) when it has no room left."""
        kv = self.kv
        if kv is None:
            self.kv = KVCache(config, batch_size, new_tokens + GROWTH_STEP, dtype=dtype, device=device)
            return self.kv
        if kv.batch_size != batch_size:
            raise ValueError(f"the cache holds {kv.batch_size} rows but the input has {batch_size}")
        if kv.length + new_tokens > kv.max_length:
            self.kv = kv.resized(max(kv.length + new_tokens, kv.max_length + max(kv.max_length, GROWTH_STEP)))
        return self.kv

    # ----------------------------------------------------------------------------------------- generate's side
    def __len__(self) -> int:
        return 0 if self.kv is None else self.kv.keys.shape[0]

    def __repr__(self) -> str:
        if self.kv is None:
            return "Owl2Cache(empty)"
        return f"Owl2Cache(rows={self.kv.batch_size}, cached={self.kv.length}, capacity={self.kv.max_length})"

    @property
    def is_initialized(self) -> bool:
        return self.kv is not None

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self)

    @property
    def max_batch_size(self) -> int:
        return 0 if self.kv is None else self.kv.batch_size

    @property
    def max_cache_len(self) -> int:
        return 0 if self.kv is None else self.kv.max_length

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Positions cached so far (padding included), the same for every row and layer."""
        return 0 if self.kv is None else self.kv.length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1  # it grows as needed

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, *args: object, **kwargs: object) -> tuple[int, int]:
        raise NotImplementedError("owl2's forward builds its own attention mask from the cache's valid positions")

    def update(self, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("owl2's decoder layers write into the cache themselves (Owl2Cache.reserve)")

    def reset(self) -> None:
        if self.kv is not None:
            self.kv.reset()

    def _select(self, index: torch.Tensor) -> None:
        kv = self.kv
        if kv is None:
            return
        index = index.to(kv.keys.device)
        self.kv = KVCache.from_tensors(
            kv.keys.index_select(1, index), kv.values.index_select(1, index), kv.valid.index_select(0, index),
            kv.next_position.index_select(0, index), length=kv.length, has_padding=kv.has_padding,
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep row ``beam_idx[i]`` as row ``i`` (beam search)."""
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.kv is not None:
            self._select(torch.arange(self.kv.batch_size).repeat_interleave(repeats))

    def crop(self, max_length: int) -> None:
        """Drop the cached positions from ``max_length`` on (a negative value drops that many from the end);
        each row's next RoPE position goes back by the real tokens dropped."""
        kv = self.kv
        if kv is None:
            return
        keep = kv.length + max_length if max_length < 0 else min(max_length, kv.length)
        keep = max(keep, 0)
        if keep < kv.length:
            kv.truncate(keep)


__all__ = ["GROWTH_STEP", "Owl2Cache"]
