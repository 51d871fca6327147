"""Continuous batching: concurrent requests share decode steps, and prefill-only rows share batched prefills.

Two kinds of work go through one worker thread that owns the model:

- **generation rows** (:meth:`ContinuousBatcher.submit`): a chat completion's prompt, prefilled once and then
  decoded token by token in the running batch;
- **prefill-only rows** (:meth:`ContinuousBatcher.submit_prefill`): a prompt whose only result is the logits at
  its last position, e.g. a Q-Align rating (the level words' logits at ``... The quality of the image is``). They
  never decode and need no key/value cache.

The parts, as in vLLM:

- :class:`Scheduler` holds the waiting lines and their bounds and decides what runs in an iteration: which waiting
  generation requests join the running batch (up to ``max_batch_size``), and which prefill-only rows form this
  iteration's prefill batch (FIFO, up to ``prefill_rows`` rows and ``prefill_tokens`` positions counted as rows x
  the longest row, since rows are left-padded to it; a row longer than the budget runs alone).
- :class:`RunningBatch` is the cache side: the running generation rows, the next-token logits of each row and the
  :class:`~owl2.serving.cache_manager.CacheManager` that keeps their key/value cache. The manager owns one
  preallocated buffer; the running rows occupy its first slots and every forward runs on a view of them, so a decode
  step writes straight into it. A finished or cancelled row's slot takes the last running row (one row copied; the
  row list follows the same move), newcomers' rows are copied into free slots right-aligned to the shared write
  offset, and only a newcomer that does not fit (a prompt longer than the offset, too few free positions for the
  largest remaining budget, or no free slot) lays the buffer out anew: unused positions trimmed on the left,
  growth at least doubling, so copies of the whole cache stay rare.
- :class:`Runner` makes the model calls: one decode step, the prefill of newcomers joined to the running batch,
  and one prefill-only batch (``GenerationEngine.next_token_logits``, the very call ``Pipeline.rate`` makes).

Each iteration of the worker: (1) emit every running row's next token and decode one step for those still going;
(2) prefill the admitted newcomers and join them to the cache; (3) run at most one prefill-only batch. Prefill-only
rows get their own forward rather than riding in the newcomers' prefill because that prefill allocates and joins
cache rows (wasted on rows that never decode), and because a separate, budgeted batch bounds what a backlog of
ratings costs the decoding rows: one bounded forward per decode step, so a request of 64 images is split over
several iterations and chat tokens keep flowing between them. When nothing decodes, prefill batches run back to
back.

With a :class:`~owl2.generation.prefix_cache.PrefixCache` (``prefix_cache``; ``owl2 serve --prefix-cache-mb``), a
newcomer's prefill reuses the keys and values of the longest prefix it shares with an earlier row
(:meth:`GenerationEngine.start`), and a row that finishes leaves its prompt and answer in the cache before its slot
is given away (:meth:`GenerationEngine.remember`), so a chat's next turn prefills only what is new.

A row's result does not depend on which rows share its forward: padding is masked, RoPE positions are per row and
each generation row keeps its own sampling state (:class:`owl2.generation.decoding.RowDecoder`). A failure stays
with the rows that caused it: a row whose settings, sampling or text fail ends alone, a newcomer or prefill-only
batch that fails is retried row by row, and only the failing row gets the error; a newcomer's rows reach the cache
last, written into free slots or a buffer built aside, so its failure never touches the running rows. Every request
the worker holds gets an answer: should the worker itself fail, each running row, each newcomer taken off the line
and each prefill row of the iteration is told, and the worker goes on (a dead worker would leave every later request
waiting forever). The waiting lines are bounded: ``submit`` and ``submit_prefill`` raise :class:`QueueFullError`
when theirs is full (the server answers 429). ``max_batch_size=1`` decodes one request at a time (the baseline of
``benchmarks/serve_load.py``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from owl2.constants import OFFICIAL_IMAGE_TOKEN
from owl2.generation.decoding import RowDecoder, StepEvent, decode_rows, forward_step
from owl2.generation.engine import GenerationEngine, GenerationRequest
from owl2.generation.prefix_cache import PrefixCache, PrefixKey
from owl2.model.cache import KVCache
from owl2.serving.cache_manager import CacheManager

EventSink = Callable[[StepEvent | BaseException], None]
"""Called from the worker thread with each step's event of a request, or with the error that ended it."""

PrefillSink = Callable[[int, torch.Tensor | BaseException], None]
"""Called from the worker thread once per row of a prefill-only submission: the row's index and its last-position
logits [V] (float32, on the CPU), or the error that failed the row."""


class QueueFullError(RuntimeError):
    """The waiting line is full; try again later (HTTP 429)."""


@dataclass
class Submission:
    """A request in the batcher; :meth:`cancel` frees its slot at the next step (a client that went away)."""

    request: GenerationRequest
    sink: EventSink
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    done: bool = False
    """Its last event (one with a finish reason) or its error was handed to the sink."""

    def cancel(self) -> None:
        self.cancelled = True

    def tell(self, event: StepEvent | BaseException) -> None:
        """Hand ``event`` to the sink; nothing follows the request's last event or error. A sink that raises is a
        client that cannot be reached: the request is cancelled, and the worker and the other rows go on."""
        if self.done:
            return
        self.done = isinstance(event, BaseException) or event.finish_reason is not None
        try:
            self.sink(event)
        except Exception:
            self.cancelled = True


@dataclass(frozen=True)
class PrefillRow:
    """One prefill-only row: official-form ``prompt_ids`` (one -200 per image) and ``images`` [n, 3, S, S]."""

    prompt_ids: Sequence[int]
    images: torch.Tensor | None = None

    @property
    def image_count(self) -> int:
        return 0 if self.images is None else int(self.images.shape[0])

    def positions(self, tokens_per_image: int) -> int:
        """Sequence positions the row occupies, each image counted as its visual tokens."""
        images = sum(1 for t in self.prompt_ids if t == OFFICIAL_IMAGE_TOKEN)
        return len(self.prompt_ids) - images + images * tokens_per_image


@dataclass
class PrefillSubmission:
    """Prefill-only rows of one request, run in order; :meth:`cancel` drops the rows not yet run."""

    rows: list[PrefillRow]
    sink: PrefillSink
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    failed: bool = False
    """A row failed: the request is lost, so its remaining rows are not run."""
    scheduled: int = 0
    """Rows handed to the runner so far."""
    answered: set[int] = field(default_factory=set)
    """Rows whose logits went to the sink."""

    def cancel(self) -> None:
        self.cancelled = True

    def tell(self, index: int, result: torch.Tensor | BaseException) -> None:
        """Hand row ``index``'s logits or error to the sink, at most once per row and nothing after an error. A sink
        that raises cancels the request (as :meth:`Submission.tell`)."""
        if self.failed or index in self.answered:
            return
        if isinstance(result, BaseException):
            self.failed = True
        else:
            self.answered.add(index)
        try:
            self.sink(index, result)
        except Exception:
            self.cancelled = True


@dataclass
class BatcherStats:
    running: int = 0
    waiting: int = 0  # requests of both kinds waiting for their first forward
    steps: int = 0  # decode steps run
    prefills: int = 0  # prefill batches of generation newcomers run
    generated_tokens: int = 0
    cancelled: int = 0  # requests (of both kinds) dropped because their client went away
    peak_batch: int = 0
    waiting_prefill_rows: int = 0
    prefill_only_batches: int = 0
    prefill_only_rows: int = 0  # rows that got their logits
    peak_prefill_only_rows: int = 0  # the largest prefill-only batch
    cache_relayouts: int = 0  # joins that laid the running rows' cache out anew, copying every running row
    prefill_only_during_decode: int = 0  # prefill-only batches run in an iteration that also decoded


# ------------------------------------------------------------------------------------------------------- scheduler
class Scheduler:
    """The waiting lines, their bounds, and what runs next. Not thread-safe: the batcher calls it under its lock."""

    def __init__(self, *, max_queue: int, prefill_queue_images: int, prefill_rows: int, prefill_tokens: int,
                 tokens_per_image: int) -> None:
        self.max_queue = max_queue
        self.prefill_queue_images = prefill_queue_images
        self.prefill_rows = prefill_rows
        self.prefill_tokens = prefill_tokens
        self.tokens_per_image = tokens_per_image
        self.waiting: deque[Submission] = deque()
        self.prefill: deque[PrefillSubmission] = deque()
        self.queued_images = 0  # images (or one per image-less row) of the prefill rows not yet run
        self.queued_rows = 0
        self.cancelled = 0

    @staticmethod
    def _cost(row: PrefillRow) -> int:
        return max(row.image_count, 1)

    def add(self, submission: Submission) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
        self.waiting.append(submission)

    def add_prefill(self, submission: PrefillSubmission) -> None:
        """Queue the rows; refused when rows already wait and these would pass the bound. An empty line takes any
        submission, so a request over the bound on its own (the server's per-request limits allow it) is not
        refused forever."""
        cost = sum(self._cost(r) for r in submission.rows)
        if self.queued_rows and self.queued_images + cost > self.prefill_queue_images:
            raise QueueFullError(f"the rating queue is full ({self.queued_images} images waiting, limit "
                                 f"{self.prefill_queue_images}); retry later")
        self.prefill.append(submission)
        self.queued_images += cost
        self.queued_rows += len(submission.rows)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefill)

    @property
    def depth(self) -> int:
        return len(self.waiting) + len(self.prefill)

    def admit(self, free: int) -> list[Submission]:
        """Up to ``free`` waiting generation requests, skipping those cancelled while they waited."""
        taken: list[Submission] = []
        while self.waiting and len(taken) < free:
            submission = self.waiting.popleft()
            if submission.cancelled:
                self.cancelled += 1
            else:
                taken.append(submission)
        return taken

    def next_prefill(self) -> list[tuple[PrefillSubmission, int]]:
        """This iteration's prefill-only batch: (submission, row index) pairs in arrival order, within the budget."""
        batch: list[tuple[PrefillSubmission, int]] = []
        longest = 0
        while self.prefill:
            submission = self.prefill[0]
            if submission.cancelled or submission.failed:
                self._release(submission.rows[submission.scheduled:])
                self.prefill.popleft()
                if not submission.failed:  # a failed request was not given up by its client
                    self.cancelled += 1
                continue
            while submission.scheduled < len(submission.rows):
                row = submission.rows[submission.scheduled]
                widest = max(longest, row.positions(self.tokens_per_image))
                if batch and (len(batch) + 1 > self.prefill_rows or (len(batch) + 1) * widest > self.prefill_tokens):
                    return batch
                batch.append((submission, submission.scheduled))
                self._release([row])
                submission.scheduled += 1
                longest = widest
            self.prefill.popleft()
        return batch

    def _release(self, rows: Sequence[PrefillRow]) -> None:
        self.queued_images -= sum(self._cost(r) for r in rows)
        self.queued_rows -= len(rows)

    def drain(self) -> tuple[list[Submission], list[tuple[PrefillSubmission, int]]]:
        """Everything still waiting (at shutdown): generation requests and the prefill rows not yet run."""
        generation = list(self.waiting)
        rows = [(s, i) for s in self.prefill for i in range(s.scheduled, len(s.rows))]
        self.waiting.clear()
        self.prefill.clear()
        self.queued_images = self.queued_rows = 0
        return generation, rows


# ----------------------------------------------------------------------------------------------------------- cache
@dataclass
class _Row:
    submission: Submission
    decoder: RowDecoder
    key: PrefixKey | None = None
    """What the row's prompt positions hold (with a prefix cache), to keep its keys and values when it ends."""
    fed: list[int] = field(default_factory=list)
    """The answer tokens fed back to the model so far: their keys and values follow the prompt's in the cache."""


@dataclass
class RunningBatch:
    """The decoding rows, their key/value cache and each row's next-token logits [len(rows), V]. Row ``i`` is
    slot ``i`` of ``slots`` (the :class:`CacheManager`), and the list follows the manager's moves."""

    rows: list[_Row] = field(default_factory=list)
    slots: CacheManager = field(default_factory=CacheManager)
    logits: torch.Tensor | None = None

    @property
    def cache(self) -> KVCache | None:
        """The running rows' cache: a view of the manager's buffer."""
        return self.slots.cache

    def clear(self) -> None:
        """Forget every row, the cache and the logits."""
        self.rows, self.logits = [], None
        self.slots.clear()

    def fail(self, error: BaseException) -> None:
        """End every row with ``error`` and forget the cache."""
        rows = self.rows
        self.clear()
        for row in rows:
            row.submission.tell(error)

    def room(self, rows: Sequence[_Row] | None = None) -> int:
        """Cache positions the rows can still write: the largest remaining output budget."""
        return max(row.decoder.max_new_tokens - row.decoder.count for row in (self.rows if rows is None else rows))


# ---------------------------------------------------------------------------------------------------------- runner
class Runner:
    """The model calls of the batcher; it holds no queue and no lock."""

    def __init__(self, engine: GenerationEngine, stats: BatcherStats, prefix_cache: PrefixCache | None = None) -> None:
        self.engine = engine
        self.stats = stats
        self.prefix_cache = prefix_cache

    def step(self, batch: RunningBatch) -> None:
        """Emit every row's next token, drop finished, failed and cancelled rows, decode one step for the others. A
        row whose sampling or text fails gets its error alone; only a failure of the shared forward raises."""
        assert batch.cache is not None and batch.logits is not None
        rows = batch.rows
        results = decode_rows([row.decoder for row in rows], batch.logits)
        keep: list[int] = []
        tokens: dict[int, int] = {}  # the id each kept row feeds to the next step
        for i, row in enumerate(rows):
            if row.submission.cancelled:
                self.stats.cancelled += 1
                continue
            event = results[i]
            if not isinstance(event, StepEvent):  # this row's own failure: its neighbours go on
                row.submission.tell(event if event is not None else RuntimeError("the row had already finished"))
                continue
            self.stats.generated_tokens += 1
            row.submission.tell(event)
            if not row.decoder.finished and not row.submission.cancelled and event.token_id is not None:
                keep.append(i)
                tokens[i] = event.token_id
            elif row.decoder.finished:
                self._remember(batch.cache, i, row)
        if not keep:  # the buffer stays for the next rows; the worker releases it when it goes idle
            batch.slots.retain([])
            batch.rows, batch.logits = [], None
            return
        order = batch.slots.retain(keep)  # departed slots take the last rows: the list follows
        batch.rows = [rows[i] for i in order]
        feed = torch.tensor([tokens[i] for i in order], device=self.engine.model.device)
        batch.logits = forward_step(self.engine.model, feed, batch.slots.cache)
        for i, row in zip(order, batch.rows, strict=True):
            row.fed.append(tokens[i])
        self.stats.steps += 1

    def _remember(self, cache: KVCache, slot: int, row: _Row) -> None:
        """Keep a finished row's prompt and answer in the prefix cache (before its slot is given to another row).
        Best effort: a failure here must not end the rows still decoding."""
        if self.prefix_cache is None or row.key is None:
            return
        with contextlib.suppress(Exception):  # the cache only saves work: the answer was already given
            self.engine.remember(self.prefix_cache, row.key, cache, slot, row.fed)

    def join(self, batch: RunningBatch, newcomers: list[Submission]) -> None:
        """Prefill ``newcomers`` together and join them to the running batch. A newcomer whose settings or
        prompt fail gets its error and the others still join; the running rows are never touched by a failure."""
        engine = self.engine
        joining: list[_Row] = []
        for submission in newcomers:
            try:  # the decoder first: a setting it refuses fails this newcomer alone, before any forward
                decoder = RowDecoder(submission.request, engine.decode, engine.eos_ids,
                                     submission.request.params.max_new_tokens, engine.model.device)
            except Exception as exc:
                submission.tell(exc)
                continue
            joining.append(_Row(submission, decoder))
        if joining:
            self._prefill(batch, joining)

    def _prefill(self, batch: RunningBatch, joining: list[_Row]) -> None:
        engine = self.engine
        try:
            started = engine.start([r.submission.request for r in joining], prefix_cache=self.prefix_cache)
            fresh, fresh_logits = started.cache, started.logits
        except Exception as exc:  # the newcomers' own problem: the running rows go on
            if len(joining) > 1:  # find which of them it is: the others still join
                for row in joining:
                    self._prefill(batch, [row])
                return
            joining[0].submission.tell(exc)
            return
        self.stats.prefills += 1
        for row, key in zip(joining, started.keys, strict=True):
            n = engine.prompt_tokens(row.submission.request)
            row.decoder.max_new_tokens = min(row.decoder.max_new_tokens, engine.context_length - n)
            row.key = key
        everyone = batch.rows + joining
        try:  # the join comes last: it writes free slots or a buffer built aside, never the running rows
            logits = (fresh_logits if not batch.rows or batch.logits is None
                      else torch.cat([batch.logits, fresh_logits]))
            batch.slots.join(fresh, room=batch.room(everyone))
        except Exception as exc:
            for row in joining:
                row.submission.tell(exc)
            return
        self.stats.cache_relayouts = batch.slots.relayouts
        batch.rows, batch.logits = everyone, logits

    def prefill_only(self, rows: list[tuple[PrefillSubmission, int]]) -> None:
        """One forward for ``rows``; each row's logits (or error) go to its submission's sink."""
        rows = [(s, i) for s, i in rows if not (s.cancelled or s.failed)]  # a client may have left since
        if not rows:
            return
        try:
            logits = self.engine.next_token_logits([s.rows[i].prompt_ids for s, i in rows],
                                                   [s.rows[i].images for s, i in rows]).cpu()
        except Exception as exc:
            if len(rows) > 1:  # retry one by one: only the row at fault fails
                for pair in rows:
                    self.prefill_only([pair])
                return
            submission, index = rows[0]
            submission.tell(index, exc)
            return
        self.stats.prefill_only_batches += 1
        self.stats.prefill_only_rows += len(rows)
        self.stats.peak_prefill_only_rows = max(self.stats.peak_prefill_only_rows, len(rows))
        for (submission, index), row_logits in zip(rows, logits, strict=True):
            submission.tell(index, row_logits)


# --------------------------------------------------------------------------------------------------------- batcher
class ContinuousBatcher:
    """Runs generation requests and prefill-only rows of many clients through one :class:`GenerationEngine`.

    ``max_batch_size``: generation rows decoded together; ``max_queue``: generation requests waiting.
    ``prefill_rows`` / ``prefill_tokens``: the budget of one prefill-only batch (rows, and rows x the longest row's
    positions); ``prefill_queue_images``: images of prefill-only rows that may wait (an image-less row counts one).
    """

    def __init__(self, engine: GenerationEngine, *, max_batch_size: int = 8, max_queue: int = 64,
                 prefill_rows: int = 16, prefill_tokens: int = 4096, prefill_queue_images: int = 1024,
                 prefix_cache: PrefixCache | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if prefill_rows < 1 or prefill_tokens < 1 or prefill_queue_images < 1:
            raise ValueError(f"prefill_rows, prefill_tokens and prefill_queue_images must be at least 1, got "
                             f"{prefill_rows}, {prefill_tokens}, {prefill_queue_images}")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self.scheduler = Scheduler(max_queue=max_queue, prefill_queue_images=prefill_queue_images,
                                   prefill_rows=prefill_rows, prefill_tokens=prefill_tokens,
                                   tokens_per_image=engine.model.config.tokens_per_image)
        self.prefix_cache = prefix_cache
        self.runner = Runner(engine, self.stats, prefix_cache)
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
            self._check_open()
            self.scheduler.add(submission)
            self._update_waiting()
            self._wake.notify()
        return submission

    def submit_prefill(self, rows: Sequence[PrefillRow], sink: PrefillSink) -> PrefillSubmission:
        """Queue prefill-only ``rows``; ``sink(i, logits)`` receives row i's last-position logits [V] (float32,
        CPU), or ``sink(i, error)``. Raises :class:`QueueFullError` when the rating line is full."""
        if not rows:
            raise ValueError("a prefill submission needs at least one row")
        submission = PrefillSubmission(list(rows), sink)
        with self._wake:
            self._check_open()
            self.scheduler.add_prefill(submission)
            self._update_waiting()
            self._wake.notify()
        return submission

    @property
    def queue_depth(self) -> int:
        return self.scheduler.depth

    # ------------------------------------------------------------------------------------------------- worker
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the batcher is closed")

    def _update_waiting(self) -> None:
        self.stats.waiting = self.scheduler.depth
        self.stats.waiting_prefill_rows = self.scheduler.queued_rows
        self.stats.cancelled += self.scheduler.cancelled
        self.scheduler.cancelled = 0

    def _advance(self, batch: RunningBatch, newcomers: list[Submission]) -> None:
        """One decode step, then the newcomers' prefill; a failure ends the rows it touched, never the worker."""
        try:
            if batch.rows:
                self.runner.step(batch)
        except Exception as exc:  # the shared forward: every row in it ends
            batch.fail(exc)
        if not newcomers:
            return
        try:
            self.runner.join(batch, newcomers)
        except Exception as exc:  # join answers its own failures; anything else still reaches every newcomer
            joined = {id(row.submission) for row in batch.rows}
            for submission in newcomers:
                if id(submission) not in joined:
                    submission.tell(exc)

    def _run(self) -> None:
        batch = RunningBatch(slots=CacheManager(max_rows=self.max_batch_size))
        while True:
            with self._wake:
                if not batch.rows and not self.scheduler.has_work():
                    batch.slots.clear()  # idle: give the cache's memory back (kept while requests keep coming)
                while not batch.rows and not self.scheduler.has_work() and not self._closed:
                    self._wake.wait()
                if self._closed:
                    break
                newcomers = self.scheduler.admit(self.max_batch_size - len(batch.rows))
                prefill = self.scheduler.next_prefill()
                self._update_waiting()
            decoding = bool(batch.rows)
            # The handlers below catch faults of the worker itself (the runner answers the rows' own failures):
            # they answer every request of that part of the iteration, and the worker keeps serving.
            with torch.inference_mode():
                try:
                    self._advance(batch, newcomers)
                except Exception as exc:
                    batch.fail(exc)
                    for submission in newcomers:
                        submission.tell(exc)
                if prefill:
                    try:
                        self.runner.prefill_only(prefill)
                    except Exception as exc:
                        for prefill_submission, index in prefill:
                            prefill_submission.tell(index, exc)
                    self.stats.prefill_only_during_decode += int(decoding)
            self.stats.running = len(batch.rows)
            self.stats.peak_batch = max(self.stats.peak_batch, len(batch.rows))
        error = RuntimeError("the server is shutting down")
        batch.fail(error)
        with self._wake:
            waiting, rows = self.scheduler.drain()
            self._update_waiting()
        for submission in waiting:
            submission.tell(error)
        for prefill_submission, index in rows:
            prefill_submission.tell(index, error)
