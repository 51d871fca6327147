"""Files and folders owl2 writes get the modes a plain ``open`` / ``mkdir`` would give under the umask, so a
checkpoint saved for a group can be read by the group (atomic writers and safetensors otherwise make them 0600)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import owl2
from owl2.checkpoint.io import read_tensor_file, save_safetensors
from owl2.cli.main import main as cli
from tests.conftest import OFFICIAL_TINY


@pytest.fixture(params=[0o022, 0o002], ids=["umask-022", "umask-002"])
def umask(request) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def modes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory.parent)): p.stat().st_mode & 0o777 for p in [directory, *directory.rglob("*")]}


def assert_plain_modes(directory: Path, umask: int) -> None:
    found = modes(directory)
    wanted = {name: (0o777 if (directory.parent / name).is_dir() else 0o666) & ~umask for name in found}
    assert found == wanted
    assert not [p for p in directory.rglob("*") if p.name.startswith(".")], "temporary files left behind"


def test_save_model_writes_shared_modes(tmp_path, tiny_fp32, umask):
    files = owl2.save_model(tiny_fp32, tmp_path / "saved", max_shard_size="200KB")
    assert len(files) > 1
    assert_plain_modes(tmp_path / "saved", umask)


def test_convert_writes_shared_modes(tmp_path, umask):
    source = tmp_path / "official"
    source.mkdir()
    shutil.copy(OFFICIAL_TINY / "config.json", source)
    torch.save(owl2.load_model(OFFICIAL_TINY, show_progress=False).state_dict(), source / "pytorch_model.bin")
    assert cli(["convert", str(source), str(tmp_path / "converted"), "--quiet"]) == 0
    assert_plain_modes(tmp_path / "converted", umask)


def test_merge_writes_shared_modes(tmp_path, umask):
    """``owl2 merge`` with an adapter in the layout Q-Align publishes (plain torch, no peft)."""
    base = tmp_path / "base"
    shutil.copytree(OFFICIAL_TINY, base, ignore=shutil.ignore_patterns("oracle_*", "*.txt", "manifest.json"))
    (base / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    torch.save({f"{prefix}.lora_A.weight": torch.ones(2, 64), f"{prefix}.lora_B.weight": torch.ones(64, 2)},
               adapter / "adapter_model.bin")
    torch.save({}, adapter / "non_lora_trainables.bin")
    assert cli(["merge", str(base), str(adapter), str(tmp_path / "merged"), "--quiet"]) == 0
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    assert_plain_modes(tmp_path / "merged", umask)


def test_save_safetensors_gives_the_modes_open_would(tmp_path, umask):
    """safetensors' own save_file writes 0600; owl2's writer gives a new file what ``open`` would, keeps the mode
    of a file it replaces (as ``open`` does), and leaves no temporary file."""
    fresh, kept = tmp_path / "fresh.safetensors", tmp_path / "kept.safetensors"
    kept.write_bytes(b"old")
    kept.chmod(0o640)
    for target in (fresh, kept):
        save_safetensors({"a": torch.arange(3.0)}, target)
        assert torch.equal(read_tensor_file(target)["a"], torch.arange(3.0))
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask
    assert kept.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.safetensors", "kept.safetensors"]
