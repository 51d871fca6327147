"""MME (Fu et al. 2023) scoring, as the benchmark's official ``eval_tool/calculation.py`` computes it.

Every image of a subtask has two yes/no questions (one "yes", one "no"). Per subtask:

* accuracy  = correct answers / questions (an unparsable answer, "other", is simply wrong);
* accuracy+ = images with BOTH questions right / images;
* score     = 100 * accuracy + 100 * accuracy+  (max 200).

Perception = sum over the 10 perception subtasks (max 2000), Cognition = sum over the 4 cognition subtasks (max 800).

The official tool groups CONSECUTIVE line pairs of each result file as one image; here records are grouped by
``(subtask, image)``, which is the same for the official file layout and robust to reordering.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["COGNITION_SUBTASKS", "PERCEPTION_SUBTASKS", "mme_scores", "parse_mme_answer"]

PERCEPTION_SUBTASKS = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
COGNITION_SUBTASKS = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_mme_answer(text: str) -> str:
    """Official MME answer parsing: ``"yes"``, ``"no"`` or ``"other"``.

    Lower-case; an exact "yes"/"no" is taken as is; otherwise "yes" if the FIRST FOUR characters contain "yes",
    else "no" if they contain "no", else "other". Nothing is stripped (the official tool reads lines with their
    trailing newline, which the 4-character rule absorbs), so e.g. "Yes, there is" -> yes, "No." -> no,
    "not" -> no, "know" -> no (quirk), "There is no dog" -> other, " yes" -> yes, "\\n\\nyes" -> other.
    """
    ans = text.lower()
    if ans in ("yes", "no"):
        return ans
    prefix = ans[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_scores(records: Iterable[Mapping]) -> dict:
    """MME scores from per-question records.

    Each record is a mapping with ``"subtask"`` (or ``"category"``; names as in :data:`PERCEPTION_SUBTASKS` /
    :data:`COGNITION_SUBTASKS`), ``"image"`` (image id/name), ``"answer"`` (ground truth "Yes"/"No", any case) and
    ``"prediction"`` (raw model output).

    Returns ``{"perception", "cognition", "total", "subtasks": {name: {"acc", "acc_plus", "score", "n_questions",
    "n_images", "n_other"}}, "missing": [subtasks absent from the records], "totals": {"perception", "cognition",
    "total"}}`` (``totals`` repeats the three sums as one flat dict for report tables). ``acc``/``acc_plus`` are
    x100 so that ``score == acc + acc_plus``. Perception / cognition sum only the subtasks present (``missing``
    lists the rest).
    """
    per_task: dict[str, dict[str, list[bool]]] = {}
    other: dict[str, int] = {}
    for rec in records:
        task = str(rec.get("subtask", rec.get("category")))
        gt = str(rec["answer"]).strip().lower()
        if gt not in ("yes", "no"):
            raise ValueError(f"MME ground truth must be yes/no, got {rec['answer']!r}")
        pred = parse_mme_answer(str(rec.get("prediction") or ""))
        other[task] = other.get(task, 0) + (pred == "other")
        per_task.setdefault(task, {}).setdefault(str(rec["image"]), []).append(pred == gt)

    subtasks = {}
    for task, images in per_task.items():
        answers = [ok for oks in images.values() for ok in oks]
        acc = 100.0 * sum(answers) / len(answers)
        acc_plus = 100.0 * sum(all(oks) for oks in images.values()) / len(images)
        subtasks[task] = {
            "acc": acc,
            "acc_plus": acc_plus,
            "score": acc + acc_plus,
            "n_questions": len(answers),
            "n_images": len(images),
            "n_other": other[task],
        }
    perception = sum(subtasks[t]["score"] for t in PERCEPTION_SUBTASKS if t in subtasks)
    cognition = sum(subtasks[t]["score"] for t in COGNITION_SUBTASKS if t in subtasks)
    missing = [t for t in (*PERCEPTION_SUBTASKS, *COGNITION_SUBTASKS) if t not in subtasks]
    return {
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "subtasks": subtasks,
        "missing": missing,
        "totals": {"perception": perception, "cognition": cognition, "total": perception + cognition},
    }
