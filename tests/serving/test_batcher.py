"""Continuous batching against the engine's own runs: a row's tokens do not depend on who shares its steps."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from owl2.generation import GenerationRequest, SamplingParams
from owl2.model.cache import gather_rows
from owl2.serving.batcher import ContinuousBatcher, QueueFullError
from tests.serving.conftest import scene


class Collector:
    def __init__(self, n: int) -> None:
        self.events = [[] for _ in range(n)]
        self.errors: list[BaseException | None] = [None] * n
        self.done = [threading.Event() for _ in range(n)]

    def sink(self, i: int):
        def receive(event):
            if isinstance(event, BaseException):
                self.errors[i] = event
                self.done[i].set()
                return
            self.events[i].append(event)
            if event.finish_reason:
                self.done[i].set()
        return receive

    def wait(self, timeout: float = 60) -> None:
        for event in self.done:
            assert event.wait(timeout), "a request never finished"

    def text(self, i: int) -> str:
        return "".join(e.delta for e in self.events[i])

    def tokens(self, i: int) -> list[int]:
        return [e.token_id for e in self.events[i] if e.token_id is not None]


def requests(tiny_pipeline, n: int = 7, **sampling):
    colours = ["red", "blue", "green"]
    return [tiny_pipeline.request("Describe the image in detail please." if i % 2 == 0 else f"Count to {i}.",
                              [scene(colours[i % 3])] if i % 2 == 0 else [], max_new_tokens=4 + 3 * i, **sampling)
            for i in range(n)]


@pytest.mark.parametrize("max_batch_size", [1, 3, 8])
def test_staggered_requests_match_runs_alone(tiny_pipeline, max_batch_size):
    batch = requests(tiny_pipeline)
    alone = [tiny_pipeline.engine.generate([r])[0] for r in batch]
    batcher = ContinuousBatcher(tiny_pipeline.engine, max_batch_size=max_batch_size, max_queue=16).start()
    collected = Collector(len(batch))
    try:
        for i, request in enumerate(batch):
            batcher.submit(request, collected.sink(i))
            time.sleep(0.002 * i)  # arrivals while others decode: rows join and leave the running batch
        collected.wait()
    finally:
        batcher.close()
    for i, result in enumerate(alone):
        assert collected.errors[i] is None
        assert collected.tokens(i) == result.token_ids
        assert collected.text(i) == result.text
        assert collected.events[i][-1].finish_reason == result.finish_reason
    assert batcher.stats.peak_batch == min(max_batch_size, len(batch)) or max_batch_size > 1
    assert batcher.stats.peak_batch <= max_batch_size


def test_rows_share_decode_steps(tiny_pipeline):
    batch = requests(tiny_pipeline, n=4)
    batcher = ContinuousBatcher(tiny_pipeline.engine, max_batch_size=4)
    collected = Collector(len(batch))
    for i, request in enumerate(batch):  # queued before the worker starts: one prefill, shared steps
        batcher.submit(request, collected.sink(i))
    batcher.start()
    collected.wait()
    batcher.close()
    longest = max(r.params.max_new_tokens for r in batch)
    assert batcher.stats.prefills == 1
    assert batcher.stats.steps == longest - 1  # one decode step per token after the first, shared by all rows
    assert batcher.stats.generated_tokens == sum(r.params.max_new_tokens for r in batch)


def test_seeded_sampling_is_independent_of_the_batch(tiny_pipeline):
    batch = requests(tiny_pipeline, n=4, temperature=0.9, top_p=0.9, seed=7)
    alone = [tiny_pipeline.engine.generate([r])[0].token_ids for r in batch]
    batcher = ContinuousBatcher(tiny_pipeline.engine, max_batch_size=4).start()
    collected = Collector(len(batch))
    for i, request in enumerate(batch):
        batcher.submit(request, collected.sink(i))
    collected.wait()
    batcher.close()
    assert [collected.tokens(i) for i in range(len(batch))] == alone


def test_cancel_frees_the_slot_and_queue_is_bounded(tiny_pipeline):
    long = tiny_pipeline.request("Say many words.", max_new_tokens=200, min_new_tokens=200)
    batcher = ContinuousBatcher(tiny_pipeline.engine, max_batch_size=1, max_queue=1).start()
    collected = Collector(3)
    first = batcher.submit(long, collected.sink(0))
    while not collected.events[0]:  # running: the one slot is taken
        time.sleep(0.001)
    batcher.submit(tiny_pipeline.request("hi", max_new_tokens=3), collected.sink(1))  # waits: the line is now full
    with pytest.raises(QueueFullError, match="queue is full"):
        batcher.submit(tiny_pipeline.request("hi", max_new_tokens=3), collected.sink(2))
    first.cancel()
    assert collected.done[1].wait(30), "the waiting request did not get the freed slot"
    batcher.close()
    assert len(collected.events[0]) < 200
    assert batcher.stats.cancelled == 1
    assert collected.events[1][-1].finish_reason in ("stop", "length")


def test_a_bad_newcomer_does_not_end_the_running_rows(tiny_pipeline):
    good = tiny_pipeline.request("Describe the image.", [scene()], max_new_tokens=12)
    bad = GenerationRequest(good.prompt_ids, None, SamplingParams(max_new_tokens=3))  # placeholder, no image
    batcher = ContinuousBatcher(tiny_pipeline.engine, max_batch_size=4).start()
    collected = Collector(2)
    batcher.submit(good, collected.sink(0))
    batcher.submit(bad, collected.sink(1))
    collected.wait()
    batcher.close()
    assert isinstance(collected.errors[1], ValueError) and "placeholder" in str(collected.errors[1])
    assert collected.tokens(0) == tiny_pipeline.engine.generate([good])[0].token_ids


def test_gather_rows_right_aligns_and_trims(tiny_pipeline):
    model = tiny_pipeline.model
    prompts = [tiny_pipeline.request("a b c d e f g h", max_new_tokens=2), tiny_pipeline.request("x", max_new_tokens=2)]
    batch = tiny_pipeline.engine.prepare([p.prompt_ids for p in prompts], [None, None])
    cache = model.new_cache(*batch["input_ids"].shape)
    with torch.inference_mode():
        model(**batch, cache=cache, logits_to_keep=1)
    short_only = gather_rows([(cache, [1])], room=5)
    real = int(cache.valid[1].sum())
    assert short_only.length == real  # the long row's extra columns are gone
    assert short_only.max_length == real + 5
    assert bool(short_only.valid[0, :real].all())
    torch.testing.assert_close(short_only.keys[:, 0, :, :real], cache.keys[:, 1, :, cache.length - real:cache.length])
    both = gather_rows([(short_only, [0]), (cache, [0])], room=1)
    assert both.length == cache.length and both.batch_size == 2
    assert int(both.valid[0].sum()) == real and int(both.valid[1].sum()) == int(cache.valid[0].sum())
    assert both.next_position.tolist() == [int(cache.next_position[1]), int(cache.next_position[0])]
