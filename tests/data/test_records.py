"""The messages format with a top-level ``images`` list and bare image parts (the Hugging Face / TRL convention), and
how skipped records are reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from owl2.data import SupervisedDataset, read_records
from owl2.data.records import SkippedRecordWarning
from owl2.processing.image import ImageProcessor
from owl2.processing.tokenizer import load_tokenizer

REPO = Path(__file__).parents[2]
TOKENIZER_DIR = REPO / "tests" / "fixtures" / "llama2-tokenizer"


def _user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def _answer(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


IMAGE = {"type": "image"}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _images(directory: Path, *names: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        Image.new("RGB", (20 + k, 12), (10 * k, 100, 200)).save(directory / name)


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_bare_image_parts_take_the_listed_images_in_order(tmp_path):
    _images(tmp_path / "data" / "imgs", "a.png", "b.png")
    records = [
        # The exact shape of a TRL / Hugging Face chat dataset row.
        {"messages": [_user(IMAGE, _text("What is this?")), _answer("a square")], "images": ["imgs/a.png"]},
        # Two images, the second in a later turn: each part takes the next listed image.
        {"id": "two", "messages": [_user(_text("First "), IMAGE), _answer("red"), _user(IMAGE, _text("And now?")),
                                   _answer("blue")], "images": ["imgs/a.png", "imgs/b.png"]},
        # llava-instruct-mix rows name the position with "index" (and carry "text": null on image parts).
        {"id": "indexed", "messages": [
            _user({"type": "image", "index": 1, "text": None}, {"type": "image", "index": 0, "text": None},
                  {"type": "text", "index": None, "text": "Compare."}), _answer("same")],
         "images": ["imgs/a.png", "imgs/b.png"]},
    ]
    good, skipped = read_records(_jsonl(tmp_path / "data" / "train.jsonl", records))
    assert skipped == []
    root = tmp_path / "data" / "imgs"  # relative paths resolve against the data file's directory, as elsewhere
    assert good[0].turns == [("user", "<|image|>What is this?"), ("assistant", "a square")]
    assert good[0].images == [root / "a.png"]
    assert good[1].turns[0] == ("user", "First <|image|>") and good[1].turns[2] == ("user", "<|image|>And now?")
    assert good[1].images == [root / "a.png", root / "b.png"]
    assert good[2].turns[0] == ("user", "<|image|><|image|>Compare.")
    assert good[2].images == [root / "b.png", root / "a.png"]

    # The dataset puts the images in the same order: each sample's pixels are its listed images.
    processor = ImageProcessor(size=16, crop_size=16)
    dataset = SupervisedDataset(good, load_tokenizer(TOKENIZER_DIR), image_processor=processor)
    sample = dataset[2]
    assert sample["input_ids"].count(-200) == 2
    expected = processor([root / "b.png", root / "a.png"], policy="pad")
    assert (sample["pixel_values"] == expected).all()


@pytest.mark.parametrize(("record", "reason"), [
    ({"messages": [_user(IMAGE, _text("Q")), _answer("A")]}, "no top-level 'images'"),
    ({"messages": [_user(IMAGE, IMAGE, _text("Q")), _answer("A")], "images": ["a.png"]}, "image 1, but 'images' has 1"),
    ({"messages": [_user(IMAGE, _text("Q")), _answer("A")], "images": ["a.png", "a.png"]}, "exactly once"),
    ({"messages": [_user({"type": "image", "index": 0}, {"type": "image", "index": 0}, _text("Q")), _answer("A")],
      "images": ["a.png", "a.png"]}, "exactly once"),
    ({"messages": [_user({"type": "image", "image": "a.png"}, IMAGE, _text("Q")), _answer("A")],
      "images": ["a.png"]}, "one style per record"),
    ({"messages": [_user({"type": "image", "image": "a.png"}, _text("Q")), _answer("A")], "images": ["a.png"]},
     "both as content parts and as a top-level"),
    ({"messages": [_user({"type": "image", "index": "0"}, _text("Q")), _answer("A")], "images": ["a.png"]},
     "must be an integer"),
], ids=["no-list", "too-few-listed", "unplaced-image", "placed-twice", "mixed-styles", "both", "bad-index"])
def test_bare_image_parts_that_do_not_match_the_list_are_skipped(tmp_path, record, reason):
    _images(tmp_path, "a.png")
    with pytest.warns(SkippedRecordWarning):
        good, skipped = read_records(_jsonl(tmp_path / "d.jsonl", [{"id": "r", **record}]))
    assert good == [] and len(skipped) == 1
    assert reason in skipped[0][1]


def test_a_skipped_record_is_reported_once(tmp_path):
    """With Python's defaults (no logging set up) each skipped record reaches stderr exactly once."""
    data = _jsonl(tmp_path / "d.jsonl", [
        {"id": "empty", "messages": []},
        {"id": "ok", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ])
    script = f"from owl2.data import read_records; print(len(read_records({str(data)!r})[0]))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # Python's default warning filters
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, check=True)
    assert done.stdout.strip() == "1"
    assert done.stderr.count("skipping record 'empty': empty conversation") == 1
