"""``Owl2Tokenizer.token_text``: one token as text on its own, as the server's log-probabilities show it."""

from __future__ import annotations

from pathlib import Path

import pytest

from owl2.processing.tokenizer import Owl2Tokenizer, load_tokenizer

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "llama2-tokenizer"


@pytest.fixture(scope="module", params=("sentencepiece", "tokenizers"))
def tokenizer(request: pytest.FixtureRequest) -> Owl2Tokenizer:
    return load_tokenizer(TOKENIZER_DIR, backend=request.param)


def test_word_pieces_show_their_space(tokenizer: Owl2Tokenizer) -> None:
    hello = tokenizer.encode("Hello", add_bos=False)
    assert tokenizer.token_pieces(hello) == ["▁Hello"]
    assert tokenizer.token_text(hello[0]) == " Hello"
    assert tokenizer.token_text(tokenizer.eos_token_id) == "</s>"


def test_byte_pieces_become_their_character(tokenizer: Owl2Tokenizer) -> None:
    newline = tokenizer.token_pieces(range(tokenizer.vocab_size)).index("<0x0A>")
    assert tokenizer.token_text(newline) == "\n"
    high = tokenizer.token_pieces(range(tokenizer.vocab_size)).index("<0xE2>")  # the first byte of a 3-byte char
    assert tokenizer.token_text(high) == "\ufffd"


def test_image_ids_show_the_placeholder(tokenizer: Owl2Tokenizer) -> None:
    assert tokenizer.token_text(-200) == "<|image|>"
