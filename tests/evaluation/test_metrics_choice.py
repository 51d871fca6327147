"""Multiple-choice extraction, accuracy and MMBench CircularEval: hand-computed cases."""

from __future__ import annotations

import pytest

from owl2.evaluation.metrics import circular_eval, circular_variants, extract_choice, multiple_choice_accuracy

OPTS = ["cat", "dog", "red fox", "cow"]


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("[C]", "C"),
        ("The answer is B", "B"),
        ("B. dog", "B"),
        ("D: cow", "D"),
        ("b", "B"),  # a lone lower-case letter
        ("(b).", "B"),
        ("the answer is b", None),  # lower-case letters inside a sentence are not taken ...
        ("It is a red fox.", "C"),  # ... but the option text is (rule 3)
        ("dog", "B"),
        ("A or B", None),  # ambiguous letters, and no single option text either
        ("a cat and a dog", None),  # two option texts
        ("A cat", "A"),  # VLMEvalKit quirk: the article "A" counts as the letter A
        ("E", None),  # not an option
        ("", None),
        (None, None),
        ("I don't know", None),
    ],
)
def test_extract_choice(response: str | None, expected: str | None) -> None:
    assert extract_choice(response, OPTS) == expected


def test_extract_choice_mapping_options() -> None:
    assert extract_choice("Answer: (c)", {"a": "x", "b": "y", "c": "z"}) is None  # "answer" + "c": not lone
    assert extract_choice("(c)", {"a": "x", "b": "y", "c": "z"}) == "C"


def test_multiple_choice_accuracy() -> None:
    preds = ["B", "The answer is C", "dog", None]
    answers = ["B", "C", "A", "D"]
    # with extraction: B ok, C ok, "dog" -> B wrong, None wrong -> 2/4
    assert multiple_choice_accuracy(preds, answers, [OPTS] * 4) == 50.0
    # without options, predictions must be letters: "B" ok, the rest wrong -> 1/4
    assert multiple_choice_accuracy(preds, answers) == 25.0
    assert multiple_choice_accuracy([], []) == 0.0


def test_circular_variants() -> None:
    variants = circular_variants(["cat", "dog", "cow", "fox"], "C")
    assert variants == [
        (["cat", "dog", "cow", "fox"], "C"),
        (["dog", "cow", "fox", "cat"], "B"),
        (["cow", "fox", "cat", "dog"], "A"),
        (["fox", "cat", "dog", "cow"], "D"),
    ]
    for opts, letter in variants:  # the correct option text is always at the answer letter
        assert opts["ABCD".index(letter)] == "cow"
    assert circular_variants(["x", "y"], "a") == [(["x", "y"], "A"), (["y", "x"], "B")]
    with pytest.raises(ValueError):
        circular_variants(["x", "y"], "C")


def _records(base: int, options: list[str], answer: str, predict, category: str, l2: str) -> list[dict]:
    return [
        {
            "index": base + k * 1_000_000,
            "options": opts,
            "answer": letter,
            "prediction": predict(k, opts, letter),
            "category": category,
            "l2-category": l2,
        }
        for k, (opts, letter) in enumerate(circular_variants(options, answer))
    ]


def test_circular_eval() -> None:
    always_right = lambda k, opts, letter: f"The answer is {letter}"  # noqa: E731
    always_a = lambda k, opts, letter: "A"  # noqa: E731  (position bias: right only when the answer is A)
    wrong_once = lambda k, opts, letter: letter if k != 2 else "None of them"  # noqa: E731
    by_text = lambda k, opts, letter: opts["ABC".index(letter)]  # noqa: E731  (answers with the option text)
    records = (
        _records(1, ["cat", "dog", "cow"], "B", always_right, "ocr", "FP-S")
        + _records(2, ["cat", "dog", "cow"], "A", always_a, "ocr", "FP-S")
        + _records(3, ["cat", "dog", "cow", "fox"], "D", wrong_once, "scene", "FP-C")
        + _records(4, ["cat", "dog", "cow"], "C", by_text, "scene", "FP-C")
    )
    out = circular_eval(records[::-1])  # order does not matter
    # Solved: q1 (all rotations right), q4 (text always matched); q2 right only for rotation 0; q3 misses k = 2.
    assert out["n_questions"] == 4
    assert out["overall"] == 50.0
    # Vanilla (rotation 0 only): q1 ok, q2 ok ("A" is the answer), q3 ok, q4 ok -> 100 %.
    assert out["vanilla"] == 100.0
    assert out["per_category"] == {"ocr": 50.0, "scene": 50.0}
    assert out["per_l2_category"] == {"FP-C": 50.0, "FP-S": 50.0}


def test_circular_eval_letter_predictions() -> None:
    records = [
        {"index": 7, "answer": "A", "prediction": "a"},
        {"index": 1_000_007, "answer": "B", "prediction": " B "},
        {"index": 8, "answer": "A", "prediction": "A"},
        {"index": 1_000_008, "answer": "B", "prediction": None},
    ]
    out = circular_eval(records)
    assert out["overall"] == 50.0
    assert out["per_category"] == {}


def test_circular_eval_rotation_field() -> None:
    # With "rotation" given, every row may carry the plain base index.
    records = [
        {"index": 3, "rotation": 0, "answer": "A", "prediction": "A", "category": "x"},
        {"index": 3, "rotation": 1, "answer": "B", "prediction": "A", "category": "x"},
        {"index": 4, "rotation": 0, "answer": "B", "prediction": "B", "category": "y"},
        {"index": 4, "rotation": 1, "answer": "A", "prediction": "A", "category": "y"},
    ]
    out = circular_eval(records)
    assert out["overall"] == 50.0  # q3 fails rotation 1
    assert out["vanilla"] == 100.0
    assert out["metrics"] == {"circular_accuracy": 50.0, "vanilla_accuracy": 100.0}
    assert out["breakdown"]["category"] == {"x": 0.0, "y": 100.0}
