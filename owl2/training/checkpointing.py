"""Resumable training checkpoints, written so that a crash at any moment leaves the previous ones intact.

A checkpoint is a directory ``<output_dir>/checkpoints/step-0000123/`` holding

* ``trainable.safetensors``: the trainable parameters (frozen ones come back from the starting model);
* ``optimizer.pt``: the optimizer state (gathered to full tensors under FSDP); under DeepSpeed, ``deepspeed/``
  holds the engine's own checkpoint (partitioned optimizer state) instead;
* ``trainer_state.pt``: step, data position (epoch and mega-batch index), scheduler state, recipe;
* ``rng-rank<r>.pt``: each process's random-number state (torch, CUDA, numpy, Python).

Everything is first written to a hidden ``.tmp-step-...`` directory, flushed to disk, and then renamed to its final
name in one step, so a directory named ``step-*`` is always complete. Only the newest ``keep_last`` are kept.
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
from safetensors.torch import load_file, save_file
from torch import nn

from owl2.training.distributed import DistEnv, barrier, unwrap

CHECKPOINTS_DIR = "checkpoints"
DEEPSPEED_TAG = "deepspeed"
_STEP_DIR = re.compile(r"^step-(\d+)$")


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


def checkpoint_dirs(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
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
    """Delete the hidden directories a killed run left half-written (never a complete ``step-*``)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if root.is_dir():
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


# --------------------------------------------------------------------------------------------- model/optimizer
def _is_sharded(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def model_state(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Full CPU tensors of the model's state (only its trainable parameters with ``trainable_only``), gathered from
    the shards under FSDP (a collective there: call it on every rank; only rank 0 gets the tensors)."""
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        return get_model_state_dict(model, options=options)
    inner = unwrap(model)
    if trainable_only:
        return {name: p.detach().cpu().clone() for name, p in inner.named_parameters() if p.requires_grad}
    return {name: tensor.detach().cpu() for name, tensor in inner.state_dict().items()}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    params = dict(unwrap(model).named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unknown[:5]} "
                         "(was it written by a run with another recipe?)")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, optimizer, options=options)
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


# ------------------------------------------------------------------------------------------------- save / load
def _is_deepspeed(model: nn.Module) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def save_checkpoint(
    output_dir: str | os.PathLike[str],
    env: DistEnv,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
    recipe: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write the checkpoint of ``state.step`` (every rank calls this) and prune old ones; returns its directory."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / f"step-{state.step:07d}"
    tmp = root / f".tmp-step-{state.step:07d}"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(env)
    weights = model_state(model, trainable_only=True)
    if _is_deepspeed(model):  # ZeRO partitions the optimizer state: every rank writes its part
        model.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
        optim = None
    else:
        optim = optimizer_state(model, optimizer)
    torch.save(rng_state(env.device), tmp / f"rng-rank{env.rank}.pt")
    if env.is_main:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
        if optim is not None:
            torch.save(optim, tmp / "optimizer.pt")
        torch.save({"state": state.to_dict(), "scheduler": scheduler.state_dict(), "recipe": recipe,
                    "world_size": env.world_size}, tmp / "trainer_state.pt")
    barrier(env)
    if env.is_main:
        _fsync_tree(tmp)
        if final.exists():  # the same step written again after a resume: swap, never leave neither
            stale = root / f".old-step-{state.step:07d}"
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
            tmp.rename(final)
            shutil.rmtree(stale)
        else:
            tmp.rename(final)
        for old in checkpoint_dirs(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def load_checkpoint(
    directory: str | os.PathLike[str],
    env: DistEnv,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainerState:
    """Restore model, optimizer, scheduler and this rank's RNG from ``directory``; returns the trainer state."""
    directory = Path(directory)
    if not (directory / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"{directory} is not a complete owl2 training checkpoint (no trainer_state.pt)")
    meta = torch.load(directory / "trainer_state.pt", weights_only=True)
    load_trainable_state(model, load_file(str(directory / "trainable.safetensors")))
    if _is_deepspeed(model):
        if not (directory / DEEPSPEED_TAG).is_dir():
            raise ValueError(f"{directory} was not written by a DeepSpeed run; resume with the strategy that wrote it")
        model.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_module_strict=False)
    else:
        if not (directory / "optimizer.pt").is_file():
            raise ValueError(f"{directory} was written by a DeepSpeed run; resume with train.distributed='deepspeed'")
        load_optimizer_state(model, optimizer, torch.load(directory / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(meta["scheduler"])
    # The scheduler sets the groups' rates only when it steps; the rates of the step being resumed come from it.
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    rng_file = directory / f"rng-rank{env.rank}.pt"
    if rng_file.is_file() and meta["world_size"] == env.world_size:
        set_rng_state(torch.load(rng_file, weights_only=True), env.device)
    return TrainerState(**meta["state"])
