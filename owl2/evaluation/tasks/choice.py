"""Multiple-choice tasks: MMBench (with CircularEval), SEED-Bench, ScienceQA-IMG, Q-Bench, and text-only MMLU.

The image tasks generate an option letter. Prompt (``evaluate_mmbench.py``): ``USER: <|image|>{hint or "N/A"}\\n
{question}\\nA. ...\\nB. ...\\nAnswer with the option\u2019s letter from the given choices directly. ASSISTANT: ``
(the official script's curly apostrophe kept), greedy, at most 10 new tokens; the letter is extracted from the
answer (:func:`owl2.evaluation.metrics.extract_choice`). SEED-Bench, ScienceQA-IMG and Q-Bench are not in the
official scripts and use the same layout here (ScienceQA puts its context where MMBench puts the hint).

MMLU is scored by log-likelihood: the options are shown as above after "The following are multiple choice questions
(with answers) about {subject}.", the prompt ends with "Answer:", and the most likely of " A" ... " D" is the answer
(the usual 5-shot harness format; the dev split provides the shots when present).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from owl2.evaluation.metrics import circular_eval, extract_choice
from owl2.evaluation.tasks.base import (
    Sample,
    Task,
    TaskReport,
    accuracy_report,
    register,
    resolve_image,
)
from owl2.processing.conversation import OPTION_LETTERS as LETTERS
from owl2.processing.conversation import evaluation_prompt, mmlu_prompt, multiple_choice_prompt


def choice_prompt(question: str, options: Sequence[str], context: str | None = None, num_images: int = 1) -> str:
    """The MMBench prompt (``evaluate_mmbench.py``): ``context`` (the hint) and ``question`` stripped, the options
    lettered, the official U+2019 instruction, in the evaluation scripts' raw layout."""
    hint = context.strip() if context is not None else None
    return evaluation_prompt(multiple_choice_prompt(question.strip(), options, hint=hint), num_images)


def _accuracy_report(samples: Sequence[Sample], predictions: dict[str, dict[str, Any]], key: str) -> TaskReport:
    """Accuracy overall and per ``sample.meta[key]`` for letter answers."""
    return accuracy_report((s.meta.get(key, "all"), extract_choice(predictions[s.id]["prediction"],
                                                                   s.meta["options"]) == s.answer) for s in samples)


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() in ("", "nan")


@register("mmbench")
class MMBenchTask(Task):
    max_new_tokens = 10
    data_format = ("the MMBench TSV (index, question, hint, A, B, C, D, answer, category, l2-category, image as "
                   "base64); every question is asked once per rotation of its options (CircularEval)")

    def load(self, data: Path) -> list[Sample]:
        csv.field_size_limit(sys.maxsize)  # the image column holds whole base64 images
        samples = []
        with data.open(encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                options = [row[c] for c in "ABCDEFGHI" if c in row and not _is_blank(row[c])]
                answer = row.get("answer", "").strip()
                image = base64.b64decode(row["image"])
                hint = None if _is_blank(row.get("hint")) else row["hint"]
                correct = options[LETTERS.index(answer)] if answer in LETTERS[:len(options)] else None
                for shift in range(len(options)):
                    rotated = options[shift:] + options[:shift]
                    letter = LETTERS[rotated.index(correct)] if correct is not None else ""
                    # The official prompt writes "N/A" when there is no hint.
                    samples.append(Sample(f"{row['index']}:{shift}", choice_prompt(row["question"], rotated,
                                                                                   hint or "N/A"),
                                          [image], letter, {"index": row["index"], "options": rotated,
                                                            "category": row.get("category", ""),
                                                            "l2": row.get("l2-category", ""), "rotation": shift}))
        return samples

    def score(self, samples: Sequence[Sample], predictions: dict[str, dict[str, Any]]) -> TaskReport:
        records = [{"index": s.meta["index"], "rotation": s.meta["rotation"], "category": s.meta["category"],
                    "l2_category": s.meta["l2"], "answer": s.answer,
                    "prediction": extract_choice(predictions[s.id]["prediction"], s.meta["options"])}
                   for s in samples]
        result = circular_eval(records)
        breakdown = {f"L2 {name}": {"circular_accuracy": v} for name, v in result["per_l2_category"].items()}
        breakdown.update({name: {"circular_accuracy": v} for name, v in result["per_category"].items()})
        return TaskReport(result["metrics"], breakdown, "circular_accuracy")


class LetterChoiceTask(Task):
    """An image multiple-choice task answered with an option letter, scored per ``group_key`` of the metadata."""

    max_new_tokens = 10
    group_key: ClassVar[str] = "type"

    def score(self, samples: Sequence[Sample], predictions: dict[str, dict[str, Any]]) -> TaskReport:
        return _accuracy_report(samples, predictions, self.group_key)


@register("seedbench")
class SEEDBenchTask(LetterChoiceTask):
    data_format = ("SEED-Bench.json ({questions: [{question_id, data_id, data_type, question, choice_a..d, answer, "
                   "question_type_id}], question_type: {name: id}}) with the images in SEED-Bench-image/; image "
                   "questions only")

    def load(self, data: Path) -> list[Sample]:
        content = json.loads(data.read_text(encoding="utf-8"))
        names = {v: k for k, v in content.get("question_type", {}).items()}
        root = data.parent / "SEED-Bench-image"
        root = root if root.is_dir() else data.parent
        samples = []
        for q in content["questions"]:
            if q.get("data_type", "image") != "image":
                continue
            options = [q[f"choice_{c}"] for c in "abcd"]
            samples.append(Sample(str(q["question_id"]), choice_prompt(q["question"], options),
                                  [resolve_image(root, q["data_id"])], q["answer"].strip(),
                                  {"options": options, "type": names.get(q["question_type_id"],
                                                                         str(q["question_type_id"]))}))
        return samples


@register("scienceqa_img")
class ScienceQATask(LetterChoiceTask):
    group_key = "subject"
    data_format = ("ScienceQA's problems.json and pid_splits.json with images/test/<id>/image.png; test questions "
                   "that have an image")

    def load(self, data: Path) -> list[Sample]:
        root = data if data.is_dir() else data.parent
        problems = json.loads((root / "problems.json").read_text(encoding="utf-8"))
        splits = root / "pid_splits.json"
        test_ids = json.loads(splits.read_text())["test"] if splits.is_file() else [
            k for k, v in problems.items() if v.get("split") == "test"]
        samples = []
        for pid in test_ids:
            p = problems[pid]
            if not p.get("image"):
                continue
            context = p.get("hint") or "N/A"
            samples.append(Sample(pid, choice_prompt(p["question"], p["choices"], context),
                                  [resolve_image(root / "images" / "test" / pid, p["image"])], LETTERS[p["answer"]],
                                  {"options": p["choices"], "subject": p.get("subject", "all")}))
        return samples


@register("qbench")
class QBenchTask(LetterChoiceTask):
    data_format = ("Q-Bench's llvisionqa_dev.json / llvisionqa_test.json ([{img_path, question, candidates, "
                   "correct_ans, type, concern}]) with the images in images/ beside it")

    def load(self, data: Path) -> list[Sample]:
        items = json.loads(data.read_text(encoding="utf-8"))
        root = data.parent / "images"
        root = root if root.is_dir() else data.parent
        samples = []
        for i, q in enumerate(items):
            options = list(q["candidates"])
            answer = LETTERS[options.index(q["correct_ans"])] if q.get("correct_ans") in options else ""
            samples.append(Sample(str(q.get("id", i)), choice_prompt(q["question"], options),
                                  [resolve_image(root, q["img_path"])], answer,
                                  {"options": options, "type": _QBENCH_TYPES.get(q.get("type"), str(q.get("type")))}))
        return samples


_QBENCH_TYPES = {0: "yes-or-no", 1: "what", 2: "how"}


@register("mmlu")
class MMLUTask(Task):
    mode = "loglikelihood"
    max_new_tokens = 1
    policy = "none"
    shots = 5
    data_format = ("the MMLU CSV release: test/<subject>_test.csv (question, A, B, C, D, answer; no header) and, "
                   "for 5-shot prompts, dev/<subject>_dev.csv")

    def load(self, data: Path) -> list[Sample]:
        tests = sorted((data / "test").glob("*_test.csv")) if (data / "test").is_dir() else sorted(
            data.glob("*_test.csv"))
        if not tests:
            raise FileNotFoundError(f"{data}: no test/*_test.csv files")
        samples = []
        for file in tests:
            subject = file.name.removesuffix("_test.csv")
            dev = data / "dev" / f"{subject}_dev.csv"
            shots = _read_mmlu(dev)[: self.shots] if dev.is_file() else []
            shots = [(q.strip(), opts, ans) for q, opts, ans in shots]
            for k, (question, options, answer) in enumerate(_read_mmlu(file)):
                prompt = mmlu_prompt(subject.replace("_", " "), question.strip(), options, shots)
                samples.append(Sample(f"{subject}:{k}", prompt, [], answer, {"subject": subject},
                                      continuations=list(LETTERS[:len(options)])))
        return samples

    def score(self, samples: Sequence[Sample], predictions: dict[str, dict[str, Any]]) -> TaskReport:
        report = accuracy_report((s.meta["subject"], predictions[s.id]["prediction"] == s.answer) for s in samples)
        rows = report.breakdown or {"all": report.metrics}
        report.metrics["subject_average"] = sum(r["accuracy"] for r in rows.values()) / len(rows)
        return report

    def settings(self) -> dict[str, Any]:
        return {"mode": self.mode, "shots": self.shots, "scoring": "log-likelihood of ' A'..' D' after 'Answer:'"}


def _read_mmlu(path: Path) -> list[tuple[str, list[str], str]]:
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    return [(r[0], r[1:-1], r[-1].strip()) for r in rows if len(r) >= 4]
