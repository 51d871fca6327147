"""The decoding core: the model calls of a decode loop and the one function that turns a step's logits into every
row's result.

Every decode loop of owl2 is built from these pieces: :meth:`GenerationEngine.iterate` (static batches), the
serving batcher (continuous batches) and :meth:`Owl2ForCausalLM.generate` (:func:`generate_ids`, the official
greedy algorithm). A step is :func:`prefill` or :func:`forward_step` (logits [B, V] float32), then
:func:`decode_rows`: the log-probabilities, the ``min_new_tokens`` mask, the repetition penalty, greedy picks and
temperature/top-k/top-p sampling run as batched tensor operations over the rows, each sampling row drawing from its
own generator (a seeded request gets the same ids alone or in any batch), and the chosen ids and log-probabilities
of the whole batch come to the host in one transfer. Only the text and stop handling is per row, on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from owl2.generation.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filtered_distribution,
    inverse_cdf_pick,
    make_generator,
)
from owl2.generation.streaming import TextStream
from owl2.model.cache import KVCache
from owl2.model.modeling import GenerateOutput

if TYPE_CHECKING:
    from owl2.generation.engine import GenerationRequest
    from owl2.model.modeling import Owl2ForCausalLM


@dataclass
class StepEvent:
    row: int
    token_id: int | None  # the id added to the output (None when the row ended on a stop id, which is not output)
    delta: str
    finish_reason: str | None  # set on the row's last event
    logprob: float | None = None  # log-probability of the chosen id (when the request asks for logprobs)
    top_logprobs: list[tuple[int, float]] | None = None  # the ``params.logprobs`` most likely ids and theirs


LOWEST_LOGPROB = -9999.0
"""What a log-probability of -inf (or NaN) is reported as: OpenAI's floor, and a number JSON can carry."""


def _finite_logprob(value: float) -> float:
    return value if value >= LOWEST_LOGPROB else LOWEST_LOGPROB  # NaN fails the comparison too


class RowDecoder:
    """The decoding state of one sequence: sampling settings, stop conditions, output budget and text stream.

    Shared by every decode loop (static and continuous batches), so all pick the same tokens and end rows the same
    way. The ids a repetition penalty looks at are kept as a mask [V] on the logits' device, made at the first step
    that needs it."""

    def __init__(self, request: GenerationRequest, decode: Callable[[list[int]], str], eos_ids: Sequence[int],
                 max_new_tokens: int, device: torch.device) -> None:
        params = request.params
        self.params: SamplingParams = params
        self.stream = TextStream(decode, params.stop)
        self.stop_ids = set(params.stop_token_ids if params.stop_token_ids is not None else eos_ids)
        self.generator = make_generator(params, device)
        self.prompt_ids = [int(t) for t in request.prompt_ids if t >= 0]
        self.max_new_tokens = max_new_tokens
        self.count = 0
        self.finished = False
        self._seen: torch.Tensor | None = None

    def masked_ids(self, vocab: int) -> list[int]:
        """The stop ids to mask this step: all of them while fewer than ``min_new_tokens`` were generated, none
        after. A stop id outside the vocabulary is skipped: the model can never pick it anyway."""
        if self.count < self.params.min_new_tokens:
            return [t for t in self.stop_ids if 0 <= t < vocab]
        return []

    def seen(self, vocab: int, device: torch.device) -> torch.Tensor:
        """Bool [V]: the ids of the prompt and of the output so far (what the repetition penalty applies to)."""
        if self._seen is None or self._seen.shape[0] != vocab:
            seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = [t for t in self.prompt_ids if t < vocab]
            if ids:
                seen[torch.tensor(ids, device=device)] = True
            self._seen = seen
        return self._seen

    def update_seen(self, seen: torch.Tensor) -> None:
        """Replace the mask of :meth:`seen` with ``seen`` [V] (the step's chosen id added on the device)."""
        self._seen = seen

    def uniform(self, device: torch.device) -> torch.Tensor:
        """This row's draw for the step: a float64 scalar in [0, 1) from its own generator, on ``device``."""
        assert self.generator is not None
        return torch.rand((), generator=self.generator, dtype=torch.float64,
                          device=self.generator.device).to(device, non_blocking=True)

    def emit(self, row: int, token: int, logprob: float | None = None,
             top: list[tuple[int, float]] | None = None) -> StepEvent:
        """Add ``token`` to the output; the event says what text it settled and whether the row is finished.
        ``logprob`` and ``top`` are the step's log-probabilities as :func:`decode_rows` reports them."""
        self.count += 1
        if token in self.stop_ids:
            self.finished = True
            return StepEvent(row, None, self.stream.finish(), "stop", logprob, top)
        delta = self.stream.push(token)
        if self.stream.stopped:
            reason: str | None = "stop"
        elif self.count >= self.max_new_tokens:
            reason, delta = "length", delta + self.stream.finish()
        else:
            reason = None
        self.finished = reason is not None
        return StepEvent(row, token, delta, reason, logprob, top)


# --------------------------------------------------------------------------------------------------- model calls
def prefill(model: Owl2ForCausalLM, batch: Mapping[str, torch.Tensor | None], cache: KVCache | None) -> torch.Tensor:
    """The prompt's forward (``batch``: the model's keyword inputs, ``input_ids`` [B, T] ...) -> the logits [B, V]
    float32 of each row's next token. ``cache`` (or None) receives the prompt's keys and values."""
    return model(**batch, cache=cache, logits_to_keep=1).logits[:, -1].float()


def forward_step(model: Owl2ForCausalLM, token_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One decode step: ``token_ids`` [B], one new id per row, after what ``cache`` holds -> logits [B, V] float32."""
    return model(token_ids[:, None], cache=cache, logits_to_keep=1).logits[:, -1].float()


def greedy_pick(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` [B, V] -> the best id of each row [B] (the first on a tie)."""
    return logits.argmax(-1)


# ---------------------------------------------------------------------------------------------------------- picks
@dataclass
class Pick:
    """A row's chosen id and, when the row asks for them, its log-probabilities (before any processing)."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


_NOTHING_TO_SAMPLE = "no token can be sampled: every logit is -inf or NaN"


def pick_tokens(
    rows: Sequence[RowDecoder], logits: torch.Tensor, *, logprobs: bool = True
) -> list[Pick | Exception | None]:
    """Choose the next id of every unfinished row from the step's float32 ``logits`` [B, V] (row i of the logits
    is ``rows[i]``'s; they are not changed). Finished rows get None; a row whose own settings or draw fail gets the
    exception in its place, and the other rows their picks as usual.

    All rows are processed together: the ``min_new_tokens`` mask, the repetition penalty, greedy argmax, and for
    the sampling rows :func:`filtered_distribution` and :func:`inverse_cdf_pick` with one uniform per row from the
    row's own generator. With ``logprobs``, the log-softmax of the raw logits gives each asking row its chosen id's
    log-probability and its top alternatives. The ids, the rows' sampling status and the log-probabilities reach
    the host in one transfer."""
    batch, vocab = logits.shape
    device = logits.device
    picks: list[Pick | Exception | None] = [None] * batch
    active: list[int] = []
    masked_rows: list[int] = []
    masked_ids: list[int] = []
    penalised: list[int] = []  # positions in ``active``
    penalties: list[float] = []
    sampled: list[int] = []  # positions in ``active``
    temperatures: list[float] = []
    top_ks: list[int] = []
    top_ps: list[float] = []
    uniforms: list[torch.Tensor] = []
    reported: list[int] = []  # per active row: alternatives reported, -1 for no log-probabilities
    for i, row in enumerate(rows):
        if row.finished:
            continue
        try:  # the row's own settings and generator: a failure here ends this row alone
            params = row.params
            penalty = float(params.repetition_penalty)
            masked = row.masked_ids(vocab)
            count = -1 if params.logprobs is None or not logprobs else min(int(params.logprobs), vocab)
            sample = not params.greedy
            if sample:
                setting = (float(params.temperature), int(params.top_k), float(params.top_p))
                uniform = row.uniform(device)
        except Exception as exc:
            picks[i] = exc
            continue
        position = len(active)
        active.append(i)
        reported.append(count)
        masked_rows += [position] * len(masked)
        masked_ids += masked
        if penalty != 1.0:
            penalised.append(position)
            penalties.append(penalty)
        if sample:
            sampled.append(position)
            temperatures.append(setting[0])
            top_ks.append(setting[1])
            top_ps.append(setting[2])
            uniforms.append(uniform)
    if not active:
        return picks

    raw = logits if len(active) == batch else logits[torch.tensor(active, device=device)]
    width = max(reported)
    work = raw
    if masked_ids:
        work = work.clone()
        work[torch.tensor(masked_rows, device=device), torch.tensor(masked_ids, device=device)] = float("-inf")
    seen = None
    if penalised:
        index = torch.tensor(penalised, device=device)
        seen = torch.stack([rows[active[p]].seen(vocab, device) for p in penalised])
        work = work.index_copy(0, index, apply_repetition_penalty(
            work[index], seen, torch.tensor(penalties, dtype=torch.float64, device=device)))
    chosen = greedy_pick(work)
    status = torch.zeros(len(active), dtype=torch.long, device=device)  # 0 ok, 1 all masked, 2 NaN probabilities
    if sampled:
        index = torch.tensor(sampled, device=device)
        subset = work[index]
        probs = filtered_distribution(subset, temperatures, top_ks, top_ps)
        drawn, valid = inverse_cdf_pick(probs, torch.stack(uniforms))
        chosen = chosen.index_copy(0, index, drawn)
        failure = torch.where(torch.isfinite(subset.max(-1).values), 2, 1)
        status = status.index_copy(0, index, torch.where(valid, 0, failure))
    if seen is not None:
        # the chosen ids join what the penalty looks at, on the device: no host round trip per row
        seen.scatter_(1, chosen[torch.tensor(penalised, device=device)][:, None], True)
        for j, p in enumerate(penalised):
            rows[active[p]].update_seen(seen[j])

    columns = [chosen[:, None].double(), status[:, None].double()]
    if width >= 0:
        full = raw.log_softmax(-1)
        columns.append(full.gather(-1, chosen[:, None]).double())
        if width > 0:
            values, ids = full.topk(width, dim=-1)
            columns += [ids.double(), values.double()]
    host = torch.cat(columns, 1).tolist()  # the step's one transfer: float64 holds every id and float32 exactly

    for position, i in enumerate(active):
        line = host[position]
        token, code = int(line[0]), int(line[1])
        if code:
            picks[i] = ValueError(_NOTHING_TO_SAMPLE if code == 1 else
                                  "no token can be sampled: the sampling probabilities are NaN or zero "
                                  f"(temperature {temperatures[sampled.index(position)]!r})")
            continue
        count = reported[position]
        logprob, top = None, None
        if count >= 0:
            logprob = _finite_logprob(line[2])
            if count > 0:
                ids, values = line[3:3 + width], line[3 + width:3 + 2 * width]
                top = [(int(t), _finite_logprob(v)) for t, v in zip(ids[:count], values[:count], strict=True)]
        picks[i] = Pick(token, logprob, top)
    return picks


def decode_rows(rows: Sequence[RowDecoder], logits: torch.Tensor) -> list[StepEvent | Exception | None]:
    """One decode step for every row: :func:`pick_tokens` on ``logits`` [B, V] float32, then each row's event
    (:meth:`RowDecoder.emit`: its text delta and whether it finished). A finished row gets None; a row whose
    sampling or text fails gets the exception, and its neighbours their events as usual."""
    results: list[StepEvent | Exception | None] = []
    for i, (row, pick) in enumerate(zip(rows, pick_tokens(rows, logits), strict=True)):
        if not isinstance(pick, Pick):
            results.append(pick)
            continue
        try:
            results.append(row.emit(i, pick.token, pick.logprob, pick.top))
        except Exception as exc:  # this row's own text: its neighbours still get their events
            results.append(exc)
    return results


# ------------------------------------------------------------------------------------------- the model's generate
@torch.inference_mode()
def generate_ids(
    model: Owl2ForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    *,
    image_embeds: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    cache: KVCache | None = None,
    return_dict: bool = False,
) -> torch.Tensor | GenerateOutput:
    """:meth:`Owl2ForCausalLM.generate`: greedy decoding of up to ``max_new_tokens`` new ids per row of the
    left-padded ``input_ids`` [B, T] -> [B, new] (``GenerateOutput`` with the per-step float32 logits
    [B, new, V] when ``return_dict``). A row that emits an id of ``eos_token_id`` is filled with ``pad_token_id``
    afterwards; decoding stops once every row has finished. ``cache`` reuses a preallocated :class:`KVCache`
    (reset first); ``use_cache=False`` runs the whole sequence again at every step, as the official code can."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    b, t = input_ids.shape
    device = model.device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate needs left-padded prompts: the last column of attention_mask has padding")
    if image_embeds is None and pixel_values is not None and pixel_values.shape[0] > 0:
        image_embeds = model.model.encode_images(pixel_values.to(device))
    eos = _as_id_tensor(eos_token_id, device)
    pad = pad_token_id if pad_token_id is not None else (model.config.pad_token_id or 0)
    if use_cache:
        if cache is None or not cache.fits(b, t + max_new_tokens, model.dtype, device):
            cache = model.new_cache(b, t + max_new_tokens)
        cache.reset()
    else:
        cache = None

    finished = torch.zeros(b, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    ids, mask = input_ids, attention_mask
    logits = prefill(model, {"input_ids": ids, "attention_mask": mask, "image_embeds": image_embeds}, cache)
    for step in range(max_new_tokens):
        next_ids = torch.where(finished, torch.full_like(finished, pad, dtype=torch.long), greedy_pick(logits))
        tokens.append(next_ids)
        scores.append(logits)
        if eos is not None:
            finished |= torch.isin(next_ids, eos)
            if bool(finished.all()):
                break
        if step == max_new_tokens - 1:
            break
        if cache is not None:
            logits = forward_step(model, next_ids, cache)
        else:
            ids = torch.cat([ids, next_ids[:, None]], 1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            logits = prefill(model, {"input_ids": ids, "attention_mask": mask, "image_embeds": image_embeds}, None)
    sequences = torch.stack(tokens, 1)
    if return_dict:
        return GenerateOutput(sequences=sequences, scores=torch.stack(scores, 1))
    return sequences


def _as_id_tensor(ids: int | Sequence[int] | None, device: torch.device) -> torch.Tensor | None:
    if ids is None:
        return None
    ids = [ids] if isinstance(ids, int) else list(ids)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None
