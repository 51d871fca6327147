"""Text-only decode speed of owl2 against llama.cpp on the same weights, batch 1, in one run.

The mid-size random model of ``decode.py`` (LLM hidden 1024, 8 layers, vocab 32000) is exported without its image
branch to GGUF files (``llama_cpp_export.py``) and run by llama.cpp through llama-cpp-python. Each pair puts an owl2
load option next to the llama.cpp weight type of the same width: ``bf16`` vs ``f16``, ``int8`` (weight-only, bf16
activations) vs ``q8_0``, ``int4`` vs ``q4_0`` (a pair whose owl2 variant ``decode.VARIANTS`` lacks is skipped).

Correctness first: on every exported type, llama.cpp's greedy tokens and logits for a random 32-token prompt are
compared with owl2 in float32 (free-running greedy agreement, agreement when both are fed owl2's tokens, the
largest logit difference at the first step and over all steps). Then timing: a 32-token prompt (fed as ids), greedy
new tokens at batch 1, decode tokens/s without the prefill, with as many llama.cpp threads as torch uses. The two
engines' runs alternate so that machine noise hits both; each figure is the median over ``--runs``.

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python gguf
    python benchmarks/vs_llama_cpp.py [--runs 5] [--new-tokens 64] [--pairs bf16:f16 int8:q8_0 int4:q4_0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from owl2.model.config import Owl2Config

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER = REPO / "tests" / "fixtures" / "llama2-tokenizer" / "tokenizer.model"
DEFAULT_PAIRS = ["bf16:f16", "int8:q8_0", "int4:q4_0"]
PROMPT_TOKENS = 32


def missing_packages() -> list[str]:
    names = {"llama_cpp": "llama-cpp-python", "gguf": "gguf", "sentencepiece": "sentencepiece"}
    return [package for module, package in names.items() if importlib.util.find_spec(module) is None]


def prompt_ids(vocab_size: int, seed: int = 0) -> torch.Tensor:
    """[1, 32] ids: BOS, then 31 random text tokens (past the three special ids)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (1, PROMPT_TOKENS), generator=g)
    ids[0, 0] = 1
    return ids


class LlamaCppDecoder:
    """Greedy decoding of one sequence with llama.cpp, one ``eval`` per token as owl2's loop runs one forward."""

    def __init__(self, path: Path, n_ctx: int, threads: int) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   verbose=False)
        self.vocab = self.llm.n_vocab()

    def last_logits(self) -> np.ndarray:
        """[vocab] float32 logits of the last evaluated token (a view into llama.cpp's buffer)."""
        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.vocab,))

    def run(self, prompt: list[int], new_tokens: int, forced: list[int] | None = None,
            keep_logits: bool = False) -> tuple[float, float, list[int], list[np.ndarray]]:
        """Prefill seconds, decode tokens/s, the ``new_tokens`` greedy tokens and (with ``keep_logits``) the logits
        of each step. With ``forced`` the tokens fed back are ``forced``'s instead of the greedy ones, so each
        step's argmax is compared on the same history as the reference's."""
        self.llm.reset()  # the next eval drops the cached positions
        logits = []
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        token = int(self.last_logits().argmax())
        t1 = time.perf_counter()
        tokens = [token]
        if keep_logits:
            logits.append(self.last_logits().copy())
        for step in range(new_tokens - 1):
            self.llm.eval([forced[step] if forced is not None else token])
            token = int(self.last_logits().argmax())
            tokens.append(token)
            if keep_logits:
                logits.append(self.last_logits().copy())
        t2 = time.perf_counter()
        return t1 - t0, (new_tokens - 1) / (t2 - t1), tokens, logits

    def close(self) -> None:
        self.llm.close()


@torch.inference_mode()
def owl2_reference(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[list[int], list[np.ndarray]]:
    """owl2's greedy tokens after ``ids`` [1, T] and the float32 logits [vocab] of each step."""
    cache = model.new_cache(1, ids.shape[1] + new_tokens)
    logits = model(ids, cache=cache, logits_to_keep=1).logits[0, -1].float()
    tokens, steps = [], []
    for _ in range(new_tokens):
        steps.append(logits.numpy().copy())
        tokens.append(int(logits.argmax()))
        if len(tokens) < new_tokens:
            logits = model(torch.tensor([[tokens[-1]]]), cache=cache, logits_to_keep=1).logits[0, -1].float()
    return tokens, steps


@torch.inference_mode()
def rounding_only_diff(config: Owl2Config, ids: torch.Tensor, ref_logits: np.ndarray, kind: str) -> float:
    """Largest first-step logit difference that rounding the exported matrices to ``kind`` causes by itself: owl2
    in float32 with those matrices quantised and dequantised by ``gguf.quants``, against ``ref_logits`` [vocab]. A
    llama.cpp difference far above it points at the export rather than the weight type."""
    import gguf
    from decode import random_model
    from llama_cpp_export import GGUF_TYPES

    qtype = GGUF_TYPES[kind][0]
    model = random_model(config)
    for name, p in model.named_parameters():
        if p.ndim == 2 and not name.startswith(("model.vision_model", "model.visual_abstractor")):
            rounded = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qtype), qtype)
            p.copy_(torch.from_numpy(np.asarray(rounded, dtype=np.float32).reshape(p.shape)))
    logits = model(ids, logits_to_keep=1).logits[0, -1]
    return float(np.abs(logits.numpy() - ref_logits).max())


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def check(decoder: LlamaCppDecoder, prompt: list[int], ref_tokens: list[int], ref_logits: list[np.ndarray]) -> dict:
    """llama.cpp against owl2's float32 reference: free-running greedy agreement, agreement and logit differences
    when both see owl2's tokens, and the position of the first differing greedy token (None when none differs)."""
    n = len(ref_tokens)
    _, _, greedy, _ = decoder.run(prompt, n)
    _, _, forced, logits = decoder.run(prompt, n, forced=ref_tokens, keep_logits=True)
    diffs = [float(np.abs(x - y).max()) for x, y in zip(logits, ref_logits, strict=True)]
    first_diff = next((i for i, (x, y) in enumerate(zip(greedy, ref_tokens, strict=True)) if x != y), None)
    return {
        "greedy_agreement": agreement(greedy, ref_tokens), "first_greedy_difference": first_diff,
        "teacher_forced_agreement": agreement(forced, ref_tokens), "first_step_max_abs_logit_diff": diffs[0],
        "max_abs_logit_diff": max(diffs), "reference_max_abs_logit": float(np.abs(ref_logits[0]).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per engine and pair (the median is reported)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS,
                        help="owl2 variant:GGUF type pairs to time (GGUF types: f16, q8_0, q4_0)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                        help="SentencePiece tokenizer.model written into the GGUF files (llama.cpp requires one)")
    parser.add_argument("--gguf-dir", type=Path, default=None,
                        help="keep the exported GGUF files here (default: a temporary folder, removed at the end)")
    parser.add_argument("--no-timing", action="store_true", help="run the correctness check only")
    args = parser.parse_args()
    missing = missing_packages()
    if missing:
        sys.exit(f"vs_llama_cpp.py needs {', '.join(missing)}: "
                 f'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install {" ".join(missing)}')

    import llama_cpp
    from decode import VARIANTS, as_loaded, mid_config, random_model, time_owl2
    from llama_cpp_export import GGUF_TYPES, export_gguf

    pairs = [tuple(pair.split(":", 1)) for pair in args.pairs]
    for variant, kind in pairs:
        if kind not in GGUF_TYPES:
            parser.error(f"unknown GGUF type {kind!r} in {variant}:{kind}; use one of {', '.join(GGUF_TYPES)}")
    timed = [(v, k) for v, k in pairs if v in VARIANTS]
    for variant, kind in pairs:
        if variant not in VARIANTS:
            print(f"skipping {variant} vs {kind}: decode.py has no owl2 variant {variant!r}")

    threads = torch.get_num_threads()
    config = mid_config()
    ids = prompt_ids(config.vocab_size)
    prompt = ids[0].tolist()
    n_ctx = PROMPT_TOKENS + args.new_tokens
    print(f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, {threads} threads")

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.gguf_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        reference = random_model(config)  # float32: the export's source and the correctness reference
        kinds = ["f16"] + [k for _, k in timed if k != "f16"]
        paths = {kind: export_gguf(reference, folder / f"owl2-text-{kind}.gguf", kind, args.tokenizer)
                 for kind in dict.fromkeys(kinds)}
        ref_tokens, ref_logits = owl2_reference(reference, ids, args.new_tokens)
        del reference

        print(f"correctness against owl2 fp32, {PROMPT_TOKENS}-token prompt, {args.new_tokens} greedy tokens")
        print(f"{'gguf':6} {'greedy agree':>12} {'first diff':>10} {'forced agree':>12} {'logit diff 1st':>14} "
              f"{'max':>7} {'rounding only':>13} {'|logit| max':>11}")
        checks = []
        for kind, path in paths.items():
            decoder = LlamaCppDecoder(path, n_ctx, threads)
            row = {"gguf": kind, **check(decoder, prompt, ref_tokens, ref_logits)}
            decoder.close()
            row["rounding_only_first_step_logit_diff"] = rounding_only_diff(config, ids, ref_logits[0], kind)
            checks.append(row)
            first = "-" if row["first_greedy_difference"] is None else str(row["first_greedy_difference"])
            print(f"{kind:6} {row['greedy_agreement']:12.3f} {first:>10} {row['teacher_forced_agreement']:12.3f} "
                  f"{row['first_step_max_abs_logit_diff']:14.4f} {row['max_abs_logit_diff']:7.4f} "
                  f"{row['rounding_only_first_step_logit_diff']:13.4f} {row['reference_max_abs_logit']:11.3f}")

        timings = []
        if not args.no_timing and timed:
            print(f"decode, batch 1, {PROMPT_TOKENS}-token text prompt, {args.new_tokens} new tokens greedy, "
                  f"median of {args.runs} runs")
            print(f"{'pair':18} {'owl2 tok/s':>10} {'llama.cpp tok/s':>15} {'ratio':>6} {'owl2 prefill':>12} "
                  f"{'llama.cpp prefill':>17} {'tokens agree':>12}")
            for variant, kind in timed:
                dtype, quantize = VARIANTS[variant]
                model = as_loaded(random_model(config).to(dtype), quantize)
                decoder = LlamaCppDecoder(paths[kind], n_ctx, threads)
                batch = {"input_ids": ids}
                time_owl2(model, batch, 4)  # warm-up of both engines
                decoder.run(prompt, 4)
                owl2_speed, owl2_prefill, cpp_speed, cpp_prefill = [], [], [], []
                tokens, cpp_tokens = None, None
                for _ in range(args.runs):
                    p, s, tokens = time_owl2(model, batch, args.new_tokens)
                    owl2_prefill.append(p)
                    owl2_speed.append(s)
                    p, s, cpp_tokens, _ = decoder.run(prompt, args.new_tokens)
                    cpp_prefill.append(p)
                    cpp_speed.append(s)
                decoder.close()
                del model
                row = {
                    "owl2": variant, "llama_cpp": kind, "owl2_tokens_per_s": statistics.median(owl2_speed),
                    "llama_cpp_tokens_per_s": statistics.median(cpp_speed),
                    "owl2_prefill_s": statistics.median(owl2_prefill),
                    "llama_cpp_prefill_s": statistics.median(cpp_prefill),
                    "greedy_tokens_agree": agreement(tokens[0].tolist(), cpp_tokens),
                    "owl2_runs_tokens_per_s": owl2_speed, "llama_cpp_runs_tokens_per_s": cpp_speed,
                }
                row["ratio"] = row["owl2_tokens_per_s"] / row["llama_cpp_tokens_per_s"]
                timings.append(row)
                print(f"{variant + ' vs ' + kind:18} {row['owl2_tokens_per_s']:10.1f} "
                      f"{row['llama_cpp_tokens_per_s']:15.1f} {row['ratio']:6.2f} {row['owl2_prefill_s']:12.3f} "
                      f"{row['llama_cpp_prefill_s']:17.3f} {row['greedy_tokens_agree']:12.3f}")
    print(json.dumps({"threads": threads, "llama_cpp_python": llama_cpp.__version__, "correctness": checks,
                      "timing": timings}))


if __name__ == "__main__":
    main()
