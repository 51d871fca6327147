"""Serving under load: N concurrent clients against ``owl2 serve`` on loopback, continuous batching against
one-request-at-a-time serving, in one run.

Model: the mid-size config of ``decode.py`` (LLM hidden 1024, 8 layers; ViT 512 wide, 6 layers, 224 px; abstractor
64 queries), randomly initialised and saved with the LLaMA-2 tokenizer from ``tests/fixtures``, or ``--model DIR``.
Both servers are the same ``owl2 serve`` command in a subprocess (bf16 on the CPU unless ``--device``/``--dtype``
say otherwise); only ``--max-batch-size`` differs: 8 (continuous batching) and 1 (one request at a time: requests
wait in the queue). Each client sends ``--requests`` chat completions one after another, each with its own image
(a data URL) and a short question; ``min_tokens = max_tokens`` so every answer has the same length and the random
weights cannot stop early.

Reported per server and client count: completion tokens/s over the whole run, requests/s, p50 and p95 latency of
a request, and the ratio of batched to sequential throughput.

``--engine vllm`` puts vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server`` under
``.venv-vllm/bin/python``, owl2's plugin loading the same checkpoint, owl2's ``mplug_owl2`` chat template with BOS)
next to owl2's batched server; ``--engine both`` runs owl2's batched and sequential servers and vLLM's. The load,
the client code and the timing are the same for every server; vLLM gets the same dtype (``--dtype``, bf16 unless
given), ``--max-num-seqs`` equal to the batched server's batch size, eager mode and prefix caching as it defaults.
The table then has one row per server and client count, with the throughput relative to owl2's batched server.

    python benchmarks/serve_load.py [--clients 1 2 4 8] [--requests 4] [--max-tokens 32] [--model DIR]
        [--engine owl2|vllm|both]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "llama2-tokenizer"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def write_random_model(directory: Path) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import json

    from decode import mid_config, random_model

    import owl2
    from owl2.processing.image import PREPROCESSOR_CONFIG_NAME, ImageProcessor

    config = mid_config()
    owl2.save_model(random_model(config), directory)
    for file in TOKENIZER.iterdir():
        if file.name != "README.md":
            shutil.copy(file, directory / file.name)
    size = config.vision.image_size
    (directory / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps(ImageProcessor(size=size, crop_size=size).to_dict()))
    return directory


def image_url(index: int) -> str:
    image = Image.new("RGB", (224, 224), ((37 * index) % 256, (91 * index) % 256, (53 * index) % 256))
    image.paste(Image.new("RGB", (64, 64), "white"), (16 + index % 100, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, batch: int, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "owl2.cli.main", "serve", "--model", str(model), "--port", str(port),
               "--max-batch-size", str(batch), "--max-queue", "256", "--log-level", "warning",
               "--default-temperature", "0"]
    if args.dtype:
        command += ["--dtype", args.dtype]
    if args.device:
        command += ["--device", args.device]
    return launch(command, port)


def start_vllm(model: Path, args: argparse.Namespace, workdir: Path) -> tuple[subprocess.Popen, str]:
    """vLLM's OpenAI server on ``model`` with the flags its CPU build needs (eager mode, a short context) and owl2's
    chat template, BOS written in front because vLLM adds no special tokens to a rendered chat."""
    from owl2.integrations.transformers.processing import chat_template

    if not VLLM_PYTHON.exists():
        raise SystemExit(f"--engine {args.engine} needs {VLLM_PYTHON} (scripts/vllm_venv.sh builds it)")
    template = workdir / "mplug_owl2.jinja"
    template.write_text(chat_template("mplug_owl2", bos=True))
    port = free_port()
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model.resolve()),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", vllm_dtype(args.dtype),
               "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.batch_size),
               "--enforce-eager", "--seed", "0", "--limit-mm-per-prompt", '{"image": 1}',
               "--chat-template", str(template), "--chat-template-content-format", "openai",
               "--uvicorn-log-level", "warning", "--disable-log-stats"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CACHE_ROOT": str(workdir / "vllm-cache"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    # the CPU build takes minutes to profile and start on a few cores
    return launch(command, port, env=env, cwd=workdir, start_s=900)


def vllm_dtype(dtype: str | None) -> str:
    """owl2's ``--dtype`` spelled for vLLM; owl2 serves bf16 on the CPU when none is given, so vLLM does too."""
    names = {None: "bfloat16", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    return names.get(dtype, dtype or "bfloat16")


def launch(command: list[str], port: int, env: dict[str, str] | None = None, cwd: Path = ROOT,
           start_s: float = 180) -> tuple[subprocess.Popen, str]:
    """Start a server (``command``) and wait until its health check answers."""
    # the servers' logs go to stderr with the progress lines; stdout keeps the table alone
    process = subprocess.Popen(command, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                               stdout=sys.stderr, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + start_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{Path(command[2 if command[1] == '-m' else 0]).name} exited with code "
                               f"{process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.3)
    stop(process)
    raise RuntimeError("the server did not start")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (vLLM's server then shuts its engine process down), SIGKILL to the process group if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


async def run_load(url: str, clients: int, requests: int, max_tokens: int, offset: int) -> dict[str, float]:
    latencies: list[float] = []
    tokens = 0

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for r in range(requests):
            body = {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_url(offset + index * requests + r)}},
                {"type": "text", "text": "Describe the picture."}]}],
                "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0}
            started = time.perf_counter()
            reply = await http.post("/v1/chat/completions", json=body)
            reply.raise_for_status()
            latencies.append(time.perf_counter() - started)
            tokens += reply.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        started = time.perf_counter()
        await asyncio.gather(*[client(i, http) for i in range(clients)])
        wall = time.perf_counter() - started
    latencies.sort()
    return {"tokens_per_s": tokens / wall, "requests_per_s": len(latencies) / wall,
            "p50": statistics.median(latencies), "p95": latencies[min(len(latencies) - 1,
                                                                      round(0.95 * (len(latencies) - 1)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: a random mid-size model")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8,
                        help="the batched server's --max-batch-size (vLLM's --max-num-seqs)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--engine", choices=("owl2", "vllm", "both"), default="owl2",
                        help="owl2: batched vs sequential owl2 serve; vllm: owl2's batched server vs vLLM's; both: all")
    parser.add_argument("--max-model-len", type=int, default=512, help="vLLM's context length")
    args = parser.parse_args()

    servers = {"owl2": ("batched", "sequential"), "vllm": ("batched", "vllm"),
               "both": ("batched", "sequential", "vllm")}[args.engine]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or write_random_model(Path(tmp) / "model")
        results: dict[tuple[str, int], dict[str, float]] = {}
        for name in servers:
            if name == "vllm":
                process, url = start_vllm(model, args, Path(tmp))
            else:
                process, url = start_server(model, args.batch_size if name == "batched" else 1, args)
            try:
                asyncio.run(run_load(url, 2, 1, 4, offset=10_000))  # warm-up: first calls pay one-off costs
                for clients in args.clients:
                    results[(name, clients)] = asyncio.run(
                        run_load(url, clients, args.requests, args.max_tokens, offset=clients * 1000))
                    row = results[(name, clients)]
                    print(f"{name:>10} clients={clients}: {row['tokens_per_s']:.1f} tok/s, "
                          f"p50 {row['p50']:.2f} s, p95 {row['p95']:.2f} s", file=sys.stderr, flush=True)
            finally:
                stop(process)

    print(f"\nmodel: {args.model or 'random mid-size (benchmarks/decode.py)'}; {args.requests} requests per client, "
          f"{args.max_tokens} new tokens each, one image per request; batched = --max-batch-size {args.batch_size}")
    if args.engine == "owl2":
        print_batched_vs_sequential(results, args.clients)
    else:
        print(f"dtype {vllm_dtype(args.dtype)} for every server; vllm = vLLM's OpenAI server, --max-num-seqs "
              f"{args.batch_size}, eager")
        print_by_server(results, servers, args.clients)


def print_batched_vs_sequential(results: dict[tuple[str, int], dict[str, float]], clients_list: list[int]) -> None:
    print("| clients | batched tok/s | sequential tok/s | ratio | batched p50 / p95 (s) | sequential p50 / p95 (s) |")
    print("|---|---|---|---|---|---|")
    for clients in clients_list:
        b, s = results[("batched", clients)], results[("sequential", clients)]
        print(f"| {clients} | {b['tokens_per_s']:.1f} | {s['tokens_per_s']:.1f} | "
              f"{b['tokens_per_s'] / s['tokens_per_s']:.2f}x | {b['p50']:.2f} / {b['p95']:.2f} | "
              f"{s['p50']:.2f} / {s['p95']:.2f} |")


def print_by_server(results: dict[tuple[str, int], dict[str, float]], servers: tuple[str, ...],
                    clients_list: list[int]) -> None:
    """One row per server and client count; the ratio is the row's throughput over owl2's batched server's."""
    labels = {"batched": "owl2 serve (batched)", "sequential": "owl2 serve (one at a time)", "vllm": "vLLM"}
    print("| engine | clients | tok/s | req/s | p50 / p95 (s) | vs owl2 batched |")
    print("|---|---|---|---|---|---|")
    for name in servers:
        for clients in clients_list:
            row, base = results[(name, clients)], results[("batched", clients)]
            print(f"| {labels[name]} | {clients} | {row['tokens_per_s']:.1f} | {row['requests_per_s']:.2f} | "
                  f"{row['p50']:.2f} / {row['p95']:.2f} | {row['tokens_per_s'] / base['tokens_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
