"""DeQA-Score's soft-label loss: a KL divergence at the level word, next to the usual next-token cross-entropy.

A sample with a soft label (:mod:`owl2.data.quality`, batched by :func:`owl2.data.collate`) has a target distribution
``t`` over the rating levels (best first) and the position of its level word. The model's distribution there is the
softmax over the *whole* vocabulary of the logits one position earlier (where the level word is predicted), and the
loss is ``KL(t || q) = sum_i t_i (log t_i - log q[level_id_i])``: ``t`` is zero outside the level ids, so only they
enter the sum, while the softmax still pushes every other token down. DeQA-Score computes the same thing with
``F.kl_div(log_softmax, target, reduction="batchmean")`` over a ``[B, V]`` target that holds ``t`` at the level ids.

With the loss on, the level word is taken out of the cross-entropy (DeQA-Score drops it from the next-token loss too,
so the one-hot level does not fight the soft one): :func:`mask_level_words`. The trainer then minimises
``ce_weight * CE + soft_label_weight * KL``, each averaged over its own count (target tokens, soft-labelled samples)
across the whole global step (:mod:`owl2.training.trainer`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from owl2.constants import IGNORE_INDEX

__all__ = ["SOFT_LABEL_KEYS", "mask_level_words", "soft_label_kl"]

SOFT_LABEL_KEYS = ("soft_labels", "level_ids", "level_positions")
"""The batch entries :func:`owl2.data.collate` adds for soft-labelled samples (the model does not take them)."""


def mask_level_words(labels: torch.Tensor, level_positions: torch.Tensor) -> torch.Tensor:
    """``labels`` with the level word of each soft-labelled row (``level_positions >= 0``) set to ignored."""
    rows = torch.nonzero(level_positions >= 0).flatten()
    masked = labels.clone()
    masked[rows, level_positions[rows]] = IGNORE_INDEX
    return masked


def soft_label_kl(logits: torch.Tensor, soft_labels: torch.Tensor, level_ids: torch.Tensor,
                  level_positions: torch.Tensor) -> torch.Tensor:
    """``sum over soft-labelled rows of KL(t || q)`` in float32 (a sum, for normalising over a global step).

    ``logits`` ``[B, T, V]``; ``soft_labels`` ``[B, L]``; ``level_ids`` ``[B, L]``; ``level_positions`` ``[B]``, the
    level word's index in the sequence (-1: no soft label, the row is left out).
    """
    rows = torch.nonzero(level_positions >= 0).flatten()
    if rows.numel() == 0:
        return logits.new_zeros((), dtype=torch.float32)
    if bool((level_positions[rows] < 1).any()):
        raise ValueError("a level word at position 0 has no position that predicts it")
    predicting = logits[rows, level_positions[rows] - 1].float()  # [R, V]: the logits that predict the level word
    log_q = F.log_softmax(predicting, dim=-1).gather(1, level_ids[rows])
    target = soft_labels[rows].float()
    # xlogy gives 0 log 0 = 0, as kl_div does for zero targets.
    return (torch.xlogy(target, target) - target * log_q).sum()
