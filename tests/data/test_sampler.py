"""ModalityLengthGroupedSampler: permutation, no mixed batch, deterministic per seed/epoch."""

from __future__ import annotations

import random

import pytest

from owl2.data import ModalityLengthGroupedSampler


def _data(n: int = 103, seed: int = 0) -> tuple[list[int], list[bool]]:
    rng = random.Random(seed)
    return [rng.randint(5, 500) for _ in range(n)], [rng.random() < 0.6 for _ in range(n)]


@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_permutation_and_no_mixed_batch(batch_size):
    lengths, mm = _data()
    sampler = ModalityLengthGroupedSampler(lengths, mm, batch_size, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(0 < len(b) <= batch_size for b in batches)
    assert all(len({mm[i] for i in b}) == 1 for b in batches)
    # Each batch is sorted by length (longest first) within its mega-batch.
    assert all([lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True) for b in batches)


def test_deterministic_per_seed_and_epoch():
    lengths, mm = _data()
    a = ModalityLengthGroupedSampler(lengths, mm, 4, seed=1)
    b = ModalityLengthGroupedSampler(lengths, mm, 4, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    assert list(ModalityLengthGroupedSampler(lengths, mm, 4, seed=2)) != first


def test_distributed_ranks():
    lengths, mm = _data(50)
    world = 3
    per_rank = [list(ModalityLengthGroupedSampler(lengths, mm, 4, world_size=world, rank=r, seed=0))
                for r in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1
    seen = {i for batches in per_rank for b in batches for i in b}
    assert seen == set(range(50))
    # Step by step, every rank's batch has the same modality.
    for step in zip(*per_rank, strict=True):
        assert len({mm[i] for b in step for i in b}) == 1


def test_all_text_only():
    sampler = ModalityLengthGroupedSampler([3, 1, 2], [False] * 3, 2)
    assert sorted(i for b in sampler for i in b) == [0, 1, 2]
