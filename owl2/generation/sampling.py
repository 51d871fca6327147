"""Decoding settings and the batched logits processing that turns one step's logits [B, V] into the next ids."""

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


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """The CTRL rule on every row at once: ``logits`` [N, V] float32, ``seen`` [N, V] bool (ids in the prompt or
    the output), ``penalty`` [N] -> new logits [N, V]. The result stays finite where ``logits`` is: a tiny penalty
    would otherwise divide a positive logit to +inf, and +inf minus +inf is NaN downstream."""
    penalty = penalty.to(logits.dtype)[:, None]
    largest = torch.finfo(logits.dtype).max
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty).clamp(-largest, largest)
    return torch.where(seen, penalised, logits)


_CANDIDATES = 64
"""Best tokens per row that top-k and top-p look at on a CPU before sorting the whole vocabulary: the kept set is
almost always among them, and a CPU sort of 32000 logits per row costs more than everything else of a step."""


def filtered_distribution(
    logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int], top_p: Sequence[float]
) -> torch.Tensor:
    """The sampling distribution of every row: ``logits`` [N, V] float32 (finite, or -inf where a token is masked)
    and each row's ``temperature`` (> 0), ``top_k`` (0: off) and ``top_p`` (1: off) -> ``probs`` [N, V] float64, in
    vocabulary order, unnormalised: the softmax over the tokens ``top_k`` keeps, 0 for every token filtered out.

    ``top_k`` keeps the k best tokens (and any tied with the k-th); ``top_p`` then keeps the smallest set, best
    first (ties by id), whose probability under that softmax reaches ``top_p`` (the best token always stays, however
    small ``top_p``). The logits are shifted so that the best is 0 and divided by the temperature in float64: every
    scaled logit is then <= 0, so no positive temperature overflows (``1e-300`` gives the best token all the mass);
    a float32 division would see such a temperature rounded to 0, and 0 / 0 is NaN. A row whose logits are all
    -inf comes out NaN (see :func:`inverse_cdf_pick`)."""
    device = logits.device
    vocab = logits.shape[-1]
    best = logits.max(-1, keepdim=True).values
    scaled = (logits - best).double() / torch.tensor(temperature, dtype=torch.float64, device=device)[:, None]
    k_on = [0 < k < vocab for k in top_k]
    p_on = [p < 1 for p in top_p]
    if not any(k_on) and not any(p_on):
        return scaled.softmax(-1)
    # the best tokens of every row, in order, ties by id: the whole row on a GPU, where sorting is cheap, else the
    # best few (one partial sort); rows where those cannot settle the cut are sorted whole below
    partial = device.type == "cpu"
    width = min(vocab, max([_CANDIDATES, *(k for k, on in zip(top_k, k_on, strict=True) if on)])) if partial else vocab
    values, ids = _best(scaled, width)
    ks = torch.tensor([k if on else 1 for k, on in zip(top_k, k_on, strict=True)], device=device)
    kth = torch.where(torch.tensor(k_on, device=device)[:, None], values.gather(-1, ks[:, None] - 1), float("-inf"))
    probs = scaled.masked_fill(scaled < kth, float("-inf")).softmax(-1)
    if not any(p_on):
        return probs
    limit = torch.tensor(top_p, dtype=torch.float64, device=device)
    cut, settled = _top_p_cut(probs.gather(-1, ids), values, limit)
    last_value, last_id = values.gather(-1, cut), ids.gather(-1, cut)
    if width < vocab and not bool(settled.all()):  # a CPU tensor: reading it is no device transfer
        rows = (~settled).nonzero()[:, 0]
        all_values, all_ids = _best(scaled[rows], vocab)
        cut = _top_p_cut(probs[rows].gather(-1, all_ids), all_values, limit[rows])[0]
        last_value, last_id = last_value.clone(), last_id.clone()
        last_value[rows], last_id[rows] = all_values.gather(-1, cut), all_ids.gather(-1, cut)
    positions = torch.arange(vocab, device=device)
    kept = (scaled > last_value) | ((scaled == last_value) & (positions <= last_id))
    kept |= ~torch.tensor(p_on, device=device)[:, None]
    return probs.masked_fill(~kept, 0.0)


def _best(scaled: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``width`` best values of every row of ``scaled`` [N, V] and their ids [N, width], best first and tied
    values by id (as one stable sort of the row would order them, within the best ``width``)."""
    if width == scaled.shape[-1]:
        return scaled.sort(dim=-1, descending=True, stable=True)
    values, ids = scaled.topk(width, dim=-1)
    ids, by_id = ids.sort(-1)
    values, by_value = values.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(-1, by_value)


def _top_p_cut(
    sorted_probs: torch.Tensor, sorted_values: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Over each row's best tokens in order (``sorted_probs``, ``sorted_values`` [N, C]): the index [N, 1] of the
    last token top-p keeps, and whether that is the row's cut [N] bool: the first token dropped lies among them,
    strictly above their last value, so no token outside them (all at or below it) can come first."""
    mass_before = sorted_probs.cumsum(-1)
    mass_before = torch.cat([torch.zeros_like(mass_before[:, :1]), mass_before[:, :-1]], -1)
    kept = mass_before < top_p[:, None]
    kept[:, 0] = True  # the best token always stays
    count = kept.sum(-1, keepdim=True)
    width = sorted_probs.shape[-1]
    first_dropped = sorted_values.gather(-1, count.clamp(max=width - 1))
    settled = (count < width) & (first_dropped > sorted_values[:, -1:])
    return count - 1, settled[:, 0]


def inverse_cdf_pick(probs: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw per row: ``probs`` [N, V] from :func:`filtered_distribution`, ``uniform`` [N] in [0, 1) float64 ->
    the ids [N] and whether each row could be sampled [N] bool (False when its probabilities are NaN or sum to 0).
    The draw is the first id whose cumulative mass exceeds ``uniform`` times the row's kept mass, so a row's id
    depends only on its own logits, settings and uniform, never on the rest of the batch."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    position = torch.searchsorted(cdf, uniform[:, None] * total, right=True)
    # uniform * total can round up to total, past the last kept id
    vocab = probs.shape[-1]
    last_kept = vocab - 1 - (probs > 0).flip(-1).to(torch.uint8).argmax(-1, keepdim=True)
    position = torch.minimum(position, last_kept)
    valid = torch.isfinite(total[:, 0]) & (total[:, 0] > 0)
    return position[:, 0], valid


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator
