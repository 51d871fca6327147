"""A real ``owl2 serve`` process on loopback serving the tiny random-init checkpoint of the evaluation tests
(``tiny_checkpoint``), and the helpers to check it against ``tiny_pipeline``, the same checkpoint loaded in the test
process, whose greedy answers the server must reproduce."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def scene(colour: str = "red", size: int = 28) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    image.paste(Image.new("RGB", (size // 2, size // 2), colour), (size // 4, size // 4))
    return image


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_server(model: Path | None, *extra: str, timeout: float = 90.0, log: Path | None = None) -> ServerProcess:
    """``owl2 serve`` in a subprocess (fp32 on the CPU, greedy unless a request says otherwise). ``model`` None: the
    embedded owl2-tiny (no --model). ``log``: a file that receives the server's stderr."""
    port = free_port()
    command = [sys.executable, "-m", "owl2.cli.main", "serve", *([] if model is None else ["--model", str(model)]),
               "--dtype", "fp32", "--device", "cpu", "--port", str(port), "--default-temperature", "0",
               "--log-level", "warning", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    stderr = None if log is None else log.open("w", encoding="utf-8")
    try:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=stderr)
    finally:
        if stderr is not None:
            stderr.close()  # the child has its own copy
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"owl2 serve exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return ServerProcess(url, process)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"owl2 serve did not come up within {timeout} s")


@pytest.fixture(scope="module")
def server(tiny_checkpoint) -> Iterator[ServerProcess]:
    """One server for a test module; small limits so that the bad-input corpus can reach each of them."""
    process = start_server(tiny_checkpoint, "--max-body-mb", "2", "--max-images", "4",
                           "--max-new-tokens", "64", "--max-queue", "8", "--max-rate-items", "4",
                           "--max-video-frames", "3")
    yield process
    process.stop()


def expected_answer(pipeline, messages: Sequence[dict], max_tokens: int) -> str:
    """The pipeline's greedy answer to OpenAI-style ``messages`` (images as PIL, in the order given)."""
    owl2_messages = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            owl2_messages.append({"role": message["role"], "content": content})
            continue
        parts = []
        for part in content:
            if part["type"] == "text":
                parts.append(part)
            else:
                payload = part["image_url"]["url"].split(",", 1)[1]
                parts.append({"type": "image", "image": Image.open(io.BytesIO(base64.b64decode(payload)))})
        owl2_messages.append({"role": message["role"], "content": parts})
    return pipeline.chat(owl2_messages, max_new_tokens=max_tokens)


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free loopback port in this process; yields the base URL."""
    import uvicorn

    port = free_port()
    with run_uvicorn(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def run_uvicorn(config) -> Iterator[None]:
    """A uvicorn server of ``config`` in a thread of this process, from started until the block ends."""
    import uvicorn

    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(30)
