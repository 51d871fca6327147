"""The decoding core against a straightforward per-row reference: ``decode_rows`` processes every row of a step
as batched tensor operations, and each row must get exactly what the row alone, computed step by step in plain
per-row code, would get: greedy, temperature with top-k/top-p and a seed, the repetition penalty,
``min_new_tokens``; the log-probabilities are those of the raw logits; a row that fails ends alone.

That the whole step reaches the host in one transfer is a property of ``pick_tokens``' structure (one ``tolist``
of a packed tensor); it is not observable from outside without instrumenting torch, so it is not asserted here."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from owl2.generation import sampling
from owl2.generation.decoding import RowDecoder, StepEvent, decode_rows, pick_tokens
from owl2.generation.engine import GenerationRequest
from owl2.generation.sampling import SamplingParams, filtered_distribution

VOCAB = 300
STEPS = 6
EOS = 2


def decode(ids: list[int]) -> str:
    return "".join(chr(0x41 + i % 26) for i in ids)


def make_row(params: SamplingParams, prompt: list[int]) -> RowDecoder:
    return RowDecoder(GenerationRequest(prompt, None, params), decode, (EOS,), params.max_new_tokens,
                      torch.device("cpu"))


def step_logits(step: int, rows: int) -> torch.Tensor:
    """Logits [rows, V] with a few ties, a wide range and the EOS id often the best."""
    g = torch.Generator().manual_seed(100 + step)
    logits = torch.randn(rows, VOCAB, generator=g) * 3
    logits[:, EOS] = logits.max(-1).values + 1.0
    logits[:, 10] = logits[:, 11]  # a tie
    logits[1::2] = logits[1::2].round()  # many ties, also where top-k and top-p cut
    return logits


class Reference:
    """One row decoded alone, in plain per-row code: the rules of ``SamplingParams`` written out."""

    def __init__(self, params: SamplingParams, prompt: list[int]) -> None:
        self.params = params
        self.seen = [t for t in prompt if t >= 0]
        self.count = 0
        self.generator = None if params.greedy else torch.Generator().manual_seed(params.seed)

    def pick(self, logits: torch.Tensor) -> int:
        p = self.params
        x = logits.clone()
        if self.count < p.min_new_tokens:
            x[EOS] = float("-inf")
        if p.repetition_penalty != 1.0 and self.seen:
            ids = torch.tensor(sorted(set(self.seen)))
            s = x[ids]
            largest = torch.finfo(x.dtype).max
            x[ids] = torch.where(s > 0, s / p.repetition_penalty, s * p.repetition_penalty).clamp(-largest, largest)
        if p.greedy:
            token = int(x.argmax())
        else:
            scaled = (x - x.max()).double() / p.temperature
            if 0 < p.top_k < VOCAB:
                kth = scaled.topk(p.top_k).values[-1]
                scaled[scaled < kth] = float("-inf")
            # top-p over the tokens best first, ties by id
            probs = scaled.softmax(-1).tolist()
            order = sorted(range(VOCAB), key=lambda i: (-float(scaled[i]), i))
            keep, mass = set(), 0.0
            for j, i in enumerate(order):
                if j > 0 and p.top_p < 1 and mass >= p.top_p:
                    break
                keep.add(i)
                mass += probs[i]
            # the draw: the first id whose cumulative kept mass exceeds the uniform times the kept mass
            kept = [probs[i] if i in keep else 0.0 for i in range(VOCAB)]
            u = float(torch.rand((), generator=self.generator, dtype=torch.float64))
            target, running, token = u * sum(kept), 0.0, max(keep)
            for i, prob in enumerate(kept):
                running += prob
                if prob > 0 and running > target:
                    token = i
                    break
        self.seen.append(token)
        self.count += 1
        return token


SETTINGS = [
    SamplingParams(max_new_tokens=STEPS),
    SamplingParams(max_new_tokens=STEPS, repetition_penalty=1.7),
    SamplingParams(max_new_tokens=STEPS, min_new_tokens=3),
    SamplingParams(max_new_tokens=STEPS, temperature=0.8, seed=1),
    SamplingParams(max_new_tokens=STEPS, temperature=1.3, top_k=5, seed=2),
    SamplingParams(max_new_tokens=STEPS, temperature=1.0, top_p=0.6, seed=3),
    SamplingParams(max_new_tokens=STEPS, temperature=0.7, top_k=20, top_p=0.9, seed=4),
    SamplingParams(max_new_tokens=STEPS, temperature=1.1, repetition_penalty=0.6, top_p=0.95, seed=5,
                   min_new_tokens=STEPS),
    # the top-p set is larger than the candidates a CPU looks at first: the whole row is sorted
    SamplingParams(max_new_tokens=STEPS, temperature=6.0, top_p=0.95, seed=6),
    SamplingParams(max_new_tokens=STEPS, temperature=1.0, top_k=100, top_p=0.99, seed=7),
]
PROMPTS = [[1, 5, 7, -200, 9], [1, 12], [1, 40, 41], [1], [1, 3, 3], [1, 250], [1, 10, 11], [1, 77, 78, 79], [1],
           [1, 8]]


def run_batched(settings: list[SamplingParams], prompts: list[list[int]], logits_rows: list[int]) -> list[list[int]]:
    """Decode ``STEPS`` steps of the rows together; row i reads row ``logits_rows[i]`` of each step's logits."""
    rows = [make_row(p, prompt) for p, prompt in zip(settings, prompts, strict=True)]
    tokens: list[list[int]] = [[] for _ in rows]
    for step in range(STEPS):
        logits = step_logits(step, len(SETTINGS))[logits_rows]
        for i, result in enumerate(pick_tokens(rows, logits)):
            if result is None:
                continue
            assert not isinstance(result, Exception), result
            tokens[i].append(result.token)
            rows[i].emit(i, result.token)
    return tokens


def test_every_row_of_a_batch_equals_the_per_row_reference():
    got = run_batched(SETTINGS, PROMPTS, list(range(len(SETTINGS))))
    for i, (params, prompt) in enumerate(zip(SETTINGS, PROMPTS, strict=True)):
        reference = Reference(params, prompt)
        want = []
        for step in range(STEPS):
            token = reference.pick(step_logits(step, len(SETTINGS))[i])
            want.append(token)
            if token == EOS:
                break
        assert got[i] == want, (i, params)
    # the settings did something: min_new_tokens held EOS back, the greedy rows without it took EOS at once
    assert got[0] == [EOS] and len(got[2]) > 1 and EOS not in got[7]


def test_a_seeded_row_gets_the_same_ids_alone_and_in_any_batch():
    seeded = dataclasses.replace(SETTINGS[6], min_new_tokens=STEPS)
    alone = run_batched([seeded], [PROMPTS[6]], [6])[0]
    mixed = [SETTINGS[4], SETTINGS[0], seeded, SETTINGS[5], SETTINGS[1]]
    prompts = [PROMPTS[4], PROMPTS[0], PROMPTS[6], PROMPTS[5], PROMPTS[1]]
    together = run_batched(mixed, prompts, [4, 0, 6, 5, 1])
    assert together[2] == alone and len(alone) == STEPS
    reversed_batch = run_batched(mixed[::-1], prompts[::-1], [1, 5, 6, 0, 4])
    assert reversed_batch[2] == alone


def test_logprobs_are_the_log_softmax_of_the_raw_logits():
    """Before min_new_tokens masks the stop id, the penalty and the temperature: EOS, masked, still shows as the
    best alternative with its real log-probability."""
    settings = [SamplingParams(max_new_tokens=4, min_new_tokens=2, logprobs=3, repetition_penalty=2.0),
                SamplingParams(max_new_tokens=4),
                SamplingParams(max_new_tokens=4, temperature=2.0, seed=0, logprobs=0)]
    rows = [make_row(p, [1, 4]) for p in settings]
    logits = step_logits(0, 3)
    raw = logits.log_softmax(-1)
    picks = pick_tokens(rows, logits)
    best = raw[0].topk(3)
    assert picks[0].token != EOS and picks[0].logprob == float(raw[0, picks[0].token])
    assert [t for t, _ in picks[0].top] == best.indices.tolist() and best.indices[0] == EOS
    assert [v for _, v in picks[0].top] == best.values.tolist()
    assert picks[1].logprob is None and picks[1].top is None
    assert picks[2].logprob == float(raw[2, picks[2].token]) and picks[2].top is None


def test_a_failing_row_ends_alone_and_its_neighbours_get_their_events():
    nan = dataclasses.replace(SETTINGS[3])
    object.__setattr__(nan, "temperature", float("nan"))  # past SamplingParams' checks, as a library caller could
    masked = SamplingParams(max_new_tokens=4, temperature=1.0, seed=0)

    def broken(ids: list[int]) -> str:
        raise RuntimeError("the tokenizer failed")

    rows = [make_row(SETTINGS[0], [1]), make_row(nan, [1]), make_row(masked, [1]), make_row(SETTINGS[4], [1]),
            RowDecoder(GenerationRequest([1], None, SETTINGS[2]), broken, (EOS,), STEPS, torch.device("cpu"))]
    rows[0].finished = True
    logits = step_logits(0, 5)
    logits[2] = float("-inf")  # every token of this sampling row masked
    results = decode_rows(rows, logits)
    assert results[0] is None
    assert isinstance(results[1], ValueError) and "NaN" in str(results[1])
    assert isinstance(results[2], ValueError) and "every logit is -inf" in str(results[2])
    assert isinstance(results[4], RuntimeError)
    alone = decode_rows([make_row(SETTINGS[4], [1])], logits[3:4])[0]
    assert isinstance(results[3], StepEvent) and isinstance(alone, StepEvent)
    assert (results[3].token_id, results[3].delta) == (alone.token_id, alone.delta)


@pytest.mark.parametrize("temperature", [0.0, 1e-300, 1.0])
def test_min_new_tokens_never_picks_a_stop_id(temperature):
    params = SamplingParams(max_new_tokens=STEPS, min_new_tokens=STEPS, temperature=temperature, seed=9,
                            stop_token_ids=[EOS, 7, VOCAB + 5])
    row = make_row(params, [1])
    for step in range(STEPS):
        logits = step_logits(step, 1)
        logits[0, 7] = logits[0].max() + 5
        event = decode_rows([row], logits)[0]
        assert isinstance(event, StepEvent) and event.token_id not in (EOS, 7)
    assert row.finished and row.count == STEPS


@pytest.mark.parametrize("seed", range(8))
def test_the_candidates_shortcut_equals_a_full_sort(monkeypatch, seed):
    """On a CPU top-k/top-p look at the best few tokens first; with ties and flat rows the kept set must be the one
    a sort of the whole row gives."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(6, 2000, generator=g) * torch.tensor([[0.3], [1.0], [3.0], [8.0], [0.05], [2.0]])).round()
    settings = ([1.0, 1.0, 0.5, 2.0, 1.0, 1.0], [0, 70, 0, 3, 0, 200], [0.9, 0.5, 0.99, 0.7, 0.3, 1.0])
    shortcut = filtered_distribution(logits, *settings)
    monkeypatch.setattr(sampling, "_CANDIDATES", 2000)
    assert torch.equal(shortcut, filtered_distribution(logits, *settings))
