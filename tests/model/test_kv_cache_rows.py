"""``KVCache``'s constructor from tensors and its row selection (continuous batching keeps some rows)."""

from __future__ import annotations

import torch

from owl2.model.cache import KVCache


def _cache(rows: int, length: int, room: int) -> KVCache:
    shape = (2, rows, 1, length + room, 4)
    keys = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    valid = torch.zeros(rows, length + room, dtype=torch.bool)
    valid[:, :length] = True
    valid[0, :2] = False  # row 0 is left-padded by two positions
    return KVCache.from_tensors(keys, -keys, valid, torch.tensor([length - 2] + [length] * (rows - 1)),
                                length=length, has_padding=True)


def test_from_tensors_keeps_the_buffers() -> None:
    cache = _cache(3, 5, 2)
    assert cache.batch_size == 3 and cache.max_length == 7 and cache.length == 5 and cache.has_padding
    assert cache.reserve(2) == 5


def test_select_rows_keeps_order_history_and_positions() -> None:
    cache = _cache(3, 5, 2)
    kept = cache.select_rows([2, 0], room=4)
    assert kept.batch_size == 2 and kept.length == 5 and kept.max_length == 9
    assert torch.equal(kept.keys[:, 0, :, :5], cache.keys[:, 2, :, :5])
    assert torch.equal(kept.values[:, 1, :, :5], cache.values[:, 0, :, :5])
    assert torch.equal(kept.valid[:, :5], cache.valid[[2, 0], :5]) and not kept.valid[:, 5:].any()
    assert kept.next_position.tolist() == [5, 3]
    only_short = cache.select_rows([0], room=0)  # row 0's two padding positions are dropped
    assert only_short.length == 3 and bool(only_short.valid.all())
