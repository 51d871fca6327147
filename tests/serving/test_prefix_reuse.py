"""Prefix reuse in the server: the batcher's greedy tokens with a prefix cache equal the engine's without one (a chat's
turns, requests sharing an image and a prompt start, another image with the same text), and /metrics counts it."""

from __future__ import annotations

import threading

import httpx
import pytest

from owl2.generation import GenerationEngine, GenerationRequest
from owl2.generation.prefix_cache import PrefixCache
from owl2.serving.app import ServerSettings, create_app
from owl2.serving.batcher import ContinuousBatcher
from tests.serving.conftest import data_url, scene, serve_in_thread

CHAT = "/v1/chat/completions"


def plain_engine(pipeline) -> GenerationEngine:
    tokenizer = pipeline.tokenizer
    return GenerationEngine(pipeline.model, tokenizer.decode, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, prefix_cache=False)


def run(batcher: ContinuousBatcher, requests: list[GenerationRequest]) -> list[list[tuple[int, float]]]:
    """Submit ``requests`` at once and wait for their tokens, each with its log-probability."""
    tokens: list[list[tuple[int, float]]] = [[] for _ in requests]
    done = [threading.Event() for _ in requests]
    errors: list[BaseException] = []

    def sink(i: int):
        def receive(event) -> None:
            if isinstance(event, BaseException):
                errors.append(event)
                done[i].set()
                return
            if event.token_id is not None:
                tokens[i].append((event.token_id, event.logprob))
            if event.finish_reason:
                done[i].set()
        return receive

    for i, request in enumerate(requests):
        batcher.submit(request, sink(i))
    for event in done:
        assert event.wait(60), "a request never finished"
    assert not errors
    return tokens


def alone(engine: GenerationEngine, request: GenerationRequest) -> list[tuple[int, float]]:
    return [(e.token_id, e.logprob) for step in engine.iterate([request]) for e in step if e.token_id is not None]


def same(got: list[list[tuple[int, float]]], want: list[list[tuple[int, float]]]) -> bool:
    """The same greedy tokens, and log-probabilities equal to float32 rounding (a shifted position shows here even
    where the tiny model's argmax does not move)."""
    return [[t for t, _ in row] for row in got] == [[t for t, _ in row] for row in want] and all(
        abs(a - b) < 1e-4 for g, w in zip(got, want, strict=True) for (_, a), (_, b) in zip(g, w, strict=True))


def turn(picture, *exchanges: str) -> list[dict]:
    """A chat about ``picture``: the user's question, then answers and questions alternating."""
    messages = [{"role": "user", "content": [{"type": "image", "image": picture},
                                             {"type": "text", "text": exchanges[0]}]}]
    for k, text in enumerate(exchanges[1:]):
        messages.append({"role": "assistant" if k % 2 == 0 else "user", "content": text})
    return messages


def test_a_three_turn_chat_through_the_batcher(tiny_pipeline):
    plain = plain_engine(tiny_pipeline)
    cache = PrefixCache(64 * 2**20)
    batcher = ContinuousBatcher(tiny_pipeline.engine, max_batch_size=4, prefix_cache=cache).start()
    picture = scene("orange")
    questions = ["What is in the picture?", "What colour is the square?", "Where is it?"]
    exchanges: list[str] = []
    try:
        for k, question in enumerate(questions):
            exchanges.append(question)
            request = tiny_pipeline.request(turn(picture, *exchanges), max_new_tokens=8, logprobs=0)
            before = cache.stats.reused_tokens
            got = run(batcher, [request])
            assert same(got, [alone(plain, request)])
            reused = cache.stats.reused_tokens - before
            if k == 0:
                assert reused == 0
            else:  # the previous prompt at least (its image included) was not prefilled again
                assert reused > tiny_pipeline.model.config.tokens_per_image
            exchanges.append(tiny_pipeline.tokenizer.decode([t for t, _ in got[0]]))
    finally:
        batcher.close()
    # (an answer rendered back into the next prompt may be tokenized otherwise, so earlier turns can stay held)
    assert cache.stats.hits == 2 and cache.stats.misses == 1 and 1 <= len(cache) <= 3


def test_requests_sharing_an_image_join_one_batch_with_different_hits(tiny_pipeline):
    plain = plain_engine(tiny_pipeline)
    cache = PrefixCache(64 * 2**20)
    batcher = ContinuousBatcher(tiny_pipeline.engine, max_batch_size=4, prefix_cache=cache).start()
    picture, other = scene("teal"), scene("olive")
    first = tiny_pipeline.request([{"role": "user", "content": [{"type": "image", "image": picture},
                                                                {"type": "text", "text": "Describe it."}]}],
                                  max_new_tokens=6, logprobs=0)
    later = [
        tiny_pipeline.request(turn(picture, "Describe it in a few words."), max_new_tokens=6, logprobs=0),
        tiny_pipeline.request(turn(picture, "Describe it.", "A square.", "Why?"), max_new_tokens=5, logprobs=0),
        tiny_pipeline.request(turn(other, "Describe it."), max_new_tokens=6, logprobs=0),  # another image
        tiny_pipeline.request("Count to three.", max_new_tokens=6, logprobs=0),
    ]
    try:
        assert same(run(batcher, [first]), [alone(plain, first)])
        before = cache.stats.reused_tokens
        got = run(batcher, later)
        reused = cache.stats.reused_tokens - before
        again = run(batcher, later)  # and the same requests once more, now each hitting its own earlier run
    finally:
        batcher.close()
    want = [alone(plain, r) for r in later]
    assert same(got, want) and same(again, want)
    assert reused > 2 * tiny_pipeline.model.config.tokens_per_image  # the two rows with the shared image
    # the first run: the two rows with the shared image; the second: every row but the text one, which is shorter
    # than a block of 16 positions (the other image's row shares less than a block with the first request)
    assert cache.stats.hits == 2 + len(later) - 1


@pytest.mark.parametrize("megabytes", [512.0, 0.0])
def test_metrics_after_a_two_turn_chat(tiny_pipeline, megabytes):
    plain = plain_engine(tiny_pipeline)
    app = create_app(tiny_pipeline, ServerSettings(model_name="tiny", prefix_cache_mb=megabytes))
    picture = scene("navy")
    url = data_url(picture)
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                          {"type": "text", "text": "What is it?"}]}]
    with serve_in_thread(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        body = {"messages": first, "max_tokens": 6, "temperature": 0}
        answer = client.post(CHAT, json=body).json()["choices"][0]["message"]["content"]
        second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And the colour?"}]
        reply = client.post(CHAT, json={**body, "messages": second}).json()["choices"][0]["message"]["content"]
        metrics = client.get("/metrics").text
    request = tiny_pipeline.request(turn(picture, "What is it?", answer, "And the colour?"), max_new_tokens=6)
    assert reply == plain.generate([request])[0].text
    if megabytes:
        assert "owl2_prefix_cache_hits 1.0" in metrics and "owl2_prefix_cache_misses 1.0" in metrics
        assert "owl2_prefix_cache_entries 0.0" not in metrics and "owl2_prefix_cache_bytes 0.0" not in metrics
        reused = next(line for line in metrics.splitlines() if line.startswith("owl2_prefix_cache_reused_tokens "))
        assert float(reused.split()[1]) > tiny_pipeline.model.config.tokens_per_image
    else:
        assert "owl2_prefix_cache_hits 0.0" in metrics and "owl2_prefix_cache_bytes 0.0" in metrics


def test_the_serve_flag(tmp_path):
    from owl2.cli.main import build_parser
    from owl2.cli.serve import settings_from_args

    parse = build_parser().parse_args
    assert settings_from_args(parse(["serve", "--model", str(tmp_path / "m")])).prefix_cache_mb == 512.0
    assert settings_from_args(parse(["serve", "--prefix-cache-mb", "0"])).prefix_cache_mb == 0.0
    with pytest.raises(ValueError, match="prefix_cache_mb"):
        settings_from_args(parse(["serve", "--prefix-cache-mb", "-1"]))
