"""Training feedback: metrics as JSON lines (and TensorBoard events when installed), and a loss-curve plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from owl2.utils import atomic_write_text, pyplot, save_figure

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (flushed, so a killed run keeps its lines).

    ``resume_step``: records after that step are dropped first (they belong to the part of a killed run that the
    resumed run repeats). ``tensorboard``: also write events under ``tensorboard/`` when the package is installed.
    """

    def __init__(self, directory: str | os.PathLike[str], *, resume_step: int | None = None,
                 tensorboard: bool = True) -> None:
        self.path = Path(directory) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(self.path, "")
        else:
            kept = [line for line in read_metrics(self.path) if line.get("step", 0) <= resume_step]
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


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (a torn last line from a killed run is ignored)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss_curve(records: list[dict[str, Any]], path: str | os.PathLike[str], title: str = "training loss") -> bool:
    """Loss (and learning rate) against step as a PNG; False when matplotlib is missing or nothing was logged."""
    points = [(r["step"], r["loss"]) for r in records if "loss" in r]
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
    lrs = [(r["step"], r["lr"]) for r in records if "lr" in r]
    if lrs:
        twin = ax.twinx()
        twin.plot(*zip(*lrs, strict=True), color="tab:orange", alpha=0.6, label="learning rate")
        twin.set_ylabel("learning rate")
    save_figure(fig, path)
    return True
