"""``pipeline("image-text-to-text")`` on an mPLUG-Owl2 checkpoint (the Q-Align fixture: real LLaMA-2 ids, 17 visual
tokens per image, the "pad" policy) answers chat messages as owl2's own Pipeline does with greedy decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from transformers import pipeline

import owl2
import owl2.integrations.transformers  # registers the mplug_owl2 classes with the Auto classes
from owl2.integrations.transformers.processing import MPLUGOwl2Processor
from owl2.processing.conversation import render_conversation

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
QALIGN = FIXTURES / "qalign" / "checkpoint"
IMAGES = FIXTURES / "qalign" / "images"
MAX_NEW_TOKENS = 8


def image(name: str) -> Image.Image:
    return Image.open(IMAGES / f"{name}.png").convert("RGB")


CHATS: dict[str, list[dict[str, Any]]] = {
    "one_image": [{"role": "user", "content": [{"type": "image", "image": image("chelsea_square")},
                                              {"type": "text", "text": "Describe the image."}]}],
    "two_images_multi_turn": [
        {"role": "user", "content": [{"type": "image", "image": image("astronaut_wide")},
                                     {"type": "image", "image": image("coffee_tall")},
                                     {"type": "text", "text": "Compare them."}]},
        {"role": "assistant", "content": "The first is wider."},
        {"role": "user", "content": "And the colours?"}],
    "text_only": [{"role": "user", "content": "Write one word."}],
}


@pytest.fixture(scope="module")
def owl2_pipe() -> owl2.Pipeline:
    return owl2.load(QALIGN, dtype=torch.float32, device="cpu", show_progress=False)


@pytest.fixture(scope="module")
def hf_pipe() -> Any:
    return pipeline("image-text-to-text", model=str(QALIGN), dtype=torch.float32, device="cpu")


def test_the_pipeline_loads_owl2_processing(hf_pipe: Any) -> None:
    assert type(hf_pipe.processor) is MPLUGOwl2Processor
    assert hf_pipe.processor.image_processor.image_aspect_ratio == "pad"
    assert hf_pipe.processor.tokens_per_image == 17


@pytest.mark.parametrize("name", sorted(CHATS))
def test_greedy_answer_equals_owl2(owl2_pipe: owl2.Pipeline, hf_pipe: Any, name: str) -> None:
    messages = CHATS[name]
    expected = owl2_pipe.generate([messages], max_new_tokens=MAX_NEW_TOKENS)[0]
    assert expected.text == owl2_pipe.chat(messages, max_new_tokens=MAX_NEW_TOKENS)

    out = hf_pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    history = out[0]["generated_text"]
    assert history[:-1] == messages and history[-1]["role"] == "assistant"
    # The pipeline cuts the decoded prompt off the decoded whole sequence, so the space that SentencePiece writes for
    # the answer's first word marker stays in front of the answer; owl2 decodes the answer on its own.
    first_piece = owl2_pipe.tokenizer.token_pieces(expected.token_ids[:1])[0]
    assert history[-1]["content"] == (" " if first_piece.startswith("\u2581") else "") + expected.text

    ids = hf_pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, return_tensors=True)
    generated = ids[0]["generated_token_ids"].tolist()
    assert generated[-len(expected.token_ids):] == expected.token_ids


def test_a_batch_of_chats_is_left_padded_and_each_row_equals_owl2(owl2_pipe: owl2.Pipeline, hf_pipe: Any) -> None:
    chats = [CHATS["one_image"], CHATS["two_images_multi_turn"]]
    expected = owl2_pipe.generate(chats, max_new_tokens=MAX_NEW_TOKENS)
    out = hf_pipe(text=chats, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, batch_size=2, return_tensors=True)
    rows = [result[0]["generated_token_ids"].tolist() for result in out]
    assert rows[0][0] == hf_pipe.processor.tokenizer.pad_token_id  # the shorter prompt is padded on the left
    for row, want in zip(rows, expected, strict=True):
        assert row[-MAX_NEW_TOKENS:] == want.token_ids


def test_a_prompt_with_images_takes_the_same_path(owl2_pipe: owl2.Pipeline, hf_pipe: Any) -> None:
    """The non-chat form: a rendered prompt whose <|image|> placeholders the images fill."""
    messages = CHATS["one_image"]
    expected = owl2_pipe.generate([messages], max_new_tokens=MAX_NEW_TOKENS)[0]
    prompt = render_conversation(messages)
    out = hf_pipe(images=[messages[0]["content"][0]["image"]], text=prompt, max_new_tokens=MAX_NEW_TOKENS,
                  do_sample=False, return_tensors=True)
    assert out[0]["generated_token_ids"].tolist()[-MAX_NEW_TOKENS:] == expected.token_ids
