"""Decoding settings and the logits processing that turns one step's logits into the next token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20
"""The most alternatives a step reports (OpenAI's ``top_logprobs`` limit)."""


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    ``temperature`` 0 means greedy (argmax; ``top_p``/``top_k``/``seed`` are then unused). ``top_k`` 0 and
    ``top_p`` 1.0 disable those filters. ``repetition_penalty`` > 1 discourages ids already in the prompt or the
    output (the CTRL / transformers rule: positive logits are divided by it, negative ones multiplied).
    Generation ends at the first of: an id in ``stop_token_ids`` (default: the tokenizer's EOS), a ``stop`` string
    (removed from the returned text), or ``max_new_tokens``; stop ids are masked out of the first
    ``min_new_tokens`` steps (transformers' ``min_new_tokens``).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    stop_token_ids: Sequence[int] | None = None
    min_new_tokens: int = 0
    """The stop ids cannot be chosen before this many new tokens (the official captioning uses 8)."""
    logprobs: int | None = None
    """Report the chosen id's log-probability and this many top alternatives per step (None: none; 0: the chosen
    id's only). Computed from the model's distribution before temperature and filtering, as vLLM does."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """``logits`` [V] float32; ``previous`` [n] ids seen so far."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    seen = logits[previous]
    logits = logits.clone()
    logits[previous] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the ``top_k`` best and outside the smallest set whose probability reaches
    ``top_p`` (the best token always stays)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor, params: SamplingParams, previous: torch.Tensor, generator: torch.Generator | None
) -> int:
    """Pick the next id from one row's float32 ``logits`` [V]."""
    logits = apply_repetition_penalty(logits, previous, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator
