"""Hostile HTTP clients against a real uvicorn server on loopback, mostly over raw sockets: slow headers and bodies
(slowloris), chunked bodies over the limit, oversized and malformed headers, non-ASCII API keys, malformed JSON,
unknown routes, a connection flood and streams that hang up. Every refusal must be a 4xx (503 for the connection
cap) with OpenAI's error JSON, never a 5xx, a hang or a leaked batch slot; the limits are short so the tests are
fast."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import struct
import time
from collections.abc import Iterator

import httpx
import pytest

from owl2.serving.app import ServerSettings, create_app
from owl2.serving.connection import uvicorn_config
from tests.serving.conftest import free_port, run_uvicorn, start_server

CHAT = "/v1/chat/completions"
RATE = "/v1/rate"
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
KEEP_ALIVE = 1.0
MAX_BODY = 20_000
MAX_HEADER = 4096
GOOD = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


@contextlib.contextmanager
def serve_guarded(app) -> Iterator[int]:
    """``app`` under uvicorn with the configuration ``owl2 serve`` uses, on a free loopback port; yields the port."""
    port = free_port()
    with run_uvicorn(uvicorn_config(app, port=port, log_level="critical")):
        yield port


def _settings(**extra) -> ServerSettings:
    limits = {"model_name": "tiny", "max_body_bytes": MAX_BODY, "body_timeout": BODY_TIMEOUT,
              "header_timeout": HEADER_TIMEOUT, "keep_alive_timeout": KEEP_ALIVE, "max_header_bytes": MAX_HEADER}
    return ServerSettings(**{**limits, **extra})


@pytest.fixture(scope="module")
def guarded(tiny_pipeline) -> Iterator[tuple[int, object]]:
    """One server with short limits for the module: its port and its app."""
    app = create_app(tiny_pipeline, _settings())
    with serve_guarded(app) as port:
        yield port, app


def _connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response read from ``sock``: status, headers (lower-case names) and body."""
    sock.settimeout(timeout)
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def _closed(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the server closes ``sock`` within ``timeout`` seconds (anything it still sends is skipped)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def _request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k in headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _check_error(status: int, body: bytes, want: int, words: str = "") -> dict:
    assert status == want, (status, body[:300])
    error = json.loads(body)["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"], error
    assert words.lower() in error["message"].lower(), error["message"]
    return error


def _refused(port: int, reason: str) -> float:
    """The server's count of refusals for ``reason`` (from /metrics)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    prefix = f'owl2_http_refused_total{{reason="{reason}"}} '
    return next((float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def _still_serves(port: int) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        reply = client.post(CHAT, json=GOOD)
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"], reply.text


# --------------------------------------------------------------------------------------------- body size and time
def test_a_chunked_body_over_the_limit_gets_413(guarded):
    """No Content-Length: the limit must be judged while the chunks arrive (before: 400 'error parsing the body').
    The rest of the body is dropped, never taken for the next request on the connection."""
    port, _ = guarded
    chunk = b"a" * 4000
    with _connect(port) as sock:
        sock.sendall(_request("POST", CHAT, headers={"Content-Type": "application/json",
                                                     "Transfer-Encoding": "chunked"}))
        for _ in range(8):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
        status, _, body = _response(sock)
        assert _check_error(status, body, 413, "over the limit of 20,000 bytes")["code"] == "body_too_large"
        sock.sendall(_request("GET", "/health"))
        status, _, body = _response(sock)
        assert status == 200 and json.loads(body)["status"] == "ok"
    _still_serves(port)


def test_a_declared_body_over_the_limit_gets_413_without_being_read(guarded):
    """413 from Content-Length alone; a client that goes on sending anyway can read it, and is cut off at the body
    deadline."""
    port, _ = guarded
    with _connect(port) as sock:
        sock.sendall(_request("POST", CHAT, headers={"Content-Type": "application/json",
                                                     "Content-Length": str(10**12)}))
        _check_error(*_response(sock)[::2], 413, "over the limit")
        started = time.monotonic()
        with contextlib.suppress(OSError):
            while time.monotonic() - started < BODY_TIMEOUT + 5:
                sock.sendall(b"a" * 1000)
                time.sleep(0.05)
        assert time.monotonic() - started < BODY_TIMEOUT + 3  # closed while it was still sending
    with _connect(port) as sock:  # a client that stops sending is closed at the keep-alive timeout
        sock.sendall(_request("POST", CHAT, headers={"Content-Type": "application/json",
                                                     "Content-Length": str(10 * MAX_BODY)}))
        _check_error(*_response(sock)[::2], 413, "over the limit")
        assert _closed(sock, timeout=KEEP_ALIVE + 3)


def test_a_body_that_stalls_gets_408(guarded):
    port, _ = guarded
    payload = json.dumps(GOOD).encode()
    with _connect(port) as sock:
        sock.sendall(_request("POST", CHAT, payload, {"Content-Type": "application/json"})[:-10])  # 10 bytes short
        started = time.monotonic()
        status, headers, body = _response(sock)
        waited = time.monotonic() - started
        _check_error(status, body, 408, "did not arrive within 1 s")
        assert BODY_TIMEOUT * 0.8 < waited < BODY_TIMEOUT + 3, waited
        assert headers["connection"] == "close" and _closed(sock)


def test_a_body_that_trickles_is_cut_at_the_deadline(guarded):
    """A byte every 0.1 s is never idle for long, but the whole body has a deadline."""
    port, _ = guarded
    payload = json.dumps(GOOD).encode()
    with _connect(port) as sock:
        sock.sendall(_request("POST", CHAT, headers={"Content-Type": "application/json",
                                                     "Content-Length": str(len(payload))}))
        started = time.monotonic()
        for byte in payload[:9]:  # never idle for more than 0.1 s, until 0.9 s; then nothing more
            sock.sendall(bytes([byte]))
            time.sleep(0.1)
        status, _, body = _response(sock)
        # an idle timeout would answer 1 s after the last byte (1.9 s); the deadline answers at 1 s
        assert time.monotonic() - started < BODY_TIMEOUT + 0.6
        _check_error(status, body, 408, "did not arrive")


# -------------------------------------------------------------------------------------------- slow headers
def test_slowloris_connections_are_dropped_while_others_are_served(guarded):
    """40 connections that send their headers a byte at a time are answered 408 and closed at the header deadline
    (before: held for as long as the client liked); a normal client is served meanwhile."""
    port, _ = guarded
    before = _refused(port, "header_timeout")
    started = time.monotonic()
    socks = [_connect(port) for _ in range(40)]
    try:
        for sock in socks:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for i in range(3):  # keep trickling: each line is progress, but the deadline counts from the connection
            time.sleep(0.15)
            for sock in socks:
                sock.sendall(b"X-%d: y\r\n" % i)
        _still_serves(port)
        for sock in socks:
            status, headers, body = _response(sock, timeout=HEADER_TIMEOUT + 5)
            error = _check_error(status, body, 408, "request line and headers did not arrive")
            assert error["code"] == "header_timeout" and headers["connection"] == "close" and _closed(sock)
        assert time.monotonic() - started < HEADER_TIMEOUT + 4
    finally:
        for sock in socks:
            sock.close()
    assert _refused(port, "header_timeout") - before == 40


def test_a_connection_that_sends_nothing_is_closed(guarded):
    port, _ = guarded
    with _connect(port) as sock:
        sock.settimeout(HEADER_TIMEOUT + 3)
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed, with no unsolicited response
        assert time.monotonic() - started < HEADER_TIMEOUT + 2


def test_kept_alive_connections_close_when_idle_and_have_a_header_deadline(guarded):
    port, _ = guarded
    with _connect(port) as sock:
        sock.sendall(_request("GET", "/health"))
        assert _response(sock)[0] == 200
        started = time.monotonic()
        assert _closed(sock, timeout=KEEP_ALIVE + 3)
        assert time.monotonic() - started < KEEP_ALIVE + 2
    with _connect(port) as sock:  # the second request on the connection trickles its headers
        sock.sendall(_request("GET", "/health"))
        assert _response(sock)[0] == 200
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        for _ in range(3):  # progress every 0.25 s does not move the deadline
            time.sleep(0.25)
            sock.sendall(b"X: y\r\n")
        status, _, body = _response(sock)
        assert time.monotonic() - started < HEADER_TIMEOUT + 0.6
        _check_error(status, body, 408, "did not arrive")


# -------------------------------------------------------------------------------------- header size and syntax
@pytest.mark.parametrize("trickled", [False, True], ids=["one piece", "trickled"])
def test_headers_over_the_limit_get_431(guarded, trickled):
    """h11 limits only a request that is still incomplete: headers that arrive in one piece are checked too."""
    port, _ = guarded
    request = _request("GET", "/health", headers={"X-Big": "a" * (2 * MAX_HEADER)})
    with _connect(port) as sock:
        if trickled:  # unfinished headers just over the limit, then nothing (the answer comes before the end)
            for start in range(0, MAX_HEADER + 500, 1000):
                sock.sendall(request[start:min(start + 1000, MAX_HEADER + 500)])
                time.sleep(0.02)
        else:
            sock.sendall(request)
        status, headers, body = _response(sock)
        _check_error(status, body, 431, "over the limit of 4,096 bytes")
        assert headers["connection"] == "close"


@pytest.mark.parametrize("raw", [
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-Id: abc\x00def\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-Id: abc\rInjected: 1\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GARBAGE\r\n\r\n",
    b"GET /health\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nBad Header Name: x\r\n\r\n",
], ids=["NUL in a header", "CR in a header", "negative length", "two lengths", "bad chunk", "no request line",
        "no version", "space in a name"])
def test_malformed_http_gets_a_json_400(guarded, raw):
    port, _ = guarded
    with _connect(port) as sock:
        sock.sendall(raw)
        status, headers, body = _response(sock)
        error = _check_error(status, body, 400, "malformed HTTP request")
        assert error["code"] == "malformed_http" and headers["connection"] == "close"
        assert b"Injected" not in body
        assert _closed(sock)


def test_content_length_with_transfer_encoding_is_refused_and_smuggles_nothing(guarded):
    """h11 frames such a body by Transfer-Encoding and kept the connection open, so the bytes a proxy in front would
    count as the body by Content-Length were answered here as a second request (request smuggling)."""
    port, _ = guarded
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n%s" % (5 + len(smuggled), smuggled))
    with _connect(port) as sock:
        sock.sendall(raw)
        status, headers, body = _response(sock)
        error = _check_error(status, body, 400, "Transfer-Encoding")
        assert error["code"] == "malformed_http" and headers["connection"] == "close"
        sock.settimeout(5)
        rest = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := sock.recv(65536):
                rest += chunk
        assert b"HTTP/1.1" not in rest, rest[:200]  # the smuggled request got no answer
    _still_serves(port)


# ------------------------------------------------------------------------------------------------- API keys
def test_non_ascii_authorization_is_401_not_500(tiny_pipeline):
    """Starlette decodes headers as Latin-1; comparing such a str with a key raised TypeError (500)."""
    app = create_app(tiny_pipeline, _settings(api_keys=("sekrit", "clé")))
    with serve_guarded(app) as port:
        for route in ("GET /v1/models", "GET /metrics", f"POST {CHAT}", f"POST {RATE}"):
            method, path = route.split()
            body = json.dumps(GOOD).encode() if method == "POST" else b""
            for value in (b"Bearer \xff\xfe", b"Bearer cl\xc3\xa9x", b"\xe2\x82\xac", b"Bearer sekrit\xff"):
                with _connect(port) as sock:
                    sock.sendall(_request(method, path, body, {"Content-Type": "application/json"})
                                 .replace(b"Host: localhost", b"Host: localhost\r\nAuthorization: " + value))
                    status, _, reply = _response(sock)
                    assert _check_error(status, reply, 401, "API key")["code"] == "invalid_api_key", route
        with _connect(port) as sock:  # a non-ASCII key configured on the server works when sent as UTF-8
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer cl\xc3\xa9\r\n\r\n")
            assert _response(sock)[0] == 200
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert client.post(CHAT, json=GOOD, headers={"Authorization": "bearer  sekrit"}).status_code == 200
            # the key is checked before the body is parsed: a client without one learns nothing from its JSON
            assert client.post(CHAT, content=b"{bad", headers={"content-type": "application/json"}).status_code == 401


def test_non_ascii_authorization_without_keys_is_ignored(guarded):
    port, _ = guarded
    with _connect(port) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n")
        assert _response(sock)[0] == 200


def test_openapi_schema_is_public_and_names_no_secret(tiny_pipeline):
    """As on vLLM, /openapi.json needs no key: it is the same for every owl2 server. The interactive docs are off."""
    app = create_app(tiny_pipeline, _settings(api_keys=("sekrit",), model_name="private-model"))
    with serve_guarded(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        schema = client.get("/openapi.json")
        assert schema.status_code == 200 and CHAT in schema.json()["paths"]
        assert "sekrit" not in schema.text and "private-model" not in schema.text
        for path in ("/docs", "/redoc"):
            reply = client.get(path)
            _check_error(reply.status_code, reply.content, 404)
        assert client.get("/v1/models").status_code == 401


# ----------------------------------------------------------------------------------------------- malformed JSON
_OK = json.dumps(GOOD)
JSON_CORPUS: list[tuple[str, bytes, str, int, str]] = [
    # (name, body, content type, status, words in the message)
    ("invalid UTF-8", _OK.encode().replace(b"hi", b"h\xff\xfe"), "application/json", 400, "not UTF-8"),
    ("UTF-16", _OK.encode("utf-16"), "application/json", 400, "not UTF-8"),
    ("byte-order mark", b"\xef\xbb\xbf" + _OK.encode(), "application/json", 400, "not valid JSON"),
    ("Latin-1 text", _OK.replace("hi", "caf\xe9").encode("latin-1"), "application/json", 400, "not UTF-8"),
    ("deeply nested array", b"[" * 9000 + b"]" * 9000, "application/json", 400, "nested too deeply"),
    ("deeply nested field", (_OK[:-1] + ', "user": ' + "[" * 9000 + "]" * 9000 + "}").encode(), "application/json",
     400, "nested too deeply"),
    ("nested within the limit", (_OK[:-1] + ', "user": ' + "[" * 500 + "]" * 500 + "}").encode(),
     "application/json", 400, "user"),
    ("NaN", _OK.replace('"temperature": 0', '"temperature": NaN').encode(), "application/json", 400,
     "temperature: input should be a finite number, got nan"),
    ("Infinity", _OK.replace('"temperature": 0', '"temperature": Infinity').encode(), "application/json", 400,
     "temperature: input should be a finite number, got inf"),
    ("-Infinity", _OK.replace('"temperature": 0', '"temperature": -Infinity').encode(), "application/json", 400,
     "got -inf"),
    ("1e999", _OK.replace('"temperature": 0', '"temperature": 1e999').encode(), "application/json", 400,
     "temperature: input should be a finite number"),
    ("5000 digits", _OK.replace('"max_tokens": 2', '"max_tokens": ' + "9" * 5000).encode(), "application/json", 400,
     "max_tokens: a number of 5,000 digits is out of range"),
    ("duplicate key", _OK.replace('"max_tokens": 2', '"max_tokens": 2, "max_tokens": 3').encode(),
     "application/json", 400, "body: the key 'max_tokens' appears twice"),
    ("duplicate nested key", _OK.replace('"role": "user"', '"role": "user", "role": "system"').encode(),
     "application/json", 400, "messages[0]: the key 'role' appears twice"),
    ("lone surrogate", _OK.replace("hi", "hi \\ud800").encode(), "application/json", 400,
     "messages[0].content: the string holds a lone UTF-16 surrogate (\\ud800)"),
    ("lone low surrogate in a key", _OK.replace('"max_tokens"', '"\\udc00"', 1).encode(), "application/json", 400,
     "body (a key): the string holds a lone UTF-16 surrogate (\\udc00)"),
    ("surrogates reversed", _OK.replace("hi", "\\ude00\\ud83d").encode(), "application/json", 400, "surrogate"),
    ("trailing garbage", _OK.encode() + b" x", "application/json", 400, "not valid JSON"),
    ("truncated", _OK.encode()[:-5], "application/json", 400, "not valid JSON"),
    ("empty", b"", "application/json", 400, "empty"),
    ("whitespace", b"  \n ", "application/json", 400, "empty"),
    ("array", b"[1, 2]", "application/json", 400, "got an array"),
    ("string", b'"hi"', "application/json", 400, "got a string"),
    ("number", b"42", "application/json", 400, "got a number"),
    ("null", b"null", "application/json", 400, "got null"),
    ("true", b"true", "application/json", 400, "got a boolean"),
    ("text/plain", _OK.encode(), "text/plain", 415, "Content-Type: application/json"),
    ("form", _OK.encode(), "application/x-www-form-urlencoded", 415, "got 'application/x-www-form-urlencoded'"),
    ("multipart", _OK.encode(), "multipart/form-data; boundary=x", 415, "Content-Type"),
    ("no content type", _OK.encode(), "", 415, "got none"),
]


@pytest.mark.parametrize("route", [CHAT, RATE])
def test_malformed_json_gets_a_4xx_naming_the_problem(guarded, route):
    port, _ = guarded
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        for name, body, content_type, status, words in JSON_CORPUS:
            if route == RATE and name == "nested within the limit":
                continue  # the rating request has another shape; its 400 names other fields
            headers = {"content-type": content_type} if content_type else {}
            reply = client.post(route, content=body, headers=headers)
            assert reply.status_code == status, (name, reply.status_code, reply.text[:300])
            error = reply.json()["error"]
            assert words.lower() in error["message"].lower(), (name, error["message"])
            assert error["type"] == "invalid_request_error", name
        # JSON with a charset parameter or a +json type is JSON; and after the corpus the server still answers
        for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
            reply = client.post(CHAT, content=_OK.encode(), headers={"content-type": content_type})
            assert reply.status_code == 200, (content_type, reply.text)
        escaped = json.dumps({**GOOD, "messages": [{"role": "user", "content": "hi \U0001F600"}]}).encode()
        assert b"\\ud83d\\ude00" in escaped  # an escaped surrogate pair is a character, not a lone surrogate
        assert client.post(CHAT, content=escaped, headers={"content-type": "application/json"}).status_code == 200


def test_unknown_routes_and_methods_get_json_4xx(guarded):
    port, _ = guarded
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        for method, path, status in (("GET", "/nope", 404), ("POST", "/v1/completions", 404),
                                     ("GET", "/v1/chat/completions/../../etc/passwd", 404),
                                     ("GET", "/%ff%fe", 404), ("DELETE", CHAT, 405), ("PUT", "/health", 405),
                                     ("PATCH", "/v1/models", 405), ("GET", RATE, 405)):
            reply = client.request(method, path)
            _check_error(reply.status_code, reply.content, status)
        # no CORS: a preflight from another origin is refused, and nothing allows the origin
        preflight = client.options(CHAT, headers={"Origin": "http://evil.example",
                                                  "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "content-type"})
        _check_error(preflight.status_code, preflight.content, 405)
        assert "access-control-allow-origin" not in preflight.headers
        cross = client.post(CHAT, json=GOOD, headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in cross.headers


def test_websocket_upgrades_are_answered_as_plain_http(guarded):
    """The server has no WebSocket routes, yet uvicorn ran the handshake and closed it with an empty 403; an upgrade
    request is now an ordinary request with its ordinary JSON answer."""
    port, _ = guarded
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
               "Sec-WebSocket-Version": "13"}
    for path, status in (("/v1/models", 200), ("/nope", 404)):
        with _connect(port) as sock:
            sock.sendall(_request("GET", path, headers=upgrade))
            got, _, body = _response(sock)
            assert got == status, (got, body[:200])
            assert json.loads(body)  # JSON, not an empty handshake refusal


# ------------------------------------------------------------------------------------------------ connection cap
def test_connections_over_the_cap_get_503_and_recover(tiny_pipeline):
    app = create_app(tiny_pipeline, _settings(max_connections=3, header_timeout=5.0))
    with serve_guarded(app) as port:
        holders = [_connect(port) for _ in range(3)]
        try:
            for sock in holders:
                sock.sendall(b"GET /health HTTP/1.1\r\n")  # incomplete: each holds its connection
            time.sleep(0.2)
            with _connect(port) as sock:
                sock.sendall(_request("GET", "/health"))
                status, headers, body = _response(sock)
                error = _check_error(status, body, 503, "limit of 3 connections")
                assert error["type"] == "server_error" and headers["retry-after"] == "1"
                assert _closed(sock)
        finally:
            for sock in holders:
                sock.close()
        time.sleep(0.2)
        _still_serves(port)


# ------------------------------------------------------------------------------------------ streams that hang up
def _start_stream(port: int, max_tokens: int) -> socket.socket:
    body = json.dumps({**GOOD, "max_tokens": max_tokens, "min_tokens": max_tokens, "stream": True}).encode()
    sock = _connect(port)
    sock.sendall(_request("POST", CHAT, body, {"Content-Type": "application/json"}))
    return sock


def test_streams_that_hang_up_free_their_slots(tiny_pipeline):
    """One stream decoding and one queued behind it (one slot): both hang up (the queued one before its first
    token, the running one with a reset). Both are dropped, the slot is free, and the next request runs."""
    app = create_app(tiny_pipeline, _settings(max_batch_size=1, max_queue=4))
    stats = app.state.server.batcher.stats
    with serve_guarded(app) as port:
        running = _start_stream(port, 480)
        running.settimeout(10)
        received = b""
        while b"data: " not in received:
            received += running.recv(4096)
        deadline = time.monotonic() + 10
        while stats.running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = _start_stream(port, 480)
        while app.state.server.batcher.queue_depth == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stats.running == 1 and app.state.server.batcher.queue_depth == 1
        queued.close()  # before its first token
        running.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        running.close()  # a reset, mid-stream
        while (stats.running or app.state.server.batcher.queue_depth or stats.cancelled < 2) and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        assert (stats.running, app.state.server.batcher.queue_depth, stats.cancelled) == (0, 0, 2)
        assert stats.generated_tokens < 480  # the running one stopped early; the queued one never started
        started = time.monotonic()
        _still_serves(port)
        assert time.monotonic() - started < 10


def test_a_client_that_stops_reading_is_dropped(guarded):
    """A client that read nothing of its answers waited on a full socket for ever: it held its connection, and
    what was still to be sent, as long as it liked. Now it is dropped after the deadline. Pipelined requests for the
    chat page fill the buffers faster than any generation; a stream whose client stops reading is held the same."""
    port, _ = guarded
    before = _refused(port, "send_timeout")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    sock.connect(("127.0.0.1", port))
    with sock:
        sock.settimeout(10)
        sock.sendall(_request("GET", "/") * 400)  # megabytes of answers, more than the socket buffers hold
        started = time.monotonic()
        while _refused(port, "send_timeout") == before and time.monotonic() - started < 30:
            time.sleep(0.1)
        assert _refused(port, "send_timeout") == before + 1, "the connection of a client that reads nothing was kept"
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 20):  # what was buffered, then the end of the connection
                received += chunk
        assert 0 < received.count(b"HTTP/1.1 200 OK") < 400  # the rest was never sent
    _still_serves(port)


# ------------------------------------------------------------------------------------------------ owl2 serve
def test_serve_command_applies_its_connection_flags(tiny_checkpoint):
    process = start_server(tiny_checkpoint, "--header-timeout", "1", "--body-timeout", "1", "--max-header-kb", "2",
                           "--max-body-mb", "0.01", "--keep-alive-timeout", "1", "--max-connections", "64")
    try:
        port = int(process.url.rsplit(":", 1)[1])
        with _connect(port) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\n")
            status, _, body = _response(sock)
            _check_error(status, body, 408, "within 1 s")
        with _connect(port) as sock:
            sock.sendall(_request("GET", "/health", headers={"X-Big": "a" * 3000}))
            _check_error(*_response(sock)[::2], 431, "2,048 bytes")
        with _connect(port) as sock:
            sock.sendall(_request("POST", CHAT, headers={"Content-Type": "application/json",
                                                         "Transfer-Encoding": "chunked"}))
            with contextlib.suppress(OSError):
                sock.sendall(b"3000\r\n" + b"a" * 0x3000 + b"\r\n0\r\n\r\n")
            _check_error(*_response(sock)[::2], 413, "10,485 bytes")
    finally:
        process.stop()


@pytest.mark.parametrize("flag", ["--header-timeout=0", "--body-timeout=-1", "--keep-alive-timeout=nan",
                                  "--max-header-kb=inf", "--max-connections=-1"])
def test_serve_command_refuses_bad_limits(flag):
    from owl2.cli.main import build_parser
    from owl2.cli.serve import settings_from_args

    with pytest.raises(ValueError, match=flag.split("=")[0]):
        settings_from_args(build_parser().parse_args(["serve", flag]))


def test_serve_command_refuses_an_empty_api_key():
    from owl2.cli.main import build_parser
    from owl2.cli.serve import settings_from_args

    with pytest.raises(ValueError, match="api_keys must be non-empty"):
        settings_from_args(build_parser().parse_args(["serve", "--api-key", ""]))


@pytest.mark.parametrize("field, value", [("body_timeout", 0), ("header_timeout", float("nan")),
                                          ("keep_alive_timeout", float("inf")), ("max_header_bytes", 0),
                                          ("max_connections", 0), ("max_body_bytes", -1),
                                          ("api_keys", ("",)), ("api_keys", ("sekrit ",)), ("api_keys", ("a\tb",)),
                                          ("api_keys", "sekrit")])
def test_server_settings_refuse_bad_limits(field, value):
    """Also keys: an empty one let in every client that sends "Authorization: Bearer", and one string was taken as
    a key per character."""
    with pytest.raises(ValueError, match=field):
        ServerSettings(**{field: value})
