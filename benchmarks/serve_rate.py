"""Rating under load: a reward-model loop against ``owl2 serve``'s ``POST /v1/rate``, against the same images rated
one per request, in one run.

Model: the mid-size config of ``decode.py`` (LLM hidden 1024, 8 layers; ViT 512 wide, 6 layers, 224 px; abstractor
64 queries: 65 visual tokens per image), randomly initialised and saved with the LLaMA-2 tokenizer from
``tests/fixtures`` (``serve_load.write_random_model``), or ``--model DIR``. The random weights do not matter: a
rating is one prefill whatever the weights say.

Three modes, each on a fresh ``owl2 serve`` process (the server caches encoded images by content, and every mode
rates the same images, so a server that had seen them would skip their vision encoding) after a warm-up request of
other images:

- ``reward loop``: ``--clients`` K clients, each posting ``--requests`` requests of ``--images`` M images (a
  reward model scoring a policy's samples, 8 to 64 per call);
- ``1 per request, K clients``: the same images, one per request, from K clients at once (the server still
  batches across clients);
- ``1 per request, 1 client``: the same images, one request at a time, as IQA-PyTorch's metric loop or a Flow-GRPO
  reward server with batch size 1 rate them.

Reported per mode: images/s over the whole run, p50 and p95 request latency, and the ratio of the reward loop's
images/s to each baseline's. Every mode's ratings are checked to agree (the same images give the same scores, to
1e-3 in bf16, 1e-5 in fp32). On the CPU the default dtype is fp32 (bf16 matmuls are slower there).

    python benchmarks/serve_rate.py [--clients 4] [--requests 1] [--images 8] [--model DIR] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_load import free_port, launch, write_random_model  # noqa: E402


def image_url(index: int) -> str:
    """A distinct 256 x 192 picture per index (resized to the model's 224 px by the server), as a PNG data URL."""
    image = Image.new("RGB", (256, 192), ((37 * index) % 256, (91 * index) % 256, (53 * index) % 256))
    image.paste(Image.new("RGB", (64, 48), ((200 + index) % 256, 255 - index % 256, 90)), (16 + index % 150, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def start_server(model: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "owl2.cli.main", "serve", "--model", str(model), "--port", str(port),
               "--log-level", "warning", "--max-rate-items", str(max(args.images, 1)),
               "--prefill-rows", str(args.prefill_rows), "--prefill-tokens", str(args.prefill_tokens),
               "--max-rate-queue", "4096", "--max-queue", "1024", "--dtype", args.dtype]
    if args.device:
        command += ["--device", args.device]
    return launch(command, port)


@dataclass
class ModeResult:
    images_per_s: float
    wall: float
    requests: int
    p50: float
    p95: float
    scores: dict[str, float]
    """Each image URL's score, to check that every mode rates alike."""


async def run_mode(url: str, batches: list[list[list[str]]]) -> ModeResult:
    """``batches[client]`` is that client's requests, each a list of image URLs, sent one after another."""
    latencies: list[float] = []
    scores: dict[str, float] = {}

    async def client(requests: list[list[str]], http: httpx.AsyncClient) -> None:
        for urls in requests:
            started = time.perf_counter()
            reply = await http.post("/v1/rate", json={"items": [{"image_url": u} for u in urls]})
            reply.raise_for_status()
            latencies.append(time.perf_counter() - started)
            for u, rating in zip(urls, reply.json()["data"], strict=True):
                scores[u] = rating["score"]

    limits = httpx.Limits(max_connections=len(batches))
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*[client(requests, http) for requests in batches])
        wall = time.perf_counter() - started
    latencies.sort()
    return ModeResult(len(scores) / wall, wall, len(latencies), statistics.median(latencies),
                      latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))], scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: a random mid-size model")
    parser.add_argument("--clients", type=int, default=4, help="K: concurrent clients")
    parser.add_argument("--requests", type=int, default=1, help="requests per client in the reward loop")
    parser.add_argument("--images", type=int, default=8, help="M: images per reward-loop request")
    parser.add_argument("--prefill-rows", type=int, default=16, help="the server's --prefill-rows")
    parser.add_argument("--prefill-tokens", type=int, default=4096, help="the server's --prefill-tokens")
    parser.add_argument("--dtype", default=None, help="default: fp32 on the CPU, bf16 on a GPU")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    on_gpu = (args.device or "").startswith("cuda") or (args.device is None and _cuda())
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")

    k, r, m = args.clients, args.requests, args.images
    urls = [image_url(i) for i in range(k * r * m)]
    loop = [[urls[(c * r + j) * m:(c * r + j + 1) * m] for j in range(r)] for c in range(k)]
    singles = [[[u] for u in urls[c::k]] for c in range(k)]  # the same images, one per request, K clients
    modes = {
        f"reward loop: {k} clients x {m} images/request": loop,
        f"1 per request, {k} clients": singles,
        "1 per request, 1 client (IQA-PyTorch style)": [[[u] for u in urls]],
    }
    warm_up = [[[image_url(100_000 + i) for i in range(min(m, 4))]], [[image_url(200_000)]]]

    results: dict[str, ModeResult] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or write_random_model(Path(tmp) / "model")
        for name, batches in modes.items():
            process, url = start_server(model, args)
            try:
                asyncio.run(run_mode(url, warm_up))  # first calls pay one-off costs (allocations, lazy imports)
                results[name] = asyncio.run(run_mode(url, batches))
            finally:
                process.terminate()
                process.wait(30)
            row = results[name]
            print(f"{name}: {row.images_per_s:.2f} images/s, p50 {row.p50:.2f} s, p95 {row.p95:.2f} s "
                  f"({row.wall:.1f} s)", file=sys.stderr, flush=True)

    reference = results[next(iter(modes))].scores
    tolerance = 1e-5 if args.dtype == "fp32" else 1e-3
    for name, row in results.items():
        worst = max(abs(row.scores[u] - reference[u]) for u in urls)
        assert worst <= tolerance, f"{name}: scores differ from the reward loop's by up to {worst:.2e}"

    best = results[next(iter(modes))].images_per_s
    print(f"\nmodel: {args.model or 'random mid-size (benchmarks/decode.py)'}, {args.dtype} on "
          f"{args.device or ('cuda' if on_gpu else 'cpu')}; {len(urls)} images rated in each mode; server "
          f"--prefill-rows {args.prefill_rows} --prefill-tokens {args.prefill_tokens}")
    print("| mode | requests | images/s | p50 latency (s) | p95 latency (s) | reward loop's images/s vs this |")
    print("|---|---|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row.requests} | {row.images_per_s:.2f} | {row.p50:.2f} | {row.p95:.2f} | "
              f"{best / row.images_per_s:.2f}x |")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
