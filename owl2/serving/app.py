"""The OpenAI-compatible HTTP server: ``create_app(pipeline, ServerSettings(...))`` -> a FastAPI app.

Routes: ``POST /v1/chat/completions`` (plain and SSE streaming), ``POST /v1/rate`` (Q-Align-family ratings of
images and videos, :mod:`owl2.serving.rating`), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus
text) and the chat page at ``/``. Requests of all clients share forwards through a
:class:`~owl2.serving.batcher.ContinuousBatcher`: chat completions share decode steps, ratings share batched
prefills between them. Every malformed request gets OpenAI's error JSON with a 4xx status: 400 for invalid input,
401 for a missing or wrong API key, 404 for an unknown model or route, 405 for a wrong method, 408 for a body that
does not arrive in time, 413 for a body over the size limit, 415 for a body not sent as JSON, 429 when the queue is
full.

The body of every request is read whole before the app looks at it (:class:`~owl2.serving.middleware.RequestBody`:
size limit and deadline, chunked bodies included), and the JSON routes parse it strictly
(:func:`~owl2.serving.json_body.parse_json_body`) after the API key is checked (:mod:`owl2.serving.middleware`). A
chat request becomes generation requests in :mod:`owl2.serving.requests`; this module keeps the settings, the state
behind the routes (:class:`Owl2Server`), the routes and the loops that hand the batcher's events to them. The
connection limits (header deadline, keep-alive, header size, connection cap) are uvicorn's side:
:mod:`owl2.serving.connection`.
"""

# No `from __future__ import annotations`: FastAPI reads the body model of the route from its real annotation.

import asyncio
import contextlib
import html
import io
import json
import math
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from owl2.generation.engine import GenerationRequest, StepEvent
from owl2.generation.prefix_cache import PrefixCache
from owl2.serving.batcher import ContinuousBatcher, PrefillRow, PrefillSubmission, QueueFullError, Submission
from owl2.serving.errors import APIError, clip, error_response
from owl2.serving.images import ImagePolicy, TooManyDownloads
from owl2.serving.metrics import ServerMetrics
from owl2.serving.middleware import RequestBody, api_key_check, json_route_class
from owl2.serving.protocol import (
    ChatCompletionRequest,
    LenientChatCompletionRequest,
    LenientRateRequest,
    RateRequest,
    completion_id,
    error_body,
    now,
    usage,
)
from owl2.serving.rating import InvalidRating, RatingJob, build_job, check_limits, rating_list
from owl2.serving.requests import build_generation_requests, check_model, logprob_entry


@dataclass
class ServerSettings:
    """What ``owl2 serve`` exposes as flags."""

    model_name: str = "owl2"
    api_keys: Sequence[str] = ()
    """Accepted ``Authorization: Bearer`` keys; empty: no authentication."""
    max_batch_size: int = 8
    max_queue: int = 64
    max_images_per_request: int = 8
    max_prompt_tokens: int | None = None
    """None: the model's context length."""
    max_new_tokens: int = 1024
    max_body_bytes: int = 32 * 2**20
    body_timeout: float = 60.0
    """Seconds from the end of the headers for the whole body to arrive (408 after)."""
    header_timeout: float = 10.0
    """Seconds from the connection (or the next request's first byte) for the request line and headers (408 after;
    :mod:`owl2.serving.connection`, not used under Ray Serve)."""
    keep_alive_timeout: float = 5.0
    """Seconds an idle kept-alive connection stays open (uvicorn's ``timeout_keep_alive``)."""
    max_header_bytes: int = 16 * 1024
    """The request line and headers together (431 over it)."""
    max_connections: int | None = 512
    """Open connections (or requests in flight) before a request gets 503; None: no cap."""
    images: ImagePolicy = field(default_factory=ImagePolicy)
    lenient: bool = False
    """Ignore unknown request fields instead of refusing them."""
    default_temperature: float = 1.0
    """Used when a request gives none (OpenAI's default is 1)."""
    max_rate_items: int = 64
    """Items (images or videos) per ``/v1/rate`` request."""
    max_video_frames: int = 16
    """Frames per video item of ``/v1/rate``."""
    prefill_rows: int = 16
    """Rating rows per batched prefill (one runs between two decode steps)."""
    prefill_tokens: int = 4096
    """Positions per batched rating prefill: rows x the longest row (images counted as their visual tokens)."""
    max_rate_queue: int = 1024
    """Images (video frames counted one each) of ratings that may wait before 429."""
    prefix_cache_mb: float = 512.0
    """Memory for the keys and values of prompt prefixes kept for later requests (a chat's next turn); 0: off."""

    def __post_init__(self) -> None:
        """ValueError for an HTTP limit that would refuse every request or none (a zero or NaN deadline, say), or an
        API key that would let in everyone (an empty one) or no one (white space at an end)."""
        for name in ("body_timeout", "header_timeout", "keep_alive_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.max_body_bytes < 0 or self.max_header_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 0 and max_header_bytes >= 1, got {self.max_body_bytes} and "
                             f"{self.max_header_bytes}")
        if not (isinstance(self.prefix_cache_mb, int | float) and math.isfinite(self.prefix_cache_mb)
                and self.prefix_cache_mb >= 0):
            raise ValueError(f"prefix_cache_mb must be 0 (off) or a positive number, got {self.prefix_cache_mb!r}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1 (or None: no cap), got {self.max_connections}")
        if isinstance(self.api_keys, str | bytes):  # its characters would each be a key of one character
            raise ValueError("api_keys must be a list of keys, not one string")
        for key in self.api_keys:
            # an empty key would let in any client that sends "Authorization: Bearer" with nothing after it, and a
            # key with white space at an end or a control character can never match the header a client sends
            if not isinstance(key, str) or not key or key != key.strip() or any(ord(c) < 32 or ord(c) == 127
                                                                               for c in key):
                got = f"a key of {len(key)} characters" if isinstance(key, str) else type(key).__name__
                raise ValueError("api_keys must be non-empty strings without white space at either end or control "
                                 f"characters, got {got}")


EXAMPLE_SCENE_PATH = "/example/scene.png"
"""Where the chat page of the embedded model gets its example scene (404 for any other model)."""

EMBEDDED_PAGE_NOTICE = (
    "This server runs owl2-tiny, the embedded demo model. It knows only synthetic 64 px scenes of coloured shapes "
    "and answers anything else with confident nonsense. Try the example scene with one of the questions below. For "
    "real images, convert a real checkpoint (owl2 convert MAGAer13/mplug-owl2-llama2-7b ./owl2-7b --dtype bf16) and "
    "restart with owl2 serve --model ./owl2-7b."
)
"""What the chat page says above the conversation when the server runs the embedded model."""


def page_config(pipeline: Any) -> dict[str, Any]:
    """What the chat page is told about the model: for the embedded one, the notice, the example scene's URL and
    questions it answers well, so that a first visitor sees it work before trying a photo on it."""
    if not getattr(pipeline, "is_embedded", False):
        return {"examples": None}
    from owl2.api import EMBEDDED_EXAMPLE_QUESTIONS

    return {"examples": {"notice": EMBEDDED_PAGE_NOTICE, "image": EXAMPLE_SCENE_PATH,
                         "questions": list(EMBEDDED_EXAMPLE_QUESTIONS)}}


def _script_json(value: Any) -> str:
    """JSON that is safe inside a <script> element: no "</script>" or "<!--" can end or change it early."""
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace(
        "&", "\\u0026")


class _EventStream(StreamingResponse):
    """A streamed answer that cancels its submissions however it ends. The stream's own ``finally`` does so too,
    but an ASGI server may cancel the response before the stream has started (a client gone at once), and a
    generator that never started runs no ``finally``."""

    def __init__(self, content: Any, submissions: list[Submission], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.submissions = submissions

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for submission in self.submissions:
                submission.cancel()


class _Sink:
    """Hands the worker thread's events to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[StepEvent | BaseException] = asyncio.Queue()

    def __call__(self, event: "StepEvent | BaseException") -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class _RowSink:
    """Hands the worker thread's per-row results of a prefill-only submission to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[int, torch.Tensor | BaseException]] = asyncio.Queue()

    def __call__(self, row: int, result: "torch.Tensor | BaseException") -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (row, result))


class Owl2Server:
    """The state behind the routes: pipeline, batcher, settings, metrics."""

    def __init__(self, pipeline: Any, settings: ServerSettings) -> None:
        self.pipeline = pipeline
        self.settings = settings
        engine = pipeline.engine
        self.context_length = engine.context_length
        self.max_prompt_tokens = min(settings.max_prompt_tokens or self.context_length, self.context_length - 1)
        self.batcher = ContinuousBatcher(engine, max_batch_size=settings.max_batch_size,
                                         max_queue=settings.max_queue, prefill_rows=settings.prefill_rows,
                                         prefill_tokens=settings.prefill_tokens,
                                         prefill_queue_images=settings.max_rate_queue,
                                         prefix_cache=PrefixCache(int(settings.prefix_cache_mb * 2**20))
                                         if settings.prefix_cache_mb > 0 else None)
        self.metrics = ServerMetrics(self.batcher, engine.image_cache)
        self.building_images = 0
        """Images of rating requests being fetched and decoded (changed on the event loop only)."""

    # --------------------------------------------------------------------------------------------- requests
    def check_model(self, model: str | None) -> None:
        check_model(model, self.settings.model_name)

    async def build(self, body: ChatCompletionRequest) -> "tuple[list[GenerationRequest], int]":
        """One generation request per choice and the prompt's length in tokens, or :class:`APIError`
        (:func:`owl2.serving.requests.build_generation_requests`)."""
        return await build_generation_requests(self.pipeline, self.settings, body, context_length=self.context_length,
                                               max_prompt_tokens=self.max_prompt_tokens)

    def submit(self, requests: list[GenerationRequest]) -> tuple[list[Submission], list[_Sink]]:
        loop = asyncio.get_running_loop()
        self.batcher.start()  # normally started by the app's lifespan; hosts that skip it still work
        sinks = [_Sink(loop) for _ in requests]
        submissions: list[Submission] = []
        try:
            for request, sink in zip(requests, sinks, strict=True):
                submissions.append(self.batcher.submit(request, sink))
        except QueueFullError as exc:
            for submission in submissions:
                submission.cancel()
            raise APIError(429, str(exc), "rate_limit_error", code="queue_full") from exc
        return submissions, sinks

    async def build_rating(self, body: RateRequest) -> RatingJob:
        """The rows and read-out of a rating request, or :class:`APIError`; images are fetched and decoded in the
        thread pool. The caller holds a reservation (:meth:`reserve_rating`) for its images meanwhile."""
        settings = self.settings
        try:
            return await run_in_threadpool(build_job, self.pipeline, body, settings.images, self.context_length)
        except InvalidRating as exc:
            if isinstance(exc.__cause__, TooManyDownloads):  # not the request's fault: retry later
                raise APIError(429, str(exc), "rate_limit_error", param=exc.param,
                               code="too_many_downloads") from exc
            raise APIError(400, str(exc), param=exc.param, code=exc.code) from exc

    def reserve_rating(self, body: RateRequest) -> int:
        """Check a rating request's model and limits, and count its images as waiting from now on; -> that count,
        for :meth:`release_rating` once its rows are queued (or it failed). 429 before any image is decoded when
        the rating queue has no room for them: decoded images are large (a 100-byte PNG becomes a tensor of
        megabytes), and without this every request arriving at once would decode all of its images before the
        queue refused it. As in the queue, a request over the bound on its own is taken when nothing waits."""
        self.check_model(body.model)
        settings = self.settings
        try:
            check_limits(body, max_items=settings.max_rate_items, max_frames=settings.max_video_frames)
        except InvalidRating as exc:
            raise APIError(400, str(exc), param=exc.param, code=exc.code) from exc
        images = sum(1 if item.video is None else len(item.video) for item in body.items)
        waiting = self.building_images + self.batcher.scheduler.queued_images
        if waiting and waiting + images > settings.max_rate_queue:
            raise APIError(429, f"the rating queue is full ({waiting} images waiting or being decoded, limit "
                           f"{settings.max_rate_queue}); retry later", "rate_limit_error", code="queue_full")
        self.building_images += images
        return images

    def release_rating(self, images: int) -> None:
        self.building_images -= images

    def submit_rating(self, rows: list[PrefillRow]) -> "tuple[PrefillSubmission, _RowSink]":
        self.batcher.start()
        sink = _RowSink(asyncio.get_running_loop())
        try:
            return self.batcher.submit_prefill(rows, sink), sink
        except QueueFullError as exc:
            raise APIError(429, str(exc), "rate_limit_error", code="queue_full") from exc

    def logprob_entry(self, event: StepEvent) -> dict[str, Any] | None:
        return logprob_entry(self.pipeline.tokenizer, event)


async def _collect_ratings(job: RatingJob, sink: _RowSink, request: Request,
                           submission: PrefillSubmission) -> torch.Tensor:
    """The level logits [items, levels] of every row, as the rows finish; a failed row fails the request with its
    item named, and a client that goes away cancels the rows not yet run."""
    levels: list[torch.Tensor | None] = [None] * len(job.rows)
    remaining = len(job.rows)
    while remaining:
        try:
            row, result = await asyncio.wait_for(sink.queue.get(), timeout=0.1)
        except asyncio.TimeoutError:
            row, result = -1, None
        if await _client_gone(request):
            submission.cancel()
            raise APIError(499, "client disconnected")
        if result is None:
            continue
        if isinstance(result, BaseException):
            if isinstance(result, ValueError):
                raise APIError(400, f"items[{row}]: {result}", param=f"items[{row}]")
            raise APIError(500, f"items[{row}]: {type(result).__name__}: {result}", "server_error")
        levels[row] = job.scale.gather(result[None])[0]  # keep the few level logits, not the whole vocabulary
        remaining -= 1
    return torch.stack([lv for lv in levels if lv is not None])


async def _client_gone(request: Request) -> bool:
    """Whether the client hung up. Asked at most every 0.1 s, and also while results keep arriving: a request whose
    rows finish faster than that would otherwise never look, and run to the end for nobody."""
    now = time.monotonic()
    if now - getattr(request.state, "disconnect_checked", 0.0) < 0.1:
        return False
    request.state.disconnect_checked = now
    return await request.is_disconnected()


def create_app(pipeline: Any, settings: ServerSettings | None = None) -> FastAPI:
    """The server app for ``pipeline`` (an :class:`owl2.api.Pipeline`); the batcher runs while the app does."""
    settings = settings or ServerSettings()
    server = Owl2Server(pipeline, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.batcher.start()
        try:
            yield
        finally:
            server.batcher.close()

    # /openapi.json stays public, as on vLLM and OpenAI: the schema is the same for every owl2 server (it names no
    # model, key or setting), and client generators fetch it; the interactive /docs pages are left out.
    app = FastAPI(title="owl2", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(RequestBody, limit=settings.max_body_bytes, timeout=settings.body_timeout,
                       on_refused=lambda reason: server.metrics.refused.labels(reason=reason).inc())
    body_model = LenientChatCompletionRequest if settings.lenient else ChatCompletionRequest
    rate_model = LenientRateRequest if settings.lenient else RateRequest

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        server.metrics.requests.labels(status=str(exc.status)).inc()
        return error_response(exc.status, exc.message, exc.kind, param=exc.param, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        server.metrics.requests.labels(status="400").inc()
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                          code="invalid_json")
        where = _field_path(first.get("loc", ()))
        problems = "; ".join(f"{_field_path(e.get('loc', ())) or 'body'}: "
                             f"{clip(e['msg'].removeprefix('Value error, '), 200)}" for e in exc.errors()[:5])
        return error_response(400, f"invalid request: {problems}", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                      "invalid_request_error")

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        # the traceback goes to the server's log (Starlette re-raises after this answer); the client learns nothing
        # of the server's internals (paths, library messages)
        server.metrics.requests.labels(status="500").inc()
        return error_response(500, "internal server error; the server's log has the details", "server_error")

    authorize = api_key_check(settings.api_keys)
    app.router.route_class = json_route_class(authorize)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "running": server.batcher.stats.running,
                "waiting": server.batcher.queue_depth, "pid": os.getpid()}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "owl2", "max_model_len": server.context_length}]}

    @app.get("/metrics", dependencies=[Depends(authorize)])
    async def metrics() -> Response:
        return PlainTextResponse(server.metrics.render(), media_type=server.metrics.content_type)

    config = page_config(pipeline)
    example_png: list[bytes] = []  # drawn on first request, then kept

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        text = resources.files("owl2.serving").joinpath("static/index.html").read_text(encoding="utf-8")
        text = text.replace("{{MODEL}}", html.escape(settings.model_name)).replace("{{CONFIG}}", _script_json(config))
        return HTMLResponse(text)

    @app.get(EXAMPLE_SCENE_PATH)
    async def example_scene() -> Response:
        if config["examples"] is None:
            raise APIError(404, "the example scene is served only with the embedded owl2-tiny", "not_found_error")
        if not example_png:
            from owl2.api import example_scene as draw

            buffer = io.BytesIO()
            draw().save(buffer, format="PNG")
            example_png.append(buffer.getvalue())
        return Response(example_png[0], media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: body_model, request: Request) -> Response:  # type: ignore[valid-type]
        started = time.perf_counter()
        requests, prompt_tokens = await server.build(body)
        submissions, sinks = server.submit(requests)
        server.metrics.prompt_tokens.inc(prompt_tokens * len(requests))
        ident, created = completion_id(), now()
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return _EventStream(
                _stream(server, body, request, submissions, sinks, ident, created, prompt_tokens, include_usage,
                        started), submissions,
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            choices, completion_tokens = await _collect(server, body, request, submissions, sinks)
        finally:  # one choice failed, or the client left: the other choices stop too, none is left waiting
            for submission in submissions:
                submission.cancel()
        server.metrics.finish(started, completion_tokens)
        return JSONResponse({"id": ident, "object": "chat.completion", "created": created,
                             "model": settings.model_name, "choices": choices,
                             "usage": usage(prompt_tokens * len(requests), completion_tokens)})

    @app.post("/v1/rate", dependencies=[Depends(authorize)])
    async def rate(body: rate_model, request: Request) -> Response:  # type: ignore[valid-type]
        started = time.perf_counter()
        reserved = server.reserve_rating(body)
        try:
            job = await server.build_rating(body)
            if await request.is_disconnected():  # gave up while its images were decoded: nothing to run
                raise APIError(499, "client disconnected")
            submission, sink = server.submit_rating(job.rows)
        finally:  # queued now (the queue counts them), or failed
            server.release_rating(reserved)
        server.metrics.prompt_tokens.inc(job.prompt_tokens)
        try:
            level_logits = await _collect_ratings(job, sink, request, submission)
        finally:
            submission.cancel()
        ratings = job.scale.read(level_logits)
        server.metrics.rated(started, len(ratings))
        return JSONResponse(rating_list(settings.model_name, ratings, job.prompt_tokens))

    return app


def _field_path(loc: Sequence[Any]) -> str:
    """A pydantic error location as a path, ``("body", "items", 3, "image_url")`` -> ``items[3].image_url``; a
    name of the client's (an unknown field) is cut short."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        path += f"[{part}]" if isinstance(part, int) else f".{clip(str(part))}" if path else clip(str(part))
    return path


async def _step_events(sinks: list[_Sink], idle: float | None = None,
                       ) -> AsyncIterator[tuple[int, StepEvent | BaseException] | None]:
    """The events of every choice in the order they arrive, as ``(choice index, event or the error that ended the
    choice)``, until each choice has finished or failed; the one loop of the plain and the streamed answer. With
    ``idle``, None comes too whenever nothing arrived for ``idle`` seconds, so that the caller can look whether its
    client is still there. Close it (``contextlib.aclosing``) when leaving early: that stops its forwarders."""
    merged: asyncio.Queue[tuple[int, StepEvent | BaseException]] = asyncio.Queue()

    async def forward(index: int, sink: _Sink) -> None:
        while True:
            event = await sink.queue.get()
            await merged.put((index, event))
            if isinstance(event, BaseException) or event.finish_reason:
                return

    forwarders = [asyncio.create_task(forward(i, s)) for i, s in enumerate(sinks)]
    open_choices = len(sinks)
    try:
        while open_choices:
            try:
                index, event = await asyncio.wait_for(merged.get(), idle) if idle else await merged.get()
            except asyncio.TimeoutError:
                yield None
                continue
            if isinstance(event, BaseException) or event.finish_reason:
                open_choices -= 1
            yield index, event
    finally:
        for task in forwarders:
            task.cancel()


async def _collect(server: Owl2Server, body: ChatCompletionRequest, request: Request, submissions: list[Submission],
                   sinks: list[_Sink]) -> tuple[list[dict[str, Any]], int]:
    """The choices of a plain answer and the tokens they took. The first choice that fails fails the request (400
    for a ValueError, else 500), and a client that goes away cancels every choice (499)."""
    texts: list[list[str]] = [[] for _ in sinks]
    entries: list[list[dict[str, Any]]] = [[] for _ in sinks]
    tokens = [0] * len(sinks)
    choices: list[dict[str, Any]] = []
    async with contextlib.aclosing(_step_events(sinks, idle=0.1)) as events:
        async for item in events:
            if await _client_gone(request):
                for submission in submissions:
                    submission.cancel()
                raise APIError(499, "client disconnected")
            if item is None:
                continue
            index, event = item
            if isinstance(event, BaseException):
                invalid = isinstance(event, ValueError)
                raise APIError(400 if invalid else 500, str(event),
                               "invalid_request_error" if invalid else "server_error")
            if not tokens[index]:
                server.metrics.first_token(submissions[index].submitted)
            tokens[index] += 1
            texts[index].append(event.delta)
            if body.logprobs and (entry := server.logprob_entry(event)) is not None:
                entries[index].append(entry)
            if event.finish_reason:
                choices.append({"index": index, "message": {"role": "assistant", "content": "".join(texts[index])},
                                "logprobs": {"content": entries[index]} if body.logprobs else None,
                                "finish_reason": event.finish_reason})
    return sorted(choices, key=lambda choice: choice["index"]), sum(tokens)


async def _stream(server: Owl2Server, body: ChatCompletionRequest, request: Request, submissions: list[Submission],
                  sinks: list[_Sink], ident: str, created: int, prompt_tokens: int, include_usage: bool,
                  started: float) -> AsyncIterator[str]:
    model = server.settings.model_name

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": choices, **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    completion_tokens, first = 0, True
    try:
        for i in range(len(sinks)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async with contextlib.aclosing(_step_events(sinks)) as events:
            async for item in events:
                assert item is not None  # no idle ticks were asked for
                index, event = item
                if isinstance(event, BaseException):
                    yield f"data: {json.dumps(error_body(str(event), 'server_error'))}\n\n"
                    continue
                if first:
                    server.metrics.first_token(submissions[index].submitted)
                    first = False
                completion_tokens += 1
                logprobs = None
                if body.logprobs:
                    entry = server.logprob_entry(event)
                    logprobs = {"content": [entry] if entry else []}
                if event.delta or logprobs:
                    yield chunk([{"index": index, "delta": {"content": event.delta}, "logprobs": logprobs,
                                  "finish_reason": None}])
                if event.finish_reason:
                    yield chunk([{"index": index, "delta": {}, "logprobs": None,
                                  "finish_reason": event.finish_reason}])
        if include_usage:
            yield chunk([], usage=usage(prompt_tokens * len(sinks), completion_tokens))
        yield "data: [DONE]\n\n"
        server.metrics.finish(started, completion_tokens)
    finally:  # also when the client went away mid-stream: free the slots
        for submission in submissions:
            submission.cancel()
