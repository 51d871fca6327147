"""Quality-scoring data: a table of ``image, mos[, std]`` -> Q-Align training records, with DeQA-Score soft labels.

Q-Align (Wu et al., ICML 2024) teaches a model to rate an image by answering ``How would you rate the quality of this
image?`` with ``The quality of the image is {level}.``, the level being the MOS binned into five equal-width bins
over the data set's scale, best first: :data:`LEVELS`. At inference the score is the expectation over the five level
words' probabilities, ``probs . [5, 4, 3, 2, 1]``.

DeQA-Score (You et al., CVPR 2025) replaces the one-hot level by a *soft label*: a distribution over the five levels
(:func:`soft_label`) built from the MOS and its standard deviation, trained with a KL loss at the level word
(``[loss] soft_label_weight``, :mod:`owl2.training.losses`). The rules, checked against DeQA-Score's own
preprocessing (``build_soft_labels/gen_soft_label.py``):

* ``mos_n = 4 (mos - min) / (max - min) + 1`` and ``std_n = 4 std / (max - min)`` (the scale's min and max: those of
  the data set, or given);
* ``p_x`` for the levels ``x = 5, 4, 3, 2, 1``: the Normal density ``N(x; mos_n, std_n)`` (``density="pdf"``, DeQA's
  choice for KonIQ and KADID) or the Normal mass in ``[x - 0.5, x + 0.5]`` (``density="cdf"``, its choice for SPAQ);
* an affine fix ``p' = max(a p + b, 0)`` with ``a, b`` solving ``sum(a p + b) = 1`` and ``sum((a p + b) w) = mos_n``
  (``w = [5, 4, 3, 2, 1]``); the clip comes after the solve, so where it acts the sum ends a little above 1 (DeQA keeps
  it so; the check below bounds the excess by 0.1);
* when ``std_n < 0.2`` or the fixed distribution's mean misses ``mos_n`` by more than 0.1, the two-level split
  instead: ``mos_n`` shared linearly between its two neighbouring integer levels (:func:`two_level_split`).

Input tables (:func:`read_quality_table`): CSV with a header naming ``image`` and ``mos`` (``std`` optional), a JSON
list of such objects, JSONL, or DeQA's ``mos.json`` (``{image: {"mos": ..., "std": ...}}``). Relative image paths are
resolved against the table's folder. :func:`quality_records` makes LLaVA-style records that
:class:`~owl2.data.SupervisedDataset` reads; with ``soft_labels=True`` those with a ``std`` also carry
``"soft_label"`` (five floats, best level first).

Command line: ``python -m owl2.data.quality scores.csv train.json [--soft-labels] [--scale 1 5] [--density cdf]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owl2.constants import IMAGE_PLACEHOLDER
from owl2.utils import atomic_write_text

__all__ = [
    "DENSITIES",
    "LEVELS",
    "LEVEL_WEIGHTS",
    "QUALITY_ANSWER",
    "QUALITY_PREFIX",
    "QUALITY_QUESTION",
    "QualityItem",
    "SoftLabel",
    "level_token_ids",
    "mos_level",
    "mos_scale",
    "normalize_mos",
    "quality_records",
    "read_quality_table",
    "soft_label",
    "two_level_split",
    "write_quality_records",
]

LEVELS: tuple[str, ...] = ("excellent", "good", "fair", "poor", "bad")
"""Q-Align's level words, best first (the order of every soft label and level-probability vector here)."""
LEVEL_WEIGHTS: tuple[float, ...] = (5.0, 4.0, 3.0, 2.0, 1.0)
"""The score each level stands for: ``score = probs . LEVEL_WEIGHTS``."""
QUALITY_QUESTION = "How would you rate the quality of this image?"
QUALITY_PREFIX = "The quality of the image is"
"""The answer's words before the level word: the trainer finds the level word right after them."""
QUALITY_ANSWER = QUALITY_PREFIX + " {level}."
DENSITIES = ("pdf", "cdf")
MIN_STD = 0.2
"""Below this normalised std DeQA-Score uses the two-level split (a Normal that narrow puts ~all mass on one level)."""
MAX_MEAN_ERROR = 0.1
"""Largest gap between the fixed distribution's mean and ``mos_n`` before falling back to the two-level split."""


@dataclass(frozen=True)
class QualityItem:
    """One row of a quality table: the image (resolved path, or as given when not a path) and its opinion scores."""

    image: str
    mos: float
    std: float | None = None


@dataclass(frozen=True)
class SoftLabel:
    """A DeQA-Score soft label: ``probs`` over :data:`LEVELS` (best first) and how it was made."""

    probs: tuple[float, ...]
    raw: tuple[float, ...]
    """The Normal's values at the levels before the affine fix."""
    mos_n: float
    std_n: float
    two_level: bool
    """Whether the two-level split was used (std too small, or the fix missed the mean)."""

    @property
    def mean(self) -> float:
        return sum(p * w for p, w in zip(self.probs, LEVEL_WEIGHTS, strict=True))


# ---------------------------------------------------------------------------------------------------------- labels
def normalize_mos(mos: float, low: float, high: float) -> float:
    """``mos`` on the scale ``[low, high]`` mapped linearly to ``[1, 5]``."""
    if not high > low:
        raise ValueError(f"the MOS scale needs max > min, got [{low}, {high}]")
    return 4.0 * (mos - low) / (high - low) + 1.0


def mos_level(mos: float, low: float, high: float) -> str:
    """The level word of ``mos``: five equal-width bins over ``[low, high]``, each closed on its upper end (a MOS on
    a boundary takes the lower level, as in DeQA-Score's ``get_level``)."""
    if not low <= mos <= high:
        raise ValueError(f"MOS {mos} lies outside the scale [{low}, {high}]")
    fifths = 5.0 * (mos - low) / (high - low)
    # Rounding first keeps a value that is a boundary up to float noise (e.g. 0.6 * 5) on the boundary.
    bin_index = min(5, max(1, math.ceil(round(fifths, 9))))
    return LEVELS[5 - bin_index]


def two_level_split(mos_n: float) -> tuple[float, ...]:
    """``mos_n`` in ``[1, 5]`` shared between the two integer levels around it (best first); its mean is ``mos_n``."""
    if not 1.0 <= mos_n <= 5.0:
        raise ValueError(f"normalised MOS must lie in [1, 5], got {mos_n}")
    lower = min(4, math.floor(mos_n))
    upper_share = mos_n - lower
    probs = [0.0] * 5
    probs[5 - lower] = 1.0 - upper_share  # LEVELS index of level x is 5 - x
    probs[5 - (lower + 1)] = upper_share
    return tuple(probs)


def _normal_cdf(x: float, mean: float, std: float) -> float:
    return 0.5 * (1.0 + math.erf((x - mean) / (std * math.sqrt(2.0))))


def _normal_pdf(x: float, mean: float, std: float) -> float:
    return math.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2.0 * math.pi))


def soft_label(mos: float, std: float, low: float, high: float, *, density: str = "pdf",
               min_std: float = MIN_STD, max_error: float = MAX_MEAN_ERROR) -> SoftLabel:
    """DeQA-Score's soft label of one image (rules in the module docstring); ``low``/``high``: the MOS scale."""
    if density not in DENSITIES:
        raise ValueError(f"density must be one of {DENSITIES}, got {density!r}")
    if std < 0 or not math.isfinite(std):
        raise ValueError(f"std must be finite and >= 0, got {std}")
    mos_n = normalize_mos(mos, low, high)
    std_n = 4.0 * std / (high - low)
    if std_n < min_std:
        # Also covers std 0, where the Normal is undefined.
        return SoftLabel(two_level_split(mos_n), (), mos_n, std_n, True)
    if density == "pdf":
        raw = tuple(_normal_pdf(x, mos_n, std_n) for x in LEVEL_WEIGHTS)
    else:
        raw = tuple(_normal_cdf(x + 0.5, mos_n, std_n) - _normal_cdf(x - 0.5, mos_n, std_n) for x in LEVEL_WEIGHTS)
    total = sum(raw)
    moment = sum(p * w for p, w in zip(raw, LEVEL_WEIGHTS, strict=True))
    # a * total + 5 b = 1 and a * moment + 15 b = mos_n; eliminating b gives a (moment - 3 total) = mos_n - 3.
    denominator = moment - 3.0 * total
    fixed: tuple[float, ...] | None = None
    if abs(denominator) > 1e-12:
        a = (mos_n - 3.0) / denominator
        b = (1.0 - a * total) / 5.0
        fixed = tuple(max(a * p + b, 0.0) for p in raw)
    elif abs(mos_n - 3.0) <= 1e-12 and total > 0:
        fixed = tuple(p / total for p in raw)  # already centred on 3: normalising is the affine fix
    if fixed is not None:
        error = abs(sum(p * w for p, w in zip(fixed, LEVEL_WEIGHTS, strict=True)) - mos_n)
        if error <= max_error:
            return SoftLabel(fixed, raw, mos_n, std_n, False)
    return SoftLabel(two_level_split(mos_n), raw, mos_n, std_n, True)


def level_token_ids(tokenizer: Any, levels: Sequence[str] = LEVELS) -> list[int]:
    """Each level word's id as Q-Align reads it: ``tokenizer.encode(word)[1]``, the first piece after BOS (the whole
    word for LLaMA-2; a word's first piece where the vocabulary splits it)."""
    ids = [tokenizer.encode(word)[1] for word in levels]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the level words {list(levels)} do not start with distinct tokens: {ids}")
    return ids


# ---------------------------------------------------------------------------------------------------------- tables
def _number(value: Any, what: str, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: {what} must be finite, got {value!r}")
    return number


def _item(row: dict[str, Any], root: Path, where: str) -> QualityItem:
    row = {str(k).strip().lower(): v for k, v in row.items()}
    if not row.get("image") or "mos" not in row:
        raise ValueError(f"{where}: each row needs 'image' and 'mos' (and optionally 'std'), got keys {sorted(row)}")
    std = row.get("std")
    std = None if std is None or (isinstance(std, str) and not std.strip()) else _number(std, "std", where)
    image = str(row["image"]).strip()
    if not image.startswith(("data:", "http://", "https://")) and not Path(image).expanduser().is_absolute():
        image = str(root / image)
    return QualityItem(image, _number(row["mos"], "mos", where), std)


def read_quality_table(path: str | os.PathLike[str]) -> list[QualityItem]:
    """The rows of a quality table (formats in the module docstring), images resolved against its folder."""
    path = Path(path)
    root = path.resolve().parent
    text = path.read_text(encoding="utf-8-sig")
    rows: list[tuple[str, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        rows = [(f"{path} line {n + 2}", dict(row)) for n, row in enumerate(reader)]
    elif path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines()):
            if line.strip():
                rows.append((f"{path} line {n + 1}", json.loads(line)))
    else:
        data = json.loads(text)
        if isinstance(data, dict):  # DeQA-Score's mos.json: {image: {"mos": ..., "std": ...}}
            rows = [(f"{path} [{image!r}]", {"image": image, **values}) for image, values in data.items()]
        elif isinstance(data, list):
            rows = [(f"{path} [{n}]", row) for n, row in enumerate(data)]
        else:
            raise ValueError(f"{path}: expected a list of rows or an {{image: {{mos, std}}}} object")
    items = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with 'image' and 'mos'")
        items.append(_item(row, root, where))
    if not items:
        raise ValueError(f"{path}: no rows")
    return items


def mos_scale(items: Iterable[QualityItem]) -> tuple[float, float]:
    """The data's own MOS scale: its smallest and largest MOS (what DeQA-Score uses)."""
    values = [item.mos for item in items]
    if not values:
        raise ValueError("no items to take the MOS scale from")
    return min(values), max(values)


def quality_records(items: Sequence[QualityItem], *, soft_labels: bool = False,
                    scale: tuple[float, float] | None = None, density: str = "pdf",
                    question: str = QUALITY_QUESTION, id_prefix: str = "quality") -> list[dict[str, Any]]:
    """LLaVA-style training records: the question with the image after it (``question + "\\n<|image|>"``, as in
    DeQA-Score's data) and the answer ``The quality of the image is {level}.``.

    ``scale``: the MOS scale's ``(min, max)``; default that of ``items``. ``soft_labels``: every item with a ``std``
    also carries ``"soft_label"`` (:func:`soft_label` with ``density``). Each record keeps ``mos`` (and ``std``).
    """
    low, high = scale if scale is not None else mos_scale(items)
    if soft_labels and not any(item.std is not None for item in items):
        raise ValueError("soft labels need a 'std' column; none of the rows has one")
    records = []
    for n, item in enumerate(items):
        record: dict[str, Any] = {
            "id": f"{id_prefix}-{n:06d}",
            "image": item.image,
            "conversations": [
                {"from": "human", "value": f"{question}\n{IMAGE_PLACEHOLDER}"},
                {"from": "gpt", "value": QUALITY_ANSWER.format(level=mos_level(item.mos, low, high))},
            ],
            "mos": item.mos,
        }
        if item.std is not None:
            record["std"] = item.std
            if soft_labels:
                record["soft_label"] = list(soft_label(item.mos, item.std, low, high, density=density).probs)
        records.append(record)
    return records


def write_quality_records(table: str | os.PathLike[str], output: str | os.PathLike[str], **options: Any) -> Path:
    """:func:`read_quality_table` then :func:`quality_records` (``options``), written as a JSON list to ``output``."""
    records = quality_records(read_quality_table(table), **options)
    output = Path(output)
    atomic_write_text(output, json.dumps(records, indent=1) + "\n")
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m owl2.data.quality",
                                     description="A table of image, mos[, std] -> Q-Align training records (JSON).")
    parser.add_argument("table", help="CSV, JSON or JSONL with image, mos and optionally std")
    parser.add_argument("output", help="the JSON records to write (owl2 train ... data.path=OUTPUT)")
    parser.add_argument("--soft-labels", action="store_true", help="add DeQA-Score soft labels (needs std)")
    parser.add_argument("--scale", nargs=2, type=float, metavar=("MIN", "MAX"),
                        help="the MOS scale (default: the data's smallest and largest MOS)")
    parser.add_argument("--density", choices=DENSITIES, default="pdf",
                        help="pdf: Normal density at each level (KonIQ, KADID); cdf: mass within +-0.5 (SPAQ)")
    args = parser.parse_args(argv)
    path = write_quality_records(args.table, args.output, soft_labels=args.soft_labels,
                                 scale=tuple(args.scale) if args.scale else None, density=args.density)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
