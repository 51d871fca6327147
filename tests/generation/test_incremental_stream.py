"""``TextStream`` with the real LLaMA-2 tokenizer: on random outputs (byte pieces, characters split over tokens,
leading-space pieces, special ids, stop strings across tokens) the deltas concatenate to exactly the full decode,
and each token decodes only a bounded window of recent ids."""

from __future__ import annotations

import random

import pytest

from owl2.generation.streaming import TextStream
from owl2.processing.tokenizer import Owl2Tokenizer, load_tokenizer
from tests.conftest import FIXTURES

SPACE_PIECE = 29871  # "▁" alone: LLaMA writes " 1" as "▁", "1"


@pytest.fixture(scope="module", params=("sentencepiece", "tokenizers"))
def tokenizer(request: pytest.FixtureRequest) -> Owl2Tokenizer:
    return load_tokenizer(FIXTURES / "llama2-tokenizer", backend=request.param)


def byte_ids(text: str) -> list[int]:
    """LLaMA's byte-fallback ids (<0xNN> = 3 + NN), one per UTF-8 byte."""
    return [3 + b for b in text.encode("utf-8")]


def random_output(tokenizer: Owl2Tokenizer, rng: random.Random, length: int) -> list[int]:
    """``length`` ids mixing every kind of piece a model can emit."""
    words = ["Hello", " world", " naïve", " 日本語", " 1", " 23", "\n", " é", "€", " 😀", "a", " the", "'s", " ok."]
    ids: list[int] = []
    while len(ids) < length:
        kind = rng.random()
        if kind < 0.3:
            ids.append(rng.randrange(3, tokenizer.vocab_size))  # any piece
        elif kind < 0.45:
            ids.append(rng.randrange(3, 259))  # a lone byte: often not UTF-8 on its own
        elif kind < 0.6:
            ids += byte_ids(rng.choice("é€😀日ß"))  # a character split over byte pieces
        elif kind < 0.9:
            ids += tokenizer.encode(rng.choice(words), add_bos=False)  # leading-space pieces, words
        elif kind < 0.96:
            ids.append(SPACE_PIECE)
        else:
            ids.append(rng.choice([0, 1, 2]))  # <unk>, <s>, </s>
    return ids[:length]


def stream_all(stream: TextStream, ids: list[int]) -> list[str]:
    deltas = []
    for i in ids:
        deltas.append(stream.push(i))
        if stream.stopped:
            break
    return [*deltas, stream.finish()]


@pytest.mark.parametrize("seed", range(40))
def test_deltas_concatenate_to_the_full_decode(tokenizer, seed):
    rng = random.Random(seed)
    ids = random_output(tokenizer, rng, rng.randrange(1, 300))
    stream = TextStream(tokenizer.decode)
    deltas = stream_all(stream, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == stream.text
    # U+FFFD is released only once the bytes after it show it is final (or at the end)
    assert all(not d.endswith("\ufffd") for d in deltas[:-1] if d) or "\ufffd" in tokenizer.decode(ids)


@pytest.mark.parametrize("seed", range(40))
def test_stop_strings_across_tokens_cut_the_full_decode(tokenizer, seed):
    rng = random.Random(1000 + seed)
    ids = random_output(tokenizer, rng, rng.randrange(20, 300))
    full = tokenizer.decode(ids)
    # stops taken from the text, so they span pieces; one that never occurs keeps its prefixes held back
    start = rng.randrange(len(full) // 2, len(full)) if len(full) > 1 else 0
    stops = [full[start:start + rng.randrange(1, 6)], "never-in-the-output"]
    stops = [s for s in stops if s]
    stream = TextStream(tokenizer.decode, stops)
    text = "".join(stream_all(stream, ids))
    cuts = [full.find(s) for s in stops if full.find(s) >= 0]
    assert text == (full[:min(cuts)] if cuts else full)
    assert stream.stopped == bool(cuts)
    assert not any(s in text for s in stops)


def test_a_long_output_decodes_only_a_bounded_window(tokenizer):
    """Each push used to decode the whole output: 2000 tokens cost 2 million ids of decoding."""
    rng = random.Random(7)
    ids = random_output(tokenizer, rng, 2000)
    lengths: list[int] = []

    def decode(window: list[int]) -> str:
        lengths.append(len(window))
        return tokenizer.decode(window)

    stream = TextStream(decode, stop=["never-in-the-output"])
    deltas = [stream.push(i) for i in ids]
    pushed = len(lengths)
    deltas.append(stream.finish())
    assert "".join(deltas) == tokenizer.decode(ids)
    assert max(lengths[:pushed]) <= 24
    assert sum(lengths) < 20 * len(ids)


def test_a_long_run_of_invalid_bytes_keeps_the_window_bounded(tokenizer):
    """Lone lead bytes never become a character: the text ends in U+FFFD at every token, and the window must not
    wait for it to change."""
    ids = [3 + 0xE2] * 500 + byte_ids("€") + tokenizer.encode(" done", add_bos=False)
    lengths: list[int] = []

    def decode(window: list[int]) -> str:
        lengths.append(len(window))
        return tokenizer.decode(window)

    stream = TextStream(decode)
    text = "".join(stream_all(stream, ids))
    assert text == tokenizer.decode(ids)
    assert text.startswith("\ufffd" * 500 + "€ ") and text.endswith("done")
    assert max(lengths) <= 24


def test_special_ids_and_a_lone_space_piece_keep_their_spaces(tokenizer):
    """The decoder drops the space of the first visible piece of whatever it decodes: a window decoded from a
    different id than its settled part would lose the spaces of " b" and " 1" here."""
    one = tokenizer.encode("1", add_bos=False)[-1]  # "1" without a space
    ids = [*tokenizer.encode("a", add_bos=False), 2, 1, 2, *tokenizer.encode("b", add_bos=False), SPACE_PIECE, one]
    stream = TextStream(tokenizer.decode)
    deltas = stream_all(stream, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == "a b 1"
