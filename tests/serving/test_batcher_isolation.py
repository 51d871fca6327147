"""A failure in one row of the continuous batcher stays with that row: a newcomer whose generator refuses its
settings, a row whose sampling fails, a client whose sink raises. Every request the worker holds gets its answer,
the running rows go on with exactly the tokens they would have had alone, and the worker keeps serving. Each wait is
bounded, so that a hang fails the test instead of stalling the suite."""

from __future__ import annotations

import dataclasses
import threading
import time

import torch

from owl2.generation import GenerationRequest
from owl2.serving.batcher import ContinuousBatcher, PrefillRow
from tests.serving.test_batcher import Collector, RowCollector

WAIT = 30.0


def _long(tiny_pipeline, text: str = "Count to ten.", tokens: int = 40) -> GenerationRequest:
    return tiny_pipeline.request(text, max_new_tokens=tokens, min_new_tokens=tokens)


def _broken(request: GenerationRequest, **params: object) -> GenerationRequest:
    """``request`` with settings that only fail once the worker uses them (set past SamplingParams' checks, as a
    library caller could): the worker must contain such a failure whatever its cause."""
    broken = dataclasses.replace(request.params)
    for name, value in params.items():
        object.__setattr__(broken, name, value)
    return GenerationRequest(request.prompt_ids, request.images, broken)


def _wait_decoding(collected: Collector, row: int = 0) -> None:
    deadline = time.monotonic() + WAIT
    while not collected.events[row]:
        assert time.monotonic() < deadline, "the first request never started"
        time.sleep(0.001)


def test_a_newcomer_whose_generator_refuses_its_seed_fails_alone(tiny_pipeline):
    """A seed the generator cannot take used to raise in the merge of the newcomers, outside the prefill's handler:
    every running row ended with "Overflow when unpacking long long"."""
    running, beside = _long(tiny_pipeline), _long(tiny_pipeline, "Say hello.", 20)
    bad = _broken(tiny_pipeline.request("hi", max_new_tokens=4, temperature=1.0), seed=2**64)
    want = [tiny_pipeline.engine.generate([r])[0].token_ids for r in (running, beside)]
    batcher = ContinuousBatcher(tiny_pipeline.engine, max_batch_size=4).start()
    collected = Collector(3)
    try:
        batcher.submit(running, collected.sink(0))
        _wait_decoding(collected)
        with batcher._wake:  # both arrive in one iteration: they are prefilled together
            batcher.submit(bad, collected.sink(1))
            batcher.submit(beside, collected.sink(2))
        collected.wait(WAIT)
    finally:
        batcher.close()
    assert isinstance(collected.errors[1], ValueError) and "overflow" in str(collected.errors[1]).lower()
    assert collected.events[1] == []
    assert collected.errors[0] is None and collected.tokens(0) == want[0]
    assert collected.errors[2] is None and collected.tokens(2) == want[1]


def test_a_row_whose_sampling_fails_ends_alone(tiny_pipeline):
    """A sampling failure (here a NaN temperature: NaN probabilities) used to fail every row of the decode step."""
    running = _long(tiny_pipeline)
    bad = _broken(tiny_pipeline.request("hi", max_new_tokens=8, temperature=1.0), temperature=float("nan"))
    want = tiny_pipeline.engine.generate([running])[0].token_ids
    batcher = ContinuousBatcher(tiny_pipeline.engine, max_batch_size=4).start()
    collected = Collector(2)
    try:
        batcher.submit(running, collected.sink(0))
        _wait_decoding(collected)
        batcher.submit(bad, collected.sink(1))
        collected.wait(WAIT)
    finally:
        batcher.close()
    assert collected.errors[1] is not None and collected.events[1] == []
    assert collected.errors[0] is None and collected.tokens(0) == want


def test_a_client_whose_sink_raises_does_not_stop_the_worker(tiny_pipeline):
    """A sink that raised used to end every running row and, raising again while they were told, the worker
    thread itself: every later request then waited forever."""
    running, later = _long(tiny_pipeline), _long(tiny_pipeline, "Say hello.", 12)
    want = [tiny_pipeline.engine.generate([r])[0].token_ids for r in (running, later)]
    calls = []

    def unreachable(event: object) -> None:
        calls.append(event)
        raise ConnectionError("the client's loop is gone")

    batcher = ContinuousBatcher(tiny_pipeline.engine, max_batch_size=4).start()
    collected = Collector(2)
    try:
        batcher.submit(running, collected.sink(0))
        _wait_decoding(collected)
        broken = batcher.submit(_long(tiny_pipeline, "Describe a cat."), unreachable)
        collected.done[0].wait(WAIT)
        batcher.submit(later, collected.sink(1))  # the worker still serves
        collected.wait(WAIT)
    finally:
        batcher.close()
    assert collected.errors == [None, None]
    assert collected.tokens(0) == want[0] and collected.tokens(1) == want[1]
    assert broken.cancelled and len(calls) == 1  # dropped at its first event, never told again


def test_a_rating_client_whose_sink_raises_does_not_stop_the_worker(tiny_pipeline):
    """The same for a prefill-only (rating) row: its sink is called outside the forward's handler."""
    prompt = tiny_pipeline.request("How good is this picture?")
    row = PrefillRow(prompt.prompt_ids, None)
    want = tiny_pipeline.engine.next_token_logits([row.prompt_ids], [None])[0]
    running = _long(tiny_pipeline)
    want_tokens = tiny_pipeline.engine.generate([running])[0].token_ids
    told = threading.Event()

    def unreachable(index: int, result: object) -> None:
        told.set()
        raise ConnectionError("the client's loop is gone")

    batcher = ContinuousBatcher(tiny_pipeline.engine, max_batch_size=4).start()
    decoding, other = Collector(1), RowCollector(1)
    try:
        batcher.submit(running, decoding.sink(0))
        _wait_decoding(decoding)
        batcher.submit_prefill([row, row], unreachable)
        assert told.wait(WAIT)
        batcher.submit_prefill([row], other)
        assert other.done.wait(WAIT), "the worker stopped"
        decoding.wait(WAIT)
    finally:
        batcher.close()
    torch.testing.assert_close(other.results[0], want, rtol=0, atol=1e-5)
    assert decoding.errors[0] is None and decoding.tokens(0) == want_tokens


def test_logprobs_are_reported_before_min_tokens_masks_the_stop_ids(tiny_pipeline):
    """The reported distribution is the model's: the stop id masked by ``min_new_tokens`` still shows as the best
    alternative, with its real log-probability, and the chosen id's is not renormalised over the rest."""
    plain = tiny_pipeline.request("Count to ten.", max_new_tokens=2)
    raw = tiny_pipeline.engine.next_token_logits([plain.prompt_ids], [None])[0].log_softmax(-1)
    best = raw.topk(3)
    stop_id = int(best.indices[0])  # the model's first choice, made a stop id and masked for one step
    request = tiny_pipeline.request("Count to ten.", max_new_tokens=2, min_new_tokens=1, stop_token_ids=[stop_id],
                                    logprobs=3)
    batcher = ContinuousBatcher(tiny_pipeline.engine).start()
    collected = Collector(1)
    try:
        batcher.submit(request, collected.sink(0))
        collected.wait(WAIT)
    finally:
        batcher.close()
    first = collected.events[0][0]
    assert first.token_id == int(best.indices[1])  # the best id that is not masked
    assert first.logprob == float(raw[first.token_id])  # its log-probability under the model, not renormalised
    assert [t for t, _ in first.top_logprobs] == best.indices.tolist()
    torch.testing.assert_close(torch.tensor([lp for _, lp in first.top_logprobs]), best.values, rtol=0, atol=0)
    # the static batches of the library report the same
    events = [e for step in tiny_pipeline.engine.iterate([request]) for e in step]
    assert (events[0].token_id, events[0].logprob, events[0].top_logprobs) == \
        (first.token_id, first.logprob, first.top_logprobs)
