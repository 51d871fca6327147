"""Training: stage freezing, the paper's optimizer and schedule, and the parameter groups; the trainer is in
:mod:`owl2.training.trainer`, its strategies in :mod:`owl2.training.distributed`."""

from owl2.training.optim import (
    STAGES,
    OptimConfig,
    build_optimizer,
    build_scheduler,
    group_parameters,
    is_trainable_in,
    lr_multiplier,
    param_groups,
    set_trainable,
)

__all__ = [
    "STAGES",
    "OptimConfig",
    "build_optimizer",
    "build_scheduler",
    "group_parameters",
    "is_trainable_in",
    "lr_multiplier",
    "param_groups",
    "set_trainable",
]
