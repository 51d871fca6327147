"""A preallocated key/value cache for the decoder.

All rows of a batch share one write offset (prompts are left-padded), so a step writes one slice per layer and
never reallocates. Besides keys and values the cache remembers, per cached position, whether it is a real token
(the attention mask), and each row's next RoPE position, so padding stays correct across decode steps. The modality
of a cached position needs no record: its keys and values were projected by its own MAM branch when it was written.

For continuous batching a cache can be a :meth:`KVCache.view` over the first rows of a larger one, and rows are
copied in or moved within it without copying the other rows (:meth:`KVCache.write_rows`, :meth:`KVCache.copy_row`);
the server's ``owl2.serving.cache_manager`` keeps its running rows that way.
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

    def new_zeros(self, batch_size: int, max_length: int, *, length: int = 0) -> KVCache:
        """An empty cache with this one's layers, heads, dtype and device: ``batch_size`` rows of ``max_length``
        positions, the first ``length`` of them already taken as padding (rows are then written with
        :meth:`write_rows`, right-aligned to ``length``)."""
        shape = (self.keys.shape[0], batch_size, self.keys.shape[2], max_length, self.keys.shape[4])
        return KVCache.from_tensors(
            self.keys.new_zeros(shape),
            self.values.new_zeros(shape),
            self.valid.new_zeros(batch_size, max_length),
            self.next_position.new_zeros(batch_size),
            length=length,
            has_padding=length > 0,
        )

    def span(self, rows: Sequence[int] | None = None) -> int:
        """Positions the longest history among ``rows`` (default: all) takes: from its first real token to
        ``length``; the positions before it hold padding only and can be dropped. 0 for rows with no history."""
        valid = self.valid[:, : self.length] if rows is None else self.valid[list(rows), : self.length]
        if valid.numel() == 0:
            return 0
        no_history = torch.full_like(valid[:, 0], self.length, dtype=torch.long)
        starts = torch.where(valid.any(1), valid.float().argmax(1), no_history)
        return self.length - int(starts.min())

    def view(self, rows: int) -> KVCache:
        """A cache over this one's first ``rows`` rows that shares its storage: a forward through the view writes
        into this cache's tensors. The view starts at this cache's ``length`` and ``has_padding`` and then keeps
        its own; :meth:`follow` brings them back here."""
        if not 0 < rows <= self.batch_size:
            raise ValueError(f"a view needs 1 to {self.batch_size} rows, got {rows}")
        return KVCache.from_tensors(self.keys[:, :rows], self.values[:, :rows], self.valid[:rows],
                                    self.next_position[:rows], length=self.length, has_padding=self.has_padding)

    def follow(self, view: KVCache) -> None:
        """Take the write offset and padding flag of ``view``, a :meth:`view` of this cache that forwards have
        advanced (the keys, values and bookkeeping tensors are shared already)."""
        self.length, self.has_padding = view.length, self.has_padding or view.has_padding

    def copy_row(self, source: int, target: int) -> None:
        """Overwrite row ``target`` with row ``source``: its cached keys/values, valid positions and next RoPE
        position. One row is copied, whatever the batch size."""
        if source == target:
            return
        end = self.length
        self.keys[:, target, :, :end] = self.keys[:, source, :, :end]
        self.values[:, target, :, :end] = self.values[:, source, :, :end]
        self.valid[target] = self.valid[source]
        self.next_position[target] = self.next_position[source]

    def write_rows(self, source: KVCache, rows: Sequence[int], slots: Sequence[int]) -> None:
        """Copy ``rows`` of ``source`` into this cache's rows ``slots`` (continuous batching: rows join).

        Rows are right-aligned: each copied history ends at this cache's ``length``, the positions before it are
        padding (not valid). Keys carry their RoPE rotation and ``next_position`` is kept, so every row decodes
        exactly as in ``source``. Only the listed slots are written; raises ``ValueError`` before writing anything
        when a row's history is longer than ``length``.
        """
        rows, slots = list(rows), list(slots)
        if len(rows) != len(slots):
            raise ValueError(f"{len(rows)} rows cannot fill {len(slots)} slots")
        if not rows:
            return
        if source.length > self.length and source.span(rows) > self.length:
            raise ValueError(f"rows with {source.span(rows)} cached positions do not fit before offset {self.length}")
        n = min(self.length, source.length)
        index = torch.tensor(rows, device=source.keys.device)
        target = torch.tensor(slots, device=self.keys.device)
        read, write = slice(source.length - n, source.length), slice(self.length - n, self.length)
        self.keys[:, target, :, write] = source.keys[:, index, :, read].to(self.keys.device)
        self.values[:, target, :, write] = source.values[:, index, :, read].to(self.values.device)
        self.valid[target] = False  # a reused slot may hold a departed row's positions
        self.valid[target, write] = source.valid[index, read].to(self.valid.device)
        self.next_position[target] = source.next_position[index].to(self.next_position.device)
        self.has_padding = True

    def select_rows(self, rows: Sequence[int], room: int) -> KVCache:
        """A new cache with only ``rows`` of this one, in that order, right-aligned (see :meth:`write_rows`):
        positions that no kept row uses are dropped on the left, and ``room`` free positions follow ``length``."""
        rows = list(rows)
        if not rows:
            raise ValueError("selecting rows needs at least one row")
        length = self.span(rows)
        out = self.new_zeros(len(rows), length + room, length=length)
        out.write_rows(self, rows, range(len(rows)))
        return out

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]

    def resized(self, max_length: int) -> KVCache:
        """A copy with room for ``max_length`` positions (at least ``length``): the cached positions, the valid
        flags and the next RoPE positions as they are (a cache that grows)."""
        if max_length < self.length:
            raise ValueError(f"a cache holding {self.length} positions cannot shrink to {max_length}")
        out = self.new_zeros(self.batch_size, max_length, length=self.length)
        end = self.length
        out.keys[:, :, :, :end] = self.keys[:, :, :, :end]
        out.values[:, :, :, :end] = self.values[:, :, :, :end]
        out.valid[:, :end] = self.valid[:, :end]
        out.next_position.copy_(self.next_position)
        out.has_padding = self.has_padding
        return out

    def truncate(self, length: int) -> None:
        """Forget the positions from ``length`` on (``0 <= length <= self.length``); each row's next RoPE position
        goes back by the real tokens forgotten."""
        if not 0 <= length <= self.length:
            raise ValueError(f"a cache holding {self.length} positions cannot be cut to {length}")
        self.next_position -= self.valid[:, length:self.length].sum(-1)
        self.valid[:, length:] = False
        self.length = length
        self.has_padding = bool((~self.valid[:, :length]).any())

    def reset(self, *, length: int = 0) -> None:
        """Forget every cached position; the buffers are kept for the next generation. ``length`` > 0 takes that many
        positions as padding already, for rows written after it with :meth:`write_rows`."""
        if not 0 <= length <= self.max_length:
            raise ValueError(f"a reset offset must be within 0..{self.max_length}, got {length}")
        self.valid.zero_()
        self.next_position.zero_()
        self.length = length
        self.has_padding = length > 0

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
