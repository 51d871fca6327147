"""The sampling settings at and past their boundaries: every accepted value samples without inf or NaN, and every
refused one is a one-line ValueError naming the setting."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import pytest
import torch

from owl2.generation.decoding import RowDecoder, pick_tokens
from owl2.generation.engine import GenerationRequest
from owl2.generation.sampling import (
    SEED_MAX,
    SEED_MIN,
    SamplingParams,
    apply_repetition_penalty,
    filtered_distribution,
    make_generator,
)
from owl2.generation.streaming import TextStream

VOCAB = 32000


def next_token(logits: torch.Tensor, params: SamplingParams, seen: Sequence[int] = (), seed: int | None = None) -> int:
    """The id the decoding core picks for one row of ``logits`` [V] under ``params``, with ``seen`` as the ids
    the repetition penalty looks at and the row's generator seeded with ``seed`` when given."""
    if seed is not None:
        params = dataclasses.replace(params, seed=seed)
    row = RowDecoder(GenerationRequest(list(seen), None, params), lambda ids: "", (), params.max_new_tokens,
                     torch.device("cpu"))
    result = pick_tokens([row], logits[None])[0]
    if isinstance(result, Exception):
        raise result
    return result.token


def kept_ids(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool [V]: the ids the top-p filter keeps (temperature 1)."""
    return filtered_distribution(logits[None], [1.0], [0], [top_p])[0] > 0


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 4


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45, 1e-40, 1e-30, 1e-8])
def test_a_tiny_temperature_picks_the_best_token(temperature):
    """A float32 tensor divided by 1e-300 sees a temperature of 0: 0 / 0 = NaN, and ``torch.multinomial`` failed."""
    logits = _logits()
    params = SamplingParams(temperature=temperature, seed=1)
    for seed in range(3):
        assert next_token(logits, params, seed=seed) == int(logits.argmax())


def test_a_tiny_temperature_shares_the_mass_between_tied_best_tokens():
    logits = torch.full((8,), -5.0)
    logits[[2, 5]] = 3.0
    params = SamplingParams(temperature=1e-300)
    picks = {next_token(logits, params, seed=s) for s in range(40)}
    assert picks == {2, 5}


@pytest.mark.parametrize("top_p", [1e-300, 1e-45, 1e-8])
def test_a_tiny_top_p_keeps_the_best_token(top_p):
    """The mass before the best token is 0, but cumsum minus itself is not exactly 0 in floats: with a tiny top_p
    every token was dropped, and sampling failed on NaN probabilities."""
    for seed in range(5):
        logits = _logits(seed)
        kept = kept_ids(logits, top_p)
        assert kept.sum() == 1 and kept[logits.argmax()]
        params = SamplingParams(temperature=1.0, top_p=top_p)
        assert next_token(logits, params, seed=0) == int(logits.argmax())


@pytest.mark.parametrize("penalty", [1e-300, 1e-30, 1e30, 1e300])
@pytest.mark.parametrize("temperature", [0.0, 1e-300, 1.0, 2.0])
def test_extreme_repetition_penalties_stay_finite(penalty, temperature):
    """Positive logits divided by 1e-300 overflowed to +inf, and +inf - +inf is NaN."""
    logits = _logits()
    seen = logits.topk(50).indices
    params = SamplingParams(temperature=temperature, repetition_penalty=penalty, top_p=0.9, top_k=40)
    token = next_token(logits, params, seen.tolist(), seed=0)
    assert 0 <= token < VOCAB
    mask = torch.zeros(VOCAB, dtype=torch.bool)
    mask[seen] = True
    assert apply_repetition_penalty(logits[None], mask[None], torch.tensor([penalty])).isfinite().all()


def test_every_token_masked_is_a_clear_error():
    params = SamplingParams(temperature=1.0)
    with pytest.raises(ValueError, match="every logit is -inf"):
        next_token(torch.full((5,), float("-inf")), params, seed=0)


@pytest.mark.parametrize("seed", [SEED_MIN, -1, 0, 2**63 - 1, 2**63 + 15, SEED_MAX])
def test_every_accepted_seed_seeds_a_generator(seed):
    params = SamplingParams(temperature=1.0, seed=seed)
    generator = make_generator(params, torch.device("cpu"))
    draws = [next_token(_logits(), params) for _ in range(2)]
    assert generator is not None and draws[0] == draws[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"seed": 2**64}, "seed"), ({"seed": SEED_MIN - 1}, "seed"), ({"seed": 10**30}, "seed"),
     ({"seed": 1.5}, "seed"), ({"seed": True}, "seed"), ({"seed": "7"}, "seed"),
     ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
     ({"temperature": -1e-300}, "temperature"),
     ({"top_p": float("nan")}, "top_p"), ({"top_p": 1.0000001}, "top_p"),
     ({"repetition_penalty": float("nan")}, "repetition_penalty"),
     ({"repetition_penalty": float("inf")}, "repetition_penalty"),
     ({"repetition_penalty": -1.0}, "repetition_penalty"),
     ({"max_new_tokens": 4, "min_new_tokens": 5}, "min_new_tokens")],
)
def test_settings_past_a_boundary_are_a_one_line_value_error(kwargs, message):
    """A seed past 64 bits used to pass here and fail later, inside the server's worker (manual_seed's overflow)."""
    with pytest.raises(ValueError, match=message) as info:
        SamplingParams(**kwargs)
    assert "\n" not in str(info.value)


def test_long_stop_strings_cost_little_per_token():
    """Checking whether the text's tail could still grow into a stop string tried every length: the square of the
    text's length on each token, seconds of the shared worker's time for one request with long stop strings."""
    stops = [c + "x" * 100_000 for c in "abcd"]
    stream = TextStream(lambda ids: "yyyy" * len(ids), stops)
    started = time.perf_counter()
    for _ in range(1024):
        stream.push(1)
    assert time.perf_counter() - started < 1.0
    assert stream.text == "yyyy" * 1024


@pytest.mark.parametrize("stops", [["ab", "b"], ["aab"], ["abcab"], ["b", "ba", "bab"]])
def test_held_back_tail_is_the_longest_stop_prefix(stops):
    """The tail held back is exactly the longest tail of the text that can still grow into a stop string."""
    for text in ["", "a", "ab", "aba", "abab", "xaab", "xabca", "xabcab", "b", "bb"]:
        stream = TextStream(lambda ids: "", stops)
        want = max([k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])],
                   default=0)
        assert stream._partial_stop_length(text) == want, (stops, text)


def test_stop_ids_outside_the_vocabulary_are_ignored_by_min_new_tokens(tiny_pipeline):
    """An out-of-vocabulary stop id can never be generated; masking it raised IndexError."""
    request = tiny_pipeline.request("Count to ten.", max_new_tokens=3, min_new_tokens=3,
                                    stop_token_ids=[2, 10**6, -5])
    result = tiny_pipeline.engine.generate([request])[0]
    assert len(result.token_ids) == 3


def test_a_tiny_temperature_generates_the_greedy_answer(tiny_pipeline):
    greedy = tiny_pipeline.chat("Count to ten.", max_new_tokens=6)
    assert tiny_pipeline.chat("Count to ten.", max_new_tokens=6, temperature=1e-300, seed=3) == greedy
