"""Eval reports: a Markdown table of every metric, and per-category bars as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from owl2.evaluation.tasks.base import TaskReport
from owl2.utils import pyplot, save_figure


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def markdown_report(task: str, report: TaskReport, num_samples: int, settings: dict[str, Any]) -> str:
    lines = [f"# {task}", "", f"{num_samples} samples; " + ", ".join(f"{k} {v}" for k, v in settings.items()), "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in report.metrics.items()]
    if report.breakdown:
        columns = sorted({key for row in report.breakdown.values() for key in row})
        lines += ["", "| category | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for category, row in report.breakdown.items():
            lines.append(f"| {category} | " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def plot_breakdown(task: str, report: TaskReport, path: Path) -> bool:
    """Horizontal bars of ``report.plot_metric`` per category; False without matplotlib or a metric to plot."""
    metric = report.plot_metric
    rows = [(name, row[metric]) for name, row in report.breakdown.items() if metric and metric in row]
    if not rows:
        return False
    plt = pyplot()
    if plt is None:
        return False
    names, values = zip(*rows, strict=True)
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.2), dpi=100)
    ax.barh(range(len(rows)), values, color="tab:blue")
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    ax.set_xlabel(metric)
    ax.set_title(task)
    for i, value in enumerate(values):
        ax.text(value, i, f" {value:.1f}", va="center", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)
    return True
