"""The data-parallel strategy interface in one process: which strategy a recipe gets, one plain step, and a
checkpoint written and read back through the strategy."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from owl2.training.checkpointing import TrainerState, load_checkpoint, save_checkpoint
from owl2.training.deepspeed import DeepSpeedStrategy
from owl2.training.distributed import DEEPSPEED_TAG, OPTIMIZER_FILE, DistEnv, Strategy, make_strategy


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


# ------------------------------------------------------------------------------------------------- checkpoints
class _TwoLayers(nn.Module):
    """A trainable layer and a frozen one: checkpoints hold only the trainable parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.trained = nn.Linear(3, 4)
        self.frozen = nn.Linear(4, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(torch.tanh(self.trained(x)))


def _setup(seed: int) -> tuple[Strategy, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    strategy = Strategy(DistEnv())
    model = strategy.wrap(_TwoLayers(), config=None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return strategy, optimizer, scheduler


def _step(strategy: Strategy, optimizer: torch.optim.Optimizer, scheduler: Any, x: torch.Tensor) -> None:
    with strategy.no_sync(last=True):
        strategy.backward(strategy.model(x).square().sum(), last=True)
    strategy.clip_and_step(optimizer, scheduler, 0.0, 0.0, lambda loss, norm: None)


def test_checkpoint_round_trip_through_the_strategy_resumes_exactly(tmp_path):
    strategy, optimizer, scheduler = _setup(0)
    data = torch.randn(4, 2, 3)
    for x in data[:2]:
        _step(strategy, optimizer, scheduler, x)
    directory = save_checkpoint(tmp_path, strategy, optimizer, scheduler, TrainerState(step=2, tokens=7), {"r": 1},
                                keep_last=2)
    assert strategy.wrote_checkpoint(directory) and (directory / OPTIMIZER_FILE).is_file()
    assert not (directory / DEEPSPEED_TAG).exists()
    assert set(load_file(str(directory / "trainable.safetensors"))) == {"trained.weight", "trained.bias"}

    # Another initialisation (its frozen layer the same, as a resumed run rebuilds it from the starting model)
    resumed, resumed_optimizer, resumed_scheduler = _setup(1)
    resumed.model.frozen.load_state_dict(strategy.model.frozen.state_dict())
    assert not torch.equal(resumed.model.trained.weight, strategy.model.trained.weight)
    state = load_checkpoint(directory, resumed, resumed_optimizer, resumed_scheduler)
    assert state == TrainerState(step=2, tokens=7)
    assert resumed_scheduler.last_epoch == 2 and resumed_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 3)
    for name, value in strategy.model_state().items():
        assert torch.equal(resumed.model_state()[name], value), name
    for x in data[2:]:
        _step(strategy, optimizer, scheduler, x)
        _step(resumed, resumed_optimizer, resumed_scheduler, x)
    for name, value in strategy.model_state(trainable_only=True).items():
        assert torch.equal(resumed.model_state(trainable_only=True)[name], value), name


def test_the_strategy_refuses_a_checkpoint_of_another_kind(tmp_path):
    strategy, optimizer, scheduler = _setup(0)
    plain = save_checkpoint(tmp_path, strategy, optimizer, scheduler, TrainerState(step=1), {}, keep_last=2)
    deepspeed = DeepSpeedStrategy(DistEnv())
    assert not deepspeed.wrote_checkpoint(plain)
    with pytest.raises(ValueError, match="was not written by a DeepSpeed run"):
        deepspeed.load_optimizer_state(optimizer, plain)

    engine_written = tmp_path / "step-0000002"
    engine_written.mkdir()
    (engine_written / DEEPSPEED_TAG).mkdir()
    assert deepspeed.wrote_checkpoint(engine_written) and not strategy.wrote_checkpoint(engine_written)
    with pytest.raises(ValueError, match=r"written by a DeepSpeed run; resume with train\.distributed='deepspeed'"):
        strategy.load_optimizer_state(optimizer, engine_written)


def test_trainable_state_of_another_model_is_refused():
    strategy, _, _ = _setup(0)
    state = strategy.model_state(trainable_only=True)
    state["extra.weight"] = torch.zeros(1)
    del state["trained.bias"]
    with pytest.raises(ValueError, match=r"missing \['trained.bias'\], unexpected \['extra.weight'\]"):
        strategy.load_trainable_state(state)
