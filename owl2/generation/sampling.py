"""Decoding settings and the logits processing that turns one step's logits into the next token."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20
"""The most alternatives a step reports (OpenAI's ``top_logprobs`` limit)."""

SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1
"""The seeds a generator takes (``torch.Generator.manual_seed``: a negative seed is taken modulo 2**64)."""


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    ``temperature`` 0 means greedy (argmax; ``top_p``/``top_k``/``seed`` are then unused); any positive
    temperature, however small, samples without overflow (a tiny one picks the best token, as greedy would).
    ``top_k`` 0 and ``top_p`` 1.0 disable those filters. ``seed`` is an integer in [-2**63, 2**64 - 1].
    ``repetition_penalty`` > 1 discourages ids already in the prompt or the output (the CTRL / transformers rule:
    positive logits are divided by it, negative ones multiplied).
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
    id's only). Computed from the model's distribution before any processing (``min_new_tokens``, penalties,
    temperature, top-k/top-p), as vLLM does."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        # written so that NaN fails each check (every comparison with NaN is false)
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}")
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
    """``logits`` [V] float32; ``previous`` [n] ids seen so far. The result stays finite where ``logits`` is: a
    tiny penalty would otherwise divide a positive logit to +inf, and +inf minus +inf is NaN downstream."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    seen = logits[previous]
    logits = logits.clone()
    largest = torch.finfo(logits.dtype).max
    logits[previous] = torch.where(seen > 0, seen / penalty, seen * penalty).clamp(-largest, largest)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the ``top_k`` best and outside the smallest set whose probability reaches
    ``top_p`` (the best token always stays, however small ``top_p``)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # mass before this token already >= top_p
        # cumsum minus itself is not exactly 0 for the best token: with a tiny top_p it could drop every token
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor, params: SamplingParams, previous: torch.Tensor, generator: torch.Generator | None
) -> int:
    """Pick the next id from one row's float32 ``logits`` [V] (finite, or -inf where a token is masked).

    The logits are shifted so that the best is 0 before dividing by the temperature: every scaled logit is then
    <= 0, so no positive temperature overflows to inf or NaN (``1e-300`` gives the best token all the mass). Raises
    ``ValueError`` when every token is masked."""
    logits = apply_repetition_penalty(logits, previous, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    best = logits.max()
    if not torch.isfinite(best):
        raise ValueError("no token can be sampled: every logit is -inf or NaN")
    # in float64: a float32 tensor divided by 1e-300 would see the temperature rounded to 0, and 0 / 0 is NaN
    scaled = ((logits - best).double() / params.temperature).float()
    logits = filter_top_k_top_p(scaled, params.top_k, params.top_p)
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
