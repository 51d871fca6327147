"""Training checkpoints under SIGKILL: a run killed while it prunes old checkpoints or rewrites an existing step
leaves only complete ``step-*`` directories, loses none, and the next start resumes from the newest.

Each case runs a child process that saves checkpoints of a small module with the real :func:`save_checkpoint` and
kills itself with SIGKILL at the dangerous moment: its own ``shutil.rmtree`` or ``os.rename`` (in that child only)
deletes part of the directory or stops before renaming, then sends the signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from owl2.training.checkpointing import (
    CHECKPOINTS_DIR,
    TrainerState,
    checkpoint_dirs,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
)
from owl2.training.distributed import DistEnv, Strategy

REPO = Path(__file__).parents[2]
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

# argv: output dir, kill point, then the steps to save in order ("3" or "3:b" for a second version of step 3).
# The weights of each save are seeded by its label and also written to expected-<label>.pt, for the test to compare.
CHILD = r'''
import os, shutil, signal, sys
from pathlib import Path

import torch
from torch import nn

from owl2.training.checkpointing import TrainerState, save_checkpoint
from owl2.training.distributed import DistEnv, Strategy

out, kill_at, labels = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
armed = False


def die():
    os.kill(os.getpid(), signal.SIGKILL)


real_rmtree, real_rename = shutil.rmtree, os.rename


def rmtree(path, *args, **kwargs):
    name = Path(path).name
    if (armed and kill_at == "prune-rmtree" and "step-" in name and not name.startswith((".tmp-", ".old-"))
            and Path(path).exists()):
        # Part of the directory is gone (as when a kill lands mid-way through rmtree), then the kill.
        for part in ("trainable.safetensors", "trainer_state.pt"):
            (Path(path) / part).unlink(missing_ok=True)
        die()
    if armed and kill_at == "old-rmtree" and name.startswith(".old-") and Path(path).exists():
        (Path(path) / "trainable.safetensors").unlink(missing_ok=True)
        die()
    return real_rmtree(path, *args, **kwargs)


def rename(src, dst, *args, **kwargs):
    src, dst = Path(src), Path(dst)
    if armed and kill_at == "swap" and src.name.startswith(".tmp-") and (dst.parent / f".old-{dst.name}").exists():
        die()  # the existing step is aside under .old-, the new one not yet in place
    result = real_rename(src, dst, *args, **kwargs)
    if armed and kill_at == "prune-rename" and src.name.startswith("step-") and dst.name.startswith("."):
        die()  # hidden, not yet deleted
    return result


shutil.rmtree, os.rename = rmtree, rename
model = nn.Linear(4, 3)
strategy = Strategy(DistEnv())
strategy.wrap(model, config=None)
optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
for i, label in enumerate(labels):
    step = int(label.split(":")[0])
    torch.manual_seed(10 * step + (":" in label))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape))
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out / f"expected-{label}.pt")
    armed = i == len(labels) - 1
    save_checkpoint(out, strategy, optimizer, scheduler, TrainerState(step=step), {"r": 1}, keep_last=2)
print("finished")
'''


def run_child(out: Path, kill_at: str, labels: list[str]) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", CHILD, str(out), kill_at, *labels], env=env, capture_output=True,
                          text=True, timeout=120)


def load(directory: Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint, through the same loader a resume uses."""
    model = nn.Linear(4, 3)
    strategy = Strategy(DistEnv())
    strategy.wrap(model, config=None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = load_checkpoint(directory, strategy, optimizer, scheduler)
    assert state.step == checkpoint_step(directory)
    assert optimizer.state  # the AdamW moments came back too
    return model.state_dict()


def assert_same(weights: dict[str, torch.Tensor], expected: Path) -> None:
    reference = torch.load(expected, weights_only=True)
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


def visible_and_hidden(out: Path) -> tuple[list[str], list[str]]:
    names = sorted(p.name for p in (out / CHECKPOINTS_DIR).iterdir())
    return [n for n in names if not n.startswith(".")], [n for n in names if n.startswith(".")]


def assert_killed(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == -signal.SIGKILL, f"the child was not killed at that point: {done.stdout}{done.stderr}"


@pytest.mark.parametrize("kill_at", ["prune-rmtree", "prune-rename"])
def test_kill_while_pruning_leaves_only_complete_checkpoints(tmp_path, kill_at):
    done = run_child(tmp_path, kill_at, ["1", "2", "3"])  # keep_last=2: saving 3 prunes 1
    assert_killed(done)
    visible, hidden = visible_and_hidden(tmp_path)
    assert hidden == [".del-step-0000001"]  # what is half-deleted is hidden
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["step-0000002", "step-0000003"] == visible
    for directory, label in zip(checkpoint_dirs(tmp_path), ["2", "3"], strict=True):
        assert_same(load(directory), tmp_path / f"expected-{label}.pt")
    assert latest_checkpoint(tmp_path).name == "step-0000003"

    remove_partial_checkpoints(tmp_path)  # the next start clears the hidden rest
    assert visible_and_hidden(tmp_path) == (["step-0000002", "step-0000003"], [])


def test_kill_between_the_renames_of_a_rewritten_step_keeps_the_previous_copy(tmp_path):
    """Step 3 saved, then saved again (as after resuming from step 2): killed after the existing step-3 went aside
    and before the new one took its name. The previous step 3 is found, complete, by the next start."""
    done = run_child(tmp_path, "swap", ["2", "3", "3:b"])
    assert_killed(done)
    assert visible_and_hidden(tmp_path) == (["step-0000002"], [".old-step-0000003", ".tmp-step-0000003"])

    last = latest_checkpoint(tmp_path)  # what the trainer's resume asks first
    assert last is not None and last.name == "step-0000003"
    assert_same(load(last), tmp_path / "expected-3.pt")
    remove_partial_checkpoints(tmp_path)
    assert visible_and_hidden(tmp_path) == (["step-0000002", "step-0000003"], [])


def test_cleanup_alone_puts_back_a_step_moved_aside(tmp_path):
    """A start that clears leftovers before it looks for the latest checkpoint restores the step, never deletes it."""
    assert_killed(run_child(tmp_path, "swap", ["3", "3:b"]))
    remove_partial_checkpoints(tmp_path)
    assert visible_and_hidden(tmp_path) == (["step-0000003"], [])
    assert_same(load(latest_checkpoint(tmp_path)), tmp_path / "expected-3.pt")


def test_kill_while_deleting_the_replaced_copy_keeps_the_new_one(tmp_path):
    assert_killed(run_child(tmp_path, "old-rmtree", ["2", "3", "3:b"]))
    assert visible_and_hidden(tmp_path) == (["step-0000002", "step-0000003"], [".old-step-0000003"])
    assert_same(load(latest_checkpoint(tmp_path)), tmp_path / "expected-3:b.pt")
    remove_partial_checkpoints(tmp_path)  # a half-deleted .old is never put back over the new step
    assert visible_and_hidden(tmp_path) == (["step-0000002", "step-0000003"], [])
    assert_same(load(latest_checkpoint(tmp_path)), tmp_path / "expected-3:b.pt")


def test_a_partial_copy_moved_aside_is_never_restored(tmp_path):
    """Only a complete ``.old-step-N`` comes back; a partial one (no weights) stays hidden and is cleared."""
    root = tmp_path / CHECKPOINTS_DIR / ".old-step-0000004"
    root.mkdir(parents=True)
    torch.save({"x": 1}, root / "trainer_state.pt")
    torch.save({}, root / "optimizer.pt")
    assert checkpoint_dirs(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    remove_partial_checkpoints(tmp_path)
    assert visible_and_hidden(tmp_path) == ([], [])


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    """Resumed from step 2 while steps 5 and 6 of the earlier run exist: saving step 3 with keep_last=2 keeps step 3
    (ordered by step alone it would be the one deleted) and the latest other."""
    model = nn.Linear(4, 3)
    strategy = Strategy(DistEnv())
    strategy.wrap(model, config=None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for step in (2, 5, 6, 3):
        save_checkpoint(tmp_path, strategy, optimizer, scheduler, TrainerState(step=step), {}, keep_last=2)
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["step-0000003", "step-0000006"]
    assert load_file(str(checkpoint_dirs(tmp_path)[0] / "trainable.safetensors")).keys() == {"weight", "bias"}
