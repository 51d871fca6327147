"""Every task end to end on small files in its released format, scoring through cached predictions, exact
prompts, resume after a kill, and the report files."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from owl2.cli.main import main as cli
from owl2.evaluation import evaluate, get_task, read_predictions
from owl2.evaluation.tasks.choice import choice_prompt
from owl2.evaluation.tasks.vqa import vqa_prompt
from owl2.processing.tokenizer import load_tokenizer
from tests.conftest import FIXTURES

REPO = Path(__file__).parents[2]


def png(path: Path, color=(200, 30, 30), size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def png_bytes(color=(10, 200, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (30, 30), color).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- released formats
def vqa_jsonl(root: Path) -> Path:
    png(root / "imgs" / "a.jpg")
    lines = [
        {"question_id": 1, "image": "imgs/a.jpg", "question": "What colour?", "answers": ["red"] * 10},
        {"question_id": 2, "image": "imgs/a.jpg", "question": "How many?", "answers": ["2"] * 4 + ["two"] + ["3"] * 5},
        {"question_id": 3, "image": "imgs/a.jpg", "question": "Is it a cat?", "answer": "no"},
    ]
    path = root / "vqav2_val.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    return path


def vqa_official_dir(root: Path) -> Path:
    png(root / "val2014" / "COCO_val2014_000000000042.jpg")
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": [
        {"image_id": 42, "question": "What is it?", "question_id": 420}]}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": 420, "answer_type": "other", "answers": [{"answer": "a ball"}] * 10}]}))
    return root


def textvqa_json(root: Path) -> Path:
    png(root / "train_images" / "abc.jpg")
    path = root / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps({"data": [{"question_id": 7, "image_id": "abc", "question": "What does it say?",
                                          "answers": ["stop"] * 10}]}))
    return path


def vizwiz_json(root: Path) -> Path:
    png(root / "val" / "VizWiz_val_00000000.jpg")
    path = root / "val.json"
    path.write_text(json.dumps([{"image": "val/VizWiz_val_00000000.jpg", "question": "What is this?",
                                 "answers": [{"answer": "soup", "answer_confidence": "yes"}] * 10,
                                 "answer_type": "other"}]))
    return path


def gqa_json(root: Path) -> Path:
    png(root / "images" / "n1.jpg")
    path = root / "testdev_balanced_questions.json"
    path.write_text(json.dumps({"q1": {"imageId": "n1", "question": "Is it red?", "answer": "yes",
                                       "types": {"structural": "verify"}},
                                "q2": {"imageId": "n1", "question": "What colour?", "answer": "red",
                                       "types": {"structural": "query"}}}))
    return path


def pope_dir(root: Path) -> Path:
    png(root / "val2014" / "COCO_val2014_000000000001.jpg")
    for split in ("random", "adversarial"):
        rows = [{"question_id": i, "image": "COCO_val2014_000000000001.jpg", "text": f"Is there a {o} in the image?",
                 "label": label} for i, (o, label) in enumerate((("dog", "yes"), ("car", "no")))]
        (root / f"coco_pope_{split}.json").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def karpathy_json(root: Path) -> Path:
    png(root / "val2014" / "COCO_val2014_000000000005.jpg")
    png(root / "val2014" / "COCO_val2014_000000000006.jpg", (0, 0, 200))
    images = [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000005.jpg", "split": "test", "cocoid": 5,
         "sentences": [{"raw": "A red square."}, {"raw": "A red block on white."}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000006.jpg", "split": "test", "cocoid": 6,
         "sentences": [{"raw": "A blue square."}, {"raw": "Something blue."}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000006.jpg", "split": "train", "cocoid": 7,
         "sentences": [{"raw": "Not in the test split."}]},
    ]
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def mmbench_tsv(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "MMBench_DEV_EN.tsv"
    image = base64.b64encode(png_bytes()).decode()
    rows = [
        {"index": 0, "question": "What colour is it?", "hint": "", "A": "red", "B": "green", "C": "blue", "D": "",
         "answer": "B", "category": "attribute_recognition", "l2-category": "FP-S", "image": image},
        {"index": 1, "question": "Which shape?", "hint": "Look closely.", "A": "circle", "B": "square", "C": "",
         "D": "", "answer": "B", "category": "spatial", "l2-category": "FP-C", "image": image},
    ]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


def mme_dir(root: Path) -> Path:
    png(root / "existence" / "000.png")
    (root / "existence" / "000.txt").write_text(
        "Is there a square in this image? Please answer yes or no.\tYes\n"
        "Is there a dog? Please answer yes or no.\tNo\n")
    png(root / "artwork" / "images" / "10.jpg")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10.txt").write_text(
        "Is this painted by Monet? Please answer yes or no.\tNo\nIs this painted by Renoir? Please answer yes or no."
        "\tYes\n")
    return root


def seed_json(root: Path) -> Path:
    png(root / "SEED-Bench-image" / "x.jpg")
    path = root / "SEED-Bench.json"
    path.write_text(json.dumps({"question_type": {"Scene Understanding": 1}, "questions": [
        {"question_id": "101", "data_id": "x.jpg", "data_type": "image", "question": "What is shown?",
         "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d", "answer": "C", "question_type_id": 1},
        {"question_id": "102", "data_id": "v.mp4", "data_type": "video", "question": "skip", "choice_a": "a",
         "choice_b": "b", "choice_c": "c", "choice_d": "d", "answer": "A", "question_type_id": 1}]}))
    return path


def scienceqa_dir(root: Path) -> Path:
    png(root / "images" / "test" / "5" / "image.png")
    (root / "problems.json").write_text(json.dumps({
        "5": {"question": "Which is a mammal?", "choices": ["frog", "cow"], "answer": 1, "hint": "Think.",
              "image": "image.png", "split": "test", "subject": "natural science"},
        "6": {"question": "No image here", "choices": ["x", "y"], "answer": 0, "hint": "", "image": None,
              "split": "test", "subject": "language science"}}))
    (root / "pid_splits.json").write_text(json.dumps({"test": ["5", "6"]}))
    return root


def qbench_json(root: Path) -> Path:
    png(root / "images" / "q.jpg")
    path = root / "llvisionqa_dev.json"
    path.write_text(json.dumps([{"img_path": "q.jpg", "question": "Is the image blurry?", "candidates": ["Yes", "No"],
                                 "correct_ans": "No", "type": 0, "concern": 1}]))
    return path


def mmlu_dir(root: Path) -> Path:
    (root / "test").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "test" / "astronomy_test.csv").write_text(
        '"What orbits the Earth?",The Moon,Mars,The Sun,Venus,A\n"Which is a planet?",Pluto,Mars,Moon,Sun,B\n')
    (root / "dev" / "astronomy_dev.csv").write_text('"What is hot?",Ice,Snow,The Sun,Rain,C\n')
    return root


def shapes_dir(root: Path) -> Path:
    from owl2.experiments.shapes import write_eval_set

    write_eval_set(root, scenes=3, seed=0, size=56, text_items=2)
    return root


FORMATS = {
    "vqav2": vqa_jsonl, "okvqa": vqa_official_dir, "textvqa": textvqa_json, "vizwiz": vizwiz_json, "gqa": gqa_json,
    "pope": pope_dir, "coco_caption": karpathy_json, "flickr30k": karpathy_json, "mmbench": mmbench_tsv,
    "mme": mme_dir, "seedbench": seed_json, "scienceqa_img": scienceqa_dir, "qbench": qbench_json, "mmlu": mmlu_dir,
    "shapes": shapes_dir,
}
EXPECTED_SAMPLES = {"vqav2": 3, "okvqa": 1, "textvqa": 1, "vizwiz": 1, "gqa": 2, "pope": 4, "coco_caption": 2,
                    "flickr30k": 2, "mmbench": 3 + 2, "mme": 4, "seedbench": 1, "scienceqa_img": 1, "qbench": 1,
                    "mmlu": 2}


def test_every_task_is_covered():
    from owl2.evaluation import TASKS

    # The rating tasks need a Q-Align scorer: tests/evaluation/test_iqa_task.py runs them.
    assert set(TASKS) == set(FORMATS) | {"iqa", "iqa_eval", "iaa"}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_task_runs_end_to_end_on_its_released_format(tmp_path, tiny_pipeline, name):
    data = FORMATS[name](tmp_path / "data")
    result = evaluate(tiny_pipeline, name, data, tmp_path / "out", batch_size=2, show_progress=False)
    task = get_task(name)
    samples = task.load(data)
    if name in EXPECTED_SAMPLES:
        assert len(samples) == EXPECTED_SAMPLES[name]
    predictions = read_predictions(result.predictions_path)
    assert set(predictions) == {s.id for s in samples} and result.ran == len(samples)
    report = json.loads((tmp_path / "out" / f"{name}.report.json").read_text())
    assert report["metrics"] == pytest.approx(result.report.metrics)
    assert all(isinstance(v, (int, float)) for v in report["metrics"].values())
    assert (tmp_path / "out" / f"{name}.report.md").read_text().startswith(f"# {name}\n")
    # A second run re-scores the cache without inference.
    again = evaluate(tiny_pipeline, name, data, tmp_path / "out", batch_size=2, show_progress=False)
    assert again.ran == 0 and again.report.metrics == pytest.approx(result.report.metrics)


def with_cached_predictions(tmp_path, name: str, data: Path, answers: dict[str, str]):
    """Score ``answers`` (id -> model output) through the harness, as if a model had produced them."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / f"{name}.predictions.jsonl").write_text(
        "".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in answers.items()))
    return evaluate(None, name, data, out, show_progress=False).report


def test_vqa_scoring_through_the_harness(tmp_path):
    data = vqa_jsonl(tmp_path / "data")
    # q1: "Red." normalises to "red": 10 matches -> 1. q2: "2": 4 of 10 answers are "2" ("two" normalises to "2"
    # too: 5 matches) -> each leave-one-out subset has >= 4 matches -> 1. q3: single answer "no", predicted "yes" -> 0.
    report = with_cached_predictions(tmp_path, "vqav2", data, {"1": "Red.", "2": "2", "3": "yes"})
    assert report.metrics["accuracy"] == pytest.approx(200 / 3)


def test_mmbench_circular_scoring_through_the_harness(tmp_path):
    data = mmbench_tsv(tmp_path / "data")
    samples = {s.id: s for s in get_task("mmbench").load(data)}
    assert samples["0:1"].meta["options"] == ["green", "blue", "red"] and samples["0:1"].answer == "A"
    # Question 0 right in every rotation; question 1 right in one of its two rotations -> circular 50 %.
    answers = {"0:0": "B", "0:1": "A", "0:2": "C. green", "1:0": "B", "1:1": "B"}
    report = with_cached_predictions(tmp_path, "mmbench", data, answers)
    assert report.metrics["circular_accuracy"] == pytest.approx(50.0)


def test_mme_scoring_through_the_harness(tmp_path):
    data = mme_dir(tmp_path / "data")
    answers = {"existence/000/0": "Yes", "existence/000/1": "no.", "artwork/10/0": "No", "artwork/10/1": "no"}
    report = with_cached_predictions(tmp_path, "mme", data, answers)
    # existence: acc 1, acc+ 1 -> 200 (perception). artwork: acc 0.5, acc+ 0 -> 50 (also perception).
    assert report.metrics["perception"] == pytest.approx(250.0)
    assert report.breakdown["existence"]["score"] == pytest.approx(200.0)


def test_mmlu_picks_the_most_likely_letter(tmp_path, tiny_pipeline):
    data = mmlu_dir(tmp_path / "data")
    task = get_task("mmlu")
    samples = task.load(data)
    assert samples[0].prompt.startswith("The following are multiple choice questions (with answers) about astronomy."
                                        "\n\nWhat is hot?\nA. Ice\nB. Snow\nC. The Sun\nD. Rain\nAnswer: C\n\n")
    assert samples[0].prompt.endswith("What orbits the Earth?\nA. The Moon\nB. Mars\nC. The Sun\nD. Venus\nAnswer:")
    result = evaluate(tiny_pipeline, task, data, tmp_path / "out", show_progress=False)
    record = read_predictions(result.predictions_path)[samples[0].id]
    logprobs = record["logprobs"]
    assert record["prediction"] == "ABCD"[max(range(4), key=logprobs.__getitem__)]


def test_prompts_are_the_official_ones():
    fixtures = {p["name"]: p for p in json.loads((FIXTURES / "prompts" / "prompts_visible.json").read_text())}
    tokenizer = load_tokenizer(FIXTURES / "llama2-tokenizer")
    vqa = fixtures["eval_vqa_trailing_space"]
    assert vqa_prompt("What color is the bus?") == vqa["prompt"]
    assert tokenizer.encode_prompt(vqa["prompt"]) == vqa["input_ids"]
    mmbench = fixtures["eval_mmbench"]
    assert choice_prompt("What is the main object?", ["a chair", "a table", "a lamp"], "N/A") == mmbench["prompt"]
    assert tokenizer.encode_prompt(mmbench["prompt"]) == mmbench["input_ids"]


OFFICIAL_MC = "Answer with the option\u2019s letter from the given choices directly."  # U+2019, as the scripts
TINY_MC = "Answer with the option's letter from the given choices directly."  # ASCII: what owl2-tiny was trained on
SHORT = "Answer the question using a single word or phrase."
# One sample's exact prompt per task, from the files above: the official evaluation scripts' raw layout (trailing
# space after "ASSISTANT:") for the benchmarks, the model's own template for the shapes world, no template for MMLU.
PINNED_PROMPTS = {
    "vqav2": ("2", f"USER: <|image|>How many? {SHORT} ASSISTANT: "),
    "okvqa": ("420", f"USER: <|image|>What is it? {SHORT} ASSISTANT: "),
    "textvqa": ("7", f"USER: <|image|>What does it say? {SHORT} ASSISTANT: "),
    "vizwiz": ("val/VizWiz_val_00000000.jpg", f"USER: <|image|>What is this? {SHORT} ASSISTANT: "),
    "gqa": ("q1", f"USER: <|image|>Is it red? {SHORT} ASSISTANT: "),
    "pope": ("random:1", f"USER: <|image|>Is there a car in the image? {SHORT} ASSISTANT: "),
    "coco_caption": ("5", "USER: <|image|>Provide a one-sentence caption for the provided image. ASSISTANT: "),
    "flickr30k": ("6", "USER: <|image|>Provide a one-sentence caption for the provided image. ASSISTANT: "),
    "mme": ("existence/000/0", f"USER: <|image|>Is there a square in this image?\n{SHORT} ASSISTANT: "),
    "mmbench": ("1:1", f"USER: <|image|>Look closely.\nWhich shape?\nA. square\nB. circle\n{OFFICIAL_MC} ASSISTANT: "),
    "seedbench": ("101", f"USER: <|image|>What is shown?\nA. a\nB. b\nC. c\nD. d\n{OFFICIAL_MC} ASSISTANT: "),
    "scienceqa_img": ("5", f"USER: <|image|>Think.\nWhich is a mammal?\nA. frog\nB. cow\n{OFFICIAL_MC} ASSISTANT: "),
    "qbench": ("0", f"USER: <|image|>Is the image blurry?\nA. Yes\nB. No\n{OFFICIAL_MC} ASSISTANT: "),
    "mmlu": ("astronomy:1", "The following are multiple choice questions (with answers) about astronomy.\n\n"
             "What is hot?\nA. Ice\nB. Snow\nC. The Sun\nD. Rain\nAnswer: C\n\n"
             "Which is a planet?\nA. Pluto\nB. Mars\nC. Moon\nD. Sun\nAnswer:"),
    "shapes": ("shapes-eval-0-000002-multiple_choice-0",
               f"USER: <|image|>\nHow many shapes are there?\nA. 4\nB. 3\nC. 5\nD. 2\n{TINY_MC} ASSISTANT:"),
}


def test_every_task_prompt_is_pinned(tmp_path):
    assert set(PINNED_PROMPTS) == set(FORMATS)
    for name, (sample_id, prompt) in PINNED_PROMPTS.items():
        samples = {s.id: s for s in get_task(name).load(FORMATS[name](tmp_path / name))}
        assert samples[sample_id].prompt == prompt, name
    shapes = {s.id: s.prompt for s in get_task("shapes").load(tmp_path / "shapes")}
    assert shapes["shapes-eval-0-000000-caption-0"] == (
        "USER: <|image|>\nProvide a one-sentence caption for the provided image. ASSISTANT:")
    assert shapes["shapes-eval-0-000000-count-1"] == (
        f"USER: <|image|>\nHow many red shapes are there?\n{SHORT} ASSISTANT:")
    assert shapes["shapes-eval-0-text-000001"] == (
        "USER: Sort these words alphabetically: horse, music, fish. ASSISTANT:")
    # The two apostrophes never mix: the benchmarks ask with the official one, the shapes world with owl2-tiny's.
    assert not any("\u2019" in prompt for prompt in shapes.values())
    assert sum(prompt.endswith(f"{TINY_MC} ASSISTANT:") for prompt in shapes.values()) == 3


def test_a_killed_run_resumes_without_losing_or_repeating(tmp_path, tiny_checkpoint):
    data = shapes_dir(tmp_path / "data")
    samples = get_task("shapes").load(data)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "owl2", "eval", "--model", str(tiny_checkpoint), "--task", "shapes", "--data",
                str(data), "--output", str(out), "--batch-size", "1", "--dtype", "fp32", "--quiet"]

    subprocess.run(command(tmp_path / "reference"), env=env, check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    predictions = killed / "shapes.predictions.jsonl"
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and (
            not predictions.is_file() or len(predictions.read_text().splitlines()) < 3):
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = read_predictions(predictions)
    assert 3 <= len(partial) < len(samples)
    subprocess.run(command(killed), env=env, check=True, capture_output=True, timeout=300)
    lines = predictions.read_text().splitlines()
    assert len(lines) == len(samples)  # nothing repeated, nothing lost
    assert read_predictions(predictions) == read_predictions(tmp_path / "reference" / "shapes.predictions.jsonl")
    report = json.loads((killed / "shapes.report.json").read_text())
    assert report["metrics"] == json.loads((tmp_path / "reference" / "shapes.report.json").read_text())["metrics"]


def test_cli_reports_and_lists(tmp_path, tiny_checkpoint, capsys):
    data = mme_dir(tmp_path / "data")
    assert cli(["eval", "--model", str(tiny_checkpoint), "--task", "mme", "--data", str(data), "--output",
                str(tmp_path / "out"), "--dtype", "fp32", "--quiet"]) == 0
    assert "mme: perception" in capsys.readouterr().out
    assert (tmp_path / "out" / "mme.png").read_bytes()[:4] == b"\x89PNG"
    assert cli(["eval", "--list"]) == 0
    assert "mmbench" in capsys.readouterr().out
    assert cli(["eval", "--model", str(tiny_checkpoint), "--task", "nope", "--data", str(data)]) == 2
    assert cli(["eval", "--model", str(tiny_checkpoint), "--task", "gqa", "--data", str(tmp_path / "missing.json"),
                "--output", str(tmp_path / "o")]) == 2
