"""What runs before a route: :class:`RequestBody` (ASGI middleware: the whole body under its size limit and
deadline), the API-key check (:func:`api_key_check`) and the route class of the JSON routes
(:func:`json_route_class`: key first, then Content-Type and strict parsing)."""

import asyncio
import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from owl2.serving.errors import APIError, error_response
from owl2.serving.json_body import PARSE_IN_THREAD_BYTES, InvalidJSON, is_json, parse_json_body


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
        response = error_response(status, message, code=reason)
        if status == 408:  # a client this slow gets no second request on the connection
            response.headers["connection"] = "close"
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def api_key_check(keys: Sequence[str]) -> Callable[[Request], Awaitable[None]]:
    """The API-key check for ``keys`` (none: every request passes), used as a route dependency."""
    api_keys = [key.encode("utf-8") for key in keys]

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

    return authorize


def json_route_class(authorize: Callable[[Request], Awaitable[None]]) -> type[APIRoute]:
    """The route class of an app whose key check is ``authorize`` (:func:`api_key_check`)."""

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
                if not is_json(content_type):
                    got = f"got {content_type[:60]!r}" if content_type else "got none"
                    raise APIError(415, f"send the body as JSON with 'Content-Type: application/json' ({got})",
                                   code="unsupported_media_type")
                body = await request.body()
                try:
                    parsed = (await run_in_threadpool(parse_json_body, body) if len(body) > PARSE_IN_THREAD_BYTES
                              else parse_json_body(body))
                except InvalidJSON as exc:
                    raise APIError(400, str(exc), code="invalid_json") from None
                request._json = parsed  # Starlette's request.json(), which FastAPI calls next, returns it as is
                return await handler(request)

            return checked

    return JSONRoute
