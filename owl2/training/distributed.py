"""Process groups and data-parallel strategies: one process (no wrapper), DDP, FSDP2 (``fully_shard``), DeepSpeed.

Launch with ``torchrun --nproc_per_node N -m owl2 train ...``: torchrun sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` and this module joins the group (NCCL on CUDA, gloo on the CPU). Every strategy sees the same global
batch: each rank takes its slice of the sampler's mega-batch, and gradients are averaged over ranks.

The trainer drives every strategy through one interface, :class:`Strategy` (made by :func:`make_strategy`): it wraps
the model, attaches the optimizer, runs each micro-batch's backward (holding the gradient sync back until the last
micro-batch of a step) and takes the optimizer step. It also holds what a training checkpoint
(:mod:`owl2.training.checkpointing`) needs to know about the strategy: how the trainable state is gathered and loaded,
how the optimizer state is written into a checkpoint directory and read back, and whether a directory was written by
a strategy of its kind. :class:`Strategy` itself is the one-process case; DDP and FSDP2 are below, DeepSpeed is in
:mod:`owl2.training.deepspeed`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from owl2.training.config import TrainConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device_obj = torch.device(device)
    if device_obj.type == "cuda":
        torch.cuda.set_device(device_obj)
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistEnv(device=device_obj)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_obj.type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device_obj)


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum ``value`` over ranks (a copy; unchanged with one process)."""
    value = value.detach().clone()
    if env.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def resolve_strategy(strategy: str, env: DistEnv) -> str:
    if strategy == "auto":
        return "ddp" if env.distributed else "none"
    if strategy == "none" and env.distributed:
        raise ValueError("train.distributed='none' cannot run under torchrun with several processes")
    return strategy


def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # Text-only batches leave the vision tower and the MAM's image branch without gradients.
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def wrap_fsdp(model: nn.Module, env: DistEnv) -> nn.Module:
    """Shard every decoder, ViT and abstractor layer, then the rest (FSDP2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    inner = model.base_model.model if hasattr(model, "base_model") else model  # peft-wrapped models
    for stack in (inner.model.layers, inner.model.vision_model.encoder.layers,
                  inner.model.visual_abstractor.encoder.layers):
        for layer in stack:
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP or DeepSpeed wrapper (FSDP2 shards in place and has no wrapper)."""
    return model.module if hasattr(model, "module") else model


# ---------------------------------------------------------------------------------------------------- strategies
OPTIMIZER_FILE = "optimizer.pt"
"""The optimizer state in a checkpoint directory, written by every strategy but DeepSpeed."""
DEEPSPEED_TAG = "deepspeed"
"""The directory of a checkpoint that holds the DeepSpeed engine's own checkpoint (its tag)."""

Diverged = Callable[[float, float], None]
"""Called with ``(loss, gradient norm)`` when either is not finite; raises."""


class Strategy:
    """One process, no wrapper: the interface every data-parallel strategy implements, and its plain case.

    Call :meth:`wrap` with the built model, then :meth:`attach_optimizer` with the optimizer and schedule built on
    :func:`unwrap` of it; from then on :attr:`model` is what the forward runs on (a wrapper or an engine). Each
    micro-batch of a step runs its forward and :meth:`backward` inside :meth:`no_sync`; :meth:`clip_and_step` ends
    the step.

    For checkpoints, :meth:`model_state`, :meth:`load_trainable_state`, :meth:`save_optimizer_state` and
    :meth:`load_optimizer_state` move the state between :attr:`model` (with the optimizer) and full CPU tensors or a
    checkpoint directory; every rank calls them, since gathering a sharded state is a collective."""

    name: ClassVar[str] = "none"

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self._model: nn.Module | None = None

    @property
    def model(self) -> nn.Module:
        """The model as the strategy runs it (set by :meth:`wrap`)."""
        if self._model is None:
            raise RuntimeError("Strategy.wrap has not been called")
        return self._model

    def wrap(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        """Take the built model (its trainable parameters set, on this rank's device) of the recipe ``config`` and
        return it wrapped."""
        self._model = model
        return model

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, scheduler: Any,
                         config: TrainConfig) -> tuple[Any, Any]:
        """The ``(optimizer, scheduler)`` the steps use, given those built on the unwrapped model and the recipe
        ``config`` as it runs (its batch layout fitted to the data)."""
        return optimizer, scheduler

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward: gradients are synchronised over ranks only when
        ``last`` (the step's last micro-batch)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate the gradients of ``loss`` (a scalar already normalised over the global step)."""
        loss.backward()

    def clip_and_step(self, optimizer: Any, scheduler: Any, clip: float, loss_value: float,
                      diverged: Diverged) -> float:
        """Clip the gradients to the norm ``clip`` (0: no clipping), update, advance the schedule and zero the
        gradients; returns the gradient norm before clipping. Calls ``diverged`` first, without updating, when the
        step's loss (``loss_value``) or the norm is not finite."""
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2: the norm over all shards
            norm = norm.full_tensor()
        norm = float(norm)
        if not (math.isfinite(loss_value) and math.isfinite(norm)):
            diverged(loss_value, norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    # ------------------------------------------------------------------------------------------- checkpoints
    def model_state(self, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """Full CPU tensors of the model's state by parameter name (only its trainable parameters with
        ``trainable_only``); only rank 0 is sure to get them."""
        inner = unwrap(self.model)
        if trainable_only:
            return {name: p.detach().cpu().clone() for name, p in inner.named_parameters() if p.requires_grad}
        return {name: tensor.detach().cpu() for name, tensor in inner.state_dict().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` (as :meth:`model_state` with ``trainable_only`` gives it) into the model; it must name
        every trainable parameter and nothing the model lacks."""
        params = dict(unwrap(self.model).named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state]
        unknown = [n for n in state if n not in params]
        if missing or unknown:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unknown[:5]} "
                             "(was it written by a run with another recipe?)")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def wrote_checkpoint(self, directory: Path) -> bool:
        """Whether the optimizer state in the checkpoint ``directory`` is in this strategy's form."""
        return (directory / OPTIMIZER_FILE).is_file()

    def save_optimizer_state(self, optimizer: Any, directory: Path) -> None:
        """Write ``optimizer``'s state into the checkpoint directory ``directory`` (which rank 0 created)."""
        state = self._optimizer_state(optimizer)
        if self.env.is_main:
            torch.save(state, directory / OPTIMIZER_FILE)

    def load_optimizer_state(self, optimizer: Any, directory: Path) -> None:
        """Restore ``optimizer``'s state from the checkpoint ``directory``; refuses one that another kind of
        strategy wrote."""
        if not self.wrote_checkpoint(directory):
            raise ValueError(f"{directory} was written by a DeepSpeed run; resume with train.distributed='deepspeed'")
        self._load_optimizer(optimizer, torch.load(directory / OPTIMIZER_FILE, weights_only=True))

    def _optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def _load_optimizer(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)


class DdpStrategy(Strategy):
    """DistributedDataParallel: gradients are all-reduced in the backward of the step's last micro-batch."""

    name = "ddp"

    def wrap(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        return super().wrap(wrap_ddp(model, self.env), config)

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.model.no_sync()


class FsdpStrategy(Strategy):
    """FSDP2: each layer's parameters are sharded over the ranks; gradients are reduce-scattered at the step's last
    micro-batch."""

    name = "fsdp"

    def wrap(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        if config.lora.enabled:
            raise ValueError("LoRA trains few parameters: use train.distributed='ddp' rather than fsdp")
        return super().wrap(wrap_fsdp(model, self.env), config)

    @contextlib.contextmanager
    def no_sync(self, last: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(last)
        yield

    # Checkpoints hold full tensors, gathered from the shards, so a run resumes under any number of processes.
    def model_state(self, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        return get_model_state_dict(self.model, options=options)

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def _optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, optimizer, options=options)

    def _load_optimizer(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def make_strategy(distributed: str, env: DistEnv) -> Strategy:
    """The strategy that ``train.distributed`` (``distributed``) asks for in this launch (see
    :func:`resolve_strategy`); DDP and FSDP2 in one process fall back to no wrapper, which would only add
    overhead."""
    name = resolve_strategy(distributed, env)
    if name == "deepspeed":
        from owl2.training.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(env)
    if name in ("ddp", "fsdp") and env.distributed:
        return (DdpStrategy if name == "ddp" else FsdpStrategy)(env)
    return Strategy(env)


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
