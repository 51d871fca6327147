"""A corpus of malformed requests, for chat completions and for ratings: each gets OpenAI's error JSON with the right
4xx code, and afterwards (for ratings: meanwhile) the server still answers correctly and its memory has not grown."""

from __future__ import annotations

import asyncio
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


# ------------------------------------------------------------------------------------------ POST /v1/rate
RATE = "/v1/rate"
_GOOD = data_url(scene("teal"))


def _rate(*items: object, **extra: object) -> dict:
    return {"items": list(items), **extra}


def _raw_rate(fragment: str) -> bytes:
    """A body with a number JSON can spell but pydantic must refuse (``1e999`` is infinite, ``NaN``)."""
    return ('{"items": [{"image_url": "' + _GOOD + '"}], ' + fragment + "}").encode()


# (name, body, status, words the message must hold): the server (conftest) allows 4 items and 3 frames a video
RATE_CORPUS: list[tuple[str, object, int, str]] = [
    ("not json", b'{"items": [', 400, "json"),
    ("no items", {"task": "quality"}, 400, "items"),
    ("empty items", _rate(), 400, "items: list should have at least 1 item"),
    ("items a string", {"items": "cat.png"}, 400, "items"),
    ("items a huge number", {"items": 10**40}, 400, "items"),
    ("too many items", _rate(*[{"image_url": _GOOD}] * 5), 400, "5 items in one request; the limit is 4"),
    ("item a string", _rate(_GOOD), 400, "items[0]: an item is"),
    ("item a number", _rate({"image_url": _GOOD}, 7), 400, "items[1]: an item is"),
    ("item empty", _rate({}), 400, "items[0]: an item is"),
    ("image and video in one item", _rate({"image_url": _GOOD, "video": [_GOOD]}), 400, "exactly one"),
    ("unknown item field", _rate({"image": _GOOD}), 400, "items[0].image"),
    ("image_url a number", _rate({"image_url": 5}), 400, "items[0].image_url: an image is a url string"),
    ("image_url without url", _rate({"image_url": {}}), 400, "items[0].image_url.url"),
    ("empty url", _rate({"image_url": ""}), 400, "items[0].image_url.url"),
    ("video with no frames", _rate({"video": []}), 400, "items[0].video: list should have at least 1 item"),
    ("video a string", _rate({"video": _GOOD}), 400, "items[0].video"),
    ("video frame a number", _rate({"video": [_GOOD, 3]}), 400, "items[0].video[1]"),
    ("too many frames", _rate({"image_url": _GOOD}, {"video": [_GOOD] * 4}), 400,
     "items[1].video: 4 frames; the limit is 3"),
    ("unsupported url scheme", _rate({"image_url": _GOOD}, {"image_url": "ftp://x/cat.png"}), 400,
     "items[1].image_url: unsupported image url"),
    ("bare path", _rate({"image_url": "/etc/hostname"}), 400, "items[0].image_url"),
    ("file url not allowed", _rate({"image_url": "file:///etc/passwd"}), 400, "items[0].image_url: file://"),
    ("http url not allowed", _rate({"image_url": "http://127.0.0.1:9/cat.png"}), 400, "items[0].image_url: http"),
    ("invalid base64", _rate({"image_url": "data:image/png;base64,@@@notbase64@@@"}), 400, "items[0].image_url"),
    ("not an image", _rate({"image_url": _b64(b"hello, I am text, not a picture")}), 400, "items[0].image_url"),
    ("truncated frame", _rate({"video": [_GOOD, _b64(_TRUNCATED)]}), 400, "items[0].video[1]"),
    ("decompression bomb", _rate({"image_url": _GOOD}, {"image_url": _b64(_bomb_png())}), 400,
     "items[1].image_url"),
    ("unknown task", _rate({"image_url": _GOOD}, task="sharpness"), 400, "task: input should be 'quality'"),
    ("task a number", _rate({"image_url": _GOOD}, task=12), 400, "task"),
    ("unknown prompt", _rate({"image_url": _GOOD}, prompt="custom"), 400, "prompt"),
    ("a prompt template", _rate({"image_url": _GOOD}, prompt="USER: <|image|> rate it"), 400, "prompt"),
    ("infinite weight", _raw_rate('"weights": [1e999, 4, 3, 2, 1]'), 400, "weights[0]: input should be a finite"),
    ("NaN weight", _raw_rate('"weights": [NaN, 4, 3, 2, 1]'), 400, "finite"),
    ("huge weights", _rate({"image_url": _GOOD}, weights=[1e300, 1, 1, 1, 1]), 400, "weights[0]"),
    ("weights of the wrong count", _rate({"image_url": _GOOD}, weights=[1, 2]), 400, "weights: got 2 weights"),
    ("equal weights", _rate({"image_url": _GOOD}, weights=[1, 1, 1, 1, 1]), 400, "weights"),
    ("weights a string", _rate({"image_url": _GOOD}, weights="5,4,3,2,1"), 400, "weights"),
    ("one level word", _rate({"image_url": _GOOD}, levels=["good"]), 400, "levels"),
    ("level numbers", _rate({"image_url": _GOOD}, levels=[1, 2]), 400, "levels"),
    ("level groups of unequal length", _rate({"image_url": _GOOD}, levels=[["a", "b"], ["c", "d", "e"]]), 400,
     "levels: level groups must have the same length"),
    ("a thousand levels", _rate({"image_url": _GOOD}, levels=["w"] * 1000), 400, "levels"),
    ("a huge level word", _rate({"image_url": _GOOD}, levels=["x" * 10000, "y"]), 400, "levels"),
    ("an empty level word", _rate({"image_url": _GOOD}, levels=["good", " "]), 400, "levels"),
    ("a level word twice", _rate({"image_url": _GOOD}, levels=["good", "fair", "good"]), 400,
     "levels 'good' and 'good' begin with the same token"),
    ("a level of two groups twice",
     _rate({"image_url": _GOOD}, levels=[["good", "bad", "good"], ["high", "low", "high"]]), 400,
     "levels 'good/high' and 'good/high' begin with the same token"),
    ("unknown field", _rate({"image_url": _GOOD}, temperature=0), 400, "temperature"),
    ("unknown model", _rate({"image_url": _GOOD}, model="gpt-4o"), 404, "gpt-4o"),
    ("body over the size limit", _rate({"image_url": _b64(b"\x00" * (3 * 2**20))}), 413, "limit"),
]


def _send_rate(client: httpx.AsyncClient | httpx.Client, body: object) -> object:
    """The response, or (for the async client) the coroutine that gives it."""
    if isinstance(body, bytes):
        return client.post(RATE, content=body, headers={"content-type": "application/json"})
    return client.post(RATE, json=body)


def _check_rate_error(response: httpx.Response, status: int, words: str, name: str) -> None:
    _check_error(response, status, name)
    message = response.json()["error"]["message"]
    assert "\n" not in message and words.lower() in message.lower(), f"{name}: {message!r}"


def test_every_malformed_rating_gets_its_error_while_good_requests_succeed(server, tiny_pipeline):
    """The rating corpus sent all at once, with a good rating and a good chat among it: every bad request gets its
    4xx and a message naming the field or item, the good ones their right answers, and nothing hangs."""
    good_rating = _rate({"image_url": _GOOD}, {"video": [data_url(scene("red")), data_url(scene("blue"))]})
    want = tiny_pipeline.rate([scene("teal"), [scene("red"), scene("blue")]])
    chat = _image_request(data_url(scene("green")), "What colour is it?")
    want_chat = expected_answer(tiny_pipeline, chat["messages"], 4)

    async def burst(url: str) -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            bad = [_send_rate(client, body) for _, body, _, _ in RATE_CORPUS]
            replies = await asyncio.gather(*bad, client.post(RATE, json=good_rating), client.post(CHAT, json=chat))
            return list(replies[:-2]), replies[-2], replies[-1]

    def check_good(rating: httpx.Response, reply: httpx.Response) -> None:
        assert rating.status_code == 200, rating.text
        for got, expected in zip(rating.json()["data"], want, strict=True):
            assert got["score"] == pytest.approx(expected.score, abs=1e-5)
            assert got["logits"] == pytest.approx(list(expected.logits), abs=1e-5)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == want_chat

    with httpx.Client(base_url=server.url, timeout=60) as client:
        bad, rating, reply = asyncio.run(burst(server.url))
        for (name, _, status, words), response in zip(RATE_CORPUS, bad, strict=True):
            _check_rate_error(response, status, words, name)
        check_good(rating, reply)
        before = rss_bytes(server.pid)
        for _ in range(3):
            bad, rating, reply = asyncio.run(burst(server.url))
            for (name, _, status, words), response in zip(RATE_CORPUS, bad, strict=True):
                _check_rate_error(response, status, words, name)
            check_good(rating, reply)
        after = rss_bytes(server.pid)
        health = wait_idle(client)
    assert health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0
    assert after - before < 40 * 2**20, f"the server grew by {(after - before) / 2**20:.1f} MiB over 3 rounds"


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
