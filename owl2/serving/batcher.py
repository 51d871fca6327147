"""Continuous batching: concurrent requests share decode steps.

One worker thread owns the model. Each iteration it

1. picks the next token of every running row from the logits it holds for it, and tells the row's submitter;
2. drops rows that finished or whose client went away, and runs one decode step for the rest;
3. admits waiting requests up to ``max_batch_size``: they are prefilled together (left-padded, images encoded
   through the engine's content cache) and their key/value rows are merged into the running cache
   (:func:`owl2.model.cache.gather_rows`), so they take part in the next step.

A row's tokens do not depend on which rows share its steps: each row keeps its own sampling state
(:class:`owl2.generation.engine.RowDecoder`), padding is masked, and RoPE positions are per row. The waiting line
is bounded: :meth:`ContinuousBatcher.submit` raises :class:`QueueFullError` when it is full (the server answers
429). ``max_batch_size=1`` serves one request at a time (the baseline of ``benchmarks/serve_load.py``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from owl2.generation.engine import (
    GenerationEngine,
    GenerationRequest,
    RowDecoder,
    StepEvent,
    decode_step,
    step_logprobs,
)
from owl2.model.cache import KVCache, gather_rows

EventSink = Callable[[StepEvent | BaseException], None]
"""Called from the worker thread with each step's event of a request, or with the error that ended it."""


class QueueFullError(RuntimeError):
    """The waiting line is full; try again later (HTTP 429)."""


@dataclass
class Submission:
    """A request in the batcher; :meth:`cancel` frees its slot at the next step (a client that went away)."""

    request: GenerationRequest
    sink: EventSink
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Row:
    submission: Submission
    decoder: RowDecoder


@dataclass
class BatcherStats:
    running: int = 0
    waiting: int = 0
    steps: int = 0  # decode steps run
    prefills: int = 0  # prefill batches run
    generated_tokens: int = 0
    cancelled: int = 0
    peak_batch: int = 0


class ContinuousBatcher:
    """Runs :class:`GenerationRequest` s of many clients through one :class:`GenerationEngine`."""

    def __init__(self, engine: GenerationEngine, *, max_batch_size: int = 8, max_queue: int = 64) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self._waiting: deque[Submission] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------------------------- interface
    def start(self) -> ContinuousBatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="owl2-batcher", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the worker; requests still waiting or running get a ``RuntimeError``."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, request: GenerationRequest, sink: EventSink) -> Submission:
        """Queue ``request``; ``sink`` receives its events. Raises :class:`QueueFullError` when the line is full."""
        submission = Submission(request, sink)
        with self._wake:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._waiting.append(submission)
            self.stats.waiting = len(self._waiting)
            self._wake.notify()
        return submission

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------------------------------------- worker
    def _run(self) -> None:
        rows: list[_Row] = []
        cache: KVCache | None = None
        logits: torch.Tensor | None = None  # [len(rows), V]: the next-token logits of every running row
        while True:
            with self._wake:
                while not rows and not self._waiting and not self._closed:
                    self._wake.wait()
                if self._closed:
                    break
                newcomers = self._admit(self.max_batch_size - len(rows))
            try:
                with torch.inference_mode():
                    if rows:
                        assert cache is not None and logits is not None
                        rows, cache, logits = self._step(rows, cache, logits)
                    if newcomers:
                        rows, cache, logits = self._join(rows, cache, logits, newcomers)
            except Exception as exc:  # a failed step ends the rows in it, never the worker
                for row in rows:
                    row.submission.sink(exc)
                rows, cache, logits = [], None, None
            self.stats.running = len(rows)
            self.stats.peak_batch = max(self.stats.peak_batch, len(rows))
        error = RuntimeError("the server is shutting down")
        for row in rows:
            row.submission.sink(error)
        for submission in self._waiting:
            submission.sink(error)
        self._waiting.clear()

    def _admit(self, free: int) -> list[Submission]:
        """Up to ``free`` waiting submissions, skipping those cancelled while they waited (lock held)."""
        taken: list[Submission] = []
        while self._waiting and len(taken) < free:
            submission = self._waiting.popleft()
            if submission.cancelled:
                self.stats.cancelled += 1
            else:
                taken.append(submission)
        self.stats.waiting = len(self._waiting)
        return taken

    def _step(self, rows: list[_Row], cache: KVCache, logits: torch.Tensor
              ) -> tuple[list[_Row], KVCache | None, torch.Tensor | None]:
        """Emit every row's next token, drop finished and cancelled rows, decode one step for the others."""
        decoders = [row.decoder for row in rows]
        chosen = decode_step(decoders, logits)
        logprobs = step_logprobs(decoders, logits)
        keep: list[int] = []
        for i, row in enumerate(rows):
            if row.submission.cancelled:
                self.stats.cancelled += 1
                continue
            event = row.decoder.advance(i, chosen[i], None if logprobs is None else logprobs[i])
            self.stats.generated_tokens += 1
            row.submission.sink(event)
            if not row.decoder.finished:
                keep.append(i)
        if not keep:
            return [], None, None
        if len(keep) < len(rows):
            cache = gather_rows([(cache, keep)], room=self._room([rows[i] for i in keep]))
        device = self.engine.model.device
        feed = torch.tensor([chosen[i] for i in keep], device=device)
        out = self.engine.model(feed[:, None], cache=cache, logits_to_keep=1)
        self.stats.steps += 1
        return [rows[i] for i in keep], cache, out.logits[:, -1].float()

    def _join(self, rows: list[_Row], cache: KVCache | None, logits: torch.Tensor | None,
              newcomers: list[Submission]) -> tuple[list[_Row], KVCache | None, torch.Tensor | None]:
        """Prefill ``newcomers`` together and merge them into the running batch."""
        engine = self.engine
        try:
            batch = engine.prepare([s.request.prompt_ids for s in newcomers], [s.request.images for s in newcomers])
            lengths = batch["attention_mask"].sum(1).cpu()
            engine.check_context(lengths)
            fresh = engine.model.new_cache(*batch["input_ids"].shape)
            out = engine.model(**batch, cache=fresh, logits_to_keep=1)
        except Exception as exc:  # the newcomers' own problem: the running rows go on
            if len(newcomers) > 1:  # find which of them it is: the others still join
                for submission in newcomers:
                    rows, cache, logits = self._join(rows, cache, logits, [submission])
                return rows, cache, logits
            newcomers[0].sink(exc)
            return rows, cache, logits
        self.stats.prefills += 1
        device = engine.model.device
        joined = [
            _Row(s, RowDecoder(s.request, engine.decode, engine.eos_ids,
                               min(s.request.params.max_new_tokens, engine.context_length - int(n)), device))
            for s, n in zip(newcomers, lengths, strict=True)
        ]
        everyone = rows + joined
        parts = [(cache, range(len(rows)))] if rows and cache is not None else []
        merged = gather_rows([*parts, (fresh, range(len(joined)))], room=self._room(everyone))
        new_logits = out.logits[:, -1].float()
        return everyone, merged, new_logits if logits is None or not rows else torch.cat([logits, new_logits])

    @staticmethod
    def _room(rows: list[_Row]) -> int:
        """Cache positions the rows can still write: the largest remaining output budget."""
        return max(row.decoder.max_new_tokens - row.decoder.count for row in rows)
