"""``POST /v1/rate`` against ``Pipeline.rate`` on the Q-Align fixture scorer: the same ratings over HTTP, also while
chat completions decode in the same batcher; budgets, the queue bound, disconnects, keys and the CLI flags."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

import owl2
from owl2.rating.rate import rating_row
from owl2.serving.app import ServerSettings, create_app
from owl2.serving.images import ImagePolicy
from tests.conftest import FIXTURES
from tests.serving.conftest import data_url, png_bytes, scene, serve_in_thread

QALIGN = FIXTURES / "qalign"
IMAGES = QALIGN / "images"
RATE, CHAT = "/v1/rate", "/v1/chat/completions"
KEY = {"Authorization": "Bearer rate-key"}


def load_scorer() -> owl2.api.Pipeline:
    return owl2.load(QALIGN / "checkpoint", dtype=torch.float32, device="cpu", show_progress=False)


@pytest.fixture(scope="module")
def reference() -> owl2.api.Pipeline:
    """The expectations come from a second copy, so that nothing runs on the server's model outside its worker."""
    return load_scorer()


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, object]]:
    settings = ServerSettings(model_name="qalign", api_keys=("rate-key",), prefill_rows=2, max_batch_size=4,
                              default_temperature=0, images=ImagePolicy(allowed_local_dir=IMAGES))
    app = create_app(load_scorer(), settings)
    with serve_in_thread(app) as url:
        yield url, app


def file_data_url(name: str) -> str:
    """The PNG file itself as a data URL (the bytes a client would read from disk)."""
    return "data:image/png;base64," + base64.b64encode((IMAGES / f"{name}.png").read_bytes()).decode()


def frames(*names: str) -> list[Image.Image]:
    out = []
    for name in names:
        with Image.open(IMAGES / f"{name}.png") as image:
            out.append(image.convert("RGB"))
    return out


def positions(pipe: owl2.api.Pipeline, item: object) -> int:
    row = rating_row(pipe.tokenizer, pipe.image_processor, item)
    images = row.prompt_ids.count(-200)
    return len(row.prompt_ids) - images + images * pipe.model.config.tokens_per_image


def assert_same(got: dict, want: owl2.rating.Rating, index: int) -> None:
    """One entry of ``data`` against ``pipe.rate``'s rating, to 1e-5."""
    expected = want.to_dict()
    assert got["object"] == "rating" and got["index"] == index
    assert list(got["probs"]) == list(expected["probs"])  # the level words, best first
    for key in ("score", "normalized", "std"):
        assert got[key] == pytest.approx(expected[key], abs=1e-5), key
    assert got["level"] == expected["level"]
    torch.testing.assert_close(torch.tensor(got["logits"]), torch.tensor(expected["logits"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(list(got["probs"].values())),
                               torch.tensor(list(expected["probs"].values())), rtol=0, atol=1e-5)


def test_ratings_equal_pipe_rate(served, reference):
    url, app = served
    stats = app.state.server.batcher.stats
    items = [
        {"image_url": file_data_url("chelsea_square")},  # the plain-string form
        {"image_url": {"url": file_data_url("camera_gray_tall")}},  # grayscale PNG
        {"image_url": {"url": f"file://{IMAGES / 'logo_rgba_wide.png'}"}},  # RGBA PNG, from the allowed folder
        {"video": [file_data_url(f"vA_f{i}") for i in range(3)]},
        {"image_url": file_data_url("coffee_tall")},
    ]
    want = reference.rate([IMAGES / "chelsea_square.png", IMAGES / "camera_gray_tall.png",
                           IMAGES / "logo_rgba_wide.png", frames("vA_f0", "vA_f1", "vA_f2"),
                           IMAGES / "coffee_tall.png"])
    batches = stats.prefill_only_batches
    with httpx.Client(base_url=url, timeout=120, headers=KEY) as client:
        reply = client.post(RATE, json={"model": "qalign", "items": items})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["object"] == "rating.list" and body["model"] == "qalign"
        for i, rating in enumerate(want):
            assert_same(body["data"][i], rating, i)
        # usage: the prompt's text tokens plus each image's and frame's visual tokens
        image, video = positions(reference, frames("coffee_tall")[0]), positions(reference, frames("vA_f0") * 3)
        assert video - image == 2 * reference.model.config.tokens_per_image
        assert body["usage"] == {"prompt_tokens": 4 * image + video, "total_tokens": 4 * image + video}
        # 5 rows through a budget of 2 rows per prefill: 3 batched forwards, none larger than 2
        assert stats.prefill_only_batches - batches == 3 and stats.peak_prefill_only_rows == 2

        # the other task and prompt, and another scale
        pair = [{"image_url": file_data_url("ihc_wide")}, {"video": [file_data_url(f"vB_f{i}") for i in range(4)]}]
        other = client.post(RATE, json={"items": pair, "task": "aesthetics", "prompt": "eval"}).json()
        want_other = reference.rate([IMAGES / "ihc_wide.png", frames(*(f"vB_f{i}" for i in range(4)))],
                                    task="aesthetics", prompt="eval")
        for i, rating in enumerate(want_other):
            assert_same(other["data"][i], rating, i)
        triads = [["good", "average", "poor"], ["high", "medium", "low"], ["fine", "acceptable", "bad"]]
        scaled = client.post(RATE, json={"items": pair[:1], "levels": triads, "weights": [1, 0.5, 0]}).json()
        assert_same(scaled["data"][0], reference.rate([IMAGES / "ihc_wide.png"], levels=triads,
                                                      weights=[1, 0.5, 0])[0], 0)
        assert list(scaled["data"][0]["probs"]) == ["good/high/fine", "average/medium/acceptable", "poor/low/bad"]

        # the key is required, as for chat; metrics count the ratings
        assert client.post(RATE, json={"items": items[:1]}, headers={"Authorization": "Bearer nope"}).status_code \
            == 401
        metrics = client.get("/metrics").text
    assert "owl2_rated_items_total 8.0" in metrics and "owl2_rate_latency_seconds_count 3.0" in metrics


def test_ratings_are_exact_while_chats_decode(served, reference):
    """Two greedy chat completions decode while two rating requests go through the same batcher: the chats equal
    ``pipe.chat`` and the ratings ``pipe.rate``, and some rating prefills really ran between decode steps."""
    url, app = served
    stats = app.state.server.batcher.stats
    chats = [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                           {"type": "text", "text": question}]}]
             for image, question in ((frames("chelsea_square")[0], "Describe the picture."),
                                     (frames("coffee_tall")[0], "What is in it?"))]
    tokens = 60
    want_chats = [reference.chat([{"role": "user", "content": [
        {"type": "image", "image": frames(name)[0]}, {"type": "text", "text": q}]}],
        max_new_tokens=tokens, min_new_tokens=tokens)
        for name, q in (("chelsea_square", "Describe the picture."), ("coffee_tall", "What is in it?"))]
    first = [{"image_url": file_data_url(n)} for n in ("astronaut_wide", "ihc_wide", "coffee_tall")]
    second = [{"video": [file_data_url(f"vB_f{i}") for i in range(4)]}, {"image_url": file_data_url("chelsea_square")}]
    want_first = reference.rate([IMAGES / f"{n}.png" for n in ("astronaut_wide", "ihc_wide", "coffee_tall")])
    want_second = reference.rate([frames(*(f"vB_f{i}" for i in range(4))), IMAGES / "chelsea_square.png"])
    during = stats.prefill_only_during_decode

    async def run() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=url, timeout=120, headers=KEY) as client:
            chat_tasks = [asyncio.create_task(client.post(CHAT, json={
                "messages": m, "max_tokens": tokens, "min_tokens": tokens, "temperature": 0})) for m in chats]
            while (await client.get("/health")).json()["running"] < 2:  # both chats are decoding
                await asyncio.sleep(0.01)
            ratings = await asyncio.gather(client.post(RATE, json={"items": first}),
                                           client.post(RATE, json={"items": second}))
            return list(ratings), list(await asyncio.gather(*chat_tasks))

    ratings, replies = asyncio.run(run())
    for reply, want in zip(ratings, (want_first, want_second), strict=True):
        assert reply.status_code == 200, reply.text
        for i, rating in enumerate(want):
            assert_same(reply.json()["data"][i], rating, i)
    for reply, want in zip(replies, want_chats, strict=True):
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["message"]["content"] == want
    assert stats.prefill_only_during_decode > during


def test_full_rating_queue_answers_429_and_a_client_that_leaves_frees_its_rows():
    """With room for 8 waiting images, a request of 24 is taken (the line was empty), a second one while its rows
    wait gets 429; the first client then hangs up, and its rows that had not run are dropped."""
    settings = ServerSettings(model_name="qalign", prefill_rows=1, max_rate_queue=8)
    app = create_app(load_scorer(), settings)
    stats = app.state.server.batcher.stats
    many = [{"image_url": data_url(Image.new("RGB", (32, 32), (10 * i, 200 - 5 * i, 7 * i)))} for i in range(24)]

    async def run(url: str) -> int:
        async with httpx.AsyncClient(base_url=url, timeout=60) as probe, \
                httpx.AsyncClient(base_url=url, timeout=60) as leaving:
            big = asyncio.create_task(leaving.post(RATE, json={"items": many}))
            while (await probe.get("/health")).json()["waiting"] == 0:  # its rows are queued
                await asyncio.sleep(0.005)
            refused = await probe.post(RATE, json={"items": many[:1]})
            assert refused.json()["error"]["type"] == "rate_limit_error", refused.text
            big.cancel()  # the client gives up: its connection closes
            with pytest.raises(asyncio.CancelledError):
                await big
            return refused.status_code

    with serve_in_thread(app) as url:
        assert asyncio.run(run(url)) == 429
        deadline = time.monotonic() + 30
        while stats.waiting_prefill_rows and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stats.cancelled == 1 and stats.waiting_prefill_rows == 0
        assert stats.prefill_only_rows < 24  # it stopped early
        with httpx.Client(base_url=url, timeout=60) as client:
            after = client.post(RATE, json={"items": many[:2]})
            assert after.status_code == 200 and len(after.json()["data"]) == 2
            assert 'owl2_requests_total{status="429"} 1.0' in client.get("/metrics").text


class _SlowImage(http.server.BaseHTTPRequestHandler):
    """One image, answered after a second: a slow remote source."""

    def do_GET(self) -> None:
        time.sleep(1.0)
        body = png_bytes(scene("orange"))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def slow_image_url() -> Iterator[str]:
    """The URL of an image that a local server sends after a second; the server stops on exit."""
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowImage)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{images.server_address[1]}/orange.png"
    finally:
        images.shutdown()


def test_fetching_does_not_block_the_server_and_long_videos_are_refused(tiny_pipeline):
    settings = ServerSettings(model_name="tiny", max_video_frames=64,
                              images=ImagePolicy(allow_remote=True, allow_private_hosts=True))
    app = create_app(tiny_pipeline, settings)

    async def run(url: str, slow: str) -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            rating = asyncio.create_task(client.post(RATE, json={"items": [{"image_url": slow}]}))
            await asyncio.sleep(0.3)  # the server is now waiting for the image
            started = time.perf_counter()
            assert (await client.get("/health")).status_code == 200
            health_seconds = time.perf_counter() - started
            assert not rating.done()
            return await rating, health_seconds

    with slow_image_url() as slow, serve_in_thread(app) as url:
        reply, health_seconds = asyncio.run(run(url, slow))
        assert health_seconds < 0.5, f"/health took {health_seconds:.2f} s while an image was fetched"
        assert reply.status_code == 200
        assert reply.json()["data"][0]["score"] == pytest.approx(tiny_pipeline.rate([scene("orange")])[0].score,
                                                                 abs=1e-5)
        # 60 frames of 9 positions each do not fit the tiny model's 512 positions
        video = {"video": [data_url(scene("red"))] * 60}
        refused = httpx.post(url + RATE, json={"items": [{"image_url": data_url(scene("red"))}, video]},
                             timeout=60)
        assert refused.status_code == 400
        assert refused.json()["error"]["message"].startswith("items[1]: 60 frames")
        assert "more than the context of 512; send fewer frames" in refused.json()["error"]["message"]


def test_images_being_decoded_count_against_the_rating_queue(tiny_pipeline):
    """Rating requests decoded all of their images before the queue could refuse them, so any number arriving at
    once all held their decoded images (megabytes per image for a real model) at the same time. Now the images of a
    request being fetched and decoded count as waiting: one more gets 429 at once, and once the first is queued
    and run the room is back."""
    settings = ServerSettings(model_name="tiny", max_rate_queue=1,
                              images=ImagePolicy(allow_remote=True, allow_private_hosts=True))
    app = create_app(tiny_pipeline, settings)
    other = {"items": [{"image_url": data_url(scene("red"))}]}

    async def run(url: str, slow: str) -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            first = asyncio.create_task(client.post(RATE, json={"items": [{"image_url": slow}]}))
            await asyncio.sleep(0.3)  # the server is now fetching its image
            refused = await client.post(RATE, json=other)
            return refused, await first

    with slow_image_url() as slow, serve_in_thread(app) as url:
        refused, first = asyncio.run(asyncio.wait_for(run(url, slow), timeout=60))
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "queue_full"
        assert first.status_code == 200, first.text
        assert app.state.server.building_images == 0
        assert httpx.post(url + RATE, json=other, timeout=60).status_code == 200


def test_cli_parses_rating_options(tmp_path: Path):
    from owl2.cli.main import build_parser
    from owl2.cli.serve import settings_from_args

    defaults = settings_from_args(build_parser().parse_args(["serve", "--model", str(tmp_path / "m")]))
    assert (defaults.max_rate_items, defaults.max_video_frames, defaults.prefill_rows, defaults.prefill_tokens,
            defaults.max_rate_queue) == (64, 16, 16, 4096, 1024)
    args = build_parser().parse_args(["serve", "--model", str(tmp_path / "m"), "--max-rate-items", "8",
                                      "--max-video-frames", "4", "--prefill-rows", "2", "--prefill-tokens", "512",
                                      "--max-rate-queue", "32"])
    settings = settings_from_args(args)
    assert (settings.max_rate_items, settings.max_video_frames, settings.prefill_rows, settings.prefill_tokens,
            settings.max_rate_queue) == (8, 4, 2, 512, 32)
