"""MME parsing and scores: hand-computed cases."""

from __future__ import annotations

import pytest

from owl2.evaluation.metrics import COGNITION_SUBTASKS, PERCEPTION_SUBTASKS, mme_scores, parse_mme_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("yes", "yes"),
        ("Yes", "yes"),
        ("YES.", "yes"),
        ("Yes, there is a dog.", "yes"),
        ("yes\n", "yes"),  # the official tool sees the line's trailing newline
        ("No", "no"),
        ("no.", "no"),
        ("No, it is not.", "no"),
        ("not", "no"),
        ("none", "no"),
        ("know", "no"),  # quirk: "no" inside the first four characters
        (" yes", "yes"),
        ("\n\nyes", "other"),  # nothing is stripped
        ("There is no dog", "other"),  # "ther" contains neither
        ("The answer is yes", "other"),
        ("", "other"),
        ("y", "other"),
    ],
)
def test_parse_mme_answer(text: str, expected: str) -> None:
    assert parse_mme_answer(text) == expected


def _image(task: str, image: str, preds: tuple[str, str]) -> list[dict]:
    return [
        {"subtask": task, "image": image, "answer": "Yes", "prediction": preds[0]},
        {"subtask": task, "image": image, "answer": "No", "prediction": preds[1]},
    ]


def test_mme_scores() -> None:
    records = (
        # existence: img1 both right, img2 one right, img3 both wrong, img4 both right
        _image("existence", "1", ("Yes", "No"))
        + _image("existence", "2", ("Yes", "Yes"))
        + _image("existence", "3", ("No", "maybe"))
        + _image("existence", "4", ("yes, it is", "no."))
        # count: both images fully right
        + _image("count", "1", ("yes", "no"))
        + _image("count", "2", ("Yes", "No"))
        # code_reasoning: one image, one right
        + _image("code_reasoning", "1", ("Sure", "No"))
    )
    out = mme_scores(records)
    ex = out["subtasks"]["existence"]
    # acc = (2 + 1 + 0 + 2) / 8 = 62.5 %; acc+ = 2 / 4 = 50 %; score = 112.5
    assert ex["acc"] == 62.5
    assert ex["acc_plus"] == 50.0
    assert ex["score"] == 112.5
    assert ex["n_other"] == 1  # "maybe"
    assert (ex["n_questions"], ex["n_images"]) == (8, 4)
    assert out["subtasks"]["count"]["score"] == 200.0
    # code_reasoning: acc = 1/2 -> 50, acc+ = 0 -> score 50
    assert out["subtasks"]["code_reasoning"]["score"] == 50.0
    assert out["perception"] == 312.5
    assert out["cognition"] == 50.0
    assert out["total"] == 362.5
    assert out["totals"] == {"perception": 312.5, "cognition": 50.0, "total": 362.5}
    assert len(out["missing"]) == len(PERCEPTION_SUBTASKS) + len(COGNITION_SUBTASKS) - 3


def test_mme_rejects_bad_ground_truth() -> None:
    with pytest.raises(ValueError):
        mme_scores([{"subtask": "OCR", "image": "x", "answer": "maybe", "prediction": "yes"}])


def test_subtask_lists() -> None:
    assert len(PERCEPTION_SUBTASKS) == 10
    assert len(COGNITION_SUBTASKS) == 4
