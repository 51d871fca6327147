"""Decode speed of owl2 against the official algorithm, on a mid-size random model, in one run.

Model: LLM hidden 1024, 8 layers, 16 heads, intermediate 2816, vocab 32000; ViT 512 wide, 6 layers, 224 px;
abstractor 2 layers, 64 queries. Input: one image plus 32 text tokens per row; greedy, 64 new tokens; batch 1, 4
and 8; fp32 and bf16 (with the prepacked CPU layers ``owl2.load`` gives them), and the quantised load options
(``int8-dynamic`` with fp32 activations, ``int8`` and ``int4`` weight-only with bf16 activations). For each case it
prints the prefill time, decode tokens/s (total over the batch), the same for the official-style baseline
(``official_style.py``: the official decode algorithm on the same unquantised weights, in the variant's activation
dtype), their ratio, and decode as a fraction of the memory-bandwidth roofline: the weight bytes one decode step
must read divided by the copy bandwidth measured in the same run.

    python benchmarks/decode.py [--runs 3] [--new-tokens 64] [--batch 1 4 8] [--variant fp32 bf16 int8 int4 ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from official_style import OfficialStyleDecoder

import owl2
from owl2.generation import GenerationEngine, GenerationRequest, SamplingParams
from owl2.model.config import AbstractorConfig, Owl2Config, VisionConfig
from owl2.model.quantize import DEFAULT_INT4_GROUP_SIZE, pack_for_cpu_inference, quantize_language_model

# variant -> (activation dtype, quantisation)
VARIANTS = {
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "int8-dynamic": (torch.float32, "int8-dynamic"),
    "int8": (torch.bfloat16, "int8"),
    "int4": (torch.bfloat16, "int4"),
}
# Bytes a decode step reads per quantised weight: int4 adds a bf16 scale and zero per group.
WEIGHT_BYTES = {"int8-dynamic": 1.0, "int8": 1.0, "int4": 0.5 + 4 / DEFAULT_INT4_GROUP_SIZE}


def mid_config() -> Owl2Config:
    return Owl2Config(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=16,
        vision=VisionConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
                            image_size=224),
        abstractor=AbstractorConfig(hidden_size=512, encoder_hidden_size=512, num_hidden_layers=2,
                                    num_attention_heads=8, intermediate_size=1408, num_learnable_queries=64),
    )


def random_model(config: Owl2Config, seed: int = 0) -> owl2.Owl2ForCausalLM:
    torch.manual_seed(seed)
    model = owl2.Owl2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def as_loaded(model: owl2.Owl2ForCausalLM, quantize: str | None = None) -> owl2.Owl2ForCausalLM:
    """``model`` with the layers ``owl2.load`` gives it: quantised, or with oneDNN's prepacked CPU weights."""
    return quantize_language_model(model, quantize) if quantize is not None else pack_for_cpu_inference(model)


def decode_step_bytes(model: owl2.Owl2ForCausalLM, quantize: str | None) -> int:
    """Weight bytes one text decode step reads: the LLM without the image branch, one embedding row, the head
    (matrices at the quantised size per weight when quantised). ``model`` is the unquantised model."""
    total = 0
    for name, p in model.named_parameters():
        if name.startswith(("model.vision_model", "model.visual_abstractor")) or ".multiway.1." in name:
            continue
        quantized = quantize is not None and p.ndim == 2 and name != "model.embed_tokens.weight"
        size = WEIGHT_BYTES[quantize] if quantized else p.element_size()
        total += int((p.shape[1] if name == "model.embed_tokens.weight" else p.numel()) * size)
    return total


def copy_bandwidth(n_bytes: int = 512 * 2**20, runs: int = 5) -> float:
    """Bytes/s moved (read + write) by copying into an existing buffer."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * n_bytes / min(times)


def inputs(config: Owl2Config, batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (batch, 33), generator=g)
    ids[:, 0], ids[:, 1] = 1, -200  # BOS, one image, 31 more text tokens: 32 text tokens per row
    pixels = torch.randn(batch, 3, config.vision.image_size, config.vision.image_size, generator=g)
    return owl2.prepare_official_inputs(ids, pixel_values=pixels, config=config)


@torch.inference_mode()
def time_owl2(model, batch, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    b, length = batch["input_ids"].shape
    cache = model.new_cache(b, length + new_tokens)
    t0 = time.perf_counter()
    out = model(**batch, cache=cache, logits_to_keep=1)
    next_ids = out.logits[:, -1].argmax(-1)
    t1 = time.perf_counter()
    tokens = [next_ids]
    for _ in range(new_tokens - 1):
        next_ids = model(next_ids[:, None], cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1)
        tokens.append(next_ids)
    t2 = time.perf_counter()
    return t1 - t0, (new_tokens - 1) * b / (t2 - t1), torch.stack(tokens, 1)


def time_official(decoder: OfficialStyleDecoder, batch, new_tokens: int) -> tuple[float, torch.Tensor]:
    b = batch["input_ids"].shape[0]
    t0 = time.perf_counter()
    decoder.generate(batch["input_ids"], batch["pixel_values"], 1)
    t1 = time.perf_counter()
    tokens = decoder.generate(batch["input_ids"], batch["pixel_values"], new_tokens)
    t2 = time.perf_counter()
    return (new_tokens - 1) * b / ((t2 - t1) - (t1 - t0)), tokens


def engine_requests(config: Owl2Config, new_tokens: int) -> list[GenerationRequest]:
    """Four requests of different lengths and image counts (0, 1, 1, 2 images)."""
    g = torch.Generator().manual_seed(5)
    size = config.vision.image_size
    requests = []
    for n_text, n_images in ((40, 0), (12, 1), (28, 1), (20, 2)):
        ids = [1] + [-200] * n_images + torch.randint(3, config.vocab_size, (n_text,), generator=g).tolist()
        images = torch.randn(n_images, 3, size, size, generator=g) if n_images else None
        requests.append(GenerationRequest(ids, images, SamplingParams(max_new_tokens=new_tokens)))
    return requests


def time_engine(model: owl2.Owl2ForCausalLM, new_tokens: int, runs: int) -> tuple[float, float]:
    """Total tokens/s of the generation engine on mixed requests: one batch, then one request at a time."""
    requests = engine_requests(model.config, new_tokens)
    batched, single = [], []
    for _ in range(runs):
        # no prefix cache: the one-at-a-time pass repeats the batched prompts and would reuse them
        engine = GenerationEngine(model, lambda ids: " ".join(map(str, ids)), eos_token_id=None, prefix_cache=False)
        engine.generate(requests[:1])  # warm-up, and fills the image cache for both timings
        t0 = time.perf_counter()
        results = engine.generate(requests)
        t1 = time.perf_counter()
        for request in requests:
            engine.generate([request])
        t2 = time.perf_counter()
        tokens = sum(len(r.token_ids) for r in results)
        batched.append(tokens / (t1 - t0))
        single.append(tokens / (t2 - t1))
    return statistics.median(batched), statistics.median(single)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="repetitions per case (the median is reported)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--variant", choices=list(VARIANTS), nargs="+", default=list(VARIANTS))
    parser.add_argument("--no-baseline", action="store_true", help="skip the official-style baseline")
    parser.add_argument("--no-engine", action="store_true", help="skip the generation-engine batching comparison")
    args = parser.parse_args()

    config = mid_config()
    bandwidth = copy_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    header = f"{'variant':12} {'batch':>5} {'prefill s':>9} {'tok/s':>8} {'baseline':>9} {'ratio':>6} {'roofline':>8}"
    print(header)
    results = []
    for variant in args.variant:
        dtype, quantize = VARIANTS[variant]
        model = random_model(config).to(dtype)
        step_bytes = decode_step_bytes(model, quantize)
        model = as_loaded(model, quantize)
        # the baseline always runs the unquantised weights in the variant's activation dtype
        decoder = OfficialStyleDecoder(random_model(config).to(dtype))
        for b in args.batch:
            batch = inputs(config, b, seed=b)
            time_owl2(model, batch, 4)  # warm-up
            prefill, speed, baseline, tokens, ref_tokens = [], [], [], None, None
            for _ in range(args.runs):
                p, s, tokens = time_owl2(model, batch, args.new_tokens)
                prefill.append(p)
                speed.append(s)
                if not args.no_baseline:
                    s_ref, ref_tokens = time_official(decoder, batch, args.new_tokens)
                    baseline.append(s_ref)
            tok_s = statistics.median(speed)
            roofline = step_bytes / bandwidth * (tok_s / b)
            ref = statistics.median(baseline) if baseline else float("nan")
            agree = ref_tokens is None or bool((tokens == ref_tokens).float().mean() > 0.9)
            row = {
                "variant": variant, "batch": b, "prefill_s": statistics.median(prefill), "tokens_per_s": tok_s,
                "baseline_tokens_per_s": ref, "ratio_vs_baseline": tok_s / ref, "roofline_fraction": roofline,
                "step_weight_bytes": step_bytes, "greedy_tokens_agree_with_baseline": agree,
            }
            results.append(row)
            print(f"{variant:12} {b:5d} {row['prefill_s']:9.3f} {tok_s:8.1f} {ref:9.1f} {tok_s / ref:6.2f} "
                  f"{roofline:8.2f}")
    if not args.no_engine:
        print(f"generation engine, 4 mixed requests (0/1/1/2 images, 13-41 prompt tokens), {args.new_tokens} new "
              "tokens each; total tokens/s")
        for variant in args.variant:
            dtype, quantize = VARIANTS[variant]
            model = as_loaded(random_model(config).to(dtype), quantize)
            batched, single = time_engine(model, args.new_tokens, args.runs)
            results.append({"variant": variant, "engine_batched_tokens_per_s": batched,
                            "engine_sequential_tokens_per_s": single})
            print(f"{variant:12} batched {batched:7.1f}  one at a time {single:7.1f}  ratio {batched / single:5.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
