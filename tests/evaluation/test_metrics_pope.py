"""POPE parsing and metrics: hand-computed cases."""

from __future__ import annotations

import pytest

from owl2.evaluation.metrics import parse_pope_answer, pope_metrics, pope_scores


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("Yes, there is a dog in the image.", "yes"),
        ("No", "no"),
        ("No.", "no"),
        ("no, there is not.", "no"),
        ("There is no dog in the image.", "no"),
        ("The dog is not visible", "no"),
        ("Yes. There is no cat.", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # quirk: case-sensitive
        ("Not at all", "yes"),  # quirk: "Not" is not in the list
        ("no\n", "yes"),  # quirk: split on " " only
        ("nothing", "yes"),
        ("", "yes"),
    ],
)
def test_parse_pope_answer(text: str, expected: str) -> None:
    assert parse_pope_answer(text) == expected


def test_pope_metrics() -> None:
    preds = ["Yes", "Yes", "No", "No", "Yes", "No"]
    labels = ["yes", "no", "no", "yes", "yes", "no"]
    m = pope_metrics(preds, labels)
    # TP = 2 (0, 4), FP = 1 (1), TN = 2 (2, 5), FN = 1 (3)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)  # 2 * (2/3)^2 / (4/3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)


def test_pope_zero_division() -> None:
    m = pope_metrics(["No", "No"], ["yes", "no"])
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert m["accuracy"] == 0.5
    assert pope_metrics([], [])["accuracy"] == 0.0


def test_pope_scores_per_split() -> None:
    records = [
        {"split": "random", "prediction": "Yes", "label": "yes"},
        {"split": "random", "prediction": "No", "label": "no"},
        {"split": "adversarial", "prediction": "Yes", "label": "no"},
        {"split": "adversarial", "prediction": "Yes", "label": "yes"},
    ]
    out = pope_scores(records)
    assert out["random"]["accuracy"] == 1.0
    assert out["adversarial"]["accuracy"] == 0.5
    assert out["adversarial"]["precision"] == 0.5  # TP 1, FP 1
    assert out["adversarial"]["yes_ratio"] == 1.0
    assert out["all"]["accuracy"] == 0.75
    assert out["mean"]["accuracy"] == 0.75
    # f1: random 1.0; adversarial P = 0.5, R = 1 -> 2 * 0.5 / 1.5 = 2/3; mean = 5/6
    assert out["mean"]["f1"] == pytest.approx(5 / 6)
