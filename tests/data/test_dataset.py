"""Reading both formats, relative paths, bad records, lazy images, collate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import owl2
from owl2.data import IGNORE_INDEX, SupervisedDataset, collate, read_records
from owl2.processing.image import ImageProcessor
from owl2.processing.tokenizer import load_tokenizer

TOKENIZER_DIR = Path(__file__).parents[1] / "fixtures" / "llama2-tokenizer"
PER_IMAGE = 65
SMALL = ImageProcessor(size=16, crop_size=16)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


def _image(path: Path, size: tuple[int, int] = (20, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)


def _write(path: Path, records: list, jsonl: bool) -> Path:
    if jsonl:
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    return path


def _llava(rid, value, image=None, answer="Yes."):
    record = {"id": rid, "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    return record


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_llava_format_and_relative_paths(tmp_path, tokenizer, jsonl):
    _image(tmp_path / "imgs" / "a.png")
    _image(tmp_path / "imgs" / "b.png", (8, 30))
    records = [
        _llava("with-placeholder", "<|image|>\nWhat?", "a.png"),
        _llava("no-placeholder", "What?", ["a.png", "b.png"]),
        _llava("text", "Hi"),
    ]
    data = _write(tmp_path / ("d.jsonl" if jsonl else "d.json"), records, jsonl)
    good, skipped = read_records(data, tmp_path / "imgs")
    assert skipped == []
    assert [r.id for r in good] == ["with-placeholder", "no-placeholder", "text"]
    assert good[0].images == [tmp_path / "imgs" / "a.png"]
    # Images but no placeholder: one "<|image|>\n" per image prepended to the first human turn.
    assert good[1].turns[0] == ("user", "<|image|>\n<|image|>\nWhat?")
    assert good[2].images == []

    ds = SupervisedDataset(data, tokenizer, image_root=tmp_path / "imgs", image_processor=SMALL,
                           verify_tokenization=True)
    assert len(ds) == 3 and ds.is_multimodal == [True, True, False]
    item = ds[1]
    assert item["id"] == "no-placeholder" and item["num_images"] == 2
    assert item["input_ids"].count(-200) == 2
    assert item["pixel_values"].shape == (2, 3, 16, 16)
    assert item["length"] == len(item["input_ids"]) - 2 + 2 * PER_IMAGE
    text = ds[2]
    assert text["pixel_values"] is None and text["num_images"] == 0 and text["length"] == len(text["input_ids"])


def test_default_image_root_is_data_dir(tmp_path, tokenizer):
    _image(tmp_path / "sub" / "a.png")
    data = _write(tmp_path / "d.json", [_llava("r", "<|image|>Q", "sub/a.png")], False)
    good, skipped = read_records(data)
    assert skipped == [] and good[0].images == [tmp_path / "sub" / "a.png"]


def test_messages_format(tmp_path, tokenizer):
    _image(tmp_path / "x.png")
    records = [
        {"id": "typed", "messages": [{"role": "user", "content": "<|image|>Look."},
                                     {"role": "assistant", "content": "Red."}], "images": ["x.png"]},
        {"id": "parts", "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "See "}, {"type": "image", "image": "x.png"}]},
            {"role": "assistant", "content": "Red."}]},
        {"id": "no-placeholder", "messages": [{"role": "user", "content": "Look."},
                                              {"role": "assistant", "content": "Red."}], "images": ["x.png"]},
    ]
    good, skipped = read_records(_write(tmp_path / "m.jsonl", records, True))
    assert skipped == []
    assert good[0].turns == [("user", "<|image|>Look."), ("assistant", "Red.")]
    assert good[1].turns[0] == ("user", "See <|image|>") and good[1].system == "sys"
    assert good[1].images == [tmp_path / "x.png"]
    assert good[2].turns[0] == ("user", "<|image|>\nLook.")
    ds = SupervisedDataset(good, tokenizer, image_processor=SMALL, verify_tokenization=True)
    assert ds[1]["pixel_values"].shape == (1, 3, 16, 16)


def test_bad_records_are_skipped_with_id(tmp_path, tokenizer):
    _image(tmp_path / "ok.png")
    records = [
        _llava("good", "<|image|>Q", "ok.png"),
        _llava("missing-image", "<|image|>Q", "nope.png"),
        _llava("count-mismatch", "<|image|><|image|>Q", "ok.png"),
        _llava("placeholder-no-image", "<|image|>Q"),
        {"id": "unknown-role", "conversations": [{"from": "robot", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"id": "empty", "conversations": []},
        {"id": "ends-with-user", "conversations": [{"from": "human", "value": "Q"}]},
        {"id": "no-conversation"},
        _llava("remote", "<|image|>Q", "https://example.com/a.png"),
        _llava("too-long", "<|image|>Q", "ok.png", answer="word " * 20),
        _llava("image-does-not-fit", "<|image|>" * 2 + "Q", ["ok.png", "ok.png"]),
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n{not json\n")
    with pytest.warns(UserWarning, match="skipping record"):
        ds = SupervisedDataset(data, tokenizer, image_processor=SMALL, max_length=PER_IMAGE + 30)
    skipped = dict(ds.skipped)
    assert ds.ids == ["good", "too-long"]
    assert set(skipped) == {"missing-image", "count-mismatch", "placeholder-no-image", "unknown-role", "empty",
                            "ends-with-user", "no-conversation", "remote", "image-does-not-fit", "#11"}
    assert "not found" in skipped["missing-image"]
    assert "placeholder" in skipped["count-mismatch"]
    assert "robot" in skipped["unknown-role"]
    assert "empty" in skipped["empty"]
    assert "not valid JSON" in skipped["#11"]
    # The over-long sample is truncated at the end to exactly max_length, keeping its image.
    long = ds[1]
    assert long["length"] == PER_IMAGE + 30 and long["input_ids"].count(-200) == 1
    assert long["labels"][-1] != IGNORE_INDEX


def test_broken_image_at_load_time_is_replaced(tmp_path, tokenizer):
    _image(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    records = [_llava("broken", "<|image|>Q", "broken.png"), _llava("text", "Q"), _llava("ok", "<|image|>Q", "ok.png")]
    ds = SupervisedDataset(_write(tmp_path / "d.json", records, False), tokenizer, image_processor=SMALL)
    with pytest.warns(UserWarning, match="broken"):
        item = ds[0]
    assert item["id"] == "ok" and item["pixel_values"].shape == (1, 3, 16, 16)
    assert ds.skipped[0][0] == "broken"


def test_collate(tmp_path, tokenizer):
    _image(tmp_path / "a.png")
    records = [_llava("one", "<|image|>Describe it.", "a.png"), _llava("two", "<|image|><|image|>Q", ["a.png"] * 2),
               _llava("t1", "Hi there, how are you?"), _llava("t2", "Hi")]
    ds = SupervisedDataset(_write(tmp_path / "d.json", records, False), tokenizer, image_processor=SMALL)
    config = owl2.Owl2Config()
    assert config.tokens_per_image == PER_IMAGE
    batch = collate([ds[0], ds[1]], pad_token_id=tokenizer.pad_token_id, config=config)
    lengths = [ds[0]["length"], ds[1]["length"]]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert torch.equal(batch["pixel_values"][0], ds[0]["pixel_values"][0])
    assert (batch["input_ids"] == config.image_token_index).sum().item() == 3 * PER_IMAGE
    assert (batch["labels"][batch["input_ids"] == config.image_token_index] == IGNORE_INDEX).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    # Target tokens survive expansion unchanged.
    targets = [lab for lab in ds[0]["labels"] if lab != IGNORE_INDEX]
    assert batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist() == targets

    text_batch = collate([ds[2], ds[3]], pad_token_id=tokenizer.pad_token_id, config=config)
    assert "pixel_values" not in text_batch
    assert set(text_batch) == {"input_ids", "attention_mask", "labels"}
    assert text_batch["input_ids"][1, ds[3]["length"]:].eq(tokenizer.pad_token_id).all()


def test_dataloader_with_sampler(tmp_path, tokenizer):
    from torch.utils.data import DataLoader

    from owl2.data import ModalityLengthGroupedSampler

    _image(tmp_path / "a.png")
    records = [_llava(f"m{i}", "<|image|>Q" + " word" * i, "a.png") for i in range(5)]
    records += [_llava(f"t{i}", "Q" + " word" * i) for i in range(4)]
    ds = SupervisedDataset(_write(tmp_path / "d.json", records, False), tokenizer, image_processor=SMALL)
    sampler = ModalityLengthGroupedSampler.from_dataset(ds, batch_size=2, seed=0)
    config = owl2.Owl2Config()
    loader = DataLoader(ds, batch_sampler=sampler,
                        collate_fn=lambda s: collate(s, pad_token_id=tokenizer.pad_token_id, config=config))
    batches = list(loader)
    assert len(batches) == len(sampler) == 5
    with_images = [b for b in batches if "pixel_values" in b]
    assert sum(b["pixel_values"].shape[0] for b in with_images) == 5
    assert sum(b["input_ids"].shape[0] for b in batches) == 9


def test_collated_batches_train_a_real_model(tmp_path, tokenizer):
    """A multimodal and a text-only batch go through the model's forward and backward; the loss counts exactly the
    answer tokens (checked against a hand-masked cross-entropy)."""
    from owl2.data import SupervisedDataset as Dataset
    from owl2.processing.image import ImageProcessor
    from tests.conftest import OFFICIAL_TINY, randomize_

    config = owl2.Owl2Config.from_json(OFFICIAL_TINY)
    config.vocab_size = 32000
    model = randomize_(owl2.Owl2ForCausalLM(config), seed=2).train()
    _image(tmp_path / "a.png")
    records = [_llava("one", "<|image|>Describe it.", "a.png"), _llava("two", "What is it?", "a.png"),
               _llava("t1", "Hi there, how are you?"), _llava("t2", "Hi")]
    processor = ImageProcessor(size=56, crop_size=56)
    ds = Dataset(_write(tmp_path / "d.json", records, False), tokenizer, image_processor=processor,
                 tokens_per_image=config.tokens_per_image)
    for pair in ([ds[0], ds[1]], [ds[2], ds[3]]):
        batch = collate(pair, pad_token_id=tokenizer.pad_token_id, config=config)
        out = model(**batch)
        logits = out.logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert keep.sum().item() == sum(sum(1 for t in s["labels"] if t != IGNORE_INDEX) for s in pair)
        out.loss.backward()
    assert model.model.vision_model.embeddings.patch_embed.weight.grad is not None
