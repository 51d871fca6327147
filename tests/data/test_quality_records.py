"""Quality tables -> Q-Align records, DeQA-Score soft labels against hand-computed values, and the soft label's
way through the dataset and collate to the level word."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from owl2.data import SupervisedDataset, collate
from owl2.data.quality import (
    LEVELS,
    QualityItem,
    level_token_ids,
    main,
    mos_level,
    mos_scale,
    normalize_mos,
    quality_records,
    read_quality_table,
    soft_label,
    two_level_split,
)
from owl2.data.records import read_records
from owl2.experiments.tiny import default_model_dir
from owl2.model.config import Owl2Config
from owl2.processing.image import ImageProcessor
from owl2.processing.tokenizer import IMAGE_TOKEN_INDEX, load_tokenizer

LLAMA_DIR = Path(__file__).parents[1] / "fixtures" / "llama2-tokenizer"
W = np.array([5.0, 4.0, 3.0, 2.0, 1.0])


# ------------------------------------------------------------------------------------------------------ the labels
def test_normalisation_and_level_bins():
    assert normalize_mos(62.5, 0, 100) == 3.5
    assert normalize_mos(30, 10, 60) == pytest.approx(2.6)
    # five equal bins of 0.8 on [1, 5], each closed above: a boundary takes the lower level
    cases = {1.0: "bad", 1.8: "bad", 1.81: "poor", 2.6: "poor", 3.4: "fair", 4.2: "good", 4.21: "excellent",
             5.0: "excellent"}
    assert {mos: mos_level(mos, 1, 5) for mos in cases} == cases
    assert [mos_level(m, 0, 100) for m in (0, 20, 20.01, 60, 100)] == ["bad", "bad", "poor", "fair", "excellent"]
    assert mos_level(0.6, 0, 1) == "fair"  # 5 * 0.6 is 3.0000000000000004: still on the boundary
    with pytest.raises(ValueError, match="outside the scale"):
        mos_level(5.5, 1, 5)


def test_pdf_label_where_the_affine_fix_needs_no_clip():
    # MOS 62.5 +- 10 on [0, 100]: mos_n 3.5, std_n 0.4. Values from scipy.stats.norm.pdf and a 2x2 solve.
    label = soft_label(62.5, 10, 0, 100)
    assert (label.mos_n, label.std_n, label.two_level) == (3.5, 0.4, False)
    assert label.raw == pytest.approx([8.814892059186136e-04, 0.4566227134725548, 0.4566227134725548,
                                       8.814892059186136e-04, 3.28500454538971e-09], rel=1e-12)
    assert label.probs == pytest.approx([9.633637553624272e-04, 0.4990366362446375, 0.4990366362446375,
                                         9.633637553624272e-04, 0.0], rel=1e-9, abs=1e-12)
    assert sum(label.probs) == pytest.approx(1.0) and label.mean == pytest.approx(3.5)
    # the fix is affine: one (a, b) maps every raw value to its fixed one
    a, b = np.linalg.solve([[sum(label.raw), 5.0], [float(np.dot(label.raw, W)), 15.0]], [1.0, 3.5])
    assert label.probs == pytest.approx(np.maximum(a * np.array(label.raw) + b, 0), abs=1e-12)
    assert a == pytest.approx(1.0928861511063834)


def test_pdf_label_where_the_clip_acts_keeps_deqa_sum():
    # mos_n 2.2, std_n 0.9: a p + b is negative at "excellent" and is clipped to 0 after the solve, so the sum ends
    # above 1 and the mean 0.05 off (within DeQA-Score's 0.1): the label is kept as it is, not renormalised.
    label = soft_label(2.2, 0.9, 1, 5)
    assert not label.two_level
    assert label.raw == pytest.approx([0.003506684796020055, 0.059989962792431205, 0.29860317949036,
                                       0.43245829907971817, 0.18223341630665954], rel=1e-12)
    assert label.probs == pytest.approx([0.0, 0.05163523453735771, 0.3131571859836197, 0.459863443794969,
                                         0.1856150155276238], rel=1e-9)
    assert sum(label.probs) == pytest.approx(1.0102708798435702)
    assert label.mean == pytest.approx(2.2513543992178517)


def test_cdf_label_is_the_normal_mass_around_each_level():
    label = soft_label(2.2, 0.9, 1, 5, density="cdf")
    assert label.raw == pytest.approx([0.005178055394278069, 0.06900607644336265, 0.2951343419541578,
                                       0.4122086444568575, 0.18889665605354788], rel=1e-12)
    assert label.probs == pytest.approx([0.0, 0.05919315657253951, 0.31375618585342996, 0.4455521337359905,
                                         0.19415951762815697], rel=1e-9)


def test_two_level_split_and_when_it_replaces_the_normal():
    assert two_level_split(3.3) == pytest.approx([0.0, 0.3, 0.7, 0.0, 0.0])
    assert two_level_split(5.0) == (1.0, 0.0, 0.0, 0.0, 0.0)
    assert two_level_split(1.0) == (0.0, 0.0, 0.0, 0.0, 1.0)
    assert two_level_split(2.0) == (0.0, 0.0, 0.0, 1.0, 0.0)  # all on "poor"
    # std_n 0.04 < 0.2: a Normal that narrow is replaced by the split
    narrow = soft_label(3.3, 0.04, 1, 5)
    assert narrow.two_level and narrow.probs == pytest.approx([0.0, 0.3, 0.7, 0.0, 0.0])
    # mos_n 1.2, std_n 0.6: the clipped fix has mean 1.340 (0.14 off), so the split; its mirror image 4.8 has mean
    # 4.857 (the clipped mass adds weight 5 there, weight 1 here) and keeps the fix
    low = soft_label(1.2, 0.6, 1, 5)
    assert low.two_level and low.probs == pytest.approx([0.0, 0.0, 0.0, 0.2, 0.8])
    high = soft_label(4.8, 0.6, 1, 5)
    assert not high.two_level and high.probs == pytest.approx([0.7255, 0.3074, 0.0, 0.0, 0.0], abs=1e-4)
    assert soft_label(4.0, 0.0, 1, 5).probs == (0.0, 1.0, 0.0, 0.0, 0.0)  # std 0: the split, no division by zero


def test_symmetric_label_is_normalised():
    # mos_n exactly 3 with a symmetric Normal: the affine system is degenerate; normalising is the fix that keeps
    # the shape (DeQA-Score's 1e-9 guard would give a flat 0.2 everywhere here)
    label = soft_label(3.0, 0.8, 1, 5)
    raw = np.array(label.raw)
    assert label.probs == pytest.approx(raw / raw.sum())
    assert label.mean == pytest.approx(3.0)


# ------------------------------------------------------------------------------------------------------ the tables
def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 12), (90, 140, 30)).save(path)


def test_tables_in_every_format_resolve_images_against_their_folder(tmp_path):
    folder = tmp_path / "set"
    _png(folder / "img" / "a.png")
    (folder / "t.csv").write_text("image,MOS,std\nimg/a.png,3.5,0.7\n/abs/b.png,1.5,\n")
    (folder / "t.json").write_text(json.dumps([{"image": "img/a.png", "mos": 3.5, "std": 0.7}]))
    (folder / "t.jsonl").write_text(json.dumps({"image": "img/a.png", "mos": 3.5}) + "\n\n")
    (folder / "mos.json").write_text(json.dumps({"img/a.png": {"mos": "3.5", "std": "0.7"}}))  # DeQA-Score's
    csv_items = read_quality_table(folder / "t.csv")
    assert csv_items == [QualityItem(str(folder / "img" / "a.png"), 3.5, 0.7), QualityItem("/abs/b.png", 1.5, None)]
    assert read_quality_table(folder / "t.json") == csv_items[:1]
    assert read_quality_table(folder / "t.jsonl") == [QualityItem(str(folder / "img" / "a.png"), 3.5, None)]
    assert read_quality_table(folder / "mos.json") == csv_items[:1]
    (folder / "bad.csv").write_text("path,mos\na.png,3\n")
    with pytest.raises(ValueError, match="needs 'image' and 'mos'"):
        read_quality_table(folder / "bad.csv")
    (folder / "nan.csv").write_text("image,mos\na.png,abc\n")
    with pytest.raises(ValueError, match="line 2: mos must be a number"):
        read_quality_table(folder / "nan.csv")


def test_records_carry_the_qalign_answer_and_soft_labels(tmp_path):
    items = [QualityItem("a.png", 10.0, 4.0), QualityItem("b.png", 90.0, None), QualityItem("c.png", 50.0, 6.0)]
    assert mos_scale(items) == (10.0, 90.0)
    records = quality_records(items, soft_labels=True)
    assert [r["conversations"][1]["value"] for r in records] == [
        "The quality of the image is bad.", "The quality of the image is excellent.",
        "The quality of the image is fair."]
    assert records[0]["conversations"][0]["value"] == "How would you rate the quality of this image?\n<|image|>"
    assert records[0]["soft_label"] == list(soft_label(10.0, 4.0, 10.0, 90.0).probs)
    assert "soft_label" not in records[1] and records[1]["mos"] == 90.0  # no std, no soft label
    # an explicit scale changes the bins and the labels
    wide = quality_records(items, scale=(0, 100), soft_labels=True)
    assert wide[1]["conversations"][1]["value"].endswith("excellent.") and wide[2]["conversations"][1]["value"] \
        .endswith("fair.")
    assert wide[2]["soft_label"] == list(soft_label(50.0, 6.0, 0, 100).probs)
    assert "soft_label" not in quality_records(items)[0]
    with pytest.raises(ValueError, match="need a 'std'"):
        quality_records([QualityItem("a.png", 1.0)], soft_labels=True)


def test_command_line_writes_records_the_reader_accepts(tmp_path, capsys):
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    with (tmp_path / "scores.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["image", "mos", "std"], ["img/a.png", 4.5, 0.5], ["img/b.png", 1.5, 0.5]])
    assert main([str(tmp_path / "scores.csv"), str(tmp_path / "out" / "train.json"), "--soft-labels",
                 "--scale", "1", "5", "--density", "cdf"]) == 0
    records, skipped = read_records(tmp_path / "out" / "train.json")
    assert skipped == []
    assert records[0].images == [tmp_path / "img" / "a.png"]
    assert records[0].soft_label == pytest.approx(soft_label(4.5, 0.5, 1, 5, density="cdf").probs)


# ---------------------------------------------------------------------------------------- dataset and collate
def _soft_dataset(tmp_path: Path, tokenizer_dir: Path, per_image: int) -> tuple[SupervisedDataset, list[dict]]:
    for name in ("a", "b"):
        _png(tmp_path / f"{name}.png")
    records = quality_records([QualityItem(str(tmp_path / "a.png"), 4.2, 0.6),
                               QualityItem(str(tmp_path / "b.png"), 1.4, 0.6)], scale=(1, 5), soft_labels=True)
    records.append({"id": "plain", "image": str(tmp_path / "a.png"), "conversations": [
        {"from": "human", "value": "<|image|>\nWhat is it?"}, {"from": "gpt", "value": "A green square."}]})
    records.append({"id": "bad-label", "image": str(tmp_path / "a.png"), "soft_label": [0.5, 0.5],
                    "conversations": records[0]["conversations"]})
    records.append({"id": "no-level-word", "image": str(tmp_path / "a.png"), "soft_label": [0, 1, 0, 0, 0],
                    "conversations": [records[0]["conversations"][0], {"from": "gpt", "value": "Fine."}]})
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    tokenizer = load_tokenizer(tokenizer_dir)
    with pytest.warns(UserWarning, match="skipping record"):
        dataset = SupervisedDataset(path, tokenizer, tokens_per_image=per_image,
                                    image_processor=ImageProcessor(size=16, crop_size=16))
    return dataset, records


@pytest.mark.parametrize("tokenizer_dir", [LLAMA_DIR, default_model_dir()], ids=["llama2", "owl2-tiny"])
def test_soft_label_reaches_the_level_word_after_expansion(tmp_path, tokenizer_dir):
    config = Owl2Config.from_json(default_model_dir())
    dataset, records = _soft_dataset(tmp_path, tokenizer_dir, config.tokens_per_image)
    reasons = dict(dataset.skipped)
    assert reasons["bad-label"] == "a soft label of 2 values for 5 levels"
    assert reasons["no-level-word"].startswith("a soft label, but no answer holds 'The quality of the image is'")
    assert dataset.ids == ["quality-000000", "quality-000001", "plain"] and dataset.num_soft_labels == 2
    tokenizer = dataset.tokenizer
    level_ids = level_token_ids(tokenizer)
    first = dataset[0]
    assert first["input_ids"][first["level_position"]] == level_ids[LEVELS.index("good")]
    assert first["labels"][first["level_position"]] == level_ids[1]  # still a target in the dataset
    assert dataset[1]["input_ids"][dataset[1]["level_position"]] == level_ids[LEVELS.index("bad")]
    assert "soft_label" not in dataset[2]

    batch = collate([dataset[2], dataset[0], dataset[1]], pad_token_id=0, config=config)
    positions = batch["level_positions"]
    assert positions[0] == -1 and bool((batch["soft_labels"][0] == 0).all())
    for row, sample in ((1, 0), (2, 1)):
        pos = int(positions[row])
        # the expanded position holds the same token, and a whole image's positions lie before it
        assert int(batch["input_ids"][row, pos]) == level_ids[LEVELS.index(("good", "bad")[sample])]
        assert pos == dataset[sample]["level_position"] + config.tokens_per_image - 1
        assert IMAGE_TOKEN_INDEX in dataset[sample]["input_ids"][:dataset[sample]["level_position"]]
        assert batch["soft_labels"][row].tolist() == pytest.approx(records[sample]["soft_label"])
        assert batch["level_ids"][row].tolist() == level_ids
    assert "soft_labels" not in collate([dataset[2]], pad_token_id=0, config=config)


def test_level_ids_are_the_first_piece_of_each_word():
    llama = load_tokenizer(LLAMA_DIR)
    assert level_token_ids(llama) == [15129, 1781, 6534, 6460, 4319]  # what Q-Align's own code reads
    tiny = load_tokenizer(default_model_dir())
    ids = level_token_ids(tiny)
    # owl2-tiny's 768-piece vocabulary spells the words in pieces; their first pieces are distinct and are the
    # pieces an answer holds after "is"
    assert len(set(ids)) == 5
    for word, level_id in zip(LEVELS, ids, strict=True):
        answer = tiny.encode(f"The quality of the image is {word}.", add_bos=False)
        prefix = tiny.encode("The quality of the image is", add_bos=False)
        assert answer[:len(prefix)] == prefix and answer[len(prefix)] == level_id
    with pytest.raises(ValueError, match="distinct"):
        level_token_ids(tiny, ["poor", "pure"])  # both start with the piece "p"
