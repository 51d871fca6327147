"""A corpus of malformed requests: each gets OpenAI's error JSON with the right 4xx code, and afterwards the
server still answers correctly and its memory has not grown."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import httpx
import pytest
from PIL import Image

from tests.serving.conftest import data_url, expected_answer, png_bytes, rss_bytes, scene

CHAT = "/v1/chat/completions"


def _b64(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def _bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A valid PNG header announcing width x height pixels, with a few bytes of data: a decompression bomb."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def _image_request(url: str, text: str = "What is it?") -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": text}]}], "max_tokens": 4}


def _user(text: str = "hi", **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}


_TRUNCATED = png_bytes(scene("red", 64))[:-40]
_JPEG = io.BytesIO()
Image.new("RGB", (64, 64), "blue").save(_JPEG, format="JPEG")

# (name, body: dict -> JSON, bytes -> raw, expected status, extra headers)
CORPUS: list[tuple[str, object, int]] = [
    ("not json", b"{bad json", 400),
    ("json array", b"[1, 2, 3]", 400),
    ("json string", b'"hello"', 400),
    ("empty body", b"", 400),
    ("no messages", {"model": "tiny"}, 400),
    ("empty messages", {"messages": []}, 400),
    ("messages not a list", {"messages": "hi"}, 400),
    ("message not an object", {"messages": ["hi"]}, 400),
    ("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, 400),
    ("content a number", {"messages": [{"role": "user", "content": 5}]}, 400),
    ("user content null", {"messages": [{"role": "user", "content": None}]}, 400),
    ("empty user message", _user(""), 400),
    ("only a system message", {"messages": [{"role": "system", "content": "be nice"}]}, 400),
    ("two user messages in a row", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     400),
    ("unknown part type", {"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]}, 400),
    ("text part without text", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400),
    ("image part without url", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400),
    ("unknown field", _user(frobnicate=True), 400),
    ("max_tokens a string", _user(max_tokens="ten"), 400),
    ("max_tokens zero", _user(max_tokens=0), 400),
    ("max_tokens over the limit", _user(max_tokens=100000), 400),
    ("temperature negative", _user(temperature=-1), 400),
    ("temperature a list", _user(temperature=[1]), 400),
    ("top_p zero", _user(top_p=0), 400),
    ("n zero", _user(n=0), 400),
    ("five stop strings", _user(stop=["a", "b", "c", "d", "e"]), 400),
    ("top_logprobs without logprobs", _user(top_logprobs=2), 400),
    ("top_logprobs too many", _user(logprobs=True, top_logprobs=50), 400),
    ("presence penalty", _user(presence_penalty=0.5), 400),
    ("json response format", _user(response_format={"type": "json_object"}), 400),
    ("stream options without stream", _user(stream_options={"include_usage": True}), 400),
    ("unknown model", {**_user(), "model": "gpt-4o"}, 404),
    ("invalid base64", _image_request("data:image/png;base64,@@@notbase64@@@"), 400),
    ("not an image", _image_request(_b64(b"hello, I am text, not a picture")), 400),
    ("text media type", _image_request(_b64(b"hello", "text/plain")), 400),
    ("truncated png", _image_request(_b64(_TRUNCATED)), 400),
    ("decompression bomb", _image_request(_b64(_bomb_png())), 400),
    ("empty image data", _image_request("data:image/png;base64,"), 400),
    ("file url not allowed", _image_request("file:///etc/passwd"), 400),
    ("http url not allowed", _image_request("http://127.0.0.1:9/cat.png"), 400),
    ("bare path", _image_request("/etc/hostname"), 400),
    ("too many images", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(scene())}} for _ in range(5)]}]}, 400),
    ("typed placeholder without image", _user("look: <|image|> what is it?"), 400),
    ("image in an assistant message", {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url(scene())}}]},
        {"role": "user", "content": "and?"}]}, 400),
    ("prompt over the context", _user("word " * 600), 400),
    ("max_tokens past the context", {"messages": [{"role": "user", "content": "word " * 470}], "max_tokens": 60},
     400),
    ("body over the size limit", _image_request(_b64(b"\x00" * (3 * 2**20))), 413),
]


def wait_idle(client: httpx.Client, timeout: float = 10.0) -> dict:
    """/health once the worker has retired the last row (it updates its counts right after the final event)."""
    deadline = time.monotonic() + timeout
    while True:
        health = client.get("/health").json()
        if (health["running"], health["waiting"]) == (0, 0) or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def _send(client: httpx.Client, body: object) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(CHAT, content=body, headers={"content-type": "application/json"})
    return client.post(CHAT, json=body)


def _check_error(response: httpx.Response, status: int, name: str) -> None:
    assert response.status_code == status, f"{name}: got {response.status_code} {response.text[:300]}"
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"], name
    assert error["type"] in ("invalid_request_error", "not_found_error"), name


def test_every_malformed_request_gets_its_error_and_the_server_survives(server, tiny_pipeline):
    good = _image_request(data_url(scene("green")), "What colour is it?")
    good["max_tokens"] = 8
    want = expected_answer(tiny_pipeline, good["messages"], 8)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for name, body, status in CORPUS:  # one round to warm allocator pools and caches
            _check_error(_send(client, body), status, name)
        assert client.post(CHAT, json=good).json()["choices"][0]["message"]["content"] == want
        before = rss_bytes(server.pid)
        for _ in range(4):
            for name, body, status in CORPUS:
                _check_error(_send(client, body), status, name)
        after = rss_bytes(server.pid)
        reply = client.post(CHAT, json=good)
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["message"]["content"] == want
        health = wait_idle(client)
    assert health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0
    assert after - before < 40 * 2**20, f"the server grew by {(after - before) / 2**20:.1f} MiB over 4 rounds"


def test_wrong_method_and_route(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        wrong = client.get(CHAT)
        assert wrong.status_code == 405 and "error" in wrong.json()
        missing = client.post("/v1/completions-nope", json={})
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("name", ["not json", "unknown field", "decompression bomb"])
def test_error_messages_name_the_problem(server, name):
    body = next(b for n, b, _ in CORPUS if n == name)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        message = _send(client, body).json()["error"]["message"].lower()
    assert {"not json": "json", "unknown field": "frobnicate", "decompression bomb": "pixels"}[name] in message, \
        message
