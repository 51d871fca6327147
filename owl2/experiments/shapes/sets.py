"""The shapes world's data sets: training, focus and dialogue sets (LLaVA format) and the held-out set.

Every set is a pure function of its arguments (scenes from :func:`~owl2.experiments.shapes.scenes.stream_rng`'s
streams), so it can be rebuilt instead of shipped; the same arguments write the same bytes.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from owl2.experiments.shapes.questions import (
    DIALOGUE_TURNS,
    QAItem,
    _check_answer_style,
    _named_choices,
    binding_drills,
    list_questions,
    restyled,
    scene_dialogue,
    scene_questions,
    text_questions,
    vertical_order,
)
from owl2.experiments.shapes.scenes import Scene, _scene_for, render_scene, stream_rng, training_scene
from owl2.processing.conversation import image_first
from owl2.utils import atomic_write_text


# ---------------------------------------------------------------------------------------------------------- writing
def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")  # Pillow writes no timestamp: same pixels, same bytes


def _training_image(seed: int, index: int) -> str:
    """The path of training scene ``index``'s image, relative to the data directory."""
    return f"images/train-{seed}-{index:06d}.png"


def scene_of_training_image(image: str) -> Scene:
    """The scene behind a training record's image path (``"images/train-0-000377.png"``, :func:`_training_image`),
    at the writers' default ``max_objects`` and ``zoom``: for labels the record does not carry."""
    match = re.fullmatch(r"images/train-(\d+)-(\d+)\.png", image)
    if match is None:
        raise ValueError(f"not the image of a training scene: {image!r}")
    return training_scene(int(match.group(1)), int(match.group(2)))


def write_training_set(
    directory: str | os.PathLike[str],
    *,
    scenes: int,
    text_items: int,
    seed: int,
    size: int = 224,
    multi_turn_fraction: float = 0.75,
    max_objects: int = 6,
    zoom: float = 1.0,
    drills: bool = False,
    drill_turns: int = 6,
    answer_style: str = "short",
    list_items: int = 0,
) -> Path:
    """Write ``images/train-*.png`` and ``train.json`` (LLaVA format) under ``directory``; returns the JSON path.

    Each scene gives a caption record (single turn, :data:`CAPTION_PROMPT`) and its other questions either as one
    multi-turn record (probability ``multi_turn_fraction``; the paper merges the QAs of an image into one
    conversation) or as one single-turn record each. The first human turn starts with ``"<|image|>\\n"``. Text items
    are single-turn records without ``"image"``. Scenes come from the ``"train"`` stream (see :func:`stream_rng`);
    ``max_objects`` below 6 and ``zoom`` above 1 give simpler scenes (fewer, larger objects: a curriculum's first
    steps). ``drills`` adds each scene's :func:`binding_drills` as multi-turn records of at most ``drill_turns``
    turns (ids ``f"{scene.id}-drill{k}"``), drawn from their own stream (``part="drills"``), so every other record is
    the same with or without them. ``answer_style`` (one of :data:`ANSWER_STYLES`) is the form of the training answers:
    ``"short"``, the word or number the held-out questions expect; ``"restated"``, every existence, colour and shape
    answer and every count of one shape or colour after the asked object (:func:`restated_answer`: ``"red circle
    no"``); ``"counted"``, every existence answer as
    :func:`counted_existence_answer` gives it (``"0 red triangles, so no."``); ``"listed"``, every existence, colour
    and shape answer and every count of one shape or colour as :func:`listed_answer` gives it (``"red circle, blue
    cross, so no."``); ``"marked"``, the same with every named object marked (``"red circle, red square 1, so
    yes."``, ``listed_answer(..., marked=True)``). ``list_items`` adds that many :func:`list_questions`
    (text-only, in the listed form, marked when ``answer_style`` is ``"marked"``) after the other text items.
    """
    _check_answer_style(answer_style)
    directory = Path(directory)
    records: list[dict[str, Any]] = []
    for index in range(scenes):
        scene = training_scene(seed, index, max_objects=max_objects, zoom=zoom)
        image = _training_image(seed, index)
        _save(render_scene(scene, size), directory / image)
        rng = stream_rng("train", seed, index, "questions")
        items = scene_questions(scene, rng, image=image)
        items = restyled(scene, items, answer_style)
        captions = [i for i in items if i.type == "caption"]
        others = [i for i in items if i.type != "caption"]
        rng.shuffle(others)
        groups = [others] if rng.random() < multi_turn_fraction else [[i] for i in others]
        for k, group in enumerate([captions, *groups]):
            name = "caption" if k == 0 else f"qa{k - 1}"
            records.append(_llava_record(f"{scene.id}-{name}", group, image))
        if drills:
            extra = binding_drills(scene, stream_rng("train", seed, index, "drills"))
            extra = restyled(scene, extra, answer_style)
            for k in range(0, len(extra), drill_turns):
                records.append(_llava_record(f"{scene.id}-drill{k // drill_turns}", extra[k:k + drill_turns], image))
    text_rng = stream_rng("train", seed, "text", "questions")
    for item in text_questions(text_rng, text_items, prefix=f"shapes-train-{seed}-text"):
        records.append(_llava_record(item.id, [item], None))
    for item in list_questions(seed, list_items, marked=answer_style == "marked"):
        records.append(_llava_record(item.id, [item], None))
    path = directory / "train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(records, indent=1) + "\n")
    return path


def write_focus_set(directory: str | os.PathLike[str], *, scenes: int, seed: int, size: int = 224,
                    text_items: int = 0, other_items: int | None = None, answer_style: str = "chained",
                    vertical_orders: bool = False) -> Path:
    """Write ``images/train-*.png`` and ``focus.json`` (LLaVA format) under ``directory``; returns the JSON path.

    One question per record: every existence question and every caption of ``scenes`` training scenes (the
    ``"train"`` stream, the images of :func:`write_training_set`), their other questions (all of them, or
    ``other_items`` drawn at random), and ``text_items`` text-only items, shuffled. The answers take
    ``answer_style`` as in :func:`write_training_set`, and the multiple-choice ones :func:`choice_answer`'s form
    (``"diamond B"``). ``vertical_orders`` adds each scene's :func:`vertical_order` (training only). This is
    owl2-tiny's training data: single questions at a large batch (``docs/experiments.md``)."""
    _check_answer_style(answer_style)
    directory = Path(directory)
    kept: list[QAItem] = []
    others: list[QAItem] = []
    for index in range(scenes):
        scene = training_scene(seed, index)
        image = _training_image(seed, index)
        _save(render_scene(scene, size), directory / image)
        items = restyled(scene, scene_questions(scene, stream_rng("train", seed, index, "questions"), image=image),
                         answer_style)
        for item in _named_choices(items):
            (kept if item.type in ("existence", "caption") else others).append(item)
        if vertical_orders:
            kept.append(vertical_order(scene, image))
    rng = random.Random(f"owl2-shapes/focus/{seed}")
    chosen = kept + (others if other_items is None else rng.sample(others, min(other_items, len(others))))
    chosen += text_questions(stream_rng("train", seed, "text", "questions"), text_items,
                             prefix=f"shapes-train-{seed}-text")
    rng.shuffle(chosen)
    records = [_llava_record(f"{item.id}-focus", [item], item.image) for item in chosen]
    path = directory / "focus.json"
    atomic_write_text(path, json.dumps(records, indent=1) + "\n")
    return path


def write_dialogue_set(directory: str | os.PathLike[str], *, scenes: int, seed: int, size: int = 224,
                       answer_style: str = "chained", turns: Sequence[int] = DIALOGUE_TURNS) -> Path:
    """Write ``images/train-*.png`` and ``dialogues.json`` (LLaVA format) under ``directory``; returns the JSON path.

    One conversation per training scene (the ``"train"`` stream: the scenes and images of :func:`write_focus_set`
    and :func:`write_training_set` with the same ``seed``): :func:`scene_dialogue`'s questions, the image placeholder
    in the first human turn only (``"<|image|>\\n"``), each later question as a turn of its own, as ``owl2 chat``
    sends them. The questions come from their own stream (``part="dialogue"``), so they are a fresh draw of the
    scene's questions, not those of the single-question records. Ids are ``f"{scene.id}-dialogue"``. A model trained
    on single questions only answers the later turns of a conversation badly (``owl2.experiments.tiny``, stage 4)."""
    _check_answer_style(answer_style)
    if not turns or min(turns) < 1:
        raise ValueError(f"turns must be positive numbers of questions, got {tuple(turns)}")
    directory = Path(directory)
    records = []
    for index in range(scenes):
        scene = training_scene(seed, index)
        image = _training_image(seed, index)
        _save(render_scene(scene, size), directory / image)
        items = scene_dialogue(scene, stream_rng("train", seed, index, "dialogue"), image=image,
                               answer_style=answer_style, turns=turns)
        records.append(_llava_record(f"{scene.id}-dialogue", items, image))
    path = directory / "dialogues.json"
    atomic_write_text(path, json.dumps(records, indent=1) + "\n")
    return path


def _llava_record(record_id: str, items: Sequence[QAItem], image: str | None) -> dict[str, Any]:
    conversations = []
    for k, item in enumerate(items):
        value = image_first(item.question) if image is not None and k == 0 else item.question
        conversations += [{"from": "human", "value": value}, {"from": "gpt", "value": item.answer}]
    record: dict[str, Any] = {"id": record_id}
    if image is not None:
        record["image"] = image
    record["conversations"] = conversations
    return record


def write_eval_set(
    directory: str | os.PathLike[str],
    *,
    scenes: int,
    seed: int,
    size: int = 224,
    text_items: int = 0,
    types: Iterable[str] | None = None,
) -> Path:
    """Write ``images/eval-*.png``, ``eval.jsonl`` and ``scenes.jsonl`` under ``directory``; returns the JSONL path.

    ``eval.jsonl`` holds one question per line: ``{"id", "image", "type", "question", "answer", "choices"?}``
    (``image`` relative to the file; ``null`` for the ``text_items`` text-only items). ``types`` keeps only those
    question types. ``scenes.jsonl`` holds each scene's data, for analysis. Scenes come from the ``"eval"`` stream, so
    they never share a seed with a training set.
    """
    directory = Path(directory)
    keep = set(types) if types is not None else None
    lines: list[str] = []
    scene_lines: list[str] = []
    for index in range(scenes):
        scene = _scene_for("eval", seed, index)
        image = f"images/eval-{seed}-{index:06d}.png"
        _save(render_scene(scene, size), directory / image)
        scene_lines.append(json.dumps(scene.to_dict()))
        for item in scene_questions(scene, stream_rng("eval", seed, index, "questions"), image=image):
            if keep is None or item.type in keep:
                lines.append(json.dumps(item.to_dict()))
    text_rng = stream_rng("eval", seed, "text", "questions")
    for item in text_questions(text_rng, text_items, prefix=f"shapes-eval-{seed}-text"):
        if keep is None or item.type in keep:
            lines.append(json.dumps(item.to_dict()))
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "scenes.jsonl", "".join(s + "\n" for s in scene_lines))
    path = directory / "eval.jsonl"
    atomic_write_text(path, "".join(line + "\n" for line in lines))  # written last: the set's marker
    return path


def read_eval_set(path: str | os.PathLike[str]) -> list[QAItem]:
    """The items of an ``eval.jsonl`` written by :func:`write_eval_set` (image paths as stored, relative)."""
    items = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            data = json.loads(line)
            items.append(QAItem(data["id"], data["type"], data["question"], data["answer"], data.get("choices"),
                                data.get("image")))
    return items
