"""Process groups and data-parallel wrappers: one process (no wrapper), DDP, FSDP2 (``fully_shard``), DeepSpeed.

Launch with ``torchrun --nproc_per_node N -m owl2 train ...``: torchrun sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` and this module joins the group (NCCL on CUDA, gloo on the CPU). Every strategy sees the same global
batch: each rank takes its slice of the sampler's mega-batch, and gradients are averaged over ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


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


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
