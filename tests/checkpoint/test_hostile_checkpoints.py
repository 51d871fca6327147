"""Hostile and corrupt checkpoint directories: every one is refused in one line naming the file and the problem,
quickly, by the library (a ``ValueError``) and by the command line (exit status 2, no traceback).

The corpus is built in ``tmp_path`` from the official tiny fixture; each case changes one thing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import owl2
from owl2.checkpoint.io import CheckpointError, build_empty, check_capacity, stored_size, weight_files
from owl2.cli.main import main as cli
from tests.conftest import OFFICIAL_TINY


class Hung(BaseException):
    """Raised by :func:`deadline`; a BaseException so that no ``except Exception`` (or the CLI) swallows it."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail instead of hanging: a blocking open of a FIFO or minutes of model layout end here."""

    def expire(signum: int, frame: object) -> None:
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def state() -> dict[str, torch.Tensor]:
    return load_file(OFFICIAL_TINY / "model.safetensors")


def config() -> dict:
    return json.loads((OFFICIAL_TINY / "config.json").read_text())


def write_config(directory: Path, data: dict) -> None:
    (directory / "config.json").write_text(json.dumps(data))


def edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        write_config(directory, {**config(), **changes})
    return edit


def edit_visual(part: str, **changes: object) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        data = config()
        data["visual_config"][part].update(changes)
        write_config(directory, data)
    return edit


def pickled(directory: Path, value: object, legacy: bool = False) -> None:
    """Replace the safetensors weights by ``pytorch_model.bin`` holding ``value``."""
    (directory / "model.safetensors").unlink()
    torch.save(value, directory / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)


def safetensors_bytes(directory: Path, data: bytes) -> None:
    (directory / "model.safetensors").write_bytes(data)


def header(declared: int, body: bytes) -> bytes:
    return struct.pack("<Q", declared) + body


def framed(entries: dict) -> bytes:
    """A safetensors header holding ``entries``, with its true length."""
    text = json.dumps(entries).encode()
    return header(len(text), text)


def index(directory: Path, weight_map: object, name: str = "model.safetensors.index.json") -> None:
    (directory / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def every_key_in(name: str) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        index(directory, dict.fromkeys(state(), name))
    return edit


def outside_shard(directory: Path) -> None:
    """Real weights one level up, named by a ``../`` entry: they would load, but lie outside the checkpoint."""
    outside = directory.parent / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copy(OFFICIAL_TINY / "model.safetensors", outside / "model.safetensors")
    (directory / "model.safetensors").unlink()
    index(directory, dict.fromkeys(state(), "../outside/model.safetensors"))


def symlink_outside(directory: Path) -> None:
    outside = directory.parent / "elsewhere"
    outside.mkdir(exist_ok=True)
    shutil.move(directory / "model.safetensors", outside / "model.safetensors")
    (directory / "model.safetensors").symlink_to(outside / "model.safetensors")


class Evil:
    """Unpickling this would run a shell command that creates ``MARKER``."""

    marker: Path

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def malicious_pickle(directory: Path) -> None:
    Evil.marker = directory / "pwned"
    pickled(directory, {**state(), "model.evil": Evil()})  # real weights too, so the sizes check out


def truncated(name: str) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        data = (directory / name).read_bytes()
        (directory / name).write_bytes(data[: len(data) // 2])
    return edit


def int_weights(directory: Path) -> None:
    tensors = state()
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, directory / "model.safetensors")


def fifo_config(directory: Path) -> None:
    (directory / "config.json").unlink()
    os.mkfifo(directory / "config.json")


def huge_config(directory: Path) -> None:
    with open(directory / "config.json", "wb") as handle:
        handle.truncate(65 * 2**20)  # sparse: no disk, but more bytes than any settings file has


def deep(depth: int) -> str:
    return '{"a": ' + "[" * depth + "]" * depth + "}"


# name -> (how the checkpoint is broken, the file the message must name, what it must say)
CASES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # shards that escape the checkpoint directory
    "index-dotdot-shard": (outside_shard, "model.safetensors.index.json", "outside the checkpoint directory"),
    "index-etc-passwd": (
        lambda d: pickled(d, None) or index(d, {"a": "../../../../etc/passwd"}, "pytorch_model.bin.index.json"),
        "pytorch_model.bin.index.json", "outside the checkpoint directory"),
    "index-absolute-shard": (every_key_in("/etc/passwd"), "model.safetensors.index.json", "absolute path"),
    "symlinked-weights-outside": (symlink_outside, "model.safetensors", "outside the checkpoint directory"),
    # broken indexes
    "index-list-value": (lambda d: index(d, {"a": ["model.safetensors"]}), "model.safetensors.index.json",
                         "must name a shard file, got a list"),
    "index-nul-in-name": (every_key_in("model\0.safetensors"), "model.safetensors.index.json",
                          "must name a shard file"),
    "index-not-json": (lambda d: (d / "model.safetensors.index.json").write_text("{"), "model.safetensors.index.json",
                       "not valid JSON"),
    "index-no-weight-map": (lambda d: index(d, []), "model.safetensors.index.json", "has no weight_map"),
    "index-deeply-nested": (lambda d: (d / "model.safetensors.index.json").write_text(deep(100_000)),
                            "model.safetensors.index.json", "nested too deeply"),
    # configs that would take minutes to lay out, or crash doing it
    "a-million-layers": (edit_config(num_hidden_layers=1_000_000), "config.json",
                         "num_hidden_layers must be between 1 and 1024"),
    "more-layers-than-the-weights-hold": (edit_config(num_hidden_layers=1000), "config.json",
                                          "the config does not belong to these weights"),
    "a-billion-vision-layers": (edit_visual("visual_model", num_hidden_layers=10**9), "config.json",
                                "vision num_hidden_layers must be between"),
    "a-billion-queries": (edit_visual("visual_abstractor", num_learnable_queries=10**9), "config.json",
                          "num_learnable_queries must be between"),
    "huge-vocabulary": (edit_config(vocab_size=10**12), "config.json", "vocab_size must be between"),
    "fractional-layers": (edit_config(num_hidden_layers=4.5), "config.json",
                          "num_hidden_layers must be an integer, got 4.5"),
    "string-hidden-size": (edit_config(hidden_size="64"), "config.json", "hidden_size must be an integer"),
    "boolean-heads": (edit_config(num_attention_heads=True), "config.json", "num_attention_heads must be an integer"),
    "zero-vocabulary": (edit_config(vocab_size=0), "config.json", "vocab_size must be positive"),
    "zero-vision-heads": (edit_visual("visual_model", num_attention_heads=0), "config.json",
                          "vision num_attention_heads must be positive"),
    "zero-patch-size": (edit_visual("visual_model", patch_size=0), "config.json", "patch_size must be positive"),
    "nan-epsilon": (lambda d: (d / "config.json").write_text(
        json.dumps(config()).replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN')), "config.json",
        "rms_norm_eps must be a finite number"),
    "string-rope-factor": (edit_config(rope_scaling={"type": "linear", "factor": "x"}), "config.json",
                           "rope_scaling"),
    "visual-config-a-list": (edit_config(visual_config=[1]), "config.json", "visual_config must be an object"),
    "vision-config-a-string": (edit_config(visual_config={"visual_model": "big"}), "config.json",
                               "visual_config.visual_model must be an object"),
    "config-deeply-nested": (lambda d: (d / "config.json").write_text(deep(100_000)), "config.json",
                             "nested too deeply"),
    "config-nested-below-the-json-limit": (lambda d: (d / "config.json").write_text(deep(900)), "config.json",
                                           "nested too deeply"),
    "config-not-json": (lambda d: (d / "config.json").write_text("{oops"), "config.json", "not valid JSON"),
    "config-binary": (lambda d: (d / "config.json").write_bytes(b"\xff\xfe\x00garbage"), "config.json",
                      "not UTF-8"),
    "config-a-list": (lambda d: (d / "config.json").write_text("[]"), "config.json", "expected a JSON object"),
    "config-a-fifo": (fifo_config, "config.json", "not a regular file"),
    "config-65-MiB": (huge_config, "config.json", "too large"),
    # corrupt safetensors
    "safetensors-huge-header-length": (lambda d: safetensors_bytes(d, header(2**62, b"{}")), "model.safetensors",
                                       "header too large"),
    "safetensors-header-past-the-end": (lambda d: safetensors_bytes(d, header(1000, b"{}")), "model.safetensors",
                                        "not a safetensors file"),
    "safetensors-header-not-json": (lambda d: safetensors_bytes(d, header(8, b"notjson!")), "model.safetensors",
                                    "not a safetensors file"),
    "safetensors-offsets-past-the-end": (lambda d: safetensors_bytes(d, framed(
        {"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}) + bytes(8)),
        "model.safetensors", "not a safetensors file"),
    "safetensors-truncated": (truncated("model.safetensors"), "model.safetensors", "not a safetensors file"),
    "safetensors-empty": (lambda d: safetensors_bytes(d, b""), "model.safetensors", "not a safetensors file"),
    "integer-weights": (int_weights, "model.norm.weight", "not as floating-point numbers"),
    "key-with-newline-and-escape": (lambda d: save_file({**state(), "model.x\n\x1b[31mred": torch.zeros(1)},
                                                        d / "model.safetensors"),
                                    "1 unexpected key(s)", "'model.x\\n\\x1b[31mred'"),
    # pickles
    "malicious-pickle": (malicious_pickle, "pytorch_model.bin", "refused: the pickle asks to run code"),
    "truncated-pickle": (lambda d: (pickled(d, state()), truncated("pytorch_model.bin")(d)), "pytorch_model.bin",
                         "truncated or corrupt"),
    "truncated-legacy-pickle": (lambda d: (pickled(d, state(), legacy=True), truncated("pytorch_model.bin")(d)),
                                "pytorch_model.bin", "truncated or corrupt"),
    "empty-pickle": (lambda d: pickled(d, None) or (d / "pytorch_model.bin").write_bytes(b""), "pytorch_model.bin",
                     "the file is empty"),
    "text-as-pickle": (lambda d: pickled(d, None) or (d / "pytorch_model.bin").write_text("root:x:0:0::/root:/bin/sh\n"
                                                                                          * 10**5),
                       "pytorch_model.bin", "truncated or corrupt"),
    "pickle-of-a-list": (lambda d: pickled(d, [torch.zeros(10**5)]), "pytorch_model.bin",
                         "does not hold a state dict"),
    "pickle-with-a-number": (lambda d: pickled(d, {**state(), "model.norm.weight": 3}), "pytorch_model.bin",
                             "not a plain state dict"),
}


def hostile(tmp_path: Path, case: str) -> Path:
    directory = tmp_path / case
    directory.mkdir()
    shutil.copy(OFFICIAL_TINY / "config.json", directory / "config.json")
    shutil.copy(OFFICIAL_TINY / "model.safetensors", directory / "model.safetensors")
    CASES[case][0](directory)
    return directory


def check_message(message: str, case: str) -> None:
    _, where, problem = CASES[case]
    assert "\n" not in message.strip(), message
    assert where in message and problem in message, message
    assert "weights_only=False" not in message and "Traceback" not in message, message


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_library_refuses_in_one_line(tmp_path, case):
    directory = hostile(tmp_path, case)
    with deadline(15), pytest.raises(ValueError) as caught:
        owl2.load_model(directory, show_progress=False)
    check_message(str(caught.value), case)
    assert not (directory / "pwned").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_command_line_refuses_with_exit_status_2(tmp_path, case, capsys):
    directory = hostile(tmp_path, case)
    with deadline(15):
        status = cli(["ask", "--model", str(directory), "--prompt", "hi", "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("owl2 ask: error: ") and err.count("\n") == 1, err
    check_message(err, case)
    assert not (directory / "pwned").exists()


@pytest.mark.parametrize("case", ["index-dotdot-shard", "malicious-pickle", "a-million-layers", "safetensors-truncated",
                                  "more-layers-than-the-weights-hold"])
def test_convert_refuses_the_same_files(tmp_path, case, capsys):
    directory = hostile(tmp_path, case)
    with deadline(15):
        status = cli(["convert", str(directory), str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("owl2 convert: error: ") and err.count("\n") == 1, err
    check_message(err, case)


def test_merge_refuses_to_copy_a_tokenizer_file_linked_from_outside(tmp_path, capsys):
    """A base whose tokenizer file links to a private file elsewhere: copied, the merged checkpoint would carry that
    file's contents to wherever it is published."""
    secret = tmp_path / "private" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    base = hostile(tmp_path, "index-no-weight-map")
    (base / "model.safetensors.index.json").unlink()
    (base / "special_tokens_map.json").write_text("{}")
    (base / "tokenizer.model").symlink_to(secret)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    torch.save({"base_model.model.model.norm.weight": torch.ones(64)}, adapter / "adapter_model.bin")
    torch.save({}, adapter / "non_lora_trainables.bin")
    status = cli(["merge", str(base), str(adapter), str(tmp_path / "merged"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert "tokenizer.model resolves to" in err and "outside the checkpoint directory" in err
    assert not (tmp_path / "merged" / "tokenizer.model").exists()
    assert not (tmp_path / "merged" / "special_tokens_map.json").exists()  # nothing copied, not half


def test_links_inside_the_checkpoint_and_into_the_hub_cache_are_followed(tmp_path):
    """What the containment check allows: a weight file linked from a subfolder of the checkpoint, and the layout
    of a Hugging Face hub cache snapshot, whose files link to ``../../blobs``."""
    inside = tmp_path / "inside"
    (inside / "weights").mkdir(parents=True)
    shutil.copy(OFFICIAL_TINY / "config.json", inside)
    shutil.copy(OFFICIAL_TINY / "model.safetensors", inside / "weights" / "real.safetensors")
    (inside / "model.safetensors").symlink_to("weights/real.safetensors")
    assert owl2.load_model(inside, show_progress=False) is not None

    repo = tmp_path / "hub" / "models--owner--name"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name, blob in (("config.json", "c0ffee"), ("model.safetensors", "beef")):
        shutil.copy(OFFICIAL_TINY / name, repo / "blobs" / blob)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))
    assert weight_files(snapshot) == [snapshot / "model.safetensors"]
    assert owl2.load_model(snapshot, show_progress=False) is not None


@pytest.mark.parametrize("changes", [{}, {"tie_word_embeddings": True}, {"modality_adaptive": False}])
def test_stored_size_counts_what_a_full_checkpoint_stores(changes):
    """The size check works out the checkpoint size from one layer per stack; it must equal the full layout's."""
    config_ = owl2.Owl2Config.from_dict({**config(), **changes})
    stored = {k: v for k, v in build_empty(config_).state_dict().items()
              if not (config_.tie_word_embeddings and k == "lm_head.weight")}
    assert stored_size(config_) == sum(t.numel() for t in stored.values())


def test_a_config_slightly_too_large_is_left_to_the_key_checks(tmp_path):
    """The size check stops absurd configs only; a near miss still gets the message naming the tensors."""
    directory = hostile(tmp_path, "index-no-weight-map")
    (directory / "model.safetensors.index.json").unlink()
    write_config(directory, {**config(), "num_hidden_layers": 3})
    check_capacity(directory, owl2.Owl2Config.from_json(directory), weight_files(directory))
    with pytest.raises(ValueError, match=r"missing key\(s\): model\.layers\.2\."):
        owl2.load_model(directory, show_progress=False)


def test_checkpoint_error_is_still_a_runtime_error():
    """It became a ValueError (bad input); code that caught RuntimeError keeps working."""
    assert issubclass(CheckpointError, ValueError) and issubclass(CheckpointError, RuntimeError)
