"""The OpenAI-compatible HTTP server: ``create_app(pipeline, ServerSettings(...))`` -> a FastAPI app.

Routes: ``POST /v1/chat/completions`` (plain and SSE streaming), ``POST /v1/rate`` (Q-Align-family ratings of
images and videos, :mod:`owl2.serving.rating`), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus
text) and the chat page at ``/``. Requests of all clients share forwards through a
:class:`~owl2.serving.batcher.ContinuousBatcher`: chat completions share decode steps, ratings share batched
prefills between them. Every malformed request gets OpenAI's error JSON with a 4xx status: 400 for invalid input,
401 for a missing or wrong API key, 404 for an unknown model or route, 405 for a wrong method, 408 for a body that
does not arrive in time, 413 for a body over the size limit, 415 for a body not sent as JSON, 429 when the queue is
full.

The body of every request is read whole before the app looks at it (:class:`RequestBody`: size limit and deadline,
chunked bodies included), and the JSON routes parse it strictly (:func:`parse_json_body`) after the API key is
checked. The connection limits (header deadline, keep-alive, header size, connection cap) are uvicorn's side:
:mod:`owl2.serving.connection`.
"""

# No `from __future__ import annotations`: FastAPI reads the body model of the route from its real annotation.

import asyncio
import contextlib
import dataclasses
import hmac
import html
import io
import json
import math
import os
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from owl2.generation.engine import GenerationRequest, StepEvent
from owl2.serving.batcher import ContinuousBatcher, PrefillRow, PrefillSubmission, QueueFullError, Submission
from owl2.serving.images import ImagePolicy, TooManyDownloads, fetch_image
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


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


MAX_ERROR_CHARS = 500
"""An error message or param is cut to this many characters: they quote the client's input (a field name, a model
name, a number), which may be megabytes long."""

_ECHO_CHARS = 40
"""A piece of the client's input quoted in an error message (a field name, a model name) is cut to this length."""


def _clip(text: str, limit: int = _ECHO_CHARS) -> str:
    """``text``, or its start and an ellipsis when it is longer than ``limit`` characters."""
    return text if len(text) <= limit else text[:limit] + "…"


def _shown(number: int) -> str:
    """An integer of the client's as written in a message: its digits, or how many there are when they are many."""
    digits = str(number)
    return digits if len(digits) <= 20 else f"of {len(digits):,} digits"


def _error(status: int, message: str, kind: str = "invalid_request_error", *, param: str | None = None,
           code: str | None = None) -> JSONResponse:
    """OpenAI's error JSON; message and param are cut to :data:`MAX_ERROR_CHARS`, whatever they quote."""
    return JSONResponse(error_body(_clip(message, MAX_ERROR_CHARS), kind,
                                   param=None if param is None else _clip(param, MAX_ERROR_CHARS), code=code),
                        status_code=status)


class RequestBody:
    """ASGI middleware: reads the whole request body before the app runs and hands it on in one piece.

    A body over ``limit`` bytes gets 413, judged from Content-Length and, for a chunked body, while it arrives; a
    body that has not arrived ``timeout`` seconds after the headers gets 408 (uvicorn has no body deadline, so a
    client could otherwise trickle a body for ever) and closes the connection. After a 413 the server drops the rest
    of the body as it arrives (for at most the body deadline, :mod:`owl2.serving.connection`), so that a client
    still sending it gets to read the answer. ``on_refused`` is called with the reason of each refusal."""

    def __init__(self, app: Any, limit: int, timeout: float, on_refused: Any = None) -> None:
        self.app, self.limit, self.timeout, self.on_refused = app, limit, timeout, on_refused

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(413, "body_too_large", scope, receive, send)
            return
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout)
        except _BodyTooLarge:
            await self._refuse(413, "body_too_large", scope, receive, send)
            return
        except asyncio.TimeoutError:
            await self._refuse(408, "body_timeout", scope, receive, send)
            return
        if body is None:  # the client went away while sending: nobody to answer
            return
        pending: dict[str, Any] | None = {"type": "http.request", "body": body, "more_body": False}

        async def replay() -> dict[str, Any]:
            nonlocal pending
            if pending is not None:
                message, pending = pending, None
                return message
            return await receive()  # after the body: the disconnect, which streaming responses listen for

        await self.app(scope, replay, send)

    async def _read(self, receive: Any) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, status: int, reason: str, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.on_refused is not None:
            self.on_refused(reason)
        message = (f"request body over the limit of {self.limit:,} bytes" if status == 413 else
                   f"the request body did not arrive within {self.timeout:g} s")
        response = _error(status, message, code=reason)
        if status == 408:  # a client this slow gets no second request on the connection
            response.headers["connection"] = "close"
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


_PARSE_IN_THREAD_BYTES = 1 << 20
"""JSON bodies of more bytes are parsed in the thread pool, so that other requests are not held up meanwhile."""

_MAX_DIGITS = 1000
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class InvalidJSON(ValueError):
    """The body is not a JSON object this server accepts; the message says why in one line."""


class _Duplicate(dict):  # type: ignore[type-arg]
    """An object in which ``key`` appeared twice: kept as a marker until its path is known."""

    key: str = ""


class _LongNumber:
    """An integer of more digits than anyone means: kept as a marker until its path is known."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


class _Markers:
    """The hooks of one ``json.loads``: they replace what JSON does not allow by markers and note that they did,
    so that :func:`_find_problem` is only run for such a body, and can name the field."""

    def __init__(self) -> None:
        self.seen = False

    def pairs(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        value = dict(pairs)
        if len(value) == len(pairs):
            return value
        self.seen = True
        marked = _Duplicate(value)
        keys: set[str] = set()
        for key, _ in pairs:
            if key in keys:
                marked.key = key
                break
            keys.add(key)
        return marked

    def constant(self, name: str) -> float:
        self.seen = True
        return float(name.replace("Infinity", "inf"))

    def real(self, text: str) -> float:
        value = float(text)
        self.seen = self.seen or not math.isfinite(value)
        return value

    def integer(self, text: str) -> int | _LongNumber:
        if len(text) > _MAX_DIGITS:  # Python refuses over 4300 digits, with a message about its own limit
            self.seen = True
            return _LongNumber(len(text))
        return int(text)


def _find_problem(value: Any) -> str | None:
    """The first thing in a parsed body that this server's JSON does not allow, as ``"path: what"``."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        where = path or "body"
        if isinstance(item, _Duplicate):
            return f"{where}: the key {item.key[:40]!r} appears twice in one object"
        if isinstance(item, _LongNumber):
            return f"{where}: a number of {item.digits:,} digits is out of range"
        if isinstance(item, float) and not math.isfinite(item):
            return f"{where}: input should be a finite number, got {item} (not a JSON number)"
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return (f"{where}: the string holds a lone UTF-16 surrogate (\\u{ord(item[exc.start]):04x}), "
                        "which is not a character")
        elif isinstance(item, dict):
            for key, member in reversed(item.items()):
                name = _clip(key)  # the client's key: the path names it briefly
                stack.append((f"{path}.{name}" if path else name, member))
                stack.append((f"{where} (a key)", key))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", member) for i, member in reversed(list(enumerate(item))))
    return None


def parse_json_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or :class:`InvalidJSON` with a one-line reason naming the field.

    Stricter than ``json.loads`` where JSON leaves a choice or Python is lenient: the body must be UTF-8 (not
    UTF-16, no byte-order mark), its top level an object, no key may appear twice in one object (parsers disagree
    on which one wins), ``NaN``/``Infinity`` and numbers out of range (``1e999``, integers of over 1000 digits) are
    refused, strings may not hold lone UTF-16 surrogates (``"\\ud800"``), and nesting deeper than Python's
    recursion limit is an error, not a crash."""
    if not body.strip():
        raise InvalidJSON("the body is empty; send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJSON(f"the body is not UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start})") from None
    markers = _Markers()
    try:
        value = json.loads(text, object_pairs_hook=markers.pairs, parse_constant=markers.constant,
                           parse_float=markers.real, parse_int=markers.integer)
    except json.JSONDecodeError as exc:
        raise InvalidJSON(f"the body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise InvalidJSON("the body is not valid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        raise InvalidJSON(f"the body must be a JSON object, got {kind}")
    # only escapes make surrogates, and only the hooks make markers: the usual body is not walked
    if (markers.seen or _SURROGATE_ESCAPE.search(text)) and (problem := _find_problem(value)):
        raise InvalidJSON(problem)
    return value


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


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
                                         prefill_queue_images=settings.max_rate_queue)
        self.metrics = ServerMetrics(self.batcher, engine.image_cache)
        self.building_images = 0
        """Images of rating requests being fetched and decoded (changed on the event loop only)."""

    # --------------------------------------------------------------------------------------------- requests
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.model_name:
            raise APIError(404, f"the model {_clip(model)!r} does not exist; this server serves "
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
        except TooManyDownloads as exc:  # not the request's fault: retry later
            raise APIError(429, str(exc), "rate_limit_error", param="messages", code="too_many_downloads") from exc
        except ValueError as exc:
            raise APIError(400, f"invalid image: {exc}", param="messages", code="invalid_image") from exc
        messages = _owl2_messages(body, images)
        requested = body.requested_max_tokens
        if requested is not None and requested > settings.max_new_tokens:
            raise APIError(400, f"max_tokens {_shown(requested)} is over this server's limit of "
                           f"{settings.max_new_tokens}",
                           param="max_tokens")
        min_tokens = body.min_tokens or 0
        if min_tokens > (requested or settings.max_new_tokens):  # over max_tokens is refused by the protocol
            raise APIError(400, f"min_tokens {_shown(min_tokens)} is over this server's limit of "
                           f"{settings.max_new_tokens}",
                           param="min_tokens")
        sampling: dict[str, Any] = {
            "max_new_tokens": requested or settings.max_new_tokens,
            "temperature": settings.default_temperature if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "top_k": max(body.top_k or 0, 0),
            "repetition_penalty": body.repetition_penalty or 1.0,
            "min_new_tokens": min_tokens,
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
        if min_tokens > room:
            raise APIError(400, f"this model's context is {self.context_length} tokens; the prompt takes "
                           f"{prompt_tokens}, which leaves {room} for the answer, but min_tokens is {min_tokens}",
                           param="min_tokens", code="context_length_exceeded")
        try:  # every value was checked above; a setting that still does not fit is the request's fault, not ours
            params = dataclasses.replace(request.params, max_new_tokens=min(request.params.max_new_tokens, room))
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
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
        return _error(exc.status, exc.message, exc.kind, param=exc.param, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        server.metrics.requests.labels(status="400").inc()
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                          code="invalid_json")
        where = _field_path(first.get("loc", ()))
        problems = "; ".join(f"{_field_path(e.get('loc', ())) or 'body'}: "
                             f"{_clip(e['msg'].removeprefix('Value error, '), 200)}" for e in exc.errors()[:5])
        return _error(400, f"invalid request: {problems}", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                      "invalid_request_error")

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        # the traceback goes to the server's log (Starlette re-raises after this answer); the client learns nothing
        # of the server's internals (paths, library messages)
        server.metrics.requests.labels(status="500").inc()
        return _error(500, "internal server error; the server's log has the details", "server_error")

    api_keys = [key.encode("utf-8") for key in settings.api_keys]

    async def authorize(request: Request) -> None:
        """401 unless the request sends ``Authorization: Bearer <one of the keys>``. The header is compared as
        bytes, in constant time: a client may send any bytes there, and comparing str with non-ASCII characters
        raises instead of answering."""
        if not api_keys:
            return
        header = next((value for name, value in request.scope["headers"] if name == b"authorization"), b"")
        scheme, _, key = header.strip().partition(b" ")
        matches = [hmac.compare_digest(key.strip(), k) for k in api_keys]  # every key, so timing says nothing
        if scheme.lower() != b"bearer" or not any(matches):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    class JSONRoute(APIRoute):
        """A route with a JSON body: its API key is checked before the body is parsed, the body must be sent as
        JSON (415: a browser page on another site can send text/plain without asking, but not JSON) and is parsed
        strictly (:func:`parse_json_body`, 400)."""

        def get_route_handler(self) -> Any:
            handler = super().get_route_handler()
            if self.body_field is None:
                return handler
            protected = any(getattr(d, "dependency", None) is authorize for d in self.dependencies)

            async def checked(request: Request) -> Response:
                if protected:
                    await authorize(request)
                content_type = request.headers.get("content-type")
                if not _is_json(content_type):
                    got = f"got {content_type[:60]!r}" if content_type else "got none"
                    raise APIError(415, f"send the body as JSON with 'Content-Type: application/json' ({got})",
                                   code="unsupported_media_type")
                body = await request.body()
                try:
                    parsed = (await run_in_threadpool(parse_json_body, body) if len(body) > _PARSE_IN_THREAD_BYTES
                              else parse_json_body(body))
                except InvalidJSON as exc:
                    raise APIError(400, str(exc), code="invalid_json") from None
                request._json = parsed  # Starlette's request.json(), which FastAPI calls next, returns it as is
                return await handler(request)

            return checked

    app.router.route_class = JSONRoute

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
        collectors = [asyncio.ensure_future(_collect(server, body, request, sink, submissions, i))
                      for i, sink in enumerate(sinks)]
        try:
            choices = await asyncio.gather(*collectors)
        finally:  # one choice failed, or the client left: the other choices stop too, none is left waiting
            for collector in collectors:
                collector.cancel()
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
        path += f"[{part}]" if isinstance(part, int) else f".{_clip(str(part))}" if path else _clip(str(part))
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
