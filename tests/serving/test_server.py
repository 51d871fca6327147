"""Server behaviour beyond the wire format: API keys, the bounded queue, disconnects, the image cache, image
sources, metrics and the chat page (apps run in this process with uvicorn on loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import threading
import time
from pathlib import Path

import httpx
import pytest

from owl2.serving.app import ServerSettings, create_app
from owl2.serving.images import ImagePolicy
from tests.serving.conftest import data_url, expected_answer, png_bytes, scene, serve_in_thread

CHAT = "/v1/chat/completions"


def _question(url: str, text: str = "What is it?", max_tokens: int = 6) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": text}]}],
            "max_tokens": max_tokens, "temperature": 0}


def test_api_keys(tiny_pipeline):
    app = create_app(tiny_pipeline, ServerSettings(model_name="tiny", api_keys=("sekrit", "other")))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        missing = client.post(CHAT, json=body)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        assert client.post(CHAT, json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.get("/v1/models").status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.get("/health").status_code == 200  # probes need no key
        assert client.post(CHAT, json=body, headers={"Authorization": "Bearer other"}).status_code == 200


def test_full_queue_answers_429_and_recovers(tiny_pipeline):
    app = create_app(tiny_pipeline, ServerSettings(model_name="tiny", max_batch_size=1, max_queue=1))
    slow = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 300, "min_tokens": 300}

    async def burst(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            first = asyncio.create_task(client.post(CHAT, json=slow))
            while (await client.get("/health")).json()["running"] == 0:  # the one slot is taken
                await asyncio.sleep(0.005)
            second = asyncio.create_task(client.post(CHAT, json=slow))  # waits: the queue is full
            while (await client.get("/health")).json()["waiting"] == 0:
                await asyncio.sleep(0.005)
            third = await client.post(CHAT, json=slow)
            assert third.json()["error"]["type"] == "rate_limit_error"
            return [third.status_code, (await first).status_code, (await second).status_code]

    with serve_in_thread(app) as url:
        assert asyncio.run(burst(url)) == [429, 200, 200]
        with httpx.Client(base_url=url, timeout=30) as client:
            after = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert after.status_code == 200
            assert 'owl2_requests_total{status="429"} 1.0' in client.get("/metrics").text


def test_a_client_that_goes_away_frees_its_slot(tiny_pipeline):
    app = create_app(tiny_pipeline, ServerSettings(model_name="tiny", max_batch_size=1))
    server = app.state.server
    endless = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 400, "min_tokens": 400}
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        with client.stream("POST", CHAT, json={**endless, "stream": True}) as response:
            assert next(response.iter_lines()).startswith("data: ")  # streaming has begun; now hang up
        deadline = time.monotonic() + 10
        while server.batcher.stats.cancelled < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert server.batcher.stats.cancelled == 1
        assert server.batcher.stats.generated_tokens < 400  # it stopped early
        # a non-streaming client that gives up is noticed too (8 choices with logprobs: a slow request)
        with pytest.raises(httpx.ReadTimeout):
            client.post(CHAT, json={**endless, "n": 8, "logprobs": True, "top_logprobs": 20}, timeout=0.2)
        while server.batcher.stats.cancelled < 9 and time.monotonic() < deadline + 10:
            time.sleep(0.005)
        assert server.batcher.stats.cancelled == 9
        assert server.batcher.stats.generated_tokens < 400 + 8 * 400
        ok = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert ok.status_code == 200


def test_a_plain_client_that_leaves_is_noticed_while_tokens_stream_fast(tiny_pipeline):
    """Tokens arrive far more often than every 0.1 s: the server must still look for the hang-up between them."""
    app = create_app(tiny_pipeline, ServerSettings(model_name="tiny", max_batch_size=1))
    stats = app.state.server.batcher.stats
    endless = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 480, "min_tokens": 480}
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post(CHAT, json=endless, timeout=0.3)
        deadline = time.monotonic() + 20
        while stats.cancelled < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert stats.cancelled == 1 and stats.generated_tokens < 480


def test_images_are_encoded_once_per_content(tiny_pipeline):
    app = create_app(tiny_pipeline, ServerSettings(model_name="tiny"))
    cache = tiny_pipeline.engine.image_cache
    picture = data_url(scene("purple"))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        misses = cache.misses
        first = client.post(CHAT, json=_question(picture)).json()
        hits = cache.hits
        second = client.post(CHAT, json=_question(picture, "And now?")).json()
        assert cache.misses == misses + 1 and cache.hits == hits + 1
        want = expected_answer(tiny_pipeline, _question(picture)["messages"], 6)
        assert first["choices"][0]["message"]["content"] == want
        assert second["usage"]["prompt_tokens"] > 0
        metrics = client.get("/metrics").text
    assert "owl2_image_cache_hits" in metrics and "owl2_queue_depth 0.0" in metrics


def test_local_files_only_under_the_allowed_directory(tiny_pipeline, tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "red.png").write_bytes(png_bytes(scene("red")))
    (tmp_path / "secret.png").write_bytes(png_bytes(scene("blue")))
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    app = create_app(tiny_pipeline, ServerSettings(model_name="tiny", images=ImagePolicy(allowed_local_dir=allowed)))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        inside = client.post(CHAT, json=_question(f"file://{allowed / 'red.png'}"))
        assert inside.status_code == 200
        assert inside.json()["choices"][0]["message"]["content"] == \
            client.post(CHAT, json=_question(data_url(scene("red")))).json()["choices"][0]["message"]["content"]
        for escape in (f"file://{allowed}/../secret.png", f"file://{allowed / 'link.png'}", "file:///etc/hostname"):
            refused = client.post(CHAT, json=_question(escape))
            assert refused.status_code == 400 and "outside the allowed directory" in refused.json()["error"]["message"]


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/slow.png":
            time.sleep(2)
        body = png_bytes(scene("orange")) if self.path != "/big.png" else b"\x89PNG" + b"\x00" * 300_000
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the server under test gave up on us
            self.send_response(200 if self.path != "/missing.png" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_remote_images_when_enabled_with_timeout_and_size_cap(tiny_pipeline):
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{images.server_address[1]}"
    policy = ImagePolicy(allow_remote=True, remote_timeout=0.5, remote_max_bytes=100_000, allow_private_hosts=True)
    app = create_app(tiny_pipeline, ServerSettings(model_name="tiny", images=policy))
    try:
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            fetched = client.post(CHAT, json=_question(f"{base}/ok.png"))
            assert fetched.status_code == 200
            assert fetched.json()["choices"][0]["message"]["content"] == \
                client.post(CHAT, json=_question(data_url(scene("orange")))).json()["choices"][0]["message"]["content"]
            for path in ("/slow.png", "/big.png", "/missing.png"):  # one message for every failure to fetch
                refused = client.post(CHAT, json=_question(base + path))
                assert refused.status_code == 400, refused.text
                assert "could not fetch the image" in refused.json()["error"]["message"], refused.text
    finally:
        images.shutdown()


def test_chat_page_is_self_contained(tiny_pipeline):
    app = create_app(tiny_pipeline, ServerSettings(model_name="tiny"))
    with serve_in_thread(app) as url:
        page = httpx.get(url + "/").text
    assert "<title>owl2 chat</title>" in page and "tiny" in page
    assert "http://" not in page and "https://" not in page  # nothing from a CDN


def test_cli_parses_serve_options(tmp_path: Path):
    from owl2.cli.main import build_parser
    from owl2.cli.serve import settings_from_args

    args = build_parser().parse_args(["serve", "--model", str(tmp_path / "m"), "--api-key", "k", "--max-queue", "3",
                                      "--allowed-local-media", str(tmp_path), "--allow-remote-images"])
    settings = settings_from_args(args)
    assert settings.model_name == "m" and settings.api_keys == ("k",) and settings.max_queue == 3
    assert settings.images.allowed_local_dir == tmp_path and settings.images.allow_remote
