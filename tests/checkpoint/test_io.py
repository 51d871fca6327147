"""Checkpoint reading and writing: official pickled shards, safetensors, conversion, errors, atomicity."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import owl2
from owl2.checkpoint.io import CheckpointError, ShardWriter, resolve_checkpoint, weight_files
from owl2.cli.main import main as cli
from owl2.utils import atomic_output
from tests.conftest import OFFICIAL_TINY, max_abs, official


def official_state() -> dict[str, torch.Tensor]:
    return load_file(OFFICIAL_TINY / "model.safetensors")


def write_official_layout(directory: Path, state: dict[str, torch.Tensor], dtype=torch.float16,
                          config_json: str | None = None) -> Path:
    """The released layout: shard k holds decoder layer k-1 (with its inv_freq), the last shard everything else.
    ``config_json``: the config.json text (default: official-tiny's)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(config_json or (OFFICIAL_TINY / "config.json").read_text())
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"model\.layers\.(\d+)\.", k))})
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(len(layers) + 1)]
    for key, tensor in state.items():
        m = re.match(r"model\.layers\.(\d+)\.", key)
        keep_fp32 = key.endswith("inv_freq")
        shards[int(m.group(1)) if m else -1][key] = tensor if keep_fp32 else tensor.to(dtype)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        name = f"pytorch_model-{k}-of-{len(shards)}.bin"
        torch.save(shard, directory / name)
        weight_map.update(dict.fromkeys(shard, name))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def image_batch(oracle):
    return official(oracle["input_ids_image"], pixel_values=oracle["image"])


@torch.no_grad()
def test_official_pickled_shards_load(tmp_path, oracle):
    directory = write_official_layout(tmp_path / "official", official_state())
    assert len(weight_files(directory)) == 3
    model = owl2.load_model(directory, dtype=torch.float32, show_progress=False)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert not model.training
    reference = owl2.load_model(OFFICIAL_TINY, show_progress=False)
    # The shards hold fp16, so compare against the reference rounded the same way.
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(ours, theirs.half().float()), name
    assert max_abs(model(**image_batch(oracle)).logits, oracle["logits_image"]) < 0.05


@torch.no_grad()
def test_save_and_reload_round_trip_sharded(tmp_path, tiny_fp32, oracle):
    files = owl2.save_model(tiny_fp32, tmp_path / "owl2", max_shard_size="100KB")
    assert len(files) > 1 and all(f.suffix == ".safetensors" for f in files)
    index = json.loads((tmp_path / "owl2" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tiny_fp32.state_dict())
    reloaded = owl2.load_model(tmp_path / "owl2", show_progress=False)
    assert torch.equal(reloaded(**image_batch(oracle)).logits, tiny_fp32(**image_batch(oracle)).logits)
    # Saving again with one shard replaces the index and the old shards.
    owl2.save_model(tiny_fp32, tmp_path / "owl2")
    assert sorted(p.name for p in (tmp_path / "owl2").iterdir()) == ["config.json", "model.safetensors"]
    assert owl2.Owl2Config.from_json(tmp_path / "owl2").to_dict() == tiny_fp32.config.to_dict()


@torch.no_grad()
def test_convert_official_to_bf16_safetensors(tmp_path, oracle):
    source = write_official_layout(tmp_path / "official", official_state())
    report = owl2.convert_checkpoint(source, tmp_path / "converted", dtype="bf16", max_shard_size="150KB",
                                     show_progress=False)
    assert report.verified and len(report.files) > 1
    assert len(report.skipped) == 2 + 2 * 2  # inv_freq per layer, q/k_pos_embed per abstractor layer
    converted = {}
    for f in report.files:
        converted.update(load_file(f))
    assert all(t.dtype == torch.bfloat16 for t in converted.values())
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    a = owl2.load_model(source, dtype=torch.bfloat16, show_progress=False)
    b = owl2.load_model(tmp_path / "converted", dtype=torch.bfloat16, show_progress=False)
    assert torch.equal(a(**image_batch(oracle)).logits, b(**image_batch(oracle)).logits)


def test_convert_cli(tmp_path, capsys):
    source = write_official_layout(tmp_path / "official", official_state())
    assert cli(["convert", str(source), str(tmp_path / "out"), "--dtype", "fp32", "--quiet"]) == 0
    assert "verified" in capsys.readouterr().out
    # fp32 safetensors holding exactly the source's weights
    files = sorted((tmp_path / "out").glob("*.safetensors"))
    assert files and all(t.dtype == torch.float32 for f in files for t in load_file(f).values())
    expected = owl2.load_model(source, show_progress=False).state_dict()
    converted = owl2.load_model(tmp_path / "out", show_progress=False).state_dict()
    assert converted.keys() == expected.keys()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in converted.items())
    assert cli(["convert", str(tmp_path / "missing"), str(tmp_path / "out2")]) == 2
    assert "no checkpoint directory" in capsys.readouterr().err


def test_verification_catches_a_corrupted_output(tmp_path):
    from owl2.checkpoint.convert import verify_conversion

    source = write_official_layout(tmp_path / "official", official_state())
    report = owl2.convert_checkpoint(source, tmp_path / "out", show_progress=False)
    tensors = load_file(report.files[0])
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    save_file(tensors, report.files[0])
    with pytest.raises(CheckpointError, match=f"{re.escape(key)} differs"):
        verify_conversion(source, report.files, None, show_progress=False)


def test_missing_unexpected_and_misshapen_keys_are_errors(tmp_path):
    state = official_state()
    broken = dict(state)
    del broken["model.norm.weight"]
    broken["model.extra.weight"] = torch.zeros(2)
    (tmp_path / "a").mkdir()
    save_file(broken, tmp_path / "a" / "model.safetensors")
    (tmp_path / "a" / "config.json").write_text((OFFICIAL_TINY / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): model\.norm\.weight; 1 unexpected key\(s\): "
                                              r"model\.extra\.weight"):
        owl2.load_model(tmp_path / "a", show_progress=False)
    bad_shape = dict(state)
    bad_shape["lm_head.weight"] = torch.zeros(3, 3)
    (tmp_path / "b").mkdir()
    save_file(bad_shape, tmp_path / "b" / "model.safetensors")
    (tmp_path / "b" / "config.json").write_text((OFFICIAL_TINY / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"lm_head\.weight: checkpoint shape \[3, 3\]"):
        owl2.load_model(tmp_path / "b", show_progress=False)


def test_missing_files_are_clear_errors(tmp_path):
    (tmp_path / "config.json").write_text((OFFICIAL_TINY / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights in"):
        owl2.load_model(tmp_path, show_progress=False)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "shard-1.bin"}}))
    with pytest.raises(CheckpointError, match=r"missing: shard-1\.bin"):
        owl2.load_model(tmp_path, show_progress=False)
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint(tmp_path / "config.json")


def test_hub_id_without_huggingface_hub_explains(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match="pip install huggingface_hub"):
        resolve_checkpoint("MAGAer13/mplug-owl2-llama2-7b")


def test_atomic_output_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as handle:
        handle.write(b"partial")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_shard_writer_respects_the_size_limit(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_size=1000)
    for i in range(5):
        writer.add(f"t{i}", torch.zeros(100))  # 400 bytes each
    files = writer.finish()
    assert len(files) == 3
    assert all(f.stat().st_size < 1000 + 500 for f in files)


def test_atomic_output_gives_normal_file_modes(tmp_path):
    """A new file gets 0666 less the umask (not mkstemp's 0600); a replaced file keeps its mode."""
    import os

    umask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.txt"
        with atomic_output(fresh, "w") as handle:
            handle.write("x")
        assert fresh.stat().st_mode & 0o777 == 0o644
        kept = tmp_path / "kept.txt"
        kept.write_text("old")
        kept.chmod(0o640)
        with atomic_output(kept, "w") as handle:
            handle.write("new")
        assert kept.stat().st_mode & 0o777 == 0o640 and kept.read_text() == "new"
    finally:
        os.umask(umask)
