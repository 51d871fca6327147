"""Eval reports: a Markdown table of every metric, and per-category bars (or a task's scatter plot) as a PNG."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from owl2.evaluation.tasks.base import TaskReport
from owl2.utils import pyplot, save_figure


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else _inline(str(value))


def _inline(text: str) -> str:
    """``text`` for one cell or line of Markdown: names and settings come from data files and recipes, and a ``|`` or
    a line break in them would split a table row."""
    return " ".join(text.split()).replace("|", "\\|")


def _literal(text: str) -> str:
    """``text`` drawn as written: matplotlib reads a pair of ``$`` as TeX, and category names come from data files,
    where ``$x^{$`` would fail the whole report after every prediction was made."""
    return text.replace("$", r"\$")


def markdown_report(task: str, report: TaskReport, num_samples: int, settings: dict[str, Any], *,
                    figure: str | None = None) -> str:
    """``figure``: the PNG written beside the report (a file name), shown under the tables."""
    lines = [f"# {_inline(task)}", "",
             f"{num_samples} samples; " + ", ".join(f"{k} {_inline(str(v))}" for k, v in settings.items()), "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {_inline(name)} | {_fmt(value)} |" for name, value in report.metrics.items()]
    if report.breakdown:
        columns = sorted({key for row in report.breakdown.values() for key in row})
        lines += ["", "| category | " + " | ".join(map(_inline, columns)) + " |", "|---|" + "---|" * len(columns)]
        for category, row in report.breakdown.items():
            lines.append(f"| {_inline(category)} | " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    if figure:
        lines += ["", f"![{task}]({figure})"]
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
    ax.set_yticks(range(len(rows)), [_literal(str(name)) for name in names])
    ax.invert_yaxis()
    ax.set_xlabel(_literal(metric))
    ax.set_title(_literal(task))
    for i, value in enumerate(values):
        ax.text(value, i, f" {value:.1f}", va="center", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)
    return True


def plot_scatter(title: str, x: Sequence[float], y: Sequence[float], path: Path, *,
                 curve: Callable[[Any], Any] | None = None, xlabel: str = "prediction", ylabel: str = "target",
                 note: str = "") -> bool:
    """``y`` against ``x`` as points, with ``curve`` (a function of x, e.g. a fitted logistic) drawn over the range of
    ``x``; ``note`` goes in the upper-left corner. False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    # Transparency keeps the density readable for thousands of points (a 10k-image benchmark).
    ax.scatter(x, y, s=10, alpha=0.5 if len(x) > 200 else 0.8, color="tab:blue", edgecolors="none", label="images")
    if curve is not None and len(x):
        grid = np.linspace(min(x), max(x), 200)
        ax.plot(grid, curve(grid), color="tab:red", linewidth=2, label="fitted logistic")
        ax.legend(loc="lower right", fontsize=8)
    if note:
        ax.text(0.02, 0.98, note, transform=ax.transAxes, va="top", fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return True
