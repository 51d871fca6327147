"""The shapes world as a benchmark: held-out synthetic scenes (:mod:`owl2.data.shapes`) scored per question type.

``--data`` is a directory written by :func:`owl2.data.shapes.write_eval_set` (``eval.jsonl`` plus images);
``owl2 eval --task shapes --data DIR`` first generates the held-out set (1000 scenes of the ``eval`` seed stream, which
never meets the training stream, plus 200 text-only items) into DIR when DIR has no ``eval.jsonl``. Short answers
carry the VQA suffix, captions the captioning prompt and multiple-choice questions the MMBench layout; every answer
is scored by :func:`owl2.data.shapes.score_answer` (normalised text, option letters). Captions also get CIDEr-D.
Prompts use the model's chat template (:func:`shapes_prompt`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from owl2.evaluation.metrics import caption_scores
from owl2.evaluation.tasks.base import Sample, Task, TaskReport, accuracy_report, register, resolve_image
from owl2.processing.conversation import render_conversation

QUESTIONS_FILE = "eval.jsonl"
DEFAULT_SCENES = 1000
DEFAULT_TEXT_ITEMS = 200


def shapes_prompt(item: dict[str, Any]) -> str:
    """The question as the ``mplug_owl2`` template renders a training sample of the shapes world
    (``USER: <|image|>\n{question} ASSISTANT:``). The generator's question text already carries its suffix (short
    answer, option letter or caption request). This is the model's own chat format, not the official evaluation
    scripts' variant with a trailing space, which tokenises the first answer word differently."""
    text = f"<|image|>\n{item['question']}" if item.get("image") else item["question"]
    return render_conversation([{"role": "user", "content": text}], images=[None] if item.get("image") else None)


@register("shapes")
class ShapesTask(Task):
    max_new_tokens = 48
    data_format = ("a directory from owl2.data.shapes.write_eval_set (eval.jsonl: {id, image, type, question, "
                   "answer, choices?}); generated there (1000 held-out scenes, 200 text items) when missing")

    def load(self, data: Path) -> list[Sample]:
        from owl2.data.shapes import read_eval_set, write_eval_set

        questions = data / QUESTIONS_FILE if data.is_dir() or not data.exists() else data
        if not questions.is_file():
            write_eval_set(questions.parent, scenes=DEFAULT_SCENES, seed=0, text_items=DEFAULT_TEXT_ITEMS)
        root = questions.parent
        return [Sample(str(item.id), shapes_prompt({"question": item.question, "image": item.image}),
                       [resolve_image(root, item.image)] if item.image else [], item.answer,
                       {"type": item.type, "choices": item.choices})
                for item in read_eval_set(questions)]

    def score(self, samples: Sequence[Sample], predictions: dict[str, dict[str, Any]]) -> TaskReport:
        from owl2.data.shapes import score_answer

        report = accuracy_report((s.meta["type"], score_answer(s.meta["type"], predictions[s.id]["prediction"],
                                                               s.answer, choices=s.meta["choices"])) for s in samples)
        captions = [s for s in samples if s.meta["type"] == "caption"]
        if captions:
            scores = caption_scores({s.id: predictions[s.id]["prediction"] for s in captions},
                                    {s.id: [s.answer] for s in captions})
            report.metrics["caption_CIDEr"] = 100 * scores["CIDEr"]
        return report
