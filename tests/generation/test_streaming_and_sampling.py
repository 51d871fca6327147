"""Streaming detokenisation, stop strings and the logits processors, on hand-checked cases."""

from __future__ import annotations

import dataclasses

import pytest
import sentencepiece as spm
import torch

from owl2.generation.decoding import RowDecoder, pick_tokens
from owl2.generation.engine import GenerationRequest
from owl2.generation.sampling import SamplingParams, apply_repetition_penalty, filtered_distribution
from owl2.generation.streaming import TextStream
from tests.conftest import FIXTURES

SP = spm.SentencePieceProcessor(model_file=str(FIXTURES / "llama2-tokenizer" / "tokenizer.model"))


def decode(ids: list[int]) -> str:
    return SP.decode(ids)


def byte_ids(text: str) -> list[int]:
    """LLaMA's byte-fallback ids (<0xNN> = 3 + NN), one per UTF-8 byte."""
    return [3 + b for b in text.encode("utf-8")]


def run(stream: TextStream, ids: list[int]) -> list[str]:
    deltas = [stream.push(i) for i in ids]
    return [*deltas, stream.finish()]


def test_multibyte_characters_are_never_split():
    ids = SP.encode("naïve 日本 ok") + byte_ids("é€😀")
    deltas = run(TextStream(decode), ids)
    assert "".join(deltas) == decode(ids) == "naïve 日本 oké€😀"
    assert all("\ufffd" not in d for d in deltas)
    # the 4-byte emoji arrives whole with its fourth byte (the last delta is finish())
    assert deltas[-5:] == ["", "", "", "😀", ""]


def test_stop_string_cuts_the_text_and_is_never_streamed():
    ids = SP.encode("Hello there</s>and more")
    stream = TextStream(decode, stop=["</s>"])
    deltas = run(stream, ids)
    assert "".join(deltas) == "Hello there"
    assert stream.stopped
    assert all("<" not in d for d in deltas)  # the partial "</" was held back, then dropped


def test_held_back_prefix_is_released_when_it_does_not_become_a_stop():
    ids = SP.encode("a <b> c")
    deltas = run(TextStream(decode, stop=["<stop>"]), ids)
    assert "".join(deltas) == "a <b> c"


def test_earliest_of_several_stop_strings_wins():
    stream = TextStream(decode, stop=["END", "STOP"])
    assert "".join(run(stream, SP.encode("one STOP two END"))) == "one "


def pick(logits: torch.Tensor, params: SamplingParams, seed: int | None = None) -> int:
    """The id the decoding core picks for one row of ``logits`` [V] under ``params`` (its generator seeded with
    ``seed`` when given)."""
    if seed is not None:
        params = dataclasses.replace(params, seed=seed)
    row = RowDecoder(GenerationRequest([], None, params), decode, (), params.max_new_tokens, torch.device("cpu"))
    result = pick_tokens([row], logits[None])[0]
    if isinstance(result, Exception):
        raise result
    return result.token


def kept(logits: torch.Tensor, top_k: int, top_p: float) -> list[bool]:
    """Which ids of ``logits`` [V] the top-k/top-p filters keep (temperature 1)."""
    return (filtered_distribution(logits[None], [1.0], [top_k], [top_p])[0] > 0).tolist()


def test_repetition_penalty_follows_the_ctrl_rule():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    seen = torch.zeros(4, dtype=torch.bool)
    seen[[0, 1, 1]] = True
    out = apply_repetition_penalty(logits[None], seen[None], torch.tensor([2.0]))
    assert out[0].tolist() == [1.0, -4.0, 1.0, 0.5]


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    assert kept(logits, top_k=2, top_p=1.0) == [True, True, False, False, False]
    # top_p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 is needed too; 0.1 and 0.05 go
    assert kept(logits, top_k=0, top_p=0.8) == [True, True, True, False, False]
    assert kept(logits, top_k=0, top_p=0.01) == [True, False, False, False, False]  # the best token always stays


def test_sampling_is_reproducible_with_a_seed_and_greedy_without_temperature():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=7)
    draws = [pick(logits, params) for _ in range(2)]
    assert draws[0] == draws[1]
    greedy = SamplingParams(temperature=0.0)
    assert pick(logits, greedy) == int(logits.argmax())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
     ({"top_k": -1}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty"), ({"stop": [""]}, "stop")],
)
def test_invalid_sampling_params_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
