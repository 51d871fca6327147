"""DeepSpeed ZeRO as an alternative engine (``train.distributed = "deepspeed"``; needs ``pip install deepspeed``).

The recipe's optimizer (AdamW with owl2's parameter groups) and schedule are handed to DeepSpeed as client objects,
so the learning rates, layer-wise decay and warm-up/cosine schedule are the same as with DDP or FSDP2. The JSON
config (``train.deepspeed_config``, default ``recipes/zero2.json``) chooses the ZeRO stage; owl2 fills in the batch
sizes, accumulation and clipping from the recipe so the two cannot disagree. The loss is already normalised over the
global batch, so it is passed to ``engine.backward`` without DeepSpeed's division by the accumulation steps.
:class:`DeepSpeedStrategy` is the engine behind the trainer's :class:`~owl2.training.distributed.Strategy` interface;
in a training checkpoint the engine's own checkpoint (the partitioned optimizer state) takes the place of
``optimizer.pt``, under ``deepspeed/``.
ZeRO stages 1 and 2 are supported; stage 3 partitions the parameters themselves, which owl2's checkpoints do not
gather, and is refused.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from owl2.training.config import RECIPES_DIR, TrainConfig
from owl2.training.distributed import DEEPSPEED_TAG, DistEnv, Diverged, Strategy

DEFAULT_CONFIG = RECIPES_DIR / "zero2.json"


def deepspeed_config(config: TrainConfig, env: DistEnv) -> dict[str, Any]:
    """The DeepSpeed JSON config of a recipe, with the batch layout and clipping taken from the recipe."""
    path = Path(config.train.deepspeed_config) if config.train.deepspeed_config else DEFAULT_CONFIG
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"train.deepspeed_config {path}: cannot read a JSON config ({exc})") from None
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(f"{path}: ZeRO stage {stage} is not supported (use 1 or 2, or train.distributed='fsdp' "
                         "to shard parameters)")
    if ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled"):
        raise ValueError(f"{path}: keep DeepSpeed's bf16/fp16 off; owl2 uses autocast (train.bf16) with float32 "
                         "master weights")
    micro, accum = config.train.batch_size, config.train.grad_accum
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
              train_batch_size=micro * accum * env.world_size, gradient_clipping=config.optim.grad_clip)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def deepspeed_engine(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, config: TrainConfig,
                     env: DistEnv) -> tuple[Any, Any, Any]:
    """``deepspeed.initialize`` with owl2's optimizer and schedule; returns (engine, optimizer, scheduler)."""
    try:
        import deepspeed
    except ImportError:
        raise ImportError("train.distributed='deepspeed' needs DeepSpeed: pip install deepspeed") from None
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config, env),
    )
    return engine, ds_optimizer, ds_scheduler


class DeepSpeedStrategy(Strategy):
    """The DeepSpeed engine: it takes the model's place once the optimizer is attached, runs the backward, and at
    the step's last micro-batch clips (``gradient_clipping``), updates, zeroes the gradients and advances the
    schedule itself."""

    name = "deepspeed"

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, scheduler: Any,
                         config: TrainConfig) -> tuple[Any, Any]:
        self._model, optimizer, scheduler = deepspeed_engine(self.model, optimizer, scheduler, config, self.env)
        return optimizer, scheduler

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine knows the accumulation boundary from its micro-step count

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # already normalised over the global step
        if not last:
            self.model.step()  # only counts the micro-batch; the update happens at the last one

    def clip_and_step(self, optimizer: Any, scheduler: Any, clip: float, loss_value: float,
                      diverged: Diverged) -> float:
        # The engine clips to the gradient_clipping its config got from the recipe, and computes the norm inside its
        # step, so only the loss can be checked before the update.
        if not math.isfinite(loss_value):
            diverged(loss_value, float("nan"))
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def wrote_checkpoint(self, directory: Path) -> bool:
        return (directory / DEEPSPEED_TAG).is_dir()

    def save_optimizer_state(self, optimizer: Any, directory: Path) -> None:
        # ZeRO partitions the optimizer state: every rank writes its part. The trainable weights are saved apart
        # (trainable.safetensors), so the engine leaves out the frozen ones.
        self.model.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, save_latest=False,
                                   exclude_frozen_parameters=True)

    def load_optimizer_state(self, optimizer: Any, directory: Path) -> None:
        if not self.wrote_checkpoint(directory):
            raise ValueError(f"{directory} was not written by a DeepSpeed run; resume with the strategy that wrote it")
        self.model.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_module_strict=False)
