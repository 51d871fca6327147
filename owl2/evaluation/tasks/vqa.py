"""Short-answer VQA tasks: VQAv2, OKVQA, TextVQA, VizWiz (VQA accuracy), GQA (exact match) and POPE (yes/no).

Prompt (``evaluate_vqa.py``): ``USER: <|image|>{question} Answer the question using a single word or phrase.
ASSISTANT: ``, greedy, at most 10 new tokens and at least 1 (``min_new_tokens=1``). The official scripts cover
VQAv2, OKVQA and TextVQA; VizWiz, GQA and POPE use the same prompt here (the paper gives no other).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from owl2.evaluation.metrics import exact_match, pope_metrics, vqa_accuracy
from owl2.evaluation.tasks.base import (
    Sample,
    Task,
    TaskReport,
    accuracy_report,
    first_file,
    register,
    resolve_image,
)
from owl2.processing import conversation


def vqa_prompt(question: str) -> str:
    """``USER: <|image|>{question} Answer the question using a single word or phrase. ASSISTANT: ``, the question
    stripped (``evaluate_vqa.py``)."""
    return conversation.evaluation_prompt(conversation.vqa_prompt(question.strip(), separator=" "))


def _read_json_or_jsonl(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def _answers(raw: Any) -> list[str]:
    """``["a", ...]``, ``[{"answer": "a"}, ...]`` or ``"a"`` -> list of answer strings."""
    if isinstance(raw, str):
        return [raw]
    return [a["answer"] if isinstance(a, dict) else str(a) for a in raw or []]


class _ImageIndex:
    """Finds COCO-style images by id anywhere under a directory (``COCO_val2014_000000262148.jpg``, ``262148.jpg``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_number: dict[int, Path] | None = None

    def find(self, image_id: Any) -> Path:
        if self._by_number is None:
            self._by_number = {}
            for path in self.root.rglob("*"):
                match = re.search(r"(\d+)\.(jpe?g|png)$", path.name, re.IGNORECASE)
                if match:
                    self._by_number.setdefault(int(match.group(1)), path)
        try:
            return self._by_number[int(image_id)]
        except (KeyError, ValueError):
            raise FileNotFoundError(f"no image for image_id {image_id} under {self.root}") from None


def load_vqa_samples(data: Path) -> Iterable[tuple[str, Path, str, list[str], dict[str, Any]]]:
    """(id, image, question, answers, meta) from any of the released layouts (see ``VQATask.data_format``)."""
    if data.is_dir():
        questions = sorted(data.glob("*questions*.json"))
        annotations = sorted(data.glob("*annotations*.json"))
        if not questions or not annotations:
            raise FileNotFoundError(f"{data}: expected a *questions*.json and an *annotations*.json (VQA format)")
        by_id = {a["question_id"]: a for a in json.loads(annotations[0].read_text())["annotations"]}
        images = _ImageIndex(data)
        for q in json.loads(questions[0].read_text())["questions"]:
            ann = by_id.get(q["question_id"], {})
            meta = {"answer_type": ann.get("answer_type", "all")}
            yield str(q["question_id"]), images.find(q["image_id"]), q["question"], _answers(ann.get("answers")), meta
        return
    records = _read_json_or_jsonl(data)
    if isinstance(records, dict) and "data" in records:  # TextVQA_0.5.1_val.json
        for r in records["data"]:
            yield (str(r["question_id"]), _textvqa_image(data.parent, r), r["question"], _answers(r.get("answers")),
                   {"answer_type": "all"})
        return
    for i, r in enumerate(records):
        qid = str(r.get("question_id", r.get("image", i)))
        meta = {"answer_type": r.get("answer_type", "all")}
        answers = _answers(r.get("answers", r.get("answer")))
        yield qid, resolve_image(data.parent, r["image"]), r["question"], answers, meta


def _textvqa_image(root: Path, record: dict[str, Any]) -> Path:
    name = f"{record['image_id']}.jpg"
    return first_file((root / folder / name for folder in ("train_images", "images", "test_images", ".")),
                      f"TextVQA image {name}")


@register("vqav2", "okvqa", "textvqa", "vizwiz")
class VQATask(Task):
    max_new_tokens = 10
    min_new_tokens = 1
    data_format = (
        "a JSONL/JSON list of {question_id, image, question, answers: [10 strings] | [{answer}] | answer} with image "
        "paths relative to the file (the Qwen-VL jsonl files; VizWiz's val.json); or a directory holding the "
        "official VQA *questions*.json and *annotations*.json and the COCO images; or TextVQA_0.5.1_val.json with "
        "train_images/"
    )

    def load(self, data: Path) -> list[Sample]:
        return [Sample(qid, vqa_prompt(question), [image], answers, meta)
                for qid, image, question, answers, meta in load_vqa_samples(data)]

    def score(self, samples: Sequence[Sample], predictions: dict[str, dict[str, Any]]) -> TaskReport:
        return accuracy_report((s.meta.get("answer_type", "all"), vqa_accuracy(predictions[s.id]["prediction"],
                                                                               s.answer)) for s in samples)


@register("gqa")
class GQATask(Task):
    max_new_tokens = 10
    min_new_tokens = 1
    data_format = ("testdev_balanced_questions.json ({qid: {imageId, question, answer, types}}) with the images in "
                   "images/ beside it")

    def load(self, data: Path) -> list[Sample]:
        questions = json.loads(data.read_text(encoding="utf-8"))
        root = data.parent
        return [Sample(str(qid), vqa_prompt(q["question"]), [_gqa_image(root, q["imageId"])], q["answer"],
                       {"structural": q.get("types", {}).get("structural", "all")})
                for qid, q in questions.items()]

    def score(self, samples: Sequence[Sample], predictions: dict[str, dict[str, Any]]) -> TaskReport:
        return accuracy_report((s.meta["structural"], exact_match(predictions[s.id]["prediction"], s.answer))
                               for s in samples)


def _gqa_image(root: Path, image_id: str) -> Path:
    candidates = (root / folder / f"{image_id}{suffix}" for folder in ("images", ".") for suffix in (".jpg", ".png"))
    return first_file(candidates, f"GQA image {image_id}")


@register("pope")
class POPETask(Task):
    max_new_tokens = 10
    min_new_tokens = 1
    data_format = ("a directory with coco_pope_random.json, coco_pope_popular.json, coco_pope_adversarial.json "
                   "(JSON lines {question_id, image, text, label}) and the COCO val2014 images (any sub-folder); "
                   "or one such file")

    def load(self, data: Path) -> list[Sample]:
        files = sorted(data.glob("*pope*.json*")) if data.is_dir() else [data]
        if not files:
            raise FileNotFoundError(f"{data}: no coco_pope_*.json files")
        root = data if data.is_dir() else data.parent
        images: dict[str, Path] = {}
        samples = []
        for file in files:
            split = re.sub(r"^.*pope_|\.jsonl?$", "", file.name)
            for line in file.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                r = json.loads(line)
                image = images.get(r["image"]) or _find_named(root, r["image"], images)
                samples.append(Sample(f"{split}:{r['question_id']}", vqa_prompt(r["text"]), [image],
                                      r["label"].strip().lower(), {"split": split}))
        return samples

    def score(self, samples: Sequence[Sample], predictions: dict[str, dict[str, Any]]) -> TaskReport:
        by_split: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for sample in samples:
            by_split[sample.meta["split"]].append((predictions[sample.id]["prediction"], sample.answer))
        breakdown = {split: _pope_percent(pairs) for split, pairs in sorted(by_split.items())}
        everything = [pair for pairs in by_split.values() for pair in pairs]
        return TaskReport(_pope_percent(everything), breakdown, "f1")


def _pope_percent(pairs: Sequence[tuple[str, str]]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio (x100) of (prediction, label) pairs."""
    scores = pope_metrics([p for p, _ in pairs], [a for _, a in pairs])
    return {k: 100 * scores[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}


def _find_named(root: Path, name: str, cache: dict[str, Path]) -> Path:
    direct = root / name
    if direct.is_file():
        cache[name] = direct
        return direct
    for path in root.rglob(name):
        cache[name] = path
        return path
    raise FileNotFoundError(f"image {name} not found under {root}")
