"""LoRA adapter saves under SIGKILL, and metrics files with damaged lines.

Adapters: one child process builds a LoRA model once, then forks a process per case; each forked process saves
adapter ``a`` whole, then saves adapter ``b`` and kills itself with SIGKILL at the dangerous moment, from its own
patched ``os.replace`` / ``shutil.rmtree``. The tests check what is on disk and read it with the real readers.

Metrics: real ``metrics.jsonl`` files with lines that are not JSON objects or not UTF-8, read directly and through a
real ``--resume`` of the tiny training world.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from owl2.model.modeling import Owl2ForCausalLM
from owl2.training.config import load_recipe
from owl2.training.metrics import METRICS_FILE, MetricsLogger, read_metrics
from owl2.training.trainer import train
from tests.conftest import OFFICIAL_TINY, TINY_CONFIG
from tests.training.conftest import write_recipe

REPO = Path(__file__).parents[2]

# argv: root directory, then the cases; each case runs in a forked process in root/<case>, whose exit code (a
# negative signal number when killed) is written to root/<case>/exit. Every adapter's LoRA tensors are also written
# to expected-<label>.safetensors before it is saved, for the test to compare.
CHILD = r'''
import os, shutil, signal, sys
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

import owl2
from owl2.model.modeling import Owl2ForCausalLM
from owl2.training.lora import LoraSettings, apply_lora, save_adapter

root, cases = Path(sys.argv[1]), sys.argv[2:]
torch.manual_seed(0)
config = owl2.Owl2Config.from_json(os.environ["OWL2_TEST_CONFIG"])
model = apply_lora(Owl2ForCausalLM(config), LoraSettings(r=2, alpha=4, train_abstractor=False))
kill_at = None


def die():
    os.kill(os.getpid(), signal.SIGKILL)


real_replace, real_rmtree = os.replace, shutil.rmtree


def replace(src, dst, *args, **kwargs):
    src, dst = Path(src), Path(dst)
    if kill_at == "swap" and src.name.endswith(".tmp") and dst.name == "adapter" and not dst.exists():
        die()  # the previous adapter is aside under .adapter.*.old, the new one not yet in place
    if kill_at == "writing" and dst.name == "owl2_lora.json":
        die()  # the new adapter is half-written in its hidden temporary directory
    return real_replace(src, dst, *args, **kwargs)


def rmtree(path, *args, **kwargs):
    path = Path(path)
    if kill_at == "old-rmtree" and path.name.endswith(".old") and (path / "adapter").exists():
        (path / "adapter" / "adapter_model.safetensors").unlink()  # part of it deleted, then the kill
        die()
    return real_rmtree(path, *args, **kwargs)


def save(out, label):
    torch.manual_seed(sum(map(ord, label)))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape))
    save_file(get_peft_model_state_dict(model), str(out / f"expected-{label}.safetensors"))
    save_adapter(model, out / "adapter")


os.replace, shutil.rmtree = replace, rmtree
for case in cases:
    out = root / case
    out.mkdir()
    pid = os.fork()
    if pid == 0:
        save(out, "a")
        kill_at = case.removesuffix("-then-save")
        save(out, "b")
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    (out / "exit").write_text(str(os.waitstatus_to_exitcode(status)))
print("finished")
'''
CASES = ("swap", "swap-then-save", "old-rmtree", "writing")


@pytest.fixture(scope="module")
def killed_saves(tmp_path_factory) -> Path:
    """One directory per case of :data:`CASES`, as the killed save left it."""
    pytest.importorskip("peft")
    if not hasattr(signal, "SIGKILL") or not hasattr(os, "fork"):
        pytest.skip("needs SIGKILL and fork")
    root = tmp_path_factory.mktemp("killed-adapter-saves")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OWL2_TEST_CONFIG=str(OFFICIAL_TINY))
    done = subprocess.run([sys.executable, "-c", CHILD, str(root), *CASES], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0 and "finished" in done.stdout, done.stderr[-3000:]
    for case in CASES:
        assert (root / case / "exit").read_text() == str(-signal.SIGKILL), f"{case}: the save was not killed"
    return root


def lora_model(label: str | None = None):
    from owl2.training.lora import LoraSettings, apply_lora

    torch.manual_seed(0)
    model = apply_lora(Owl2ForCausalLM(TINY_CONFIG), LoraSettings(r=2, alpha=4, train_abstractor=False))
    if label is not None:
        torch.manual_seed(sum(map(ord, label)))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape))
    return model


def loaded_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The LoRA tensors of the adapter at ``directory``, through the loader a user calls."""
    from peft.utils import get_peft_model_state_dict

    from owl2.training.lora import load_adapter

    return get_peft_model_state_dict(load_adapter(Owl2ForCausalLM(TINY_CONFIG), directory))


def assert_same(tensors: dict[str, torch.Tensor], expected: Path) -> None:
    reference = load_file(str(expected))
    assert tensors.keys() == reference.keys()
    assert all(torch.equal(tensors[k], reference[k]) for k in reference)


def listing(directory: Path) -> tuple[list[str], list[str]]:
    """Visible names beside the adapter (without the test's own files), and the kinds (tmp, old) of hidden ones."""
    names = sorted(p.name for p in directory.iterdir() if not p.name.startswith(("expected-", "exit")))
    return [n for n in names if not n.startswith(".")], sorted(n.rsplit(".", 1)[-1] for n in names if n.startswith("."))


def test_kill_between_the_renames_leaves_the_previous_adapter_for_the_reader(killed_saves):
    out = killed_saves / "swap"
    assert listing(out) == ([], ["old", "tmp"])  # no adapter/: the previous one is hidden, the new one not placed
    from owl2.training.lora import LoraSettings, adapter_layout, read_settings

    assert adapter_layout(out / "adapter") == "owl2"  # reading puts the previous adapter back
    assert listing(out) == (["adapter"], ["tmp"])  # the emptied .old is gone; a reader deletes nothing else
    assert read_settings(out / "adapter") == LoraSettings(r=2, alpha=4, train_abstractor=False)
    assert_same(loaded_tensors(out / "adapter"), out / "expected-a.safetensors")


def test_kill_between_the_renames_then_the_next_save_restores_and_cleans(killed_saves):
    """The same kill, then a save with no read first (as a resumed run finishing): only the new adapter is left."""
    from peft.utils import get_peft_model_state_dict

    from owl2.training.lora import save_adapter

    out = killed_saves / "swap-then-save"
    assert listing(out) == ([], ["old", "tmp"])
    model = lora_model("c")
    save_file(get_peft_model_state_dict(model), str(out / "expected-c.safetensors"))
    save_adapter(model, out / "adapter")
    assert listing(out) == (["adapter"], [])
    assert_same(loaded_tensors(out / "adapter"), out / "expected-c.safetensors")


def test_kill_while_deleting_the_replaced_adapter_keeps_the_new_one(killed_saves):
    from owl2.training.lora import save_adapter

    out = killed_saves / "old-rmtree"
    assert listing(out) == (["adapter"], ["old"])
    assert_same(loaded_tensors(out / "adapter"), out / "expected-b.safetensors")  # the partial old one stays hidden
    assert listing(out) == (["adapter"], ["old"])
    save_adapter(lora_model("c"), out / "adapter")  # the next save clears it
    assert listing(out) == (["adapter"], [])


def test_kill_while_writing_the_new_adapter_keeps_the_previous_one(killed_saves):
    from owl2.training.lora import save_adapter

    out = killed_saves / "writing"
    assert listing(out) == (["adapter"], ["tmp"])
    assert_same(loaded_tensors(out / "adapter"), out / "expected-a.safetensors")
    save_adapter(lora_model("c"), out / "adapter")
    assert listing(out) == (["adapter"], [])


def test_a_partial_adapter_moved_aside_is_never_restored(tmp_path):
    """Only a complete copy comes back: a hidden one without its weights stays hidden, the reader reports the
    adapter missing, and the next save clears it."""
    pytest.importorskip("peft")
    from owl2.checkpoint.io import CheckpointError
    from owl2.training.lora import adapter_layout, save_adapter

    partial = tmp_path / ".adapter.abcd1234.old" / "adapter"
    partial.mkdir(parents=True)
    (partial / "adapter_config.json").write_text("{}")
    (partial / "owl2_lora.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no LoRA adapter directory"):
        adapter_layout(tmp_path / "adapter")
    assert listing(tmp_path) == ([], ["old"])
    save_adapter(lora_model("c"), tmp_path / "adapter")
    assert listing(tmp_path) == (["adapter"], [])


def test_the_hidden_copies_of_another_adapter_are_left_alone(tmp_path):
    """Saving ``adapter`` neither restores nor deletes what belongs to ``adapter.v2`` beside it."""
    pytest.importorskip("peft")
    from owl2.training.lora import save_adapter

    other = tmp_path / ".adapter.v2.abcd1234.tmp"
    other.mkdir()
    save_adapter(lora_model("c"), tmp_path / "adapter")
    assert other.is_dir()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_a_saved_adapter_gets_the_modes_of_a_plain_mkdir_and_open(tmp_path, umask):
    """The adapter directory was mkdtemp's 0700 and its weights safetensors' 0600: unreadable to the group."""
    pytest.importorskip("peft")
    from owl2.training.lora import save_adapter

    previous = os.umask(umask)
    try:
        directory = save_adapter(lora_model("a"), tmp_path / "adapter")
        save_adapter(lora_model("c"), directory)  # replacing one too
    finally:
        os.umask(previous)
    assert directory.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()} == {
        p.name: 0o666 & ~umask for p in directory.iterdir()}
    assert listing(tmp_path) == (["adapter"], [])


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory) -> Path:
    pytest.importorskip("peft")
    from owl2.training.lora import save_adapter

    return save_adapter(lora_model("a"), tmp_path_factory.mktemp("adapter") / "adapter")


def _edit_json(name: str, **values):
    def edit(directory: Path) -> None:
        data = json.loads((directory / name).read_text())
        data.update(values)
        (directory / name).write_text(json.dumps(data))
    return edit


def _peft_only(**values):
    def edit(directory: Path) -> None:
        (directory / "owl2_lora.json").unlink()  # as saved by peft itself
        _edit_json("adapter_config.json", **values)(directory)
    return edit


def _weights(cut):
    def edit(directory: Path) -> None:
        file = directory / "adapter_model.safetensors"
        file.write_bytes(cut(file.read_bytes()))
    return edit


HOSTILE_ADAPTERS = {
    "a text rank in owl2_lora.json": (_edit_json("owl2_lora.json", r="abc"), "owl2_lora.json: r must be int"),
    "a bad regex in owl2_lora.json": (_edit_json("owl2_lora.json", target_pattern="(("), "owl2_lora.json: target_"),
    "an unknown int4 base": (_edit_json("owl2_lora.json", quantize_base="int4"), "owl2_lora.json: unknown quant"),
    "adapter_config.json not JSON": (lambda d: (d / "adapter_config.json").write_text("nope"),
                                     "adapter_config.json: not valid JSON"),
    "a text rank in adapter_config.json": (_peft_only(r="x"), "adapter_config.json: r must be a positive integer"),
    "a number for target_modules": (_peft_only(target_modules=5), "adapter_config.json: target_modules must be"),
    "weights cut short": (_weights(lambda b: b[:-10]), "adapter_model.safetensors: not a safetensors file"),
    "weights of zeros": (_weights(lambda b: bytes(100)), "adapter_model.safetensors: not a safetensors file"),
}


@pytest.mark.parametrize("case", list(HOSTILE_ADAPTERS))
def test_a_damaged_adapter_is_one_line_naming_the_file(saved_adapter, tmp_path, case, capsys):
    """Each was a TypeError, a bare ValueError or safetensors' own error naming no file (a traceback from
    ``owl2 merge``), or was accepted and failed later."""
    from owl2.checkpoint.io import CheckpointError
    from owl2.cli.main import main
    from owl2.training.lora import load_adapter, merge_into, read_settings

    edit, message = HOSTILE_ADAPTERS[case]
    directory = tmp_path / "adapter"
    subprocess.run(["cp", "-a", str(saved_adapter), str(directory)], check=True)
    edit(directory)
    readers = [lambda: read_settings(directory), lambda: load_adapter(Owl2ForCausalLM(TINY_CONFIG), directory),
               lambda: merge_into(Owl2ForCausalLM(TINY_CONFIG), directory)]
    for read in readers:
        with pytest.raises(CheckpointError, match=message) as caught:
            read()
        assert "\n" not in str(caught.value) and str(directory) in str(caught.value)
    assert main(["merge", str(OFFICIAL_TINY), str(directory), str(tmp_path / "out"), "--quiet"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("owl2 merge: error: ") and message in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------ metrics
def record(step: int) -> str:
    return json.dumps({"step": step, "loss": 1.0 / step, "lr": 0.1}) + "\n"


def test_read_metrics_keeps_the_records_around_damaged_lines(tmp_path, caplog):
    path = tmp_path / METRICS_FILE
    path.write_bytes(b"".join([
        record(1).encode(),
        b"[1, 2]\n",                              # JSON, not an object: was an AttributeError on resume
        record(2).encode(),
        b'{"step": 3, "loss": 0.3, "note": "\xff\xfe"}\n',  # not UTF-8: was a UnicodeDecodeError
        b'{"step": "4", "loss": 0.2}\n',          # a step that is not a number: was a TypeError on resume
        b"\n",
        record(5).encode(),
        '{"step": 6, "loss": 0.1, "note": "caf\u00e9'.encode()[:-1],  # torn inside a UTF-8 character
    ]))
    with caplog.at_level(logging.WARNING, logger="owl2.training"):
        records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 5]
    [warning] = caplog.records
    message = warning.getMessage()
    assert "\n" not in message and "kept 3" in message and "4 unreadable line(s)" in message
    for part in ("line 2 (a JSON list, not an object)", "line 4 (not UTF-8)", "line 5 (no integer step)",
                 "the torn last line"):
        assert part in message


def test_a_clean_file_reads_without_a_warning_and_a_complete_last_line_without_newline_counts(tmp_path, caplog):
    path = tmp_path / METRICS_FILE
    path.write_text(record(1) + record(2).rstrip("\n"))
    with caplog.at_level(logging.WARNING, logger="owl2.training"):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert not caplog.records


def test_metrics_logger_resume_drops_damaged_lines_and_later_steps(tmp_path):
    path = tmp_path / METRICS_FILE
    # Valid UTF-8 JSON throughout: values that are not objects were an AttributeError, a text step a TypeError.
    path.write_text(record(1) + "7\n" + record(2) + "null\n" + '{"step": "2", "loss": 1}\n' + record(3))
    logger = MetricsLogger(tmp_path, resume_step=2, tensorboard=False)
    logger.log({"step": 3, "loss": 0.5})
    logger.close()
    assert path.read_text(encoding="utf-8") == record(1) + record(2) + json.dumps({"step": 3, "loss": 0.5}) + "\n"


def test_resume_after_damage_to_metrics_jsonl(tmp_path, tiny_world, caplog):
    """A real run, its metrics file damaged (a line that is not an object, bytes that are not UTF-8, a torn last
    record), then a resume from step 1: it runs, warns once, and the loss curve is the uninterrupted run's."""
    model_dir, data = tiny_world
    recipe = load_recipe(write_recipe(tmp_path, model_dir, data, train={"max_steps": 2, "save_every": 1,
                                                                        "grad_accum": 1, "batch_size": 1}))
    first = train(recipe)
    metrics = first.output_dir / METRICS_FILE
    lines = metrics.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2 and len(first.losses) == 2
    metrics.write_bytes(lines[0] + b'"a string"\n' + b"\xff\xfe\n" + lines[1][:-5])
    with caplog.at_level(logging.WARNING, logger="owl2.training"):
        resumed = train(recipe, resume=str(first.output_dir / "checkpoints" / "step-0000001"))
    assert resumed.losses == first.losses
    assert [r["step"] for r in read_metrics(first.output_dir)] == [1, 2]
    [warning] = [r for r in caplog.records if "unreadable line" in r.getMessage()]
    assert "kept 1" in warning.getMessage() and "line 2 (a JSON str, not an object)" in warning.getMessage()
