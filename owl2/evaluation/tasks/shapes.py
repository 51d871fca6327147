"""The shapes world as a benchmark: held-out synthetic scenes (:mod:`owl2.experiments.shapes`) scored per question type.

``--data`` is a directory written by :func:`owl2.experiments.shapes.write_eval_set` (``eval.jsonl`` plus images);
``owl2 eval --task shapes --data DIR`` first generates the held-out set (1000 scenes of the ``eval`` seed stream, which
never meets the training stream, plus 200 text-only items) into DIR when DIR has no ``eval.jsonl``. Short answers
carry the VQA suffix, captions the captioning prompt and multiple-choice questions the MMBench layout; every answer
is scored by :func:`owl2.experiments.shapes.score_answer` (normalised text, option letters). Captions also get CIDEr-D.
Prompts use the model's chat template (:func:`shapes_prompt`).

:func:`multi_turn_check` asks the held-out questions as a conversation instead, the way ``owl2 chat`` sends it, and
compares the later turns with the same questions asked alone.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owl2.evaluation.metrics import caption_scores
from owl2.evaluation.tasks.base import Sample, Task, TaskReport, accuracy_report, register, resolve_image
from owl2.processing.conversation import image_first, render_conversation

QUESTIONS_FILE = "eval.jsonl"
DEFAULT_SCENES = 1000
DEFAULT_TEXT_ITEMS = 200


def shapes_prompt(item: dict[str, Any]) -> str:
    """The question as the ``mplug_owl2`` template renders a training sample of the shapes world
    (``USER: <|image|>\n{question} ASSISTANT:``). The generator's question text already carries its suffix (short
    answer, option letter or caption request). This is the model's own chat format, not the official evaluation
    scripts' variant with a trailing space, which tokenises the first answer word differently."""
    images = 1 if item.get("image") else 0
    return render_conversation([{"role": "user", "content": image_first(item["question"], images)}],
                               images=[None] * images if images else None)


@register("shapes")
class ShapesTask(Task):
    max_new_tokens = 48
    data_format = ("a directory from owl2.experiments.shapes.write_eval_set (eval.jsonl: {id, image, type, question, "
                   "answer, choices?}); generated there (1000 held-out scenes, 200 text items) when missing")

    def load(self, data: Path) -> list[Sample]:
        from owl2.experiments.shapes import read_eval_set, write_eval_set

        questions = data / QUESTIONS_FILE if data.is_dir() or not data.exists() else data
        if not questions.is_file():
            write_eval_set(questions.parent, scenes=DEFAULT_SCENES, seed=0, text_items=DEFAULT_TEXT_ITEMS)
        root = questions.parent
        return [Sample(str(item.id), shapes_prompt({"question": item.question, "image": item.image}),
                       [resolve_image(root, item.image)] if item.image else [], item.answer,
                       {"type": item.type, "choices": item.choices})
                for item in read_eval_set(questions)]

    def score(self, samples: Sequence[Sample], predictions: dict[str, dict[str, Any]]) -> TaskReport:
        from owl2.experiments.shapes import score_answer

        report = accuracy_report((s.meta["type"], score_answer(s.meta["type"], predictions[s.id]["prediction"],
                                                               s.answer, choices=s.meta["choices"])) for s in samples)
        captions = [s for s in samples if s.meta["type"] == "caption"]
        if captions:
            scores = caption_scores({s.id: predictions[s.id]["prediction"] for s in captions},
                                    {s.id: [s.answer] for s in captions})
            report.metrics["caption_CIDEr"] = 100 * scores["CIDEr"]
        return report


MULTI_TURN_QUESTIONS = 3
"""Questions per conversation in :func:`multi_turn_check`: the first opens it with the image, the others follow."""


@dataclass
class _Conversation:
    """One held-out scene's questions (``QAItem``s of :func:`owl2.experiments.shapes.read_eval_set`) and its image
    file."""

    image: Path
    items: list[Any]


def multi_turn_conversations(data: Path, scenes: int, *, questions: int = MULTI_TURN_QUESTIONS
                             ) -> list[_Conversation]:
    """The first ``scenes`` scenes of a :func:`~owl2.experiments.shapes.write_eval_set` directory that have
    ``questions`` short-answer or multiple-choice questions, each with that many of them in a random order drawn from
    the image's name (so the same scenes always get the same questions, whatever else the set holds). Captions are left
    out: their score is about the whole scene, not about the turn they come in."""
    from owl2.experiments.shapes import read_eval_set

    by_image: dict[str, list[Any]] = {}
    for item in read_eval_set(data / QUESTIONS_FILE):
        if item.image and item.type != "caption":
            by_image.setdefault(item.image, []).append(item)
    conversations = []
    for image, items in by_image.items():
        if len(conversations) == scenes:
            break
        if len(items) >= questions:
            chosen = random.Random(f"owl2-shapes/multi-turn/{image}").sample(items, questions)
            conversations.append(_Conversation(resolve_image(data, image), chosen))
    if len(conversations) < scenes:
        raise ValueError(f"{data}: only {len(conversations)} scenes with {questions} questions, {scenes} asked for")
    return conversations


def multi_turn_check(pipe: Any, data: str | Path, scenes: int, *, batch_size: int = 32,
                     max_new_tokens: int = ShapesTask.max_new_tokens) -> dict[str, Any]:
    """Turns 2 onwards of a conversation against the same questions asked alone, on ``scenes`` held-out scenes.

    Each scene's questions (:func:`multi_turn_conversations`) are asked as ``owl2 chat`` asks them: OpenAI-style
    messages through ``pipe`` (its template, its image processor), the image in the first user message before the
    text, each greedy answer sent back as the assistant's message exactly as decoded. The later questions are then
    asked alone, each as the first message with the image. Returns the accuracies in % (``alone`` and
    ``in_conversation`` over the same questions, ``turns`` per turn in the conversation) and the counts."""
    from owl2.experiments.shapes import score_answer

    data = Path(data)
    conversations = multi_turn_conversations(data, scenes)
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 0.0}

    def ask(prompts: list[list[dict[str, Any]]]) -> list[str]:
        answers: list[str] = []
        for start in range(0, len(prompts), batch_size):
            answers += [r.text for r in pipe.generate(prompts[start:start + batch_size], **sampling)]
        return answers

    def first_message(conversation: _Conversation, text: str) -> dict[str, Any]:
        return {"role": "user", "content": [{"type": "image", "image": str(conversation.image)},
                                            {"type": "text", "text": text}]}

    histories = [[first_message(c, c.items[0].question)] for c in conversations]
    in_conversation: list[list[str]] = [[] for _ in conversations]
    # An empty answer cannot be sent back (the template has no empty closed assistant turn): that conversation ends
    # there, and its later questions count as wrong.
    live = list(range(len(conversations)))
    for turn in range(MULTI_TURN_QUESTIONS):
        if turn:
            for index in live:
                histories[index].append({"role": "user", "content": conversations[index].items[turn].question})
        replies = dict(zip(live, ask([histories[index] for index in live]), strict=True))
        for index, answers in enumerate(in_conversation):
            answers.append(replies.get(index, ""))
        for index, answer in replies.items():
            histories[index].append({"role": "assistant", "content": answer})
        live = [index for index in live if replies[index]]
    later = [(c, k) for c in conversations for k in range(1, MULTI_TURN_QUESTIONS)]
    alone = dict(zip([(id(c), k) for c, k in later], ask([[first_message(c, c.items[k].question)] for c, k in later]),
                     strict=True))

    def right(item: Any, prediction: str) -> bool:
        return score_answer(item.type, prediction, item.answer, choices=item.choices)

    turns = [100 * sum(right(c.items[k], answers[k]) for c, answers in zip(conversations, in_conversation,
                                                                            strict=True)) / len(conversations)
             for k in range(MULTI_TURN_QUESTIONS)]
    return {
        "scenes": len(conversations),
        "questions": len(later),
        "alone": 100 * sum(right(c.items[k], alone[id(c), k]) for c, k in later) / len(later),
        "in_conversation": sum(turns[1:]) / len(turns[1:]),
        "turns": turns,
    }
