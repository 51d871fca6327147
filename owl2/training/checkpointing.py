"""Resumable training checkpoints, written so that a crash at any moment leaves the previous ones intact.

A checkpoint is a directory ``<output_dir>/checkpoints/step-0000123/`` holding

* ``trainable.safetensors``: the trainable parameters (frozen ones come back from the starting model);
* ``optimizer.pt``: the optimizer state (gathered to full tensors under FSDP); under DeepSpeed, ``deepspeed/``
  holds the engine's own checkpoint (partitioned optimizer state) instead;
* ``trainer_state.pt``: step, data position (epoch and mega-batch index), scheduler state, recipe;
* ``rng-rank<r>.pt``: each process's random-number state (torch, CUDA, numpy, Python).

Everything is first written to a hidden ``.tmp-step-...`` directory, flushed to disk, and then renamed to its final
name in one step, so a directory named ``step-*`` is always complete. Only ``keep_last`` are kept (the one just
written and the latest others); an old one is renamed to a hidden ``.del-step-...`` before it is deleted, so a kill
halfway through never leaves a visible partial one. Writing a step that already exists (after resuming from an
earlier checkpoint) moves the existing one aside to ``.old-step-...`` for the moment of the swap; if the run is
killed in that moment, listing the checkpoints puts it back. Hidden leftovers are deleted when the next run starts
(:func:`remove_partial_checkpoints`).

How the weights and the optimizer state are gathered, written and read back depends on the data-parallel strategy:
:func:`save_checkpoint` and :func:`load_checkpoint` leave that to the run's
:class:`~owl2.training.distributed.Strategy`, which holds the model.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from owl2.checkpoint.io import save_safetensors
from owl2.training.distributed import DEEPSPEED_TAG, OPTIMIZER_FILE, Strategy, barrier
from owl2.utils import fsync_dir, fsync_tree

CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_DISPLACED_DIR = re.compile(r"^\.old-(step-\d+)$")


@dataclass
class TrainerState:
    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    batch: int = 0
    """Mega-batches of ``epoch`` already consumed (the data position)."""
    tokens: int = 0
    """Target-bearing tokens seen, over all ranks."""

    def to_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "tokens": self.tokens}


def _is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds every file :func:`load_checkpoint` needs."""
    return ((directory / "trainer_state.pt").is_file() and (directory / "trainable.safetensors").is_file()
            and ((directory / OPTIMIZER_FILE).is_file() or (directory / DEEPSPEED_TAG).is_dir()))


def put_back(moved: Path, target: Path) -> bool:
    """Rename ``moved`` -- a complete copy that a swap moved aside before a kill -- back to ``target`` when
    ``target`` is missing (the caller checks completeness); returns whether it did. A rename that fails (another
    process put it back first, or the directory is read-only) is not an error: the caller reads what is there."""
    if target.exists():
        return False
    try:
        os.rename(moved, target)
    except OSError:
        return False
    fsync_dir(target.parent)
    return True


def _restore_displaced(root: Path) -> None:
    """Put back each ``.old-step-N`` whose ``step-N`` is missing: a run killed while swapping in a rewritten step
    leaves the complete previous copy there and no visible one."""
    for path in sorted(root.glob(".old-step-*")):
        match = _DISPLACED_DIR.match(path.name)
        if match is not None and not (root / match.group(1)).exists() and _is_complete(path):
            put_back(path, root / match.group(1))


def _remove_checkpoint(path: Path) -> None:
    """Delete a complete checkpoint; it goes hidden in one rename first, so a kill mid-way leaves no partial
    ``step-*`` (the hidden rest is deleted when the next run starts)."""
    hidden = path.with_name(f".del-{path.name}")
    shutil.rmtree(hidden, ignore_errors=True)
    os.rename(path, hidden)
    fsync_dir(path.parent)
    shutil.rmtree(hidden, ignore_errors=True)


def checkpoint_dirs(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints of a run, oldest first.

    A checkpoint that a killed run had moved aside to rewrite it (``.old-step-N`` without ``step-N``) is renamed
    back first, so it is listed and resumable."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    _restore_displaced(root)
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def checkpoint_step(directory: str | os.PathLike[str]) -> int:
    """The optimizer step a checkpoint directory holds, from its ``step-NNNNNNN`` name (nothing is loaded)."""
    match = _STEP_DIR.match(Path(directory).name)
    if match is None:
        raise ValueError(f"{directory} is not named like a training checkpoint (step-NNNNNNN)")
    return int(match.group(1))


def remove_partial_checkpoints(output_dir: str | os.PathLike[str]) -> None:
    """Delete the hidden directories a killed run left behind (half-written, half-deleted, or replaced), after
    putting back a checkpoint that was moved aside and never replaced; a ``step-*`` is never touched."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if root.is_dir():
        _restore_displaced(root)
        for path in root.glob(".*-step-*"):
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- RNG state
def rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------------------------------------- save / load
def save_checkpoint(
    output_dir: str | os.PathLike[str],
    strategy: Strategy,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
    recipe: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write the checkpoint of ``state.step`` of the model that ``strategy`` runs (every rank calls this) and prune old
    ones; returns its directory.

    Pruning keeps this checkpoint and the ``keep_last - 1`` latest others."""
    env = strategy.env
    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / f"step-{state.step:07d}"
    tmp = root / f".tmp-step-{state.step:07d}"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(env)
    weights = strategy.model_state(trainable_only=True)
    strategy.save_optimizer_state(optimizer, tmp)
    torch.save(rng_state(env.device), tmp / f"rng-rank{env.rank}.pt")
    if env.is_main:
        save_safetensors({k: v.contiguous() for k, v in weights.items()}, tmp / "trainable.safetensors")
        torch.save({"state": state.to_dict(), "scheduler": scheduler.state_dict(), "recipe": recipe,
                    "world_size": env.world_size}, tmp / "trainer_state.pt")
    barrier(env)
    if env.is_main:
        fsync_tree(tmp)
        if final.exists():  # the same step written again after a resume from an earlier one
            # A directory cannot be renamed over a non-empty one: the old copy steps aside for a moment. A kill
            # between the two renames leaves it complete under .old-, and checkpoint_dirs puts it back.
            stale = root / f".old-step-{state.step:07d}"
            shutil.rmtree(stale, ignore_errors=True)
            os.rename(final, stale)
            fsync_dir(root)
            os.rename(tmp, final)
            fsync_dir(root)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.rename(tmp, final)
            fsync_dir(root)
        # The checkpoint just written always stays, even when a run resumed from an earlier step finds later ones
        # of the abandoned run: ordered by step alone, those would push it out.
        others = [d for d in checkpoint_dirs(output_dir) if d != final]
        for old in others[:max(0, len(others) - (keep_last - 1))]:
            _remove_checkpoint(old)
    barrier(env)
    return final


def load_checkpoint(
    directory: str | os.PathLike[str],
    strategy: Strategy,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainerState:
    """Restore the model that ``strategy`` runs, the optimizer, the scheduler and this rank's RNG from
    ``directory``; returns the trainer state."""
    env = strategy.env
    directory = Path(directory)
    if not (directory / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"{directory} is not a complete owl2 training checkpoint (no trainer_state.pt)")
    meta = torch.load(directory / "trainer_state.pt", weights_only=True)
    strategy.load_trainable_state(load_file(str(directory / "trainable.safetensors")))
    strategy.load_optimizer_state(optimizer, directory)
    scheduler.load_state_dict(meta["scheduler"])
    # The scheduler sets the groups' rates only when it steps; the rates of the step being resumed come from it.
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    rng_file = directory / f"rng-rank{env.rank}.pt"
    if rng_file.is_file() and meta["world_size"] == env.world_size:
        set_rng_state(torch.load(rng_file, weights_only=True), env.device)
    return TrainerState(**meta["state"])
