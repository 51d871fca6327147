"""The data-parallel strategy interface in one process: which strategy a recipe gets, and one plain step."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from owl2.training.distributed import DistEnv, Strategy, make_strategy


@pytest.mark.parametrize("distributed", ["auto", "none", "ddp", "fsdp"])
def test_one_process_runs_without_a_wrapper(distributed):
    strategy = make_strategy(distributed, DistEnv())
    assert type(strategy) is Strategy and strategy.name == "none"
    model = nn.Linear(2, 1)
    assert strategy.wrap(model, config=None) is model and strategy.model is model


def test_none_under_several_processes_is_refused():
    with pytest.raises(ValueError, match="cannot run under torchrun"):
        make_strategy("none", DistEnv(rank=0, world_size=2))


def _one_step(loss_scale: float) -> tuple[nn.Linear, torch.Tensor, list[tuple[float, float]]]:
    """One micro-batch and the step through the plain strategy; ``(model, weight before, diverged calls)``."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    strategy = Strategy(DistEnv())
    strategy.wrap(model, config=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = model.weight.detach().clone()
    with strategy.no_sync(last=True):
        loss = model(torch.ones(1, 3)).sum() * loss_scale
        strategy.backward(loss, last=True)
    seen: list[tuple[float, float]] = []

    def diverged(loss_value: float, norm: float) -> None:
        seen.append((loss_value, norm))
        raise RuntimeError("diverged")

    with contextlib.suppress(RuntimeError):
        strategy.clip_and_step(optimizer, scheduler, 1.0, float(loss.detach()), diverged)
    return model, before, seen


def test_plain_step_clips_updates_and_zeroes_the_gradients():
    model, before, seen = _one_step(10.0)
    assert not seen and not torch.equal(model.weight, before)
    assert all(p.grad is None for p in model.parameters())
    # Clipped to norm 1: with SGD at lr 0.1 no weight moves by more than 0.1.
    assert float((model.weight.detach() - before).abs().max()) <= 0.1 + 1e-6


def test_a_step_with_a_non_finite_loss_reports_and_does_not_update():
    model, before, seen = _one_step(float("nan"))
    assert len(seen) == 1 and torch.equal(model.weight, before)
