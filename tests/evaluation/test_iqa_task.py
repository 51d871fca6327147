"""The IQA task: every released annotation layout, and end to end with the random-weight Q-Align-format scorer
(predictions equal ``pipe.rate``, SRCC equals scipy's on the recorded predictions, resume without inference, the
scatter plot, the CLI)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from scipy import stats

import owl2
from owl2.cli.main import main as cli
from owl2.evaluation import evaluate, get_task, read_predictions
from owl2.evaluation.metrics.iqa import plcc_logistic
from owl2.evaluation.tasks.iqa import IQATask, read_annotations
from tests.conftest import FIXTURES

QALIGN = FIXTURES / "qalign"
STILLS = ["astronaut_wide", "camera_gray_tall", "chelsea_square", "coffee_tall", "ihc_wide", "logo_rgba_wide"]
KONIQ_MOS = [3.91, 2.14, 3.55, 1.42, 2.87, 4.12]


@pytest.fixture(scope="module")
def scorer() -> owl2.Pipeline:
    return owl2.load(QALIGN / "checkpoint", dtype=torch.float32, device="cpu", show_progress=False)


def tiny_png(path: Path, color: tuple[int, int, int] = (90, 120, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), color).save(path)
    return path


# ----------------------------------------------------------------------------------------------- released layouts
def koniq_dir(root: Path, count: int = len(STILLS)) -> Path:
    """koniq10k_scores_and_distributions.csv (MOS on 1-5) with the images in 1024x768/."""
    (root / "1024x768").mkdir(parents=True)
    lines = ["image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,MOS_zscore"]
    for k, (name, mos) in enumerate(zip(STILLS[:count], KONIQ_MOS, strict=False)):
        shutil.copy(QALIGN / "images" / f"{name}.png", root / "1024x768" / f"{1000 + k}.png")
        lines.append(f"{1000 + k}.png,1,2,3,2,1,9,{mos},0.{k + 4},{(mos - 1) * 25:.3f}")
    (root / "koniq10k_scores_and_distributions.csv").write_text("\n".join(lines) + "\n")
    return root


def generic_csv(root: Path, names: list[str], mos: list[float]) -> Path:
    (root / "images").mkdir(parents=True)
    lines = ["image,mos,std"]
    for name, value in zip(names, mos, strict=True):
        shutil.copy(QALIGN / "images" / f"{name}.png", root / "images" / f"{name}.png")
        lines.append(f"images/{name}.png,{value},0.5")
    path = root / "scores.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_koniq_layouts(tmp_path):
    data = koniq_dir(tmp_path / "koniq", count=3)
    samples = get_task("iqa").load(data)  # the folder: the annotation file is found by its released name
    assert [s.id for s in samples] == ["1000.png", "1001.png", "1002.png"]
    assert [s.answer for s in samples] == KONIQ_MOS[:3]
    assert samples[0].images == [data / "1024x768" / "1000.png"] and samples[0].meta["std"] == 0.4
    # koniq10k_distributions_sets.csv (MOS on 0-100): only the official test split, images from 512x384/.
    sets = tmp_path / "sets"
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        tiny_png(sets / "512x384" / name)
    (sets / "koniq10k_distributions_sets.csv").write_text(
        "image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,set\n"
        "a.jpg,0.0,0.1,0.5,0.4,0.0,100,61.2,0.61,training\n"
        "b.jpg,0.0,0.0,0.2,0.7,0.1,105,77.4,0.52,test\n"
        "c.jpg,0.1,0.6,0.3,0.0,0.0,102,30.9,0.53,test\n")
    samples = get_task("iqa").load(sets)
    assert [(s.id, s.answer) for s in samples] == [("b.jpg", 77.4), ("c.jpg", 30.9)]


def test_spaq_csv_export(tmp_path):
    root = tmp_path / "SPAQ"
    for name in ("00001.jpg", "00002.jpg"):
        tiny_png(root / "TestImage" / name)
    annotations = root / "Annotations" / "MOS and Image attribute scores.csv"
    annotations.parent.mkdir()
    # A spreadsheet's export: a byte-order mark and the attribute columns after MOS.
    annotations.write_text("\ufeffImage name,MOS,Brightness,Colorfulness,Contrast,Noisiness,Sharpness\n"
                           "00001.jpg,42.5,50,40,45,60,30\n00002.jpg,71.8,60,66,70,72,75\n", encoding="utf-8")
    layout, rows = read_annotations(annotations)
    assert layout.name == "spaq" and rows == [("00001.jpg", 42.5, None), ("00002.jpg", 71.8, None)]
    samples = get_task("iqa").load(root)  # Annotations/ is searched from the dataset folder
    assert samples[1].images == [root / "Annotations" / ".." / "TestImage" / "00002.jpg"]
    with pytest.raises(ValueError, match="export the sheet as CSV"):
        read_annotations(root / "Annotations" / "MOS and Image attribute scores.xlsx")


def test_kadid_dmos_csv(tmp_path):
    root = tmp_path / "kadid10k"
    tiny_png(root / "images" / "I01_01_01.png")
    tiny_png(root / "images" / "I01_01_02.png")
    (root / "dmos.csv").write_text("dist_img,ref_img,dmos,var\nI01_01_01.png,I01.png,4.57,0.49\n"
                                   "I01_01_02.png,I01.png,4.13,0.25\n")
    samples = get_task("iqa").load(root)
    assert [(s.id, s.answer, s.meta["std"]) for s in samples] == [("I01_01_01.png", 4.57, pytest.approx(0.7)),
                                                                  ("I01_01_02.png", 4.13, pytest.approx(0.5))]
    assert samples[0].images == [root / "images" / "I01_01_01.png"] and samples[0].meta["layout"] == "kadid10k"


def test_agiqa_data_csv(tmp_path):
    root = tmp_path / "AGIQA-3K"
    tiny_png(root / "AGIQA-3K" / "AttnGAN_normal_000.jpg")
    (root / "data.csv").write_text(
        "name,prompt,adj1,adj2,style,mos_quality,std_quality,mos_align,std_align\n"
        'AttnGAN_normal_000.jpg,"a cat, sitting",,,,1.5761,0.8712,2.2346,0.9012\n')
    (sample,) = get_task("iqa").load(root)
    assert (sample.id, sample.answer, sample.meta["std"]) == ("AttnGAN_normal_000.jpg", 1.5761, 0.8712)
    assert sample.images == [root / "AGIQA-3K" / "AttnGAN_normal_000.jpg"]


def test_generic_json_jsonl_and_agiqa1k_export(tmp_path):
    tiny_png(tmp_path / "pics" / "x.png")
    tiny_png(tmp_path / "file" / "y.png")
    # Q-Align's test_jsons: img_path / image and gt_score.
    (tmp_path / "q.json").write_text(json.dumps([{"img_path": "pics/x.png", "gt_score": 3.25}]))
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": "pics/x.png", "mos": 2.0, "std": 0.3}) + "\n")
    (tmp_path / "AIGC_MOS_Zscore.csv").write_text("Image,Prompt,MOS\ny.png,a dog,2.75\n")
    task = get_task("iqa")
    assert [(s.id, s.answer) for s in task.load(tmp_path / "q.json")] == [("pics/x.png", 3.25)]
    assert task.load(tmp_path / "q.jsonl")[0].meta["std"] == 0.3
    (sample,) = task.load(tmp_path / "AIGC_MOS_Zscore.csv")
    assert sample.images == [tmp_path / "file" / "y.png"] and sample.answer == 2.75


def test_clear_errors(tmp_path):
    task = get_task("iqa")
    (tmp_path / "odd.csv").write_text("picture,rating\na.png,3\n")
    with pytest.raises(ValueError, match="unknown layout"):
        task.load(tmp_path / "odd.csv")
    (tmp_path / "bad.csv").write_text("image,mos\na.png,high\n")
    with pytest.raises(ValueError, match="row 1: mos is not a number"):
        task.load(tmp_path / "bad.csv")
    (tmp_path / "gone.csv").write_text("image,mos\nmissing.png,3\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        task.load(tmp_path / "gone.csv")
    with pytest.raises(FileNotFoundError, match="no annotation file"):
        task.load(tmp_path)  # three CSV files, none with a released name
    with pytest.raises(ValueError, match="rating_task"):
        IQATask(rating_task="sharpness")


def test_variants_and_their_prompts():
    assert get_task("iqa").rating_options() == {"task": "quality", "prompt": "scorer"}
    assert get_task("iqa_eval").rating_options() == {"task": "quality", "prompt": "eval"}
    assert get_task("iaa").rating_options() == {"task": "aesthetics", "prompt": "scorer"}
    assert IQATask("aesthetics", "eval").name == "iaa_eval"
    assert get_task("iqa").mode == "rate"


def test_scoring_and_the_report_without_matplotlib(tmp_path, monkeypatch):
    from owl2.evaluation import harness, report

    data = koniq_dir(tmp_path / "koniq")
    task = get_task("iqa")
    samples = task.load(data)
    scores = [3.2, 2.5, 3.0, 2.9, 2.6, 4.4]
    result = task.score(samples, {s.id: {"id": s.id, "prediction": p} for s, p in zip(samples, scores, strict=True)})
    assert result.metrics["srcc"] == pytest.approx(stats.spearmanr(scores, KONIQ_MOS)[0], abs=1e-12)
    assert result.fit is not None and result.metrics["plcc"] == pytest.approx(
        stats.pearsonr(result.fit(scores), KONIQ_MOS)[0], abs=1e-8)
    monkeypatch.setattr(report, "pyplot", lambda: None)
    paths = harness.write_report(task, result, tmp_path / "out", num_samples=len(samples))
    assert [p.name for p in paths] == ["iqa.report.json", "iqa.report.md"]
    assert "![" not in (tmp_path / "out" / "iqa.report.md").read_text()


# ------------------------------------------------------------------------------------------------- end to end
def test_koniq_end_to_end_matches_pipe_rate_and_resumes(tmp_path, scorer, monkeypatch):
    data = koniq_dir(tmp_path / "koniq")
    out = tmp_path / "out"
    result = evaluate(scorer, "iqa", data, out, batch_size=4, show_progress=False)
    samples = get_task("iqa").load(data)
    assert result.ran == len(samples) == len(STILLS)
    records = read_predictions(result.predictions_path)
    assert set(records) == {s.id for s in samples}
    assert all(set(r) == {"id", "prediction", "probs", "std"} and len(r["probs"]) == 5 for r in records.values())

    direct = scorer.rate([s.images[0] for s in samples], task="quality", prompt="scorer", batch_size=4)
    predictions = [records[s.id]["prediction"] for s in samples]
    assert predictions == pytest.approx([r.score for r in direct], abs=1e-6)
    assert [records[s.id]["std"] for s in samples] == pytest.approx([r.std for r in direct], abs=1e-6)
    assert records[samples[0].id]["probs"] == pytest.approx(list(direct[0].probs), abs=1e-6)

    mos = [s.answer for s in samples]
    report = json.loads((out / "iqa.report.json").read_text())
    assert report["metrics"]["srcc"] == pytest.approx(stats.spearmanr(predictions, mos)[0], abs=1e-12)
    assert report["metrics"]["plcc_raw"] == pytest.approx(stats.pearsonr(predictions, mos)[0], abs=1e-12)
    assert report["metrics"]["krcc"] == pytest.approx(stats.kendalltau(predictions, mos)[0], abs=1e-12)
    # The fit stops at the optimiser's tolerance (curve_fit's ftol 1.5e-8), so a refit agrees to about that.
    assert report["metrics"]["plcc"] == pytest.approx(plcc_logistic(predictions, mos), abs=1e-8)
    assert report["metrics"]["n"] == len(STILLS)
    assert report["settings"]["layout"] == "koniq10k" and report["settings"]["prompt"] == "scorer"
    assert (out / "iqa.png").read_bytes()[:4] == b"\x89PNG" and out / "iqa.png" in result.report_paths
    assert "![iqa](iqa.png)" in (out / "iqa.report.md").read_text()

    def no_inference(*args, **kwargs):
        raise AssertionError("a finished run must be re-scored from its predictions")

    monkeypatch.setattr(scorer, "rate", no_inference)
    again = evaluate(scorer, "iqa", data, out, batch_size=4, show_progress=False)
    # Equal up to the logistic fit's tolerance: a near-degenerate fit (random weights) can end a few 1e-12 apart.
    assert again.ran == 0 and again.report.metrics == pytest.approx(result.report.metrics, abs=1e-8)
    assert again.report.metrics["srcc"] == result.report.metrics["srcc"]


def test_cli_runs_the_eval_prompt_on_a_generic_csv(tmp_path, scorer, capsys):
    names = STILLS[:5]
    mos = [2.5, 4.0, 3.25, 1.5, 3.75]
    data = generic_csv(tmp_path / "generic", names, mos)
    out = tmp_path / "out"
    assert cli(["eval", "--model", str(QALIGN / "checkpoint"), "--task", "iqa_eval", "--data", str(data),
                "--output", str(out), "--dtype", "fp32", "--device", "cpu", "--batch-size", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "iqa_eval: srcc" in printed and "(5 new predictions)" in printed
    records = read_predictions(out / "iqa_eval.predictions.jsonl")
    predictions = [records[f"images/{name}.png"]["prediction"] for name in names]
    direct = scorer.rate([data.parent / "images" / f"{name}.png" for name in names], prompt="eval", batch_size=2)
    assert predictions == pytest.approx([r.score for r in direct], abs=1e-6)
    report = json.loads((out / "iqa_eval.report.json").read_text())
    assert report["metrics"]["srcc"] == pytest.approx(stats.spearmanr(predictions, mos)[0], abs=1e-12)
    assert not math.isnan(report["metrics"]["plcc"])
