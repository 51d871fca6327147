"""Image quality (and aesthetics) assessment: rate each image with a Q-Align-style scorer, correlate with the MOS.

Every image goes through :meth:`owl2.api.Pipeline.rate` (mode ``"rate"`` of the harness): the prompt asks how the
model would rate the image's quality, and the score is the expectation of 5..1 under the softmax of the next-token
logits of "excellent, good, fair, poor, bad". The report gives SRCC, PLCC after the 4-parameter logistic fit, raw
PLCC and KRCC against the mean opinion scores (:mod:`owl2.evaluation.metrics.iqa`), and a scatter plot of score
against MOS with the fitted curve.

Registered variants (the name keys the predictions cache, so different prompts never share one):

* ``iqa``: ``task="quality"``, ``prompt="scorer"`` (Q-Align's ``QAlignScorer``, DeQA-Score);
* ``iqa_eval``: ``task="quality"``, ``prompt="eval"`` (Q-Align's ``iqa_eval.py``: a space before ``ASSISTANT:``);
* ``iaa``: ``task="aesthetics"``, ``prompt="scorer"`` (``QAlignAestheticScorer``).

``IQATask(rating_task=..., prompt=...)`` builds any combination for :func:`owl2.evaluation.evaluate`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from owl2.evaluation.metrics.iqa import MIN_LOGISTIC_SAMPLES, LogisticFit, fit_logistic, iqa_scores, plcc
from owl2.evaluation.tasks.base import TASKS, Sample, Task, TaskReport, first_file

RATING_TASKS = ("quality", "aesthetics")
RATING_PROMPTS = ("scorer", "eval")
VARIANTS: dict[str, tuple[str, str]] = {"iqa": ("quality", "scorer"), "iqa_eval": ("quality", "eval"),
                                         "iaa": ("aesthetics", "scorer")}


@dataclass(frozen=True)
class Layout:
    """How one benchmark's annotation file names its columns and where its images live.

    Column names are matched case-insensitively, the first present name of each tuple wins. ``folders`` are tried
    in order, relative to the annotation file's folder, for each image name.
    """

    name: str
    image: tuple[str, ...]
    mos: tuple[str, ...]
    std: tuple[str, ...] = ()
    variance: bool = False
    """The spread column holds a variance (KADID-10k's ``var``), stored as its square root."""
    folders: tuple[str, ...] = (".",)
    files: tuple[str, ...] = ()
    """Annotation file names that identify the layout in a data folder."""


LAYOUTS: tuple[Layout, ...] = (
    Layout("koniq10k", ("image_name",), ("MOS", "MOS_zscore"), ("SD",),
           folders=("1024x768", "512x384", "images", "."),
           files=("koniq10k_scores_and_distributions.csv", "koniq10k_distributions_sets.csv")),
    Layout("spaq", ("Image name",), ("MOS",), folders=("TestImage", "../TestImage", "images", "."),
           files=("MOS and Image attribute scores.csv", "Annotations/MOS and Image attribute scores.csv")),
    Layout("kadid10k", ("dist_img",), ("dmos",), ("var",), variance=True, folders=("images", "."),
           files=("dmos.csv",)),
    Layout("agiqa", ("name",), ("mos_quality",), ("std_quality",),
           folders=("images", "image", "file", "AGIQA-3K", "AGIQA-3k", "."), files=("data.csv",)),
    Layout("generic", ("image", "img_path"), ("mos", "gt_score"), ("std",), folders=(".", "images", "file"),
           files=("iqa.csv", "iqa.jsonl", "iqa.json", "AIGC_MOS_Zscore.csv")),
)
_SUFFIXES = (".csv", ".json", ".jsonl")


@dataclass
class IQAReport(TaskReport):
    """The metrics plus what the scatter plot needs: the scores, the MOS and the fitted logistic."""

    scores: list[float] = field(default_factory=list)
    mos: list[float] = field(default_factory=list)
    fit: LogisticFit | None = None
    title: str = ""

    def plot(self, path: Path) -> bool:
        """Write the score-vs-MOS scatter with the fitted curve to ``path``; False without matplotlib."""
        from owl2.evaluation.report import plot_scatter

        note = ", ".join(f"{k.upper()} {self.metrics[k]:.4f}" for k in ("srcc", "plcc") if k in self.metrics)
        return plot_scatter(self.title, self.scores, self.mos, path, curve=self.fit, xlabel="predicted score",
                            ylabel="MOS", note=note)


class IQATask(Task):
    """Rate images with ``pipe.rate(task=rating_task, prompt=prompt)`` and correlate the scores with the MOS."""

    mode = "rate"
    max_new_tokens = 0
    data_format = ("KonIQ-10k koniq10k_scores_and_distributions.csv / koniq10k_distributions_sets.csv (image_name, "
                   "MOS; test rows when a 'set' column exists) + 1024x768/; SPAQ 'MOS and Image attribute scores' as "
                   "CSV (Image name, MOS) + TestImage/; KADID-10k dmos.csv (dist_img, dmos, var) + images/; AGIQA-3k "
                   "data.csv (name, mos_quality, std_quality); or a CSV/JSON/JSONL of image, mos[, std]")

    def __init__(self, rating_task: str = "quality", prompt: str = "scorer") -> None:
        if rating_task not in RATING_TASKS:
            raise ValueError(f"rating_task must be one of {', '.join(RATING_TASKS)}, got {rating_task!r}")
        if prompt not in RATING_PROMPTS:
            raise ValueError(f"prompt must be one of {', '.join(RATING_PROMPTS)}, got {prompt!r}")
        self.rating_task = rating_task
        self.prompt = prompt
        # A name per combination, so that predictions made with one prompt are never re-scored as another's.
        self.name = next((k for k, v in VARIANTS.items() if v == (rating_task, prompt)),  # type: ignore[misc]
                         f"{'iqa' if rating_task == 'quality' else 'iaa'}_{prompt}")
        self.layout = ""

    def rating_options(self) -> dict[str, Any]:
        """Keyword arguments of ``pipe.rate`` for this task (the harness adds the items and the batch size)."""
        return {"task": self.rating_task, "prompt": self.prompt}

    def load(self, data: Path) -> list[Sample]:
        from owl2.rating import render_rating_prompt

        annotations = find_annotations(data)
        layout, rows = read_annotations(annotations)
        self.layout = layout.name
        prompt = render_rating_prompt(self.prompt, self.rating_task, "image")
        root = annotations.parent
        return [Sample(image, prompt, [find_image(root, image, layout)], mos, {"std": std, "layout": layout.name})
                for image, mos, std in rows]

    def score(self, samples: Sequence[Sample], predictions: dict[str, dict[str, Any]]) -> IQAReport:
        scores = [float(predictions[s.id]["prediction"]) for s in samples]
        mos = [float(s.answer) for s in samples]
        metrics: dict[str, float] = dict(iqa_scores(scores, mos))
        fit = None
        if len(scores) >= MIN_LOGISTIC_SAMPLES and np.ptp(scores) > 0 and np.ptp(mos) > 0:
            fit = fit_logistic(scores, mos)
            # The PLCC of the very curve the plot draws (a refit can differ in the last digits when ill-conditioned).
            metrics["plcc"] = plcc(fit(scores), mos)
        return IQAReport(metrics, scores=scores, mos=mos, fit=fit, title=f"{self.name} ({self.layout or 'MOS'})")

    def settings(self) -> dict[str, Any]:
        return {"mode": self.mode, "rating_task": self.rating_task, "prompt": self.prompt,
                "layout": self.layout or "unknown", "image_policy": self.policy,
                "score": "sum of 5..1 weighted by the softmax over excellent/good/fair/poor/bad",
                "plcc": "after the 4-parameter logistic fit"}


for _name, (_task, _prompt) in VARIANTS.items():
    TASKS[_name] = partial(IQATask, _task, _prompt)


# --------------------------------------------------------------------------------------------- annotation files
def find_annotations(data: Path) -> Path:
    """``data`` itself when it is a file; in a folder, the first known annotation file of :data:`LAYOUTS`, else the
    folder's only CSV / JSON / JSONL file."""
    if data.is_file():
        return data
    if not data.is_dir():
        raise FileNotFoundError(f"{data} does not exist")
    for layout in LAYOUTS:
        for name in layout.files:
            if (data / name).is_file():
                return data / name
    candidates = sorted(p for p in data.iterdir() if p.is_file() and p.suffix.lower() in _SUFFIXES)
    if len(candidates) == 1:
        return candidates[0]
    known = ", ".join(name for layout in LAYOUTS for name in layout.files)
    found = ", ".join(p.name for p in candidates) or "none"
    raise FileNotFoundError(f"{data}: no annotation file found (known names: {known}; CSV/JSON/JSONL files there: "
                            f"{found}); pass the file itself")


def read_annotations(path: Path) -> tuple[Layout, list[tuple[str, float, float | None]]]:
    """The layout of ``path`` (from its columns) and its ``(image, mos, std or None)`` rows, in file order."""
    suffix = path.suffix.lower()
    if suffix in (".xlsx", ".xls"):
        raise ValueError(f"{path}: spreadsheets are not read; export the sheet as CSV (SPAQ: columns 'Image name', "
                         "'MOS'; AGIQA-1K: 'Image', 'MOS') and pass that file")
    records = _json_records(path) if suffix in (".json", ".jsonl") else _csv_records(path)
    if not records:
        raise ValueError(f"{path}: no rows")
    columns = {str(k) for record in records[:1] for k in record}
    layout = next((lay for lay in LAYOUTS if _column(columns, lay.image) and _column(columns, lay.mos)), None)
    if layout is None:
        wanted = "; ".join(f"{lay.name}: {'|'.join(lay.image)} + {'|'.join(lay.mos)}" for lay in LAYOUTS)
        raise ValueError(f"{path}: unknown layout, columns {sorted(columns)} (expected {wanted})")
    image_key, mos_key = _column(columns, layout.image), _column(columns, layout.mos)
    std_key = _column(columns, layout.std)
    set_key = _column(columns, ("set",)) if layout.name == "koniq10k" else None
    rows = []
    for number, record in enumerate(records, 1):
        if set_key and str(record[set_key]).strip().lower() != "test":
            continue  # koniq10k_distributions_sets.csv: papers report KonIQ-10k on its official test split
        image = str(record.get(image_key) or "").strip()
        mos = _number(record.get(mos_key), path, number, mos_key)
        if not image or mos is None:
            raise ValueError(f"{path} row {number}: missing {image_key if not image else mos_key}")
        std = _number(record.get(std_key), path, number, std_key) if std_key else None
        if std is not None and layout.variance:
            std = math.sqrt(std)
        rows.append((image, mos, std))
    return layout, rows


def _csv_records(path: Path) -> list[dict[str, Any]]:
    # utf-8-sig: a spreadsheet's CSV export usually starts with a byte-order mark, which would glue to the first name.
    text = path.read_text(encoding="utf-8-sig")
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
    return [row for row in reader if any(str(v or "").strip() for v in row.values())]


def _json_records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        records: Any = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = json.loads(text)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected a list of objects with image and mos")
    return records


def _column(columns: Iterable[str], names: Sequence[str]) -> str | None:
    """The first of ``names`` present in ``columns``, compared case-insensitively; the column's own spelling."""
    by_lower = {c.strip().lower(): c for c in columns}
    return next((by_lower[n.lower()] for n in names if n.lower() in by_lower), None)


def _number(value: Any, path: Path, row: int, column: str | None) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path} row {row}: {column} is not a number ({value!r})") from None
    if not math.isfinite(number):
        raise ValueError(f"{path} row {row}: {column} is {value!r}")
    return number


def find_image(root: Path, name: str, layout: Layout) -> Path:
    """The image ``name`` (absolute, or relative to the annotation folder) in the layout's image folders."""
    path = Path(name)
    if path.is_absolute():
        return first_file([path], f"image {name}")
    return first_file([(root / folder / name) for folder in layout.folders], f"{layout.name} image {name}")


__all__ = ["LAYOUTS", "RATING_PROMPTS", "RATING_TASKS", "VARIANTS", "IQAReport", "IQATask", "Layout",
           "find_annotations", "find_image", "read_annotations"]
