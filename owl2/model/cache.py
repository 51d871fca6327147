"""A preallocated key/value cache for the decoder.

All rows of a batch share one write offset (prompts are left-padded), so a step writes one slice per layer and
never reallocates. Besides keys and values the cache remembers, per cached position, whether it is a real token
(the attention mask), and each row's next RoPE position, so padding stays correct across decode steps. The modality
of a cached position needs no record: its keys and values were projected by its own MAM branch when it was written.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from owl2.model.config import Owl2Config


class KVCache:
    """Keys/values [layers, B, kv_heads, max_length, head_dim] plus per-position bookkeeping.

    Reuse one cache across generations with :meth:`reset` (same or smaller batch and length).
    """

    def __init__(
        self,
        config: Owl2Config,
        batch_size: int,
        max_length: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.has_padding = False

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    @classmethod
    def from_tensors(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        valid: torch.Tensor,
        next_position: torch.Tensor,
        *,
        length: int,
        has_padding: bool,
    ) -> KVCache:
        """A cache over existing buffers: ``keys``/``values`` [layers, B, kv_heads, max_length, head_dim],
        ``valid`` [B, max_length] bool, ``next_position`` [B] long; ``length`` positions are already cached."""
        cache = cls.__new__(cls)
        cache.keys, cache.values, cache.valid, cache.next_position = keys, values, valid, next_position
        cache.length, cache.has_padding = length, has_padding
        return cache

    def select_rows(self, rows: Sequence[int], room: int) -> KVCache:
        """A new cache with only ``rows`` of this one, in that order (see :meth:`merge`)."""
        return KVCache.merge([(self, rows)], room)

    @staticmethod
    def merge(parts: Sequence[tuple[KVCache, Sequence[int]]], room: int) -> KVCache:
        """A new cache with the listed rows of each cache, in order (continuous batching: rows join and leave).

        Rows are right-aligned: each row's cached positions end at the new cache's ``length``, which is the longest
        history among the kept rows, so positions that no kept row still uses are dropped on the left. Positions
        before a shorter row's history are padding (not valid). Keys carry their RoPE rotation and ``next_position``
        is kept, so every row decodes exactly as in its old cache. ``room`` free positions follow ``length``.
        """
        parts = [(cache, list(rows)) for cache, rows in parts if len(rows)]
        if not parts:
            raise ValueError("merging caches needs at least one row")
        first = parts[0][0]
        spans = []
        for cache, rows in parts:
            valid = cache.valid[rows, : cache.length]
            no_history = torch.full_like(valid[:, 0], cache.length, dtype=torch.long)
            starts = torch.where(valid.any(1), valid.float().argmax(1), no_history)
            spans.append(cache.length - int(starts.min()))
        length = max(spans)
        batch = sum(len(rows) for _, rows in parts)
        shape = (*first.keys.shape[:1], batch, *first.keys.shape[2:3], length + room, first.keys.shape[-1])
        out = KVCache.from_tensors(
            first.keys.new_zeros(shape),
            first.values.new_zeros(shape),
            first.valid.new_zeros(batch, length + room),
            first.next_position.new_zeros(batch),
            length=length,
            has_padding=True,
        )
        row = 0
        for cache, rows in parts:
            index = torch.tensor(rows, device=cache.keys.device)
            n = min(length, cache.length)
            source, target = slice(cache.length - n, cache.length), slice(length - n, length)
            block = slice(row, row + len(rows))
            out.keys[:, block, :, target] = cache.keys[:, index, :, source]
            out.values[:, block, :, target] = cache.values[:, index, :, source]
            out.valid[block, target] = cache.valid[index, source]
            out.next_position[block] = cache.next_position[index]
            row += len(rows)
        return out

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]

    def reset(self) -> None:
        """Forget every cached position; the buffers are kept for the next generation."""
        self.valid.zero_()
        self.next_position.zero_()
        self.length = 0
        self.has_padding = False

    def fits(self, batch_size: int, max_length: int, dtype: torch.dtype, device: torch.device) -> bool:
        return (
            self.batch_size == batch_size
            and self.max_length >= max_length
            and self.keys.dtype == dtype
            and self.keys.device == device
        )

    def reserve(self, new_tokens: int) -> int:
        """Check there is room for ``new_tokens`` more positions and return where they start."""
        if self.length + new_tokens > self.max_length:
            raise ValueError(
                f"KV cache overflow: {self.length} cached + {new_tokens} new positions > max_length {self.max_length}"
            )
        return self.length

    def commit(self, valid: torch.Tensor, has_padding: bool) -> None:
        """Record the bookkeeping of the chunk just written (``valid`` is [B, T])."""
        start, end = self.length, self.length + valid.shape[1]
        self.valid[:, start:end] = valid
        self.next_position += valid.sum(-1)
        self.has_padding = self.has_padding or has_padding
        self.length = end
