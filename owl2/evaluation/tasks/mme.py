"""MME: 14 yes/no subtasks, two questions per image.

Prompt (``evaluate_mme.py``): the question with "Please answer yes or no." removed, then ``\\nAnswer the question
using a single word or phrase.``: ``USER: <|image|>{q}\\nAnswer the question using a single word or phrase.
ASSISTANT: ``; greedy, at most 10 new tokens. Scoring is the official tool's: yes/no parsing, accuracy and accuracy+
per subtask, subtask score 100 * (acc + acc+), perception (10 subtasks, max 2000) and cognition (4, max 800).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from owl2.evaluation.metrics import mme_scores
from owl2.evaluation.tasks.base import Sample, Task, TaskReport, register
from owl2.processing.conversation import evaluation_prompt, vqa_prompt

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def mme_prompt(question: str) -> str:
    question = question.replace("Please answer yes or no.", "").strip()
    return evaluation_prompt(vqa_prompt(question, separator="\n"))


def _pairs(subtask: Path) -> list[tuple[Path, Path]]:
    """(question file, image) pairs in either release layout: images/ + questions_answers_YN/, or side by side."""
    if (subtask / "questions_answers_YN").is_dir():
        texts, images = sorted((subtask / "questions_answers_YN").glob("*.txt")), subtask / "images"
    else:
        texts, images = sorted(subtask.glob("*.txt")), subtask
    pairs = []
    for text in texts:
        image = next((images / f"{text.stem}{s}" for s in _IMAGE_SUFFIXES if (images / f"{text.stem}{s}").is_file()),
                     None)
        if image is None:
            raise FileNotFoundError(f"MME: no image for {text} in {images}")
        pairs.append((text, image))
    return pairs


@register("mme")
class MMETask(Task):
    max_new_tokens = 10
    data_format = ("MME_Benchmark_release_version/: one folder per subtask holding images and .txt files of "
                   "'question<TAB>Yes|No' lines (side by side, or in images/ and questions_answers_YN/)")

    def load(self, data: Path) -> list[Sample]:
        samples = []
        for subtask in sorted(p for p in data.iterdir() if p.is_dir()):
            for text, image in _pairs(subtask):
                lines = [line for line in text.read_text(encoding="utf-8").splitlines() if line.strip()]
                for k, line in enumerate(lines):
                    question, _, answer = line.rpartition("\t")
                    samples.append(Sample(f"{subtask.name}/{text.stem}/{k}", mme_prompt(question), [image],
                                          answer.strip(), {"subtask": subtask.name, "image": text.stem}))
        if not samples:
            raise FileNotFoundError(f"{data}: no MME subtask folders with question files")
        return samples

    def score(self, samples: Sequence[Sample], predictions: dict[str, dict[str, Any]]) -> TaskReport:
        records = [{"subtask": s.meta["subtask"], "image": s.meta["image"], "answer": s.answer,
                    "prediction": predictions[s.id]["prediction"]} for s in samples]
        scores = mme_scores(records)
        return TaskReport(scores["totals"], scores["subtasks"], "score")
