"""The evaluation harness: batched greedy inference with a task's exact prompts, cached predictions, a report.

Predictions go to ``<output>/<task>.predictions.jsonl`` as each batch finishes (flushed and synced), one JSON object
per sample. A rerun reads that file and only runs the samples that are missing, so a killed run loses at most the
batch in flight and a finished run is re-scored without inference. A line it cannot use (the torn last line of a
killed run, or a damaged one) is dropped with a warning, the file is rewritten without it before new predictions
are appended, and its sample runs again. Ctrl-C raises :class:`EvaluationInterrupted` (still a
``KeyboardInterrupt``), which says how many predictions are on disk and where. The report is written at the end:
``<task>.report.json`` (every metric), ``<task>.report.md`` (a table) and ``<task>.png`` (per-category bars, when
the task has categories, or the figure a report draws itself, such as the IQA scatter plot).

Task modes: ``generate`` (greedy decoding), ``loglikelihood`` (the most likely continuation) and ``rate``
(``pipe.rate`` with the task's ``rating_options()``; the score, level probabilities and std are cached).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from owl2.evaluation.tasks.base import Sample, Task, TaskReport
from owl2.generation import GenerationRequest, SamplingParams
from owl2.utils import atomic_write_text, describe_dropped, progress, read_json_lines

logger = logging.getLogger("owl2.evaluation")


class EvaluationInterrupted(KeyboardInterrupt):
    """Ctrl-C during :meth:`Evaluator.run`, with what is safe on disk: the caller can say how to resume.

    A ``KeyboardInterrupt`` still, so code that stops on Ctrl-C keeps stopping."""

    def __init__(self, task: str, predictions_path: Path, saved: int, total: int) -> None:
        super().__init__(f"{task}: interrupted with {saved} of {total} predictions saved in {predictions_path}")
        self.task, self.predictions_path, self.saved, self.total = task, predictions_path, saved, total


@dataclass
class EvalResult:
    task: str
    report: TaskReport
    predictions_path: Path
    report_paths: list[Path] = field(default_factory=list)
    ran: int = 0
    """Samples inferred in this run (the rest came from the predictions file)."""


def _valid_prediction(value: Any, mode: str | None) -> bool:
    """Whether ``value`` is what ``mode`` writes: a number for ``rate``, text otherwise (either when unknown)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if mode == "rate":
        return number
    return isinstance(value, str) or (mode is None and number)


def _prediction_problem(mode: str | None) -> Callable[[dict[str, Any]], str]:
    """Why a record of a predictions file cannot be used ("" when it can), for :func:`~owl2.utils.read_json_lines`."""

    def problem(record: dict[str, Any]) -> str:
        if not isinstance(record.get("id"), (str, int)) or isinstance(record.get("id"), bool):
            return "no id"
        if "prediction" not in record:
            return "no prediction"
        if not _valid_prediction(record["prediction"], mode):
            return f"prediction is not {'a number' if mode == 'rate' else 'text'}"
        return ""

    return problem


def _read_predictions(path: Path, mode: str | None) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Predictions by sample id, and a note for each line that was dropped."""
    records, dropped = read_json_lines(path, _prediction_problem(mode))
    return {str(record["id"]): record for record in records}, dropped


def read_predictions(path: Path, *, mode: str | None = None) -> dict[str, dict[str, Any]]:
    """Predictions by sample id from a predictions file; ``mode`` (a task's) also checks the prediction's type:
    a number for ``rate``, text for the others.

    A line that cannot be used is dropped, so its sample runs again: the torn last line of a killed run (which may
    end inside a UTF-8 character), a line that is not JSON, or a record without an ``id`` or a ``prediction`` of the
    right type. One warning says how many records were kept and which lines were dropped."""
    found, dropped = _read_predictions(Path(path), mode)
    if dropped:
        logger.warning("%s: kept %d cached prediction(s); dropped %s; those samples run again", path, len(found),
                       describe_dropped(dropped))
    return found


class _PredictionWriter:
    """Appends records and makes each batch durable before the next one starts."""

    def __init__(self, path: Path, existing: dict[str, dict[str, Any]]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Rewrite the valid lines first, so a torn line never ends up in the middle of the file.
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in existing.values()))
        self._handle = path.open("a", encoding="utf-8")

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        for record in records:
            self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


class Evaluator:
    """Runs tasks with one pipeline (``owl2.load(...)``); ``batch_size`` rows decode together."""

    def __init__(self, pipeline: Any, *, batch_size: int = 8, show_progress: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.pipe = pipeline
        self.batch_size = batch_size
        self.show_progress = show_progress

    # ---------------------------------------------------------------------------------------------- inference
    def image_policy(self, task: Task) -> str:
        """The pipeline's explicit policy, else the one the checkpoint's ``config.json`` names (a Q-Align scorer's
        ``pad``), else the task's (the official evaluation scripts')."""
        if self.pipe is None:  # re-scoring cached predictions
            return task.policy
        return self.pipe.policy or getattr(self.pipe.image_processor, "checkpoint_policy", None) or task.policy

    def _pixels(self, sample: Sample, policy: str) -> torch.Tensor | None:
        if not sample.images:
            return None
        return self.pipe.image_processor(list(sample.images), policy=policy)

    def _generate(self, task: Task, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        params = SamplingParams(max_new_tokens=task.max_new_tokens, min_new_tokens=task.min_new_tokens)
        policy = self.image_policy(task)
        requests = [GenerationRequest(self.pipe.tokenizer.encode_prompt(s.prompt), self._pixels(s, policy), params)
                    for s in samples]
        results = self.pipe.engine.generate(requests)
        return [{"id": s.id, "prediction": r.text.strip()} for s, r in zip(samples, results, strict=True)]

    def _score_choices(self, task: Task, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        records = []
        for sample in samples:
            prompt_ids = self.pipe.tokenizer.encode_prompt(sample.prompt)
            continuations = [self.pipe.continuation_ids(prompt_ids, c) for c in sample.continuations]
            pixels = self._pixels(sample, self.image_policy(task))
            logprobs = self.pipe.engine.loglikelihoods(prompt_ids, pixels, continuations)
            best = int(torch.argmax(logprobs))
            records.append({"id": sample.id, "prediction": sample.continuations[best],
                            "logprobs": [round(float(x), 6) for x in logprobs]})
        return records

    def _rate(self, task: Task, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        options = getattr(task, "rating_options", dict)()  # rating word and prompt (owl2.evaluation.tasks.iqa)
        ratings = self.pipe.rate([s.images[0] for s in samples], batch_size=self.batch_size, **options)
        return [{"id": s.id, "prediction": float(r.score), "probs": [float(p) for p in r.probs], "std": float(r.std)}
                for s, r in zip(samples, ratings, strict=True)]

    # -------------------------------------------------------------------------------------------------- public
    def run(self, task: Task, data: str | os.PathLike[str], output_dir: str | os.PathLike[str], *,
            limit: int | None = None) -> EvalResult:
        """Evaluate ``task`` on its released files at ``data``; cache and report under ``output_dir``."""
        output_dir = Path(output_dir)
        samples = task.load(Path(data))
        if limit is not None:
            samples = samples[:limit]
        if not samples:
            raise ValueError(f"{task.name}: no samples found in {data}")
        ids = {s.id for s in samples}
        if len(ids) != len(samples):
            raise ValueError(f"{task.name}: sample ids are not unique in {data}")
        path = output_dir / f"{task.name}.predictions.jsonl"
        known = read_predictions(path, mode=task.mode)
        done = {k: v for k, v in known.items() if k in ids}
        todo = [s for s in samples if s.id not in done]
        if todo and self.pipe is None:
            raise ValueError(f"{task.name}: {len(todo)} of {len(samples)} samples have no usable prediction in "
                             f"{path}; re-scoring without a model needs every one (run with a model to fill them)")
        writer = _PredictionWriter(path, known)
        infer = {"loglikelihood": self._score_choices, "rate": self._rate}.get(task.mode, self._generate)
        batches = [todo[i:i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        try:
            for batch in progress(batches, total=len(batches), desc=f"{task.name}", enabled=self.show_progress,
                                  unit="batch"):
                records = infer(task, batch)
                writer.write(records)
                done.update((r["id"], r) for r in records)
        except KeyboardInterrupt as exc:
            writer.close()
            # Count from the file, not from `done`: Ctrl-C may land between a batch's write and its bookkeeping.
            saved = sum(1 for key in _read_predictions(path, task.mode)[0] if key in ids)
            raise EvaluationInterrupted(task.name, path, saved, len(samples)) from exc
        finally:
            writer.close()
        report = task.score(samples, {s.id: done[s.id] for s in samples})
        result = EvalResult(task.name, report, path, ran=len(todo))
        result.report_paths = write_report(task, report, output_dir, num_samples=len(samples),
                                           image_policy=self.image_policy(task))
        return result


def _finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in nested dicts and lists) replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def write_report(task: Task, report: TaskReport, output_dir: Path, *, num_samples: int,
                 image_policy: str | None = None) -> list[Path]:
    """``<task>.report.json``, ``<task>.report.md`` and, with categories, ``<task>.png``, each replaced in one
    rename. ``image_policy``: the policy the images were preprocessed with, when not the task's own. An undefined
    metric (NaN) is ``null`` in the JSON and ``nan`` in the table."""
    settings = {**task.settings(), **({"image_policy": image_policy} if image_policy else {})}
    from owl2.evaluation.report import markdown_report, plot_breakdown

    payload = {"task": task.name, "samples": num_samples, "metrics": report.metrics, "breakdown": report.breakdown,
               "settings": settings}
    paths = [output_dir / f"{task.name}.report.json", output_dir / f"{task.name}.report.md"]
    # Strict JSON: a metric that is undefined (a correlation over constant predictions is NaN) becomes null, where
    # json.dumps would write a bare NaN that most JSON readers other than Python's reject.
    atomic_write_text(paths[0], json.dumps(_finite_or_null(payload), indent=2, ensure_ascii=False,
                                           allow_nan=False) + "\n")
    figure = output_dir / f"{task.name}.png"
    draw = getattr(report, "plot", None)  # a report that draws its own figure (the IQA scatter plot)
    drawn = bool(report.breakdown and plot_breakdown(task.name, report, figure)) or (callable(draw) and draw(figure))
    atomic_write_text(paths[1], markdown_report(task.name, report, num_samples, settings,
                                                figure=figure.name if drawn else None))
    return [*paths, figure] if drawn else paths
