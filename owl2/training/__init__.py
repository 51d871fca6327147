"""Training: stage freezing, the paper's optimizer and schedule (the trainer comes with issue 4)."""

from owl2.training.optim import (
    STAGES,
    OptimConfig,
    build_optimizer,
    build_scheduler,
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
    "is_trainable_in",
    "lr_multiplier",
    "param_groups",
    "set_trainable",
]
