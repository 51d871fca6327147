"""``KVCache``'s constructor from tensors, its row selection (continuous batching keeps some rows), growth and cut."""

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


def test_resized_keeps_every_cached_position_and_adds_room() -> None:
    cache = _cache(3, 5, 2)
    grown = cache.resized(12)
    assert grown.batch_size == 3 and grown.length == 5 and grown.max_length == 12 and grown.has_padding
    assert torch.equal(grown.keys[:, :, :, :5], cache.keys[:, :, :, :5])
    assert torch.equal(grown.values[:, :, :, :5], cache.values[:, :, :, :5])
    assert not grown.keys[:, :, :, 5:].any() and not grown.valid[:, 5:].any()
    assert torch.equal(grown.valid[:, :5], cache.valid[:, :5]) and grown.next_position.tolist() == [3, 5, 5]
    assert grown.reserve(7) == 5


def test_truncate_takes_back_the_positions_of_the_real_tokens_dropped() -> None:
    cache = _cache(3, 5, 2)
    cache.truncate(3)  # positions 3-4 are real in every row: each row goes back two
    assert cache.length == 3 and cache.next_position.tolist() == [1, 3, 3]
    assert not cache.valid[:, 3:].any() and cache.has_padding
    cache.truncate(2)  # position 2 is real everywhere
    assert cache.next_position.tolist() == [0, 2, 2]
    cache.truncate(1)  # position 1 is row 0's padding: row 0 keeps its position
    assert cache.next_position.tolist() == [0, 1, 1]
    cache.truncate(0)
    assert cache.length == 0 and not cache.has_padding and cache.next_position.tolist() == [0, 0, 0]
