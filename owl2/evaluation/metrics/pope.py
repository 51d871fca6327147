"""POPE (Li et al. 2023, object hallucination) metrics, as the POPE repository's ``evaluate.py`` computes them.

"yes" is the positive class. Reported per split (random / popular / adversarial): accuracy, precision, recall,
F1 and the yes-ratio (fraction of "yes" predictions), as fractions in [0, 1] (papers multiply by 100).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

__all__ = ["parse_pope_answer", "pope_metrics", "pope_scores"]


def parse_pope_answer(text: str) -> str:
    """Official POPE parsing: ``"yes"`` or ``"no"`` (never unparsable).

    Keep the text before the first "." (first sentence), delete commas, split on single spaces; "no" if one of
    the words is exactly "No", "no" or "not", else "yes". Case-sensitive and not stripped, as the original:
    "No, there is not." -> no; "There is no dog." -> no; "NO" / "Not" / "no\\n" -> yes (quirks); "" -> yes.
    """
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Binary metrics of raw model answers against "yes"/"no" labels.

    Labels are compared lower-cased ("no" -> negative, anything else positive, as the POPE script). Precision /
    recall / F1 are 0 when their denominator is 0 (the original divides by zero there).
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    tp = fp = tn = fn = 0
    for pred, label in zip(predictions, labels, strict=True):
        p = parse_pope_answer(pred or "") == "yes"
        y = str(label).strip().lower() != "no"
        tp += p and y
        fp += p and not y
        tn += (not p) and (not y)
        fn += (not p) and y
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
    }


def pope_scores(records: Iterable[Mapping]) -> dict[str, dict[str, float]]:
    """Per-split POPE metrics from records with ``"split"`` (or ``"category"``: random / popular / adversarial),
    ``"prediction"`` and ``"label"`` (or ``"answer"``). Also returns ``"all"`` (pooled over splits) and, when
    several splits are present, ``"mean"`` (unweighted mean of each metric over splits)."""
    by_split: dict[str, tuple[list[str], list[str]]] = {}
    for rec in records:
        split = str(rec.get("split", rec.get("category", "all")))
        preds, labels = by_split.setdefault(split, ([], []))
        preds.append(str(rec.get("prediction") or ""))
        labels.append(str(rec.get("label", rec.get("answer"))))
    out = {split: pope_metrics(p, y) for split, (p, y) in by_split.items()}
    all_p = [p for ps, _ in by_split.values() for p in ps]
    all_y = [y for _, ys in by_split.values() for y in ys]
    out["all"] = pope_metrics(all_p, all_y)
    if len(by_split) > 1:
        keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        out["mean"] = {k: sum(out[s][k] for s in by_split) / len(by_split) for k in keys}
    return out
