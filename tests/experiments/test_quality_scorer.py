"""The quality-scorer experiment: its synthetic set, Q-Align's score against the official code's, and a tiny run of
the whole pipeline (data, the untrained score, both losses, the report)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import owl2
from owl2.data.quality import LEVELS
from owl2.experiments.quality import (
    QualityExperiment,
    degrade,
    make_quality_set,
    quality_scores,
    rank_metrics,
    run_quality_experiment,
)
from owl2.experiments.shapes import generate_scene, render_scene

QALIGN = Path(__file__).parents[1] / "fixtures" / "qalign"

pytestmark = pytest.mark.usefixtures("one_thread")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_degradations_grow_with_their_strength():
    clean = render_scene(generate_scene("quality-test"), 64)
    strengths = (0.0, 0.3, 0.6, 1.0)

    def sharpness(image: Image.Image) -> float:
        return float(np.abs(np.diff(_pixels(image), axis=1)).mean())

    blurred = [sharpness(degrade(clean, "blur", s, random.Random(0))) for s in strengths]
    assert blurred == sorted(blurred, reverse=True) and blurred[-1] < 0.8 * blurred[0]
    for kind in ("noise", "jpeg"):
        errors = [float(np.abs(_pixels(degrade(clean, kind, s, random.Random(0))) - _pixels(clean)).mean())
                  for s in strengths]
        assert errors[0] == 0 and errors == sorted(errors), (kind, errors)
    with pytest.raises(ValueError, match="kind"):
        degrade(clean, "haze", 0.5, random.Random(0))


def test_quality_set_is_deterministic_and_labelled_by_strength(tmp_path):
    first = make_quality_set(tmp_path / "a", train=6, heldout=3, seed=1)
    second = make_quality_set(tmp_path / "b", train=6, heldout=3, seed=1)
    rows = list(csv.DictReader(first["train"].open()))
    assert first["train"].read_text() == second["train"].read_text()
    assert [r["kind"] for r in rows] == ["blur", "noise", "jpeg"] * 2
    for row in rows:
        strength = float(row["strength"])
        assert float(row["mos"]) == pytest.approx(5 - 4 * strength, abs=1e-4)
        assert float(row["std"]) == pytest.approx(0.35 + 0.5 * strength * (1 - strength), abs=1e-4)
        assert (tmp_path / "a" / row["image"]).read_bytes() == (tmp_path / "b" / row["image"]).read_bytes()
    held = list(csv.DictReader(first["heldout"].open()))
    assert len(held) == 3 and not {r["image"] for r in held} & {r["image"] for r in rows}


@pytest.mark.skipif(not (QALIGN / "cases.json").is_file(), reason="the Q-Align fixture is not in this checkout")
def test_score_equals_the_official_qalign_and_deqa_scorers():
    """The experiment's score (letterboxed, as it loads its models) on the Q-Align fixture's checkpoint (random
    weights, LLaMA-2 vocabulary): equal to the scores the official Q-Align and DeQA-Score code computed, for both
    prompts."""
    pipe = owl2.load(QALIGN / "checkpoint", dtype="fp32", device="cpu", policy="pad", show_progress=False)
    cases = [case for case in json.loads((QALIGN / "cases.json").read_text())["cases"]
             if case["input"] == "image" and case["task"] == "quality" and case["prompt"] in ("scorer", "eval")]
    assert len(cases) >= 5
    images = [QALIGN / "images" / f"{case['items'][0]}.png" for case in cases]
    for prompt in ("scorer", "eval"):
        scores = quality_scores(pipe, images, prompt=prompt)
        for case, score in zip(cases, scores, strict=True):
            if case["prompt"] == prompt:
                assert score == pytest.approx(case["score"], abs=1e-4), case["name"]


def test_rank_metrics():
    assert rank_metrics([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx({"srcc": 1.0, "plcc": 0.9943767})
    assert rank_metrics([4, 3, 2, 1], [1, 2, 3, 4])["srcc"] == pytest.approx(-1.0)
    assert np.isnan(rank_metrics([3, 3, 3], [1, 2, 3])["srcc"])


def test_tiny_experiment_end_to_end(tmp_path):
    settings = QualityExperiment(train_images=6, heldout_images=6, max_steps=2, batch_size=2)
    report = run_quality_experiment(tmp_path, settings)
    runs = report["runs"]
    assert list(runs) == ["untrained owl2-tiny", "(a) Q-Align cross-entropy", "(b) DeQA soft-label KL",
                          "(c) one-hot KL (control)"]
    for name, run in runs.items():
        assert len(run["scores"]) == 6 and all(1.0 <= s <= 5.0 for s in run["scores"]), name
        assert -1.0 <= run["srcc"] <= 1.0 and -1.0 <= run["template_prompt"]["srcc"] <= 1.0
    assert runs["(a) Q-Align cross-entropy"]["steps"] == runs["(b) DeQA soft-label KL"]["steps"] == 2
    # both runs trained (their scores moved) and started from the same model
    assert runs["(a) Q-Align cross-entropy"]["scores"] != runs["untrained owl2-tiny"]["scores"]
    assert runs["(a) Q-Align cross-entropy"]["scores"] != runs["(b) DeQA soft-label KL"]["scores"]
    assert "soft_label_kl" in json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    # the control trains (b)'s loss on one-hot labels of the same levels
    one_hot = json.loads((tmp_path / "data" / "train-one-hot.json").read_text())
    soft = json.loads((tmp_path / "data" / "train.json").read_text())
    for hard, record in zip(one_hot, soft, strict=True):
        assert sorted(hard["soft_label"]) == [0, 0, 0, 0, 1] and record["soft_label"] != hard["soft_label"]
        assert record["conversations"][1]["value"].endswith(f" {LEVELS[hard['soft_label'].index(1)]}.")
    assert (tmp_path / "a" / "final" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "report.json").read_text())["runs"].keys() == runs.keys()
    assert (tmp_path / "report.md").read_text().startswith("| model | SRCC | PLCC |")
    assert (tmp_path / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
