"""Training feedback: metrics as JSON lines (and TensorBoard events when installed), and a loss-curve plot."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from owl2.utils import atomic_write_text, describe_dropped, pyplot, read_json_lines, save_figure

METRICS_FILE = "metrics.jsonl"
logger = logging.getLogger("owl2.training")


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (flushed, so a killed run keeps its lines).

    ``resume_step``: the file is rewritten first with only the records :func:`read_metrics` can use up to that
    step (later ones belong to the part of a killed run that the resumed run repeats; unreadable lines are dropped
    with a warning rather than blocking the resume). ``tensorboard``: also write events under ``tensorboard/`` when
    the package is installed.
    """

    def __init__(self, directory: str | os.PathLike[str], *, resume_step: int | None = None,
                 tensorboard: bool = True) -> None:
        self.path = Path(directory) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(self.path, "")
        else:
            kept = [record for record in read_metrics(self.path) if record["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._handle = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self._tb = SummaryWriter(str(Path(directory) / "tensorboard"), purge_step=resume_step)

    def log(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self._handle.close()
        if self._tb is not None:
            self._tb.close()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metrics_problem(record: dict[str, Any]) -> str:
    """Why a JSON object is not a usable metrics record ("" when it is): every writer logs the step and the loss."""
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return "no integer step"
    if not _is_number(record.get("loss")):
        return "no numeric loss"
    return ""


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (``path`` is the file or the run directory holding it), in order.

    A record is a JSON object with an integer ``step`` and a numeric ``loss``. Any other line -- the torn last line
    of a killed run, bytes damaged on disk, a line that is not an object -- is left out, with one warning that
    counts them and names their line numbers; a missing file gives ``[]``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records, dropped = read_json_lines(path, _metrics_problem)
    if dropped:
        logger.warning("%s: kept %d metrics record(s); left out %d unreadable line(s): %s", path, len(records),
                       len(dropped), describe_dropped(dropped))
    return records


def plot_loss_curve(records: list[dict[str, Any]], path: str | os.PathLike[str], title: str = "training loss") -> bool:
    """Loss (and learning rate) against step as a PNG; False when matplotlib is missing or nothing was logged."""
    # Only numbers can be drawn: a record read some other way may lack a field or hold text in it.
    points = [(r["step"], r["loss"]) for r in records if _is_number(r.get("step")) and _is_number(r.get("loss"))]
    if not points:
        return False
    plt = pyplot()
    if plt is None:
        return False
    steps, losses = zip(*points, strict=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    lrs = [(r["step"], r["lr"]) for r in records if _is_number(r.get("step")) and _is_number(r.get("lr"))]
    if lrs:
        twin = ax.twinx()
        twin.plot(*zip(*lrs, strict=True), color="tab:orange", alpha=0.6, label="learning rate")
        twin.set_ylabel("learning rate")
    save_figure(fig, path)
    return True
