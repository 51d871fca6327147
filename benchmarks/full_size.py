"""Full-size (7B) load and inference benchmark on random weights.

What it measures, on whatever machine runs it (CPU by default):

1. **Write** (in a child process, so its memory does not count below): a random-weight checkpoint in the official
   mPLUG-Owl2 7B release layout -- ``config.json``, 33 pickled fp16 shards ``pytorch_model-{k}-of-33.bin`` (shard k
   holds decoder layer k-1 plus its ``rotary_emb.inv_freq`` buffer, shard 33 everything else) and
   ``pytorch_model.bin.index.json``. Shards are generated and written one at a time. A complete checkpoint already
   in ``--workdir`` is reused, and a partial one is resumed.
2. **Load**: wall time of loading the checkpoint with bf16 activations as ``owl2.load`` does (``--variant``: bf16
   with the prepacked CPU layers, or int8-dynamic / int8 / int4, quantised layer by layer while loading) and the
   process's peak RSS right after it (``ru_maxrss``; each variant runs in its own fresh process, so this is the
   load peak).
3. **Prefill**: one forward pass over a prompt of 32 text tokens plus one 448x448 image (expanded to 65 image
   positions by ``owl2.prepare_official_inputs``), vision encoder and abstractor included, writing a KV cache.
   The first run is reported as the cold figure; with ``--prefill-runs`` > 1 the best later run is the warm one.
4. **Decode**: greedy steps of one token through the KV cache, each timed; tokens/s = steps / summed step time.
   Then ``model.generate`` is timed end to end for the same prompt and its tokens compared with the manual loop.
5. **Peak RSS** of the whole run (load plus inference) and, where Linux allows resetting the high-water mark via
   ``/proc/self/clear_refs``, of the inference phase alone.

Prints a table and, last, the same figures as one JSON line. Not run in CI. Example::

    PYTHONPATH=. python benchmarks/full_size.py --workdir /tmp/owl2-7b-random --keep

Disk: about 16.4 GB for the checkpoint. Memory: the bf16 model (about 15.3 GiB) plus one shard while loading.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import owl2
from owl2.checkpoint.io import build_empty, stored_size
from owl2.model.quantize import pack_for_cpu_inference

GIB = 1024**3
VARIANTS = ("bf16", "int8-dynamic", "int8", "int4")
INDEX_NAME = "pytorch_model.bin.index.json"
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
OFFICIAL_IMAGE_TOKEN = -200


# --------------------------------------------------------------------------------------------- checkpoint layout
def make_config(num_layers: int | None) -> owl2.Owl2Config:
    """The 7B release config (``Owl2Config()`` defaults), optionally with fewer decoder layers for a smoke test."""
    config = owl2.Owl2Config()
    if num_layers is not None and num_layers != config.num_hidden_layers:
        data = config.to_dict()
        data["num_hidden_layers"] = num_layers
        config = owl2.Owl2Config.from_dict(data)
    return config


def shard_name(k: int, total: int) -> str:
    return f"pytorch_model-{k}-of-{total}.bin"


def inv_freq(config: owl2.Owl2Config) -> torch.Tensor:
    """The rotary buffer the official checkpoint stores in every layer: [head_dim / 2] float32."""
    dim = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def shard_plan(config: owl2.Owl2Config) -> list[dict[str, tuple[torch.Size, torch.dtype]]]:
    """Per shard, in order, ``key -> (shape, dtype)``: shard k (1-based, k <= layers) holds decoder layer k-1 plus
    its ``inv_freq`` buffer; the last shard holds every other tensor. Shapes come from a meta-device model."""
    layers = config.num_hidden_layers
    plan: list[dict[str, tuple[torch.Size, torch.dtype]]] = [{} for _ in range(layers + 1)]
    for key, tensor in build_empty(config).state_dict().items():
        match = LAYER_KEY.match(key)
        plan[int(match.group(1)) if match else layers][key] = (tensor.shape, torch.float16)
    rope_shape = torch.Size([config.head_dim // 2])
    for i in range(layers):
        plan[i][f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = (rope_shape, torch.float32)
    return plan


def plan_bytes(shard: dict[str, tuple[torch.Size, torch.dtype]]) -> int:
    return sum(shape.numel() * dtype.itemsize for shape, dtype in shard.values())


def random_tensor(key: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """fp16 values at a scale that keeps bf16 activations finite: norm weights near 1, biases near 0, the rest
    normal with std 0.02 (the release's ``initializer_range``)."""
    out = torch.empty(shape, dtype=torch.float16)
    if len(shape) == 1 and key.endswith(".weight"):  # LayerNorm / RMSNorm scales
        return out.normal_(1.0, 0.02, generator=generator)
    if key.endswith(".bias"):
        return out.normal_(0.0, 0.002, generator=generator)
    return out.normal_(0.0, 0.02, generator=generator)


def checkpoint_complete(directory: Path, config: owl2.Owl2Config) -> bool:
    """True when ``directory`` holds this config, an index naming every expected key, and every shard."""
    try:
        if json.loads((directory / "config.json").read_text()) != config.to_dict():
            return False
        index = json.loads((directory / INDEX_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    plan = shard_plan(config)
    expected = {key: shard_name(k, len(plan)) for k, shard in enumerate(plan, 1) for key in shard}
    if index.get("weight_map") != expected:
        return False
    return all((directory / shard_name(k, len(plan))).is_file() for k in range(1, len(plan) + 1))


def write_checkpoint(directory: str, num_layers: int | None, seed: int) -> None:
    """Write (or finish writing) the random checkpoint; meant to run in a child process."""
    torch.set_grad_enabled(False)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    config = make_config(num_layers)
    plan = shard_plan(config)
    total_bytes = sum(plan_bytes(shard) for shard in plan)
    for stale in root.glob(".*.tmp"):
        stale.unlink()
    config_text = json.dumps(config.to_dict(), indent=2) + "\n"
    config_path = root / "config.json"
    if not config_path.is_file() or json.loads(config_path.read_text()) != config.to_dict():
        # A different config invalidates whatever shards are there.
        for old in [*root.glob("pytorch_model-*-of-*.bin"), root / INDEX_NAME]:
            old.unlink(missing_ok=True)
        _write_text(config_path, config_text)

    missing = [k for k in range(1, len(plan) + 1) if not (root / shard_name(k, len(plan))).is_file()]
    free = shutil.disk_usage(root).free
    needed = sum(plan_bytes(plan[k - 1]) for k in missing)
    if needed > free:
        raise SystemExit(f"not enough disk in {root}: {needed / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")
    print(
        f"writing {len(missing)} of {len(plan)} shards ({needed / 1e9:.2f} GB of {total_bytes / 1e9:.2f} GB) to {root}",
        flush=True,
    )
    start = time.perf_counter()
    written = 0
    for n, k in enumerate(missing, 1):
        shard_start = time.perf_counter()
        generator = torch.Generator().manual_seed(seed * 1000 + k)
        state: dict[str, torch.Tensor] = {}
        for key, (shape, dtype) in plan[k - 1].items():
            state[key] = inv_freq(config) if dtype == torch.float32 else random_tensor(key, shape, generator)
        target = root / shard_name(k, len(plan))
        tmp = root / f".{target.name}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, target)
        del state
        written += plan_bytes(plan[k - 1])
        elapsed = time.perf_counter() - start
        print(
            f"  [{n:2d}/{len(missing)}] {target.name}: {plan_bytes(plan[k - 1]) / 1e9:.2f} GB in "
            f"{time.perf_counter() - shard_start:.1f} s  ({written / 1e9:.1f}/{needed / 1e9:.1f} GB, "
            f"{written / 1e6 / elapsed:.0f} MB/s)",
            flush=True,
        )

    weight_map = {key: shard_name(k, len(plan)) for k, shard in enumerate(plan, 1) for key in shard}
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    _write_text(root / INDEX_NAME, json.dumps(index, indent=2) + "\n")  # last: marks the checkpoint complete
    print(f"checkpoint written in {time.perf_counter() - start:.1f} s", flush=True)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def remove_checkpoint(directory: Path, config: owl2.Owl2Config) -> None:
    """Delete the files this script writes, then the directory itself if nothing else is left in it."""
    total = config.num_hidden_layers + 1
    names = ["config.json", INDEX_NAME, *(shard_name(k, total) for k in range(1, total + 1))]
    for path in [*(directory / n for n in names), *directory.glob(".*.tmp")]:
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.rmdir()
    print(f"deleted the checkpoint in {directory}", flush=True)


# ------------------------------------------------------------------------------------------------------- memory
def max_rss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    """Peak resident set size (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(who).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def proc_status(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes, or None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); True when it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    hwm, rss = proc_status("VmHWM"), proc_status("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss * 1.05 + 64 * 2**20


def gib(n: int | None) -> float | None:
    return None if n is None else round(n / GIB, 2)


# ------------------------------------------------------------------------------------------------------- timing
def build_inputs(config: owl2.Owl2Config, text_tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """BOS + random ids with one official image placeholder in the middle, plus one random image, expanded."""
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(3, min(config.vocab_size, 32000), (text_tokens - 1,), generator=g).tolist()
    half = len(body) // 2
    ids = [config.bos_token_id, *body[:half], OFFICIAL_IMAGE_TOKEN, *body[half:]]
    size = config.vision.image_size
    pixel_values = torch.randn(1, 3, size, size, generator=g).to(torch.bfloat16)
    return owl2.prepare_official_inputs(torch.tensor([ids]), pixel_values=pixel_values, config=config)


def run_prefill(
    model: owl2.Owl2ForCausalLM, batch: dict[str, torch.Tensor], new_tokens: int
) -> tuple[float, owl2.KVCache, torch.Tensor]:
    """One timed forward over the whole prompt with a fresh cache; returns (seconds, cache, last logits)."""
    length = batch["input_ids"].shape[1]
    cache = model.new_cache(1, length + new_tokens)
    start = time.perf_counter()
    out = model(
        batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"], cache=cache, logits_to_keep=1
    )
    return time.perf_counter() - start, cache, out.logits[:, -1].float()


def load(directory: Path, variant: str) -> owl2.Owl2ForCausalLM:
    """The model as ``owl2.load`` gives it for ``variant``: bf16 activations, the language model's linear layers
    quantised while loading (int8, int4) or prepacked for the CPU (bf16)."""
    if variant == "bf16":
        return pack_for_cpu_inference(owl2.load_model(directory, dtype=torch.bfloat16))
    return owl2.load_model(directory, dtype=torch.bfloat16, quantize=variant)


def benchmark(args: argparse.Namespace, directory: Path, variant: str = "bf16") -> dict[str, Any]:
    results: dict[str, Any] = {"variant": variant}
    rss_before = proc_status("VmRSS")

    print(f"loading {directory} as {variant} ...", flush=True)
    start = time.perf_counter()
    model = load(directory, variant)
    results["load_s"] = round(time.perf_counter() - start, 2)
    results["load_peak_rss_gib"] = gib(max_rss_bytes())
    results["rss_after_load_gib"] = gib(proc_status("VmRSS"))
    results["rss_before_load_gib"] = gib(rss_before)
    num_params = stored_size(model.config)
    results["params_b"] = round(num_params / 1e9, 3)
    print(f"loaded {num_params / 1e9:.2f} B parameters in {results['load_s']:.1f} s", flush=True)

    results["inference_peak_measured"] = reset_peak_rss()
    config = model.config
    batch = build_inputs(config, args.prompt_tokens, args.seed)
    length = batch["input_ids"].shape[1]
    results["prompt_positions"] = length
    steps = args.new_tokens - 1

    with torch.inference_mode():
        prefill_times: list[float] = []
        for run in range(args.prefill_runs):
            seconds, cache, logits = run_prefill(model, batch, args.new_tokens)
            prefill_times.append(seconds)
            print(f"prefill run {run + 1}: {seconds:.2f} s ({length} positions)", flush=True)
        results["prefill_s"] = round(prefill_times[0], 3)
        results["prefill_warm_s"] = round(min(prefill_times[1:]), 3) if len(prefill_times) > 1 else None
        results["prefill_logits_finite"] = bool(torch.isfinite(logits).all())

        # The last prefill's cache continues into the decode loop, one token per timed step.
        tokens = [int(logits.argmax(-1))]
        step_times: list[float] = []
        finite = True
        for _ in range(steps):
            next_ids = torch.tensor([[tokens[-1]]])
            start = time.perf_counter()
            out = model(next_ids, cache=cache, logits_to_keep=1)
            step_times.append(time.perf_counter() - start)
            step_logits = out.logits[:, -1].float()
            finite = finite and bool(torch.isfinite(step_logits).all())
            tokens.append(int(step_logits.argmax(-1)))
        print("decode steps (s): " + " ".join(f"{t:.3f}" for t in step_times), flush=True)
        results["decode_steps"] = steps
        results["decode_tok_s"] = round(steps / sum(step_times), 3) if steps else None
        results["decode_step_median_s"] = round(statistics.median(step_times), 3) if steps else None
        results["decode_step_first_s"] = round(step_times[0], 3) if steps else None
        results["decode_logits_finite"] = finite
        del cache

        if args.generate:
            start = time.perf_counter()
            generated = model.generate(**batch, max_new_tokens=args.new_tokens)
            gen_s = time.perf_counter() - start
            results["generate_s"] = round(gen_s, 3)
            best_prefill = min(prefill_times)
            results["generate_decode_tok_s"] = round(steps / (gen_s - best_prefill), 3) if steps else None
            results["generate_matches_loop"] = generated[0].tolist() == tokens
            print(f"generate({args.new_tokens} tokens): {gen_s:.2f} s", flush=True)

    results["inference_peak_rss_gib"] = gib(proc_status("VmHWM")) if results["inference_peak_measured"] else None
    # ru_maxrss may have been reset along with VmHWM, so take the larger of the two phases.
    results["peak_rss_gib"] = max(
        results["load_peak_rss_gib"], gib(max_rss_bytes()) or 0.0, results["inference_peak_rss_gib"] or 0.0
    )
    results["tokens"] = tokens
    return results


# --------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write a random-weight mPLUG-Owl2 7B checkpoint in the official layout, then measure owl2's "
        "load time, peak RSS, prefill time and decode speed on it (bfloat16).",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="checkpoint directory (default: a new temporary directory under /tmp); a complete "
        "checkpoint already there is reused, a partial one resumed",
    )
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards (default: delete it)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=32,
        help="text tokens in the prompt, BOS included; one image placeholder goes in the middle",
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=16,
        help="tokens to generate: the prefill gives the first, each decode step one more",
    )
    parser.add_argument(
        "--prefill-runs",
        type=int,
        default=2,
        help="prefill repetitions; the first is reported as cold, the best later one as warm",
    )
    parser.add_argument(
        "--no-generate", dest="generate", action="store_false", help="skip the end-to-end model.generate timing"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights and inputs")
    parser.add_argument("--variant", nargs="+", choices=VARIANTS, default=["bf16"],
                        help="how the model is loaded; each variant runs in its own process, one after the other, "
                        "and the last table gives each one's figures against the first's")
    parser.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="decoder layers (default: the release's 32); fewer only for a quick smoke test",
    )
    args = parser.parse_args(argv)
    if args.prompt_tokens < 2 or args.new_tokens < 1 or args.prefill_runs < 1:
        parser.error("--prompt-tokens must be >= 2, --new-tokens >= 1, --prefill-runs >= 1")
    return args


def print_table(results: dict[str, Any]) -> None:
    rows = [
        ("variant", results["variant"]),
        ("torch", results["torch"]),
        ("threads", results["threads"]),
        ("parameters (B)", results["params_b"]),
        ("checkpoint (GB)", results["checkpoint_gb"]),
        ("write time (s)", results["write_s"] if results["write_s"] is not None else "reused"),
        ("peak RSS of the writer process (GiB)", results["write_peak_rss_gib"]),
        ("load time (s)", results["load_s"]),
        ("peak RSS after load (GiB)", results["load_peak_rss_gib"]),
        ("peak RSS, inference only (GiB)", results["inference_peak_rss_gib"]),
        ("peak RSS, load + inference (GiB)", results["peak_rss_gib"]),
        (f"prefill, cold (s, {results['prompt_positions']} positions)", results["prefill_s"]),
        ("prefill, warm (s)", results["prefill_warm_s"]),
        (f"decode (tokens/s, {results['decode_steps']} steps)", results["decode_tok_s"]),
        ("decode step median (s)", results["decode_step_median_s"]),
        ("generate total (s)", results.get("generate_s")),
        ("generate decode (tokens/s)", results.get("generate_decode_tok_s")),
        ("generate == manual loop", results.get("generate_matches_loop")),
        ("logits finite", results["prefill_logits_finite"] and results["decode_logits_finite"]),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    print("-" * (width + 20))
    for name, value in rows:
        print(f"{name:<{width}}  {value if value is not None else '-'}")
    print("-" * (width + 20))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    created = args.workdir is None
    directory = Path(tempfile.mkdtemp(prefix="owl2-full-size-", dir="/tmp")) if created else args.workdir
    config = make_config(args.num_layers)
    plan = shard_plan(config)
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "num_layers": config.num_hidden_layers,
        "checkpoint_gb": round(sum(plan_bytes(s) for s in plan) / 1e9, 2),
        "write_s": None,
        "write_peak_rss_gib": None,
    }
    try:
        if checkpoint_complete(directory, config):
            print(f"reusing the complete checkpoint in {directory}", flush=True)
        else:
            start = time.perf_counter()
            child = mp.get_context("spawn").Process(
                target=write_checkpoint, args=(str(directory), args.num_layers, args.seed)
            )
            child.start()
            child.join()
            if child.exitcode != 0:
                print(f"writing the checkpoint failed (exit code {child.exitcode})", file=sys.stderr)
                return 1
            results["write_s"] = round(time.perf_counter() - start, 1)
            results["write_peak_rss_gib"] = gib(max_rss_bytes(resource.RUSAGE_CHILDREN))
        runs = [{**results, **run_variant(args, directory, variant)} for variant in args.variant]
    finally:
        if not args.keep:
            remove_checkpoint(directory, config)
    for run in runs:
        print_table(run)
    if len(runs) > 1:
        print_ratios(runs)
    print(json.dumps(runs), flush=True)
    return 0


def _variant_child(args: argparse.Namespace, directory: str, variant: str, queue: Any) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    queue.put(benchmark(args, Path(directory), variant))


def run_variant(args: argparse.Namespace, directory: Path, variant: str) -> dict[str, Any]:
    """:func:`benchmark` in a fresh process, so that each variant's peak RSS is its own."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_variant_child, args=(args, str(directory), variant, queue))
    child.start()
    results = queue.get()
    child.join()
    return results


def print_ratios(runs: list[dict[str, Any]]) -> None:
    base = runs[0]
    print(f"\nagainst {base['variant']}, measured in this run:")
    for run in runs[1:]:
        print(f"  {run['variant']}: decode {run['decode_tok_s'] / base['decode_tok_s']:.2f}x, prefill (warm) "
              f"{(run['prefill_warm_s'] or run['prefill_s']) / (base['prefill_warm_s'] or base['prefill_s']):.2f}x "
              f"the time, load {run['load_s'] / base['load_s']:.2f}x the time, peak RSS {run['peak_rss_gib']} GiB "
              f"against {base['peak_rss_gib']} GiB")


if __name__ == "__main__":
    sys.exit(main())
