"""Time to first token of a chat's turns about one image, with and without the prefix cache, in one run.

Model: the mid-size random model of ``decode.py`` (LLM hidden 1024, 8 layers; ViT 512 wide, 6 layers, 224 px;
64 queries). The chat: turn 1 is BOS, a 48-token preamble, the image (65 positions) and a 16-token question; each
later turn repeats the previous prompt and its greedy answer (``--new-tokens`` tokens), then 2 separator tokens and
a new 16-token question, as a chat template renders the history. Each run starts with fresh engines (empty image
and prefix caches), so turn 1 encodes the image in both columns and later turns find it in the image cache in both:
the difference is the prefill the prefix cache saves. It prints each turn's median time to first token over
``--runs`` (the prompt's prefill, from the engine's call to the first token), and turn 2's and turn 3's over turn 1's.

    python benchmarks/chat_turns.py [--runs 3] [--new-tokens 32] [--dtype fp32|bf16] [--turns 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import mid_config, random_model

from owl2.generation import GenerationEngine, GenerationRequest, SamplingParams
from owl2.generation.prefix_cache import PrefixCache


def words(generator: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=generator).tolist()


def chat(engine: GenerationEngine, image: torch.Tensor, turns: int, new_tokens: int, seed: int) -> list[float]:
    """Seconds to the first token of each turn (the answers are decoded in full, and become the next prompt)."""
    vocab = engine.model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompt = [1, *words(g, 48, vocab), -200, *words(g, 16, vocab)]
    times = []
    for _ in range(turns):
        request = GenerationRequest(prompt, image, SamplingParams(max_new_tokens=new_tokens))
        answer: list[int] = []
        start = time.perf_counter()
        with torch.inference_mode():
            for k, events in enumerate(engine.iterate([request])):
                if k == 0:
                    times.append(time.perf_counter() - start)
                answer += [e.token_id for e in events if e.token_id is not None]
        prompt = prompt + answer + [2, 1] + words(g, 16, vocab)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()

    config = mid_config()
    model = random_model(config).to(torch.float32 if args.dtype == "fp32" else torch.bfloat16)
    size = config.vision.image_size
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))

    def engine(cached: bool) -> GenerationEngine:
        return GenerationEngine(model, lambda ids: " ".join(map(str, ids)), eos_token_id=None,
                                prefix_cache=PrefixCache() if cached else False)

    chat(engine(True), image, 2, 4, seed=99)  # warm-up: first calls of each kernel
    results: dict[bool, list[list[float]]] = {False: [], True: []}
    for run in range(args.runs):
        for cached in (False, True):  # alternated, so a slow phase of the machine hits both alike
            results[cached].append(chat(engine(cached), image, args.turns, args.new_tokens, seed=run))

    print(f"chat about one image, mid-size random model, {args.dtype}, {args.new_tokens} new tokens per answer, "
          f"median of {args.runs} runs, {torch.get_num_threads()} threads")
    print(f"{'turn':>4} {'positions':>9} {'TTFT off (ms)':>14} {'TTFT on (ms)':>13}")
    positions = 1 + 48 + config.tokens_per_image + 16
    medians = {c: [statistics.median(r[t] for r in results[c]) for t in range(args.turns)] for c in results}
    for t in range(args.turns):
        print(f"{t + 1:>4} {positions:>9} {1e3 * medians[False][t]:>14.1f} {1e3 * medians[True][t]:>13.1f}")
        positions += args.new_tokens + 2 + 16
    for t in range(1, args.turns):
        print(f"turn {t + 1} TTFT / turn 1 TTFT: without prefix cache {medians[False][t] / medians[False][0]:.3f}, "
              f"with {medians[True][t] / medians[True][0]:.3f}")


if __name__ == "__main__":
    main()
