"""Evaluation: the paper's benchmarks with their exact prompts and metrics, batched, resumable and reported.

``owl2 eval --model M --task T --data PATH`` (or :func:`evaluate`) runs a task from :mod:`owl2.evaluation.tasks` on
the benchmark's released files with :class:`owl2.evaluation.harness.Evaluator`, scoring with
:mod:`owl2.evaluation.metrics`.
"""

from __future__ import annotations

import os
from typing import Any

from owl2.evaluation.harness import EvalResult, Evaluator, read_predictions
from owl2.evaluation.tasks import TASKS, Sample, Task, TaskReport, get_task


def evaluate(pipeline: Any, task: str | Task, data: str | os.PathLike[str], output_dir: str | os.PathLike[str], *,
             limit: int | None = None, batch_size: int = 8, show_progress: bool = True) -> EvalResult:
    """Run ``task`` (a name or a :class:`Task`) with ``pipeline`` (``owl2.load(...)``) and write its report."""
    task = get_task(task) if isinstance(task, str) else task
    return Evaluator(pipeline, batch_size=batch_size, show_progress=show_progress).run(task, data, output_dir,
                                                                                       limit=limit)


__all__ = ["TASKS", "EvalResult", "Evaluator", "Sample", "Task", "TaskReport", "evaluate", "get_task",
           "read_predictions"]
