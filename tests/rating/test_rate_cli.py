"""``owl2 rate``: real runs on the Q-Align-format fixture scorer (folders, CSV / JSONL, a video, resume, errors)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import owl2
from owl2.cli.main import main as cli
from owl2.cli.rate import CSV_COLUMNS, collect_paths, image_suffixes
from owl2.rating import LEVELS
from tests.conftest import FIXTURES

CHECKPOINT = FIXTURES / "qalign" / "checkpoint"
IMAGES = FIXTURES / "qalign" / "images"
BASE = ["rate", "--model", str(CHECKPOINT), "--dtype", "fp32", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def pipe() -> owl2.api.Pipeline:
    return owl2.load(CHECKPOINT, dtype=torch.float32, device="cpu", show_progress=False)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three images (one in a nested folder) among files a folder walk must pass over."""
    root = tmp_path / "photos"
    (root / "sub" / ".cache").mkdir(parents=True)
    shutil.copy(IMAGES / "chelsea_square.png", root / "a.png")
    shutil.copy(IMAGES / "coffee_tall.png", root / "b.png")
    shutil.copy(IMAGES / "astronaut_wide.png", root / "sub" / "c.png")
    shutil.copy(IMAGES / "vA_f0.png", root / ".hidden.png")
    shutil.copy(IMAGES / "vA_f1.png", root / "sub" / ".cache" / "d.png")
    (root / "notes.txt").write_text("not an image")
    (root / "data.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    return root


def expected_paths(root: Path) -> list[str]:
    return [str(root / "a.png"), str(root / "b.png"), str(root / "sub" / "c.png")]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def leftovers(directory: Path) -> list[str]:
    """Temporary files of atomic writes (``.NAME.*.tmp``)."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def make_video(path: Path, frames: int = 8, fps: int = 4) -> Path:
    """A 2 s clip at 4 fps: the one-frame-per-second rule samples frames 0 and 4."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(frames):
            pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_folder_to_csv_equals_pipe_rate(folder, tmp_path, pipe, capsys):
    out = tmp_path / "ratings.csv"
    assert cli([*BASE, "--batch-size", "2", "--output", str(out), str(folder)]) == 0
    assert "rated 3, kept 0" in capsys.readouterr().err
    rows = read_csv(out)
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert list(CSV_COLUMNS[:11]) == ["path", "media", "score", "normalized", "std", "level", "p_excellent", "p_good",
                                      "p_fair", "p_poor", "p_bad"]
    assert [r["path"] for r in rows] == expected_paths(folder)  # sorted, nested included, hidden / other files not
    ratings = pipe.rate(expected_paths(folder), batch_size=2)
    for row, rating in zip(rows, ratings, strict=True):
        assert float(row["score"]) == pytest.approx(rating.score, abs=1e-6)
        assert float(row["normalized"]) == pytest.approx(rating.normalized, abs=1e-6)
        assert float(row["std"]) == pytest.approx(rating.std, abs=1e-6)
        assert row["level"] == rating.level
        np.testing.assert_allclose([float(row[f"p_{w}"]) for w in LEVELS], rating.probs, rtol=0, atol=1e-6)
        assert (row["media"], row["task"], row["prompt"], row["policy"], row["num_frames"], row["model"],
                row["error"]) == ("image", "quality", "scorer", "pad", "", str(CHECKPOINT), "")
    assert leftovers(tmp_path) == []


def test_jsonl_with_a_video_and_num_frames(tmp_path, pipe, capsys):
    pytest.importorskip("av")
    root = tmp_path / "media"
    root.mkdir()
    shutil.copy(IMAGES / "ihc_wide.png", root / "frame.png")
    video = make_video(root / "clip.mp4")
    out = tmp_path / "ratings.jsonl"
    assert cli([*BASE, "--output", str(out), str(root)]) == 0
    records = read_jsonl(out)
    assert [(r["path"], r["media"]) for r in records] == [(str(video), "video"), (str(root / "frame.png"), "image")]
    for record, rating in zip(records, pipe.rate([video, root / "frame.png"]), strict=True):
        expected = rating.to_dict()
        assert record.keys() == {*expected, "path", "media", "task", "prompt", "policy", "num_frames", "model"}
        assert record["score"] == pytest.approx(expected["score"], abs=1e-6)
        assert record["level"] == expected["level"]
        np.testing.assert_allclose(record["logits"], expected["logits"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(list(record["probs"].values()), list(expected["probs"].values()), atol=1e-6)
        assert record["num_frames"] is None
    capsys.readouterr()
    # another frame count is another setting for the video only: the image's rating is kept
    assert cli([*BASE, "--num-frames", "1", "--output", str(out), str(root)]) == 0
    assert "rated 1, kept 1" in capsys.readouterr().err
    records = read_jsonl(out)
    assert [(r["media"], r["num_frames"]) for r in records] == [("video", None), ("video", 1), ("image", None)]
    one_frame = pipe.rate([video], num_frames=1)[0]
    assert records[1]["score"] == pytest.approx(one_frame.score, abs=1e-6)
    assert records[1]["score"] != pytest.approx(records[0]["score"], abs=1e-9)
    assert leftovers(tmp_path) == []


def test_resume_rates_only_what_is_missing(folder, tmp_path, capsys):
    out = tmp_path / "ratings.csv"
    args = [*BASE, "--batch-size", "2", "--output", str(out), str(folder)]
    assert cli(args) == 0
    first = out.read_text()
    capsys.readouterr()
    assert cli(args) == 0  # nothing new: the model is not even loaded
    err = capsys.readouterr().err
    assert "rated 0, kept 3" in err and "loading" not in err
    assert out.read_text() == first

    shutil.copy(IMAGES / "logo_rgba_wide.png", folder / "b2.png")
    assert cli(args) == 0
    assert "rated 1, kept 3" in capsys.readouterr().err
    rows = read_csv(out)
    old = {r["path"]: r for r in read_csv_text(first)}
    assert [r["path"] for r in rows] == [str(folder / n) for n in ("a.png", "b.png", "b2.png", "sub/c.png")]
    assert all(rows[i] == old[rows[i]["path"]] for i in (0, 1, 3))  # kept rows are byte-for-byte the old ones

    # another task is another setting: all rated again, the quality rows stay first
    assert cli([*args, "--task", "aesthetics"]) == 0
    assert "rated 4, kept 0" in capsys.readouterr().err
    assert [r["task"] for r in read_csv(out)] == ["quality"] * 4 + ["aesthetics"] * 4
    assert leftovers(tmp_path) == []


def read_csv_text(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(text.splitlines()))


def test_a_killed_run_resumes_to_the_same_file(folder, tmp_path, capsys):
    out = tmp_path / "ratings.jsonl"
    args = [*BASE, "--batch-size", "1", "--output", str(out), str(folder)]
    assert cli(args) == 0
    complete = out.read_text()
    # what a kill during the last append leaves: two finished records and half of the third, no newline
    lines = complete.splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    capsys.readouterr()
    assert cli(args) == 0
    assert "rated 1, kept 2" in capsys.readouterr().err
    assert out.read_text() == complete  # batch size 1: the re-rated item gives the very same numbers


def test_an_interrupted_run_keeps_every_finished_batch(folder, tmp_path, monkeypatch, capsys):
    from owl2.api import Pipeline

    calls = []
    rate = Pipeline.rate

    def interrupted(self, items, **kwargs):
        calls.append(len(items))
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second batch is rated
        return rate(self, items, **kwargs)

    monkeypatch.setattr(Pipeline, "rate", interrupted)
    out = tmp_path / "ratings.csv"
    args = [*BASE, "--batch-size", "2", "--output", str(out), str(folder)]
    assert cli(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"owl2 rate: interrupted; 2 record(s) are saved in {out}; run the same command again to rate the rest")
    assert [r["path"] for r in read_csv(out)] == expected_paths(folder)[:2]
    assert leftovers(tmp_path) == []
    monkeypatch.setattr(Pipeline, "rate", rate)
    capsys.readouterr()
    assert cli(args) == 0
    assert "rated 1, kept 2" in capsys.readouterr().err
    assert [r["path"] for r in read_csv(out)] == expected_paths(folder)


def test_a_bad_file_stops_with_exit_2_and_keeps_finished_work(folder, tmp_path, capsys):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # sorts between b.png and sub/c.png
    out = tmp_path / "ratings.csv"
    args = [*BASE, "--batch-size", "2", "--output", str(out), str(folder)]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("owl2 rate: error: image file ") and "broken.png" in err[-1]
    assert "--skip-errors" in err[-1]
    # batch 1 (a, b) was saved; in batch 2 (broken, c) the good item was rated alone and saved too
    assert [r["path"] for r in read_csv(out)] == [str(folder / "a.png"), str(folder / "b.png"),
                                                  str(folder / "sub" / "c.png")]
    assert leftovers(tmp_path) == []

    assert cli([*args, "--skip-errors"]) == 1
    assert "rated 0, kept 3, 1 error(s)" in capsys.readouterr().err
    rows = read_csv(out)
    broken = next(r for r in rows if r["path"].endswith("broken.png"))
    assert broken["score"] == "" and "broken.png" in broken["error"] and "\n" not in broken["error"]

    shutil.copy(IMAGES / "vB_f0.png", folder / "broken.png")  # fixed: the recorded error is retried
    assert cli(args) == 0
    assert "rated 1, kept 3" in capsys.readouterr().err
    rows = read_csv(out)
    assert [r["path"] for r in rows] == [str(folder / n) for n in ("a.png", "b.png", "broken.png", "sub/c.png")]
    assert all(r["error"] == "" and r["score"] for r in rows)


def test_bad_paths_and_outputs(folder, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    assert cli([*BASE, str(folder / "a.png"), str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"owl2 rate: error: {missing}: no such file or directory" in err and "loading" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli([*BASE, str(empty)]) == 2
    assert "no images or videos in this folder" in capsys.readouterr().err
    assert cli([*BASE, "--output", str(tmp_path / "ratings.txt"), str(folder)]) == 2
    assert "must end in .csv or .jsonl" in capsys.readouterr().err
    foreign = tmp_path / "mine.csv"
    foreign.write_text("name,value\nx,1\n")
    assert cli([*BASE, "--output", str(foreign), str(folder)]) == 2
    assert "other columns" in capsys.readouterr().err
    assert foreign.read_text() == "name,value\nx,1\n"
    # --skip-errors: a missing path is an item that fails, the others are rated; no file: a table
    assert cli([*BASE, "--skip-errors", str(folder / "a.png"), str(missing)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["path", "score", "0-1", "std", "level"]
    assert out[2].startswith(str(missing)) and "error:" in out[2] and "file not found" in out[2]


def test_table_and_the_default_model_note(capsys):
    image = str(IMAGES / "chelsea_square.png")
    assert cli(["rate", "--quiet", "--dtype", "fp32", "--device", "cpu", image]) == 0
    captured = capsys.readouterr()
    assert "not a quality scorer" in captured.err and "rated 1, kept 0" in captured.err
    header, row = captured.out.splitlines()
    assert header.split() == ["path", "score", "0-1", "std", "level"]
    path, score, normalized, std, level = row.split()
    assert float(std) >= 0
    assert path == image and 1 <= float(score) <= 5 and 0 <= float(normalized) <= 1 and level in LEVELS


def test_collect_paths(folder, tmp_path):
    suffixes = image_suffixes()
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tiff", ".gif"} <= suffixes
    assert not {".h5", ".hdf", ".txt", ".csv"} & suffixes
    video = make_video(folder / "sub" / "clip.MP4") if _has_av() else None
    found = [str(p) for p in collect_paths([folder / "sub", folder, folder / "notes.txt"])]
    nested = [str(folder / "sub" / "c.png"), *([str(video)] if video else [])]
    # a folder's files sorted by their parts, duplicates dropped, an explicitly named file kept whatever its suffix
    assert found == [*nested, str(folder / "a.png"), str(folder / "b.png"), str(folder / "notes.txt")]
    assert collect_paths([tmp_path / "gone.jpg"], allow_missing=True) == [tmp_path / "gone.jpg"]


def _has_av() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True
