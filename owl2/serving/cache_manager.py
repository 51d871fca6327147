"""The running batch's key/value cache: one preallocated buffer whose first rows are the live ones.

Continuous batching adds and drops rows at almost every step. Building a new cache for each change would copy the
history of every kept row; :class:`CacheManager` instead owns one :class:`~owl2.model.cache.KVCache` of
``capacity_rows`` x ``capacity_length`` positions, keeps the live rows in its slots ``0 .. rows - 1``, and hands the
model a view of those rows (:meth:`KVCache.view`), so a decode step writes straight into the buffer:

- a row that leaves is overwritten by the last live row (one row copied, :meth:`KVCache.copy_row`); the caller's
  row list follows the same moves (:meth:`CacheManager.retain` returns the new order);
- newcomers, prefilled in a cache of their own, are copied into free slots right-aligned to the shared write offset
  (:meth:`KVCache.write_rows`: their rows only) when their history fits before that offset, the buffer has room
  after it for the largest remaining output budget, and it has free slots;
- otherwise the buffer is laid out anew (the only copy of every live row, counted in ``relayouts``): positions no
  row uses are trimmed on the left (the new offset is the longest live history, or the longest prompt seen if that
  is longer, so that prompts like it fit later), and a dimension that must grow at least doubles; the length also
  doubles when the history would fill more than half of it, so the free positions a re-layout leaves last for as
  many steps as it copied positions per row, and whole copies stay rare. The buffer is sized from what the rows
  need, never from the model's context. It outlives a batch that empties (the next rows reuse it, from a new
  offset, when they fit) until :meth:`CacheManager.clear` releases it; the batcher does when it has nothing to do.

A join either completes or changes nothing the running rows use: newcomers only write free slots or a buffer built
aside and swapped in at the end, so a join that fails never touches the running rows.
"""

from __future__ import annotations

from collections.abc import Sequence

from owl2.model.cache import KVCache


class CacheManager:
    """The live rows' cache: a view of the first :attr:`rows` slots of one growing buffer.

    ``max_rows`` (the batcher's ``max_batch_size``) caps the slots allocated ahead of need.
    """

    def __init__(self, max_rows: int | None = None) -> None:
        self.max_rows = max_rows
        self._buffer: KVCache | None = None
        self._live: KVCache | None = None
        self._longest_prompt = 0  # the longest newcomer history since the buffer was allocated
        self.relayouts = 0  # joins that laid the buffer out anew (copying every live row)
        self.rows_moved = 0  # rows copied into a departed row's slot
        self.rows_written = 0  # newcomer rows copied into free slots without a re-layout

    @property
    def rows(self) -> int:
        return 0 if self._live is None else self._live.batch_size

    @property
    def cache(self) -> KVCache | None:
        """The live rows' cache (keys/values [layers, rows, kv_heads, capacity_length, head_dim], sharing the
        buffer's storage), for the model's forward; ``None`` when no row is live."""
        return self._live

    @property
    def buffer(self) -> KVCache | None:
        """The whole buffer, free slots included (its offset is brought up to date by every change of rows)."""
        return self._buffer

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, positions) the buffer holds; (0, 0) before the first join."""
        if self._buffer is None:
            return 0, 0
        return self._buffer.batch_size, self._buffer.max_length

    def clear(self) -> None:
        """Forget every row and release the buffer (the next join allocates one sized for its rows)."""
        self._buffer = self._live = None
        self._longest_prompt = 0

    def retain(self, keep: Sequence[int]) -> list[int]:
        """Keep the live rows in slots ``keep`` and drop the others.

        Each dropped slot below the new row count takes the last live row still kept (one row copied), so the live
        rows stay in slots 0..n-1 and no other row moves. Returns the new order: slot ``i`` now holds the row that
        was in slot ``order[i]``.
        """
        live = self.rows
        gone = set(range(live)) - set(keep)
        order = list(range(live))
        if not gone:
            return order
        assert self._buffer is not None and self._live is not None
        self._buffer.follow(self._live)
        for slot in sorted(gone):
            while live - 1 in gone and live - 1 > slot:  # departed rows at the end need no move
                live -= 1
            if slot >= live:
                break
            if slot < live - 1:
                self._buffer.copy_row(live - 1, slot)
                order[slot] = order[live - 1]
                self.rows_moved += 1
            live -= 1
        self._live = self._buffer.view(live) if live else None  # an empty buffer is kept for the next rows
        return order[:live]

    def join(self, fresh: KVCache, room: int) -> None:
        """Add every row of ``fresh`` (the newcomers' prefilled cache) after the live rows, in order.

        ``room``: free positions the rows need after the shared offset, the largest remaining output budget among
        all of them, newcomers included. Copies only the newcomers' rows when they fit (see the module docstring),
        else lays the buffer out anew. On failure nothing the live rows use has changed.
        """
        n, k = self.rows, fresh.batch_size
        buffer, live = self._buffer, self._live
        prompt = fresh.span()
        self._longest_prompt = max(self._longest_prompt, prompt)
        if buffer is not None and live is None:  # no row to keep: the offset can start anew
            offset = min(self._longest_prompt, buffer.max_length - room)
            if k <= buffer.batch_size and prompt <= offset:
                buffer.reset(length=offset)
                buffer.write_rows(fresh, range(k), range(k))
                self._live = buffer.view(k)
                self.rows_written += k
                return
        elif buffer is not None and live is not None:
            buffer.follow(live)
            if n + k <= buffer.batch_size and buffer.max_length - buffer.length >= room and prompt <= buffer.length:
                buffer.write_rows(fresh, range(k), range(n, n + k))  # free slots only: the live rows are untouched
                self._live = buffer.view(n + k)
                self.rows_written += k
                return
        self._relayout(fresh, room)

    def _relayout(self, fresh: KVCache, room: int) -> None:
        """A new buffer with the live rows then ``fresh``'s, right-aligned to the longest history or prompt seen,
        whichever is longer (so that later prompts like those fit without another re-layout)."""
        live, n, k = self._live, self.rows, fresh.batch_size
        span = max(self._longest_prompt, live.span() if live is not None else 0)
        rows, length = self.capacity
        if n + k > rows:
            rows = max(n + k, 2 * rows if self.max_rows is None else min(2 * rows, self.max_rows))
        if span + room > length or 2 * span > length:
            length = max(span + room, 2 * length)
        buffer = (live if live is not None else fresh).new_zeros(rows, length, length=span)
        if live is not None:
            buffer.write_rows(live, range(n), range(n))
        buffer.write_rows(fresh, range(k), range(n, n + k))
        self._buffer, self._live = buffer, buffer.view(n + k)
        self.relayouts += 1
