"""The OpenAI-compatible HTTP server: ``create_app(pipeline, ServerSettings(...))`` -> a FastAPI app.

Routes: ``POST /v1/chat/completions`` (plain and SSE streaming), ``POST /v1/rate`` (Q-Align-family ratings of
images and videos, :mod:`owl2.serving.rating`), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus
text) and the chat page at ``/``. Requests of all clients share forwards through a
:class:`~owl2.serving.batcher.ContinuousBatcher`: chat completions share decode steps, ratings share batched
prefills between them. Every malformed request gets OpenAI's error JSON with a 4xx status: 400 for invalid input,
401 for a missing or wrong API key, 404 for an unknown model or route, 413 for a body over the size limit, 429 when
the queue is full.
"""

# No `from __future__ import annotations`: FastAPI reads the body model of the route from its real annotation.

import asyncio
import contextlib
import dataclasses
import html
import io
import json
import os
import secrets
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
from owl2.serving.batcher import ContinuousBatcher, PrefillRow, PrefillSubmission, QueueFullError, Submission
from owl2.serving.images import ImagePolicy, fetch_image
from owl2.serving.metrics import ServerMetrics
from owl2.serving.protocol import (
    ChatCompletionRequest,
    LenientChatCompletionRequest,
    LenientRateRequest,
    RateRequest,
    completion_id,
    error_body,
    now,
    token_logprob,
    usage,
)
from owl2.serving.rating import InvalidRating, RatingJob, build_job, check_limits, rating_list


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


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def _error(status: int, message: str, kind: str = "invalid_request_error", **extra: Any) -> JSONResponse:
    return JSONResponse(error_body(message, kind, **extra), status_code=status)


class BodySizeLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, judged from Content-Length and from what arrives."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = _error(413, f"request body over the limit of {self.limit:,} bytes", code="body_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_large(scope, receive, send)
            return
        seen = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await too_large(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


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
                                         prefill_queue_images=settings.max_rate_queue)
        self.metrics = ServerMetrics(self.batcher, engine.image_cache)

    # --------------------------------------------------------------------------------------------- requests
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                           f"{self.settings.model_name!r}", param="model", code="model_not_found")

    async def build(self, body: ChatCompletionRequest) -> "tuple[list[GenerationRequest], int]":
        """One generation request per choice and the prompt's length in tokens (images counted as their visual
        tokens), or :class:`APIError`."""
        settings = self.settings
        self.check_model(body.model)
        urls = [part.image_url.url for m in body.messages if isinstance(m.content, list)
                for part in m.content if part.type == "image_url"]
        if len(urls) > settings.max_images_per_request:
            raise APIError(400, f"{len(urls)} images in one request; the limit is {settings.max_images_per_request}",
                           param="messages", code="too_many_images")
        try:
            images = await run_in_threadpool(lambda: [fetch_image(u, settings.images) for u in urls])
        except ValueError as exc:
            raise APIError(400, f"invalid image: {exc}", param="messages", code="invalid_image") from exc
        messages = _owl2_messages(body, images)
        requested = body.requested_max_tokens
        if requested is not None and requested > settings.max_new_tokens:
            raise APIError(400, f"max_tokens {requested} is over this server's limit of {settings.max_new_tokens}",
                           param="max_tokens")
        sampling: dict[str, Any] = {
            "max_new_tokens": requested or settings.max_new_tokens,
            "temperature": settings.default_temperature if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "top_k": max(body.top_k or 0, 0),
            "repetition_penalty": body.repetition_penalty or 1.0,
            "min_new_tokens": min(body.min_tokens or 0, requested or settings.max_new_tokens),
            "stop": body.stop_list,
            "seed": body.seed,
            "logprobs": (body.top_logprobs or 0) if body.logprobs else None,
        }
        try:
            request = await run_in_threadpool(self.pipeline.request, messages, **sampling)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        prompt_tokens = self.pipeline.engine.prompt_tokens(request)
        if prompt_tokens > self.max_prompt_tokens:
            raise APIError(400, f"the prompt takes {prompt_tokens} tokens (images included); the limit is "
                           f"{self.max_prompt_tokens}", param="messages", code="context_length_exceeded")
        room = self.context_length - prompt_tokens
        if requested is not None and requested > room:
            raise APIError(400, f"this model's context is {self.context_length} tokens; the prompt takes "
                           f"{prompt_tokens}, which leaves {room} for the answer, but max_tokens is {requested}",
                           param="max_tokens", code="context_length_exceeded")
        params = dataclasses.replace(request.params, max_new_tokens=min(request.params.max_new_tokens, room))
        requests = []
        for choice in range(body.n):
            seed = None if body.seed is None else body.seed + choice
            requests.append(GenerationRequest(request.prompt_ids, request.images,
                                              dataclasses.replace(params, seed=seed)))
        return requests, prompt_tokens

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
        thread pool."""
        self.check_model(body.model)
        settings = self.settings
        try:
            check_limits(body, max_items=settings.max_rate_items, max_frames=settings.max_video_frames)
            return await run_in_threadpool(build_job, self.pipeline, body, settings.images, self.context_length)
        except InvalidRating as exc:
            raise APIError(400, str(exc), param=exc.param, code=exc.code) from exc

    def submit_rating(self, rows: list[PrefillRow]) -> "tuple[PrefillSubmission, _RowSink]":
        self.batcher.start()
        sink = _RowSink(asyncio.get_running_loop())
        try:
            return self.batcher.submit_prefill(rows, sink), sink
        except QueueFullError as exc:
            raise APIError(429, str(exc), "rate_limit_error", code="queue_full") from exc

    def token_text(self, token_id: int) -> str:
        """The token as text, its SentencePiece space marker as a space; a byte piece as its (partial) character."""
        piece = self.pipeline.tokenizer.token_pieces([token_id])[0]
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)]).decode("utf-8", errors="replace")
        return piece.replace("\u2581", " ")

    def logprob_entry(self, event: StepEvent) -> dict[str, Any] | None:
        if event.logprob is None or event.token_id is None:
            return None
        top = [(self.token_text(t), lp) for t, lp in event.top_logprobs or []]
        return token_logprob(self.token_text(event.token_id), event.logprob, top)


def _owl2_messages(body: ChatCompletionRequest, images: list[Any]) -> list[dict[str, Any]]:
    """OpenAI messages -> owl2's message list, each ``image_url`` part replaced by its decoded image."""
    remaining = iter(images)
    out = []
    for message in body.messages:
        role = "system" if message.role == "developer" else message.role
        if message.content is None or isinstance(message.content, str):
            out.append({"role": role, "content": message.content or ""})
            continue
        parts = [{"type": "text", "text": p.text} if p.type == "text" else {"type": "image", "image": next(remaining)}
                 for p in message.content]
        out.append({"role": role, "content": parts})
    return out


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


async def _next_event(sink: _Sink, request: Request, submissions: list[Submission]) -> StepEvent:
    """The next event of ``sink``; cancels the request's submissions when its client goes away."""
    while True:
        try:
            event: StepEvent | BaseException | None = await asyncio.wait_for(sink.queue.get(), timeout=0.1)
        except asyncio.TimeoutError:
            event = None
        if await _client_gone(request):
            for submission in submissions:
                submission.cancel()
            raise APIError(499, "client disconnected")
        if event is None:
            continue
        if isinstance(event, BaseException):
            raise APIError(500 if not isinstance(event, ValueError) else 400, str(event),
                           "server_error" if not isinstance(event, ValueError) else "invalid_request_error")
        return event


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

    app = FastAPI(title="owl2", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    body_model = LenientChatCompletionRequest if settings.lenient else ChatCompletionRequest
    rate_model = LenientRateRequest if settings.lenient else RateRequest

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        server.metrics.requests.labels(status=str(exc.status)).inc()
        return _error(exc.status, exc.message, exc.kind, param=exc.param, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        server.metrics.requests.labels(status="400").inc()
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                          code="invalid_json")
        where = _field_path(first.get("loc", ()))
        problems = "; ".join(f"{_field_path(e.get('loc', ())) or 'body'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors()[:5])
        return _error(400, f"invalid request: {problems}", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                      "invalid_request_error")

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        server.metrics.requests.labels(status="500").inc()
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    async def authorize(request: Request) -> None:
        if not settings.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not any(secrets.compare_digest(key.strip(), k) for k in settings.api_keys):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

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
            return StreamingResponse(
                _stream(server, body, request, submissions, sinks, ident, created, prompt_tokens, include_usage,
                        started),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            choices = await asyncio.gather(*[_collect(server, body, request, sink, submissions, i)
                                             for i, sink in enumerate(sinks)])
        finally:
            for submission in submissions:
                submission.cancel()
        completion_tokens = sum(c.pop("_tokens") for c in choices)
        server.metrics.finish(started, completion_tokens)
        return JSONResponse({"id": ident, "object": "chat.completion", "created": created,
                             "model": settings.model_name, "choices": choices,
                             "usage": usage(prompt_tokens * len(requests), completion_tokens)})

    @app.post("/v1/rate", dependencies=[Depends(authorize)])
    async def rate(body: rate_model, request: Request) -> Response:  # type: ignore[valid-type]
        started = time.perf_counter()
        job = await server.build_rating(body)
        if await request.is_disconnected():  # gave up while its images were decoded: nothing to run
            raise APIError(499, "client disconnected")
        submission, sink = server.submit_rating(job.rows)
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
    """A pydantic error location as a path, ``("body", "items", 3, "image_url")`` -> ``items[3].image_url``."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


async def _collect(server: Owl2Server, body: ChatCompletionRequest, request: Request, sink: _Sink,
                   submissions: list[Submission], index: int) -> dict[str, Any]:
    text, tokens, entries = [], 0, []
    first = True
    while True:
        event = await _next_event(sink, request, submissions)
        if first:
            server.metrics.first_token(submissions[index].submitted)
            first = False
        tokens += 1
        text.append(event.delta)
        if body.logprobs and (entry := server.logprob_entry(event)) is not None:
            entries.append(entry)
        if event.finish_reason:
            return {"index": index, "message": {"role": "assistant", "content": "".join(text)},
                    "logprobs": {"content": entries} if body.logprobs else None,
                    "finish_reason": event.finish_reason, "_tokens": tokens}


async def _stream(server: Owl2Server, body: ChatCompletionRequest, request: Request, submissions: list[Submission],
                  sinks: list[_Sink], ident: str, created: int, prompt_tokens: int, include_usage: bool,
                  started: float) -> AsyncIterator[str]:
    model = server.settings.model_name

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": choices, **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    merged: asyncio.Queue[tuple[int, StepEvent | BaseException]] = asyncio.Queue()

    async def forward(index: int, sink: _Sink) -> None:
        while True:
            event = await sink.queue.get()
            await merged.put((index, event))
            if isinstance(event, BaseException) or event.finish_reason:
                return

    forwarders = [asyncio.create_task(forward(i, s)) for i, s in enumerate(sinks)]
    completion_tokens, open_choices, first = 0, len(sinks), True
    try:
        for i in range(len(sinks)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        while open_choices:
            index, event = await merged.get()
            if isinstance(event, BaseException):
                yield f"data: {json.dumps(error_body(str(event), 'server_error'))}\n\n"
                open_choices -= 1
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
                open_choices -= 1
                yield chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": event.finish_reason}])
        if include_usage:
            yield chunk([], usage=usage(prompt_tokens * len(sinks), completion_tokens))
        yield "data: [DONE]\n\n"
        server.metrics.finish(started, completion_tokens)
    finally:  # also when the client went away mid-stream: free the slots
        for submission in submissions:
            submission.cancel()
        for task in forwarders:
            task.cancel()
