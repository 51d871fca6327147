"""The serving cache manager against the tiny model: rows join and leave a preallocated buffer, and every row's
logits stay those of the row decoded alone; joins that fit and departures copy only the rows they concern."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

import owl2
from owl2.model.cache import KVCache
from owl2.serving.cache_manager import CacheManager
from tests.conftest import left_pad, max_abs, official, random_official_ids

ROW_TOL = 2e-5  # fp32: only the length of the masked padding differs from a run alone


@dataclass
class Stream:
    """A prompt (official ids, images [n, 3, S, S]) and the tokens fed after it, one per decode step; ``alone``
    holds the logits [V] of the row decoded by itself: after the prefill, then after each fed token."""

    ids: torch.Tensor
    images: torch.Tensor
    tokens: list[int]
    alone: list[torch.Tensor] = field(default_factory=list)
    fed: int = 0

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.fed


def make_streams(model: owl2.Owl2ForCausalLM, count: int, seed: int, max_tokens: int = 8, *, budget: int = 0,
                 text: tuple[int, int] = (2, 24), image_rate: float = 0.3) -> list[Stream]:
    """``count`` rows of varied prompt lengths (``text`` tokens; a share ``image_rate`` of the rows with one or two
    images) and budgets (up to ``max_tokens``, or exactly ``budget``), each run alone."""
    g = torch.Generator().manual_seed(seed)
    size, vocab = model.config.vision.image_size, model.config.vocab_size
    streams = []
    for _ in range(count):
        images = int(torch.randint(1, 3, (1,), generator=g)) if torch.rand(1, generator=g) < image_rate else 0
        words = int(torch.randint(*text, (1,), generator=g))
        tokens = budget or int(torch.randint(1, max_tokens + 1, (1,), generator=g))
        stream = Stream(random_official_ids(g, words, images, vocab), torch.randn(images, 3, size, size, generator=g),
                        torch.randint(3, vocab, (tokens,), generator=g).tolist())
        batch = official(stream.ids[None], pixel_values=stream.images if images else None, config=model.config)
        cache = model.new_cache(1, batch["input_ids"].shape[1] + tokens)
        stream.alone.append(model(**batch, cache=cache, logits_to_keep=1).logits[0, -1])
        for token in stream.tokens:
            stream.alone.append(model(torch.tensor([[token]]), cache=cache, logits_to_keep=1).logits[0, -1])
        streams.append(stream)
    return streams


def prefill(model: owl2.Owl2ForCausalLM, streams: list[Stream]) -> tuple[KVCache, torch.Tensor]:
    """The newcomers' own left-padded cache, exactly as long as their prompts, and their last logits [k, V]."""
    ids, mask = left_pad([s.ids for s in streams])
    images = [s.images for s in streams if len(s.images)]
    batch = official(ids, mask, pixel_values=torch.cat(images) if images else None, config=model.config)
    fresh = model.new_cache(*batch["input_ids"].shape)
    return fresh, model(**batch, cache=fresh, logits_to_keep=1).logits[:, -1]


class Driver:
    """Runs streams through a :class:`CacheManager` as the batcher does, checking every logit against ``alone``."""

    def __init__(self, model: owl2.Owl2ForCausalLM, max_rows: int) -> None:
        self.model = model
        self.manager = CacheManager(max_rows=max_rows)
        self.live: list[Stream] = []

    def join(self, newcomers: list[Stream]) -> None:
        fresh, logits = prefill(self.model, newcomers)
        for stream, row in zip(newcomers, logits, strict=True):
            assert max_abs(row, stream.alone[0]) < ROW_TOL
        self.manager.join(fresh, room=max(s.remaining for s in self.live + newcomers))
        self.live += newcomers

    def leave(self, gone: set[int]) -> None:
        order = self.manager.retain([i for i in range(len(self.live)) if i not in gone])
        self.live = [self.live[i] for i in order]
        assert self.manager.rows == len(self.live)

    def step(self) -> None:
        """Feed every live row its next token, then drop the rows with nothing left to feed."""
        assert self.manager.cache is not None and self.manager.cache.batch_size == len(self.live)
        feed = torch.tensor([[s.tokens[s.fed]] for s in self.live])
        logits = self.model(feed, cache=self.manager.cache, logits_to_keep=1).logits[:, -1]
        for stream, row in zip(self.live, logits, strict=True):
            stream.fed += 1
            assert max_abs(row, stream.alone[stream.fed]) < ROW_TOL
        self.leave({i for i, s in enumerate(self.live) if s.remaining == 0})


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@torch.no_grad()
def test_rows_joining_and_leaving_in_any_order_decode_as_alone(tiny_fp32, seed):
    streams = make_streams(tiny_fp32, 14, seed)
    rng = random.Random(seed)
    driver = Driver(tiny_fp32, max_rows=5)
    waiting = list(streams)
    while waiting or driver.live:
        if driver.live and rng.random() < 0.3:  # a client goes away: any row, not only the last
            driver.leave({rng.randrange(len(driver.live))})
        free = 5 - len(driver.live)
        if waiting and free and rng.random() < 0.6:
            count = rng.randint(1, min(free, len(waiting), 3))
            driver.join([waiting.pop(0) for _ in range(count)])
        if driver.live:
            driver.step()
    assert sum(s.fed for s in streams) > 20 and driver.manager.rows_moved > 0
    manager = driver.manager
    assert manager.rows == 0 and manager.cache is None and manager.buffer is not None
    buffer, relayouts = manager.buffer, manager.relayouts
    driver.join(make_streams(tiny_fp32, 1, seed=seed + 100, budget=2, text=(2, 4), image_rate=0))
    assert manager.buffer is buffer and manager.relayouts == relayouts  # the emptied buffer is reused
    driver.step()
    driver.step()
    manager.clear()
    assert manager.buffer is None and manager.capacity == (0, 0)


def _settled(model: owl2.Owl2ForCausalLM) -> Driver:
    """Three long-running rows after a few steps, in a buffer with free slots and room to spare."""
    streams = make_streams(model, 3, seed=7, budget=30, text=(10, 24))
    driver = Driver(model, max_rows=8)
    for stream in streams:  # the slots grow 1, 2, 4: each join is laid out anew
        driver.join([stream])
    for _ in range(6):
        driver.step()
    return driver


@torch.no_grad()
def test_a_join_that_fits_copies_no_other_row(tiny_fp32):
    driver = _settled(tiny_fp32)
    manager = driver.manager
    assert manager.relayouts == 3 and manager.capacity[0] == 4
    buffer = manager.buffer
    assert buffer is not None
    storage, relayouts, n = buffer.keys.data_ptr(), manager.relayouts, manager.rows
    before = buffer.keys[:, :n].clone(), buffer.values[:, :n].clone(), buffer.valid[:n].clone()
    newcomer = make_streams(tiny_fp32, 1, seed=11, budget=3, text=(2, 8), image_rate=0)[0]  # fits before the offset
    driver.join([newcomer])
    assert manager.relayouts == relayouts and manager.rows_written == 1
    assert manager.buffer is buffer and buffer.keys.data_ptr() == storage
    assert torch.equal(buffer.keys[:, :n], before[0]) and torch.equal(buffer.values[:, :n], before[1])
    assert torch.equal(buffer.valid[:n], before[2])
    assert manager.cache is not None and manager.cache.keys.data_ptr() == storage  # the model writes the buffer
    for _ in range(3):
        driver.step()  # the logits checks of the newcomer and the others
    assert buffer.keys.data_ptr() == storage


@torch.no_grad()
def test_a_leaving_row_takes_one_copy_and_the_order_follows(tiny_fp32):
    driver = _settled(tiny_fp32)
    manager = driver.manager
    driver.join(make_streams(tiny_fp32, 1, seed=12, budget=20, text=(2, 8), image_rate=0))
    buffer = manager.buffer
    assert buffer is not None and manager.rows == 4
    storage, relayouts = buffer.keys.data_ptr(), manager.relayouts
    before = buffer.keys[:, :4].clone()
    rows = list(driver.live)
    order = manager.retain([0, 1, 3])  # slot 2 leaves: the last row takes its place
    assert order == [0, 1, 3] and manager.rows_moved == 1 and manager.relayouts == relayouts
    assert buffer.keys.data_ptr() == storage
    assert torch.equal(buffer.keys[:, :2], before[:, :2]) and torch.equal(buffer.keys[:, 2], before[:, 3])
    driver.live = [rows[i] for i in order]
    driver.step()
    order = manager.retain([1, 2])  # the first row leaves: the last takes its slot
    assert order == [2, 1] and manager.rows_moved == 2
    driver.live = [driver.live[i] for i in order]
    driver.step()


def _broken(like: KVCache, rows: int) -> KVCache:
    """A newcomers' cache whose keys cannot be copied into ``like`` (one head dimension short)."""
    keys = like.keys.new_zeros(*like.keys.shape[:1], rows, *like.keys.shape[2:4], like.keys.shape[4] - 1)
    valid = like.valid.new_ones(rows, 2)
    return KVCache.from_tensors(keys[..., :2, :], keys[..., :2, :].clone(), valid, like.next_position.new_full(
        (rows,), 2), length=2, has_padding=False)


@pytest.mark.parametrize("rows", [1, 5])  # into free slots; too many for them: into a buffer built aside
@torch.no_grad()
def test_a_failing_join_leaves_the_running_rows_as_they_were(tiny_fp32, rows):
    driver = _settled(tiny_fp32)
    manager = driver.manager
    buffer = manager.buffer
    assert buffer is not None and manager.rows == 3 and manager.capacity[0] == 4
    n, relayouts = manager.rows, manager.relayouts
    live = manager.cache
    before = buffer.keys[:, :n].clone(), buffer.valid[:n].clone(), buffer.next_position[:n].clone(), live.length
    with pytest.raises(RuntimeError):
        manager.join(_broken(buffer, rows), room=4)
    assert manager.rows == n and manager.buffer is buffer and manager.relayouts == relayouts
    assert torch.equal(buffer.keys[:, :n], before[0]) and torch.equal(buffer.valid[:n], before[1])
    assert torch.equal(buffer.next_position[:n], before[2]) and manager.cache is live and live.length == before[3]
    for _ in range(3):
        driver.step()  # the running rows go on exactly as alone


@torch.no_grad()
def test_relayouts_stay_rare_over_a_long_random_run(tiny_fp32):
    rng = random.Random(5)
    streams = iter(make_streams(tiny_fp32, 120, seed=5, max_tokens=12))
    driver = Driver(tiny_fp32, max_rows=8)
    largest = 0
    for _ in range(200):
        if driver.live and rng.random() < 0.1:
            driver.leave({rng.randrange(len(driver.live))})
        if len(driver.live) < 8 and rng.random() < 0.5:
            driver.join([next(streams)])
        if driver.live:
            largest = max(largest, driver.manager.cache.span() + max(s.remaining for s in driver.live))
            driver.step()
        assert driver.manager.capacity[0] <= 8
    joined = driver.manager.rows_written + driver.manager.relayouts
    assert joined > 60 and driver.manager.rows_moved > 5  # the run did join and drop many rows
    assert driver.manager.relayouts <= 8
    assert driver.manager.capacity[1] <= 4 * largest  # sized from the rows, not from the context


@torch.no_grad()
def test_a_batch_that_empties_keeps_its_buffer_for_the_next_rows(tiny_fp32):
    driver = _settled(tiny_fp32)
    manager = driver.manager
    buffer, relayouts = manager.buffer, manager.relayouts
    driver.leave(set(range(len(driver.live))))  # every row finished at once
    assert manager.rows == 0 and manager.cache is None and manager.buffer is buffer
    newcomer = make_streams(tiny_fp32, 1, seed=12, budget=3, text=(2, 8), image_rate=0)[0]
    driver.join([newcomer])
    assert manager.relayouts == relayouts and manager.buffer is buffer
    for _ in range(3):
        driver.step()  # decodes as the row alone
    manager.clear()
    assert manager.buffer is None and manager.capacity == (0, 0)
