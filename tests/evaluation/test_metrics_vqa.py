"""VQA accuracy / normalisation, GQA exact match, EvalAI processor: hand-computed cases."""

from __future__ import annotations

import pytest

from owl2.evaluation.metrics import (
    evalai_process_answer,
    exact_match,
    exact_match_accuracy,
    normalize_gqa_answer,
    normalize_vqa_answer,
    vqa_accuracy,
    vqa_score,
)
from owl2.evaluation.metrics.vqa import CONTRACTIONS


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs.", "2 dogs"),  # number word -> digit, trailing period removed
        ("2 dogs", "2 dogs"),
        ("10,000", "10000"),  # digit,digit -> punctuation DELETED (not replaced by a space)
        ("1,2-3", "123"),  # ... for every punctuation char of that answer
        ("3.5", "3.5"),  # a period followed by a digit is kept
        (".5", ".5"),
        ("5 p.m.", "5 pm"),  # other periods are removed
        ("Yes.", "yes"),
        ("yes!", "yes"),
        ("it's", "it's"),  # apostrophes are not punctuation here
        ("its", "its"),  # ... and "its" is not a contraction key
        ("dont", "don't"),  # contraction restored
        ("Im", "im"),  # capitalised official key never matches (words are lower-cased first)
        ("a dog", "dog"),  # article removed
        ("The Red  Ball", "red ball"),  # lower-case, whitespace collapsed
        ("an apple", "apple"),
        ("black-and-white", "black and white"),  # "-" not touching a space -> space
        ("t - shirt", "t shirt"),  # "-" touching a space -> deleted
        ("none", "0"),
        ("zero", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("Hello\nworld\t", "hello world"),
        ("12:30", "12:30"),  # ":" is not in the official punctuation list
        ("  ", ""),
        ("", ""),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_contraction_table_quirks() -> None:
    assert CONTRACTIONS["couldnt've"] == CONTRACTIONS["couldn'tve"] == "couldn't've"
    assert "couldntve" not in CONTRACTIONS  # only one-apostrophe-missing variants for multi-apostrophe forms
    assert CONTRACTIONS["somebody'd"] == "somebodyd"  # the one inverted entry of the official table
    assert len(CONTRACTIONS) == 118  # 120 official entries minus the 2 identity ones ("let's", "she's")


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        # 10 answers, k of them match. Leaving out a matching one leaves k-1 matches, a non-matching one k.
        (0, 0.0),
        (1, (1 * (0 / 3) + 9 * (1 / 3)) / 10),  # = 0.3
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # = (2/3 + 16/3)/10 = 0.6
        (3, (3 * (2 / 3) + 7 * 1.0) / 10),  # = 0.9
        (4, (4 * 1.0 + 6 * 1.0) / 10),  # = 1.0
        (10, 1.0),
    ],
)
def test_leave_one_out(k: int, expected: float) -> None:
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)


def test_two_matches_is_exactly_0_6() -> None:
    assert vqa_accuracy("Cat.", ["cat", "cat"] + ["dog"] * 8) == pytest.approx(0.6, abs=1e-15)


def test_variants_differ() -> None:
    # Unanimous answers: "owl2" normalises the prediction ("Two" -> "2"); the original VQA code does not.
    assert vqa_accuracy("Two", ["2"] * 10, variant="owl2") == 1.0
    assert vqa_accuracy("Two", ["2"] * 10, variant="vqa") == 0.0
    assert vqa_accuracy("2", ["2"] * 10, variant="vqa") == 1.0
    # Mixed answers: "owl2" applies only the punctuation step to the answers, so "two dogs" stays a word; the
    # original normalises both sides fully. 3 x "2 dogs" + 7 x "two dogs":
    answers = ["2 dogs"] * 3 + ["two dogs"] * 7
    assert vqa_accuracy("Two dogs.", answers, variant="owl2") == pytest.approx(0.9)  # k = 3
    assert vqa_accuracy("Two dogs.", answers, variant="vqa") == 1.0  # k = 10
    with pytest.raises(ValueError):
        vqa_accuracy("x", ["x"], variant="nope")
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_gt_punctuation_only_when_answers_differ() -> None:
    # owl2: answers all "yes." -> unanimous -> left raw, prediction normalised to "yes" -> no match.
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0
    # One differing answer switches the punctuation step on for all of them: 9 x "yes." -> "yes".
    assert vqa_accuracy("yes", ["yes."] * 9 + ["no"]) == pytest.approx(1.0)


def test_vqa_score() -> None:
    preds = ["yes", "2", "red"]
    answers = [["yes"] * 10, ["2"] * 2 + ["3"] * 8, ["blue"] * 10]
    out = vqa_score(preds, answers, answer_types=["yes/no", "number", "other"])
    # per question 1.0, 0.6, 0.0 -> overall 100 * 1.6 / 3 = 53.333...
    assert out["overall"] == pytest.approx(160 / 3)
    assert out["per_question"] == pytest.approx([100.0, 60.0, 0.0])
    assert out["perAnswerType"] == pytest.approx({"yes/no": 100.0, "number": 60.0, "other": 0.0})
    assert vqa_score(preds, answers, ndigits=2)["overall"] == 53.33
    with pytest.raises(ValueError):
        vqa_score(preds, answers[:2])


def test_exact_match() -> None:
    assert normalize_gqa_answer("  Left.\n") == "left"
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match("left side", "left") == 0.0
    assert exact_match("", "") == 1.0
    assert exact_match("the table", "table") == 0.0  # no article removal for GQA
    assert exact_match_accuracy(["Yes.", "no", "cat"], ["yes", "no", "dog"]) == pytest.approx(200 / 3)
    assert exact_match_accuracy([], []) == 0.0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs?", "2 dogs"),
        ("man's hat", "man 's hat"),  # possessive split off
        ("10,000", "10000"),
        ("The cat.", "cat"),
        ("Black-and-white", "black and white"),
        ("dont", "don't"),
    ],
)
def test_evalai_processor(raw: str, expected: str) -> None:
    assert evalai_process_answer(raw) == expected
