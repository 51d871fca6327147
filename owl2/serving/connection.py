"""The connection layer of ``owl2 serve``: uvicorn's h11 protocol with the limits a public server needs.

uvicorn reads the request line and headers with no deadline (a client that sends one header byte a second holds its
connection for as long as it likes), answers malformed HTTP with plain text, and refuses connections over its
``limit_concurrency`` with a plain-text 503. :class:`GuardedH11Protocol` adds what is missing and answers every refusal
with OpenAI's error JSON:

- the request line and headers must arrive within ``header_timeout`` seconds of the connection being opened (or of
  the first byte of the next request on a kept-alive connection); a client that started a request gets 408, one that
  sent nothing is closed;
- the request line and headers together are limited to ``max_header_bytes`` (checked by h11 while they arrive, and
  once they are in): 431;
- malformed HTTP (a bad request line, a bad Content-Length, control characters in a header) gets 400;
- a request on a connection beyond ``max_connections`` open ones (or while that many requests are in flight) gets
  503 with ``Retry-After``;
- a client that stops reading its answer (the socket's buffers stay full) for ``linger_timeout`` seconds is
  disconnected, so that it cannot hold its connection and the rest of its answer for ever;
- a body the app refused without reading it all (413) is read and dropped for at most ``linger_timeout`` seconds,
  so that the client, still sending, gets to read the answer (closing a socket with unread data resets it, and the
  client would see a reset instead of the 413); then the connection is closed.

The deadline for the body is the app's (:class:`owl2.serving.middleware.RequestBody`): uvicorn has no body timeout,
and the app reads the body itself anyway. :func:`uvicorn_config` builds the uvicorn configuration from the app's
:class:`~owl2.serving.app.ServerSettings`. Ray Serve replicas use Ray's own HTTP proxy, so these connection limits
do not apply there; the app's limits (body size and deadline, JSON checks, API keys) do.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from owl2.serving.protocol import error_body

_REASONS = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}


def _json_error(message: str, code: str, kind: str = "invalid_request_error") -> bytes:
    return json.dumps(error_body(message, kind, code=code)).encode()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a connection cap and JSON answers to malformed HTTP.

    The limits are class attributes: :func:`uvicorn_config` makes a subclass with the server's values (uvicorn
    creates one protocol object per connection from the class it is given)."""

    header_timeout: ClassVar[float] = 10.0
    max_connections: ClassVar[int | None] = 512
    max_header_bytes: ClassVar[int] = 16 * 1024
    linger_timeout: ClassVar[float] = 60.0
    on_refused: ClassVar[Callable[[str], None] | None] = None
    """Called with the reason of each refusal (``header_timeout``, ``headers_too_large``, ``malformed_http``,
    ``too_many_connections``, ``send_timeout``): the server's metrics count them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None  # uvicorn's own check answers in plain text; _admit does it in JSON
        self._header_deadline: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._stalled: asyncio.TimerHandle | None = None
        self._app = self.app
        self.app = self._admit

    # ------------------------------------------------------------------------------------------ header deadline
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # also a connection that never sends a byte must not be held forever

    def data_received(self, data: bytes) -> None:
        if self._header_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in (or the request failed)
            self._disarm()
        if self._linger is not None and self.conn.their_state is not h11.SEND_BODY:  # the refused body is over
            self._linger.cancel()
            self._linger = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        for timer in (self._linger, self._stalled):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    # ------------------------------------------------------------------------------------------ stalled reader
    def pause_writing(self) -> None:
        """The answer has filled the socket's buffers: the client is not reading. It gets ``linger_timeout``
        seconds to read on, or the connection is dropped; otherwise a client that never reads would hold its
        connection, and all of its answer not yet sent, for ever."""
        super().pause_writing()
        if self._stalled is None:
            self._stalled = self.loop.call_later(self.linger_timeout, self._reader_too_slow)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _reader_too_slow(self) -> None:
        self._stalled = None
        if self.flow.write_paused and not self.transport.is_closing():
            self._refuse("send_timeout")
            # close() would first flush the buffer, which is what this client does not let happen
            self.transport.abort()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY and self._linger is None and not self.transport.is_closing():
            # answered before the body was read (413): uvicorn drops the rest as it comes, but each byte also
            # stops its keep-alive timer, so a client that never stops sending needs this deadline
            self._linger = self.loop.call_later(self.linger_timeout, self._stop_lingering)

    def _stop_lingering(self) -> None:
        self._linger = None
        if self.conn.their_state is h11.SEND_BODY:
            self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        started, _ = self.conn.trailing_data
        if started:  # h11 sends no response before a request, so the bytes are written directly
            self._refuse("header_timeout")
            body = _json_error(f"the request line and headers did not arrive within {self.header_timeout:g} s",
                               "header_timeout")
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()

    # ------------------------------------------------------------------------------------------ malformed HTTP
    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this when h11 cannot parse the request: 431 when the request line and headers are over the
        limit, else 400; JSON either way, and the connection is closed."""
        buffered, _ = self.conn.trailing_data
        if len(buffered) > self.max_header_bytes:
            status, code = 431, "headers_too_large"
            message = f"the request line and headers are over the limit of {self.max_header_bytes:,} bytes"
        else:
            status, code = 400, "malformed_http"
            message = "malformed HTTP request (request line, headers or body framing)"
        self._refuse(code)
        body = _json_error(message, code)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=status, headers=headers, reason=_REASONS[status]),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # a response had already begun: nothing more can be said on this connection
            pass
        self.transport.close()

    # ------------------------------------------------------------------------------- header size, connection cap
    async def _admit(self, scope: Any, receive: Any, send: Any) -> None:
        """The app; or 431 for a request line and headers over ``max_header_bytes`` that arrived in one piece (h11
        checks its limit only while a request is incomplete); or 400 for a request that gives both Content-Length and
        Transfer-Encoding; or 503 while more than ``max_connections``
        connections are open or requests are in flight (this connection and this request counted)."""
        size = len(scope["raw_path"]) + len(scope["query_string"]) + sum(len(k) + len(v) + 4
                                                                          for k, v in scope["headers"])
        limit = self.max_connections
        names = {name for name, _ in scope["headers"]}
        if b"content-length" in names and b"transfer-encoding" in names:
            # h11 frames such a body by Transfer-Encoding alone; a proxy in front that went by Content-Length would
            # read the rest as a second request (request smuggling), so refuse it and close (RFC 9112, 6.1)
            self._refuse("malformed_http")
            await _send_error(send, 400, "malformed HTTP request: both Content-Length and Transfer-Encoding given",
                              "malformed_http")
        elif size > self.max_header_bytes:
            self._refuse("headers_too_large")
            await _send_error(send, 431, f"the request line and headers are over the limit of "
                              f"{self.max_header_bytes:,} bytes", "headers_too_large")
        elif limit is not None and (len(self.connections) > limit or len(self.tasks) > limit):
            self._refuse("too_many_connections")
            await _send_error(send, 503, f"the server is at its limit of {limit} connections; retry shortly",
                              "server_overloaded", "server_error", [(b"retry-after", b"1")])
        else:
            await self._app(scope, receive, send)

    def _refuse(self, reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(reason)


async def _send_error(send: Any, status: int, message: str, code: str, kind: str = "invalid_request_error",
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """An error response through ASGI; the connection is closed after it (the request's body is left unread)."""
    body = _json_error(message, code, kind)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def uvicorn_config(app: Any, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's configuration for ``app`` (from :func:`owl2.serving.app.create_app`) with the connection limits of
    its :class:`~owl2.serving.app.ServerSettings`: h11 with :class:`GuardedH11Protocol`, the keep-alive timeout and
    the header size limit."""
    server = app.state.server
    settings = server.settings
    protocol = type("Owl2H11Protocol", (GuardedH11Protocol,), {
        "header_timeout": settings.header_timeout, "max_connections": settings.max_connections,
        "max_header_bytes": settings.max_header_bytes, "linger_timeout": settings.body_timeout,
        "on_refused": staticmethod(lambda reason: server.metrics.refused.labels(reason=reason).inc())})
    # ws="none": the server has no WebSocket routes; an upgrade request is answered as plain HTTP (JSON), and the
    # WebSocket handshake code is not exposed to clients at all
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol, ws="none",
                          timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]
                          h11_max_incomplete_event_size=settings.max_header_bytes)
