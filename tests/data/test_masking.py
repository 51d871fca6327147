"""Loss masking: exact label positions, and piecewise ids == encode_prompt of the whole rendered conversation."""

from __future__ import annotations

from pathlib import Path

import pytest

from owl2.data import IGNORE_INDEX, BadRecord, tokenize_conversation, truncate
from owl2.processing.conversation import render_conversation
from owl2.processing.tokenizer import IMAGE_TOKEN_INDEX, load_tokenizer

TOKENIZER_DIR = Path(__file__).parents[1] / "fixtures" / "llama2-tokenizer"


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non-legacy"])
def tokenizer(request):
    return load_tokenizer(TOKENIZER_DIR, legacy=request.param)


def test_hand_checked_labels():
    tok = load_tokenizer(TOKENIZER_DIR)
    sample = tokenize_conversation(tok, [("user", "<|image|>\nWhat is it?"), ("assistant", "A cat."),
                                         ("user", "Color?"), ("assistant", "Black")])
    pieces = tok.token_pieces(sample.input_ids)
    targets = [p for p, label in zip(pieces, sample.labels, strict=True) if label != IGNORE_INDEX]
    assert targets == ["▁A", "▁cat", ".", "</s>", "▁Black", "</s>"]
    # BOS, the user parts, the ASSISTANT: prompts and the image are masked; targets are the ids themselves.
    assert sample.input_ids[0] == 1 and sample.labels[0] == IGNORE_INDEX
    assert sample.labels[sample.input_ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX
    target_positions = [i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX]
    assert target_positions == [17, 18, 19, 20, 31, 32]
    assert all(sample.labels[i] == sample.input_ids[i] for i in target_positions)
    assert pieces[12:17] == ["▁A", "SS", "IST", "ANT", ":"]  # the prompt right before the first answer is masked


CONVERSATIONS = [
    [("user", "Hi"), ("assistant", "Hello!")],
    [("user", "<|image|>\nDescribe."), ("assistant", "A dog on grass."), ("user", "Why?"), ("assistant", "It plays.")],
    [("user", "<|image|>Two <|image|> images"), ("assistant", " spaced  answer "), ("user", "x\n<|image|>"),
     ("assistant", "\nnew line\n\n- item"), ("user", "ünïcode 你好 :)"), ("assistant", "ok")],
    [("user", "a</s>b"), ("assistant", "c <s> d"), ("user", "3"), ("assistant", "4")],
]


@pytest.mark.parametrize("template", ["mplug_owl2", "vicuna_v1"])
@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_piecewise_equals_encode_prompt(tokenizer, turns, template):
    sample = tokenize_conversation(tokenizer, turns, template, verify=True)
    n_images = sum(text.count("<|image|>") for _, text in turns)
    rendered = render_conversation([{"role": r, "content": c} for r, c in turns], template,
                                   add_generation_prompt=False, images=[None] * n_images if n_images else None)
    assert sample.text == rendered
    assert sample.input_ids == tokenizer.encode_prompt(rendered)
    assert len(sample.labels) == len(sample.input_ids)
    assert sample.num_images == n_images
    # Every answer ends with a target </s>; the number of target EOS equals the number of answers.
    eos_targets = sum(1 for label in sample.labels if label == tokenizer.eos_token_id)
    assert eos_targets == len(turns) // 2


def test_vicuna_system_prompt_is_masked():
    tok = load_tokenizer(TOKENIZER_DIR)
    sample = tokenize_conversation(tok, [("user", "Q"), ("assistant", "A")], "vicuna_v1", system="Be brief.")
    assert sample.text == "Be brief. USER: Q ASSISTANT: A</s>"
    targets = [p for p, lab in zip(tok.token_pieces(sample.input_ids), sample.labels, strict=True) if lab != -100]
    assert targets == ["▁A", "</s>"]


def test_truncation_rule():
    tok = load_tokenizer(TOKENIZER_DIR)
    sample = tokenize_conversation(tok, [("user", "<|image|>\nQ"), ("assistant", "one two three four five")])
    per_image = 10
    full = sample.expanded_length(per_image)
    assert full == len(sample.input_ids) - 1 + per_image
    assert truncate(sample, full, per_image) is sample
    cut = truncate(sample, full - 3, per_image)
    assert cut.expanded_length(per_image) == full - 3
    assert cut.input_ids == sample.input_ids[:-3] and cut.labels == sample.labels[:-3]
    # Not even the image fits (the image would be cut off): skipped.
    with pytest.raises(BadRecord, match="remove an image"):
        truncate(sample, 3, per_image)
    # The image fits but no answer token would remain: skipped.
    prompt_len = sample.labels.index(next(lab for lab in sample.labels if lab != IGNORE_INDEX))
    with pytest.raises(BadRecord, match="no answer token"):
        truncate(sample, prompt_len - 1 + per_image, per_image)


def test_malformed_turns_rejected():
    tok = load_tokenizer(TOKENIZER_DIR)
    with pytest.raises(BadRecord):
        tokenize_conversation(tok, [("user", "Q")])
    with pytest.raises(BadRecord):
        tokenize_conversation(tok, [("assistant", "A"), ("user", "Q")])
