"""What a benchmark task is: samples with exact prompts, decoding settings, and a scoring function.

A task reads the benchmark's released files from a local path (nothing is downloaded) and turns each question into a
:class:`Sample` whose ``prompt`` is the exact text the model sees (``<|image|>`` where each image goes, the template
applied). ``mode`` is ``"generate"`` (greedy decoding up to ``max_new_tokens``) or ``"loglikelihood"`` (the sample's
``continuations`` are scored after the prompt and the most likely one is the prediction). The prompts' wording and
layouts come from :mod:`owl2.processing.conversation` (the official evaluation scripts' form is its
``evaluation_prompt``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


@dataclass
class Sample:
    id: str
    prompt: str
    images: list[Any] = field(default_factory=list)
    """Image sources in prompt order: paths, bytes or PIL images."""
    answer: Any = None
    """What the task's metric compares the prediction with."""
    meta: dict[str, Any] = field(default_factory=dict)
    continuations: list[str] | None = None
    """For ``loglikelihood`` tasks: the candidate answers."""


@dataclass
class TaskReport:
    metrics: dict[str, float]
    """Headline numbers (``accuracy``, ``CIDEr``, ``perception`` ...)."""
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per category (or subtask / question type): metric name -> value."""
    plot_metric: str | None = None
    """Which breakdown metric the per-category bar plot shows."""


def accuracy_report(scored: Iterable[tuple[str, float]], extra: dict[str, float] | None = None) -> TaskReport:
    """``(group, score in [0, 1])`` per sample -> accuracy (x100) overall and per group (the breakdown is left out
    when there is only one group). ``extra`` metrics are added to the headline ones."""
    groups: dict[str, list[float]] = defaultdict(list)
    for group, score in scored:
        groups[str(group)].append(float(score))
    everything = [x for v in groups.values() for x in v]
    if not everything:
        raise ValueError("no scored samples")
    breakdown = {k: {"accuracy": 100 * sum(v) / len(v), "count": len(v)} for k, v in sorted(groups.items())}
    metrics = {"accuracy": 100 * sum(everything) / len(everything), **(extra or {})}
    return TaskReport(metrics, breakdown if len(groups) > 1 else {}, "accuracy")


class Task:
    """Base class; subclasses set the class attributes and implement :meth:`load` and :meth:`score`."""

    name: ClassVar[str] = ""
    mode: ClassVar[str] = "generate"
    max_new_tokens: ClassVar[int] = 10
    min_new_tokens: ClassVar[int] = 0
    policy: ClassVar[str] = "stretch"
    """Image preprocessing: the official evaluation scripts stretch each image to a square of its longest side."""
    data_format: ClassVar[str] = ""
    """The released file layout ``load`` reads (shown by ``owl2 eval --list``)."""

    def load(self, data: Path) -> list[Sample]:
        raise NotImplementedError

    def score(self, samples: Sequence[Sample], predictions: dict[str, dict[str, Any]]) -> TaskReport:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        return {"mode": self.mode, "max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens,
                "image_policy": self.policy, "decoding": "greedy"}


TASKS: dict[str, Callable[[], Task]] = {}


def register(*names: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: make the task available to ``owl2 eval --task NAME`` under each name."""

    def add(cls: type[Task]) -> type[Task]:
        for name in names:
            TASKS[name] = lambda name=name, cls=cls: _named(cls, name)
        return cls

    return add


def _named(cls: type[Task], name: str) -> Task:
    task = cls()
    task.name = name  # type: ignore[misc]  # one class may serve several benchmarks (vqav2, okvqa, ...)
    return task


def get_task(name: str) -> Task:
    import owl2.evaluation.tasks  # noqa: F401  (registers the tasks)

    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]()


def resolve_image(root: Path, name: str | Path) -> Path:
    """An image path from a data file, relative to ``root`` unless absolute; a clear error when it is missing."""
    path = Path(name)
    if not path.is_absolute():
        path = root / path
    if not path.is_file():
        raise FileNotFoundError(f"image {path} (named in the benchmark files) does not exist")
    return path


def first_file(candidates: Iterable[Path], what: str) -> Path:
    """The first of ``candidates`` that is a file (releases put images in different folders); a FileNotFoundError
    naming ``what`` and every path tried when none is."""
    tried = list(candidates)
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{what} not found (tried {', '.join(str(p) for p in tried)})")

