"""Continuous batching against the engine's own runs: a row's tokens do not depend on who shares its steps."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch

from owl2.generation import GenerationRequest, SamplingParams
from owl2.serving.batcher import ContinuousBatcher, PrefillRow, PrefillSubmission, QueueFullError, Scheduler
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


def record_step_sizes(batcher: ContinuousBatcher) -> list[int]:
    """The number of rows of every decode step ``batcher`` runs from now on, appended as it runs them."""
    sizes: list[int] = []
    step = batcher.runner.step

    def counted(batch):
        sizes.append(len(batch.rows))
        return step(batch)

    batcher.runner.step = counted
    return sizes


def requests(tiny_pipeline, n: int = 7, **sampling):
    colours = ["red", "blue", "green"]
    return [tiny_pipeline.request("Describe the image in detail please." if i % 2 == 0 else f"Count to {i}.",
                              [scene(colours[i % 3])] if i % 2 == 0 else [], max_new_tokens=4 + 3 * i, **sampling)
            for i in range(n)]


@pytest.mark.parametrize("max_batch_size", [1, 3, 8])
def test_staggered_requests_match_runs_alone(tiny_pipeline, max_batch_size):
    batch = requests(tiny_pipeline)
    alone = [tiny_pipeline.engine.generate([r])[0] for r in batch]
    batcher = ContinuousBatcher(tiny_pipeline.engine, max_batch_size=max_batch_size, max_queue=16)
    decoded_together = record_step_sizes(batcher)
    batcher.start()
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
    assert batcher.stats.peak_batch == max(decoded_together) <= max_batch_size
    assert sum(decoded_together) == sum(len(r.token_ids) for r in alone)  # each step emits one token per row


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


def test_cache_rows_right_align_and_trim(tiny_pipeline):
    model = tiny_pipeline.model
    prompts = [tiny_pipeline.request("a b c d e f g h", max_new_tokens=2), tiny_pipeline.request("x", max_new_tokens=2)]
    batch = tiny_pipeline.engine.prepare([p.prompt_ids for p in prompts], [None, None])
    cache = model.new_cache(*batch["input_ids"].shape)
    with torch.inference_mode():
        model(**batch, cache=cache, logits_to_keep=1)
    short_only = cache.select_rows([1], room=5)
    real = int(cache.valid[1].sum())
    assert short_only.length == real  # the long row's extra columns are gone
    assert short_only.max_length == real + 5
    assert bool(short_only.valid[0, :real].all())
    torch.testing.assert_close(short_only.keys[:, 0, :, :real], cache.keys[:, 1, :, cache.length - real:cache.length])
    both = short_only.new_zeros(2, cache.span([0]) + 1, length=cache.span([0]))  # the longest history
    both.write_rows(short_only, [0], [0])
    both.write_rows(cache, [0], [1])
    assert both.length == cache.length and both.batch_size == 2
    assert int(both.valid[0].sum()) == real and int(both.valid[1].sum()) == int(cache.valid[0].sum())
    assert both.next_position.tolist() == [int(cache.next_position[1]), int(cache.next_position[0])]


# ------------------------------------------------------------------------------------------- prefill-only rows
class RowCollector:
    """Gathers a prefill submission's per-row results (logits or errors) as the worker hands them over."""

    def __init__(self, n: int, on_result: Callable[[int, object], None] | None = None) -> None:
        self.results: dict[int, object] = {}
        self.n = n
        self.on_result = on_result
        self.done = threading.Event()

    def __call__(self, row: int, result: object) -> None:
        self.results[row] = result
        if self.on_result is not None:
            self.on_result(row, result)
        if len(self.results) == self.n or isinstance(result, BaseException):
            self.done.set()


def prefill_rows(tiny_pipeline, n: int) -> list[PrefillRow]:
    """Rows of different lengths, with and without an image."""
    colours = ["red", "blue", "green", "olive"]  # not purple: test_server counts its first encoding
    rows = []
    for i in range(n):
        request = tiny_pipeline.request("How good is this picture? " * (1 + i % 3), [scene(colours[i % 4])]
                                        if i % 3 != 2 else [])
        rows.append(PrefillRow(request.prompt_ids, request.images))
    return rows


def alone(tiny_pipeline, row: PrefillRow) -> torch.Tensor:
    return tiny_pipeline.engine.next_token_logits([row.prompt_ids], [row.images])[0]


def test_prefill_rows_run_between_decode_steps_and_match_runs_alone(tiny_pipeline):
    generation = tiny_pipeline.request("Describe the image.", [scene("blue")], max_new_tokens=40, min_new_tokens=40)
    want_tokens = tiny_pipeline.engine.generate([generation])[0].token_ids
    rows = prefill_rows(tiny_pipeline, 7)
    want = [alone(tiny_pipeline, row) for row in rows]
    batcher = ContinuousBatcher(tiny_pipeline.engine, max_batch_size=4, prefill_rows=2).start()
    decoding = Collector(1)
    first, second = RowCollector(4), RowCollector(3)
    try:
        batcher.submit(generation, decoding.sink(0))
        while not decoding.events[0]:  # the chat row is decoding
            time.sleep(0.001)
        batcher.submit_prefill(rows[:4], first)
        batcher.submit_prefill(rows[4:], second)
        assert first.done.wait(60) and second.done.wait(60)
        decoding.wait()
    finally:
        batcher.close()
    got = [first.results[i] for i in range(4)] + [second.results[i] for i in range(3)]
    for logits, expected in zip(got, want, strict=True):
        assert logits.shape == expected.shape and logits.device.type == "cpu"
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert decoding.errors[0] is None and decoding.tokens(0) == want_tokens  # untouched by the prefills
    stats = batcher.stats
    assert stats.prefill_only_rows == 7 and stats.peak_prefill_only_rows == 2
    assert stats.prefill_only_batches == 4  # 7 rows in batches of at most 2
    assert stats.prefill_only_during_decode >= 1
    assert stats.waiting_prefill_rows == 0


def test_a_bad_prefill_row_fails_alone(tiny_pipeline):
    good = prefill_rows(tiny_pipeline, 3)
    bad = PrefillRow(good[0].prompt_ids, None)  # an image placeholder without its image
    generation = tiny_pipeline.request("Count to ten.", max_new_tokens=20, min_new_tokens=20)
    batcher = ContinuousBatcher(tiny_pipeline.engine, max_batch_size=4, prefill_rows=8)
    decoding = Collector(1)
    mixed, other = RowCollector(3), RowCollector(1)
    batcher.submit(generation, decoding.sink(0))
    batcher.submit_prefill([good[0], bad, good[1]], mixed)  # queued before the start: all in one forward
    batcher.submit_prefill([good[2]], other)
    batcher.start()
    try:
        assert mixed.done.wait(60) and other.done.wait(60)
        decoding.wait()
    finally:
        batcher.close()
    assert isinstance(mixed.results[1], ValueError) and "placeholder" in str(mixed.results[1])
    torch.testing.assert_close(mixed.results[0], alone(tiny_pipeline, good[0]), rtol=0, atol=1e-5)
    assert 2 not in mixed.results  # its request is lost: the row after the bad one is not run
    torch.testing.assert_close(other.results[0], alone(tiny_pipeline, good[2]), rtol=0, atol=1e-5)
    assert decoding.errors[0] is None
    assert decoding.tokens(0) == tiny_pipeline.engine.generate([generation])[0].token_ids


def test_cancelled_prefill_rows_are_not_run(tiny_pipeline):
    rows = prefill_rows(tiny_pipeline, 6)
    batcher = ContinuousBatcher(tiny_pipeline.engine, prefill_rows=1)
    gone, staying = RowCollector(6), RowCollector(1)
    batcher.submit_prefill(rows, gone).cancel()  # a client that left while its rows waited
    submissions: list[PrefillSubmission] = []
    leaving = RowCollector(6, on_result=lambda row, result: submissions[0].cancel())  # leaves after its first row
    submissions.append(batcher.submit_prefill(rows, leaving))
    batcher.submit_prefill(rows[:1], staying)
    batcher.start()
    try:
        assert staying.done.wait(60)
    finally:
        batcher.close()
    assert gone.results == {}
    assert list(leaving.results) == [0]
    assert batcher.stats.prefill_only_rows == 2 and batcher.stats.cancelled == 2


def test_prefill_queue_is_bounded_and_close_fails_waiting_rows(tiny_pipeline):
    rows = prefill_rows(tiny_pipeline, 6)  # 4 with an image, 2 without: 6 images' worth
    batcher = ContinuousBatcher(tiny_pipeline.engine, prefill_queue_images=4)
    first = RowCollector(6)
    batcher.submit_prefill(rows, first)  # over the bound on its own, but the line is empty: taken
    with pytest.raises(QueueFullError, match="rating queue is full"):
        batcher.submit_prefill(rows[:1], RowCollector(1))
    assert batcher.queue_depth == 1 and batcher.stats.waiting_prefill_rows == 6
    batcher.start()
    batcher.close()  # may have run some rows already; every other row is told
    assert len(first.results) == 6
    errors = [r for r in first.results.values() if isinstance(r, BaseException)]
    assert all(isinstance(e, RuntimeError) and "shutting down" in str(e) for e in errors)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit_prefill(rows[:1], RowCollector(1))


def test_scheduler_budgets():
    """Rows x the longest row's positions within ``prefill_tokens``, at most ``prefill_rows`` rows, arrival order,
    a row over the budget alone, cancelled submissions skipped."""
    scheduler = Scheduler(max_queue=4, prefill_queue_images=100, prefill_rows=3, prefill_tokens=100,
                          tokens_per_image=10)
    short = PrefillRow([1, 2, -200, 3], torch.zeros(1, 3, 2, 2))  # 3 text + 10 = 13 positions
    video = PrefillRow([1, -200, -200, -200, 2], torch.zeros(3, 3, 2, 2))  # 2 + 30 = 32
    huge = PrefillRow([1] + [-200] * 12, torch.zeros(12, 3, 2, 2))  # 121: over the budget
    sink = RowCollector(0)
    a = PrefillSubmission([short] * 5, sink)
    b = PrefillSubmission([video, video, short], sink)
    c = PrefillSubmission([huge], sink)
    d = PrefillSubmission([short], sink)
    e = PrefillSubmission([short, short], sink)
    for submission in (a, b, c, d, e):
        scheduler.add_prefill(submission)
    d.cancel()

    def take() -> list[tuple[str, int]]:
        names = {id(a): "a", id(b): "b", id(c): "c", id(d): "d", id(e): "e"}
        return [(names[id(s)], i) for s, i in scheduler.next_prefill()]

    assert take() == [("a", 0), ("a", 1), ("a", 2)]  # the row budget
    assert take() == [("a", 3), ("a", 4), ("b", 0)]  # 3 x 32 = 96 <= 100
    assert take() == [("b", 1), ("b", 2)]  # the huge row would make it 3 x 121
    assert take() == [("c", 0)]  # alone, though over the budget
    assert take() == [("e", 0), ("e", 1)]  # d was cancelled
    assert take() == [] and scheduler.queued_rows == 0 and scheduler.queued_images == 0
    assert scheduler.cancelled == 1
