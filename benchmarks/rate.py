"""Rating throughput of owl2 (``pipe.rate``) against the official Q-Align scoring algorithm, in one run.

Model: the mid-size random model of ``decode.py`` (LLM hidden 1024, 8 layers, vocab 32000; ViT 512 wide, 6 layers,
224 px; abstractor 64 queries, so 65 visual tokens per image) with the LLaMA-2 tokenizer of ``tests/fixtures`` and a
224 px image processor with Q-Align's ``pad`` policy. Input: ``--images`` synthetic PIL images of mixed sizes and
aspect ratios (4:3, 3:4, 1:1, 16:9, 9:16, 4:1, 1:3); the time counts everything from the PIL image to the score,
preprocessing included, since a user pays it. Every timed owl2 pass starts with an empty visual-token cache: a user
rating a folder shows each image once.

The baseline (:class:`OfficialStyleScorer`) is the loop of Q-Align's evaluation scripts on the same weights: one
image at a time; the prompt tokenised again inside the loop; ``pixel_values`` cast with ``.half()`` as the official
code does (on the CPU the model runs in ``--dtype`` and the pixels are only rounded through float16 and back; on a
GPU the official code runs the whole model in float16); the LLM the official way (``official_style.py``: the
MultiwayNetwork's ``nonzero`` + gather/scatter per branch, eager attention); and the full-vocabulary logits computed
at every position, as the official ``forward`` does, of which the last row is read. The baseline shares owl2's image
preprocessing (the same algorithm, pixel-exact, but faster than transformers' ``CLIPImageProcessor``) and vision
tower, so its time is if anything understated.

Printed: images/s of owl2 at each batch size, of the baseline, their ratio, and the largest score difference
between the two (the baseline's float16 pixel rounding is the only intended difference; the check at the end runs
the baseline without it on a few images to show the algorithms agree); the load average before and after; the
matmul + attention GFLOP per image of each (torch's FLOP counter). ``--profile`` adds where the time goes.

Reading the numbers: on a CPU both are bound by matrix multiplies, so owl2's lead there is about the FLOP ratio (the
baseline's full-vocabulary head) times what batching gains in GEMM efficiency. On a machine shared with other jobs,
every parallel op of a multi-threaded run waits for a descheduled thread, which penalises the many small ops of
batch 1 far more than batch 32; ``--threads 1 --runs 3`` gives steadier figures there.

The official scorers only run in float16 (``.half()`` pixels and weights); the last row runs the baseline that way
(the same weights rounded to float16), which is what a user of the official code gets on a CPU. The column
``x fp16 official`` compares with it; ``x baseline`` with the baseline in ``--dtype``, the algorithm alone.

    python benchmarks/rate.py [--images 32] [--dtype fp32|bf16] [--batch 1 8 32] [--runs 1] [--threads N] [--profile]
                              [--no-official-fp16]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import json
import os
import pstats
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import mid_config, random_model
from official_style import OfficialStyleDecoder

import owl2
from owl2.api import Pipeline
from owl2.generation.engine import ImageEmbeddingCache
from owl2.model.quantize import pack_for_cpu_inference
from owl2.processing.image import ImageProcessor
from owl2.processing.tokenizer import load_tokenizer
from owl2.rating import PROMPTS, RatingScale

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "llama2-tokenizer"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZES = [(640, 480), (480, 640), (512, 512), (800, 450), (450, 800), (1024, 256), (300, 900), (720, 720)]


def synthetic_images(count: int, seed: int = 0) -> list[Image.Image]:
    """Noise over a colour gradient with a bright block, so no two images preprocess alike."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        ramp = np.linspace(0, 1, width, dtype=np.float32)[None, :, None] * rng.uniform(60, 200, 3).astype(np.float32)
        pixels = ramp + rng.normal(0, 25, (height, width, 3)).astype(np.float32)
        y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
        pixels[y:y + height // 3, x:x + width // 3] += 80
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images


def build_pipeline(dtype: torch.dtype) -> Pipeline:
    config = mid_config()
    size = config.vision.image_size
    processor = ImageProcessor(size=size, crop_size=size, default_policy="pad")
    # no parameter needs a gradient in inference (and torch's FLOP counter trips over ones that do)
    model = pack_for_cpu_inference(random_model(config).to(dtype).requires_grad_(False))  # as owl2.load does
    return Pipeline(model, load_tokenizer(TOKENIZER), processor)


class OfficialStyleScorer:
    """Q-Align's evaluation-script loop (``q_align/evaluate/*.py``) on an owl2 pipeline's weights; see the module
    docstring for what it reproduces."""

    def __init__(self, pipe: Pipeline, *, round_pixels: bool = True) -> None:
        self.pipe = pipe
        self.decoder = OfficialStyleDecoder(pipe.model)
        self.round_pixels = round_pixels
        scale = RatingScale(pipe.tokenizer)
        self.level_ids = scale.token_ids[0].tolist()
        self.weights = torch.tensor(scale.weights, dtype=torch.float64)
        self.prompt = PROMPTS["scorer"].format(task="quality", media="image")

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        pixels = self.pipe.image_processor([image], policy="pad")  # expand2square, then the CLIP processor
        return pixels.half() if self.round_pixels else pixels

    def tokenize(self) -> list[int]:
        return self.pipe.tokenizer.encode_prompt(self.prompt)

    def all_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The official head: the full vocabulary at every position."""
        model = self.pipe.model
        return torch.nn.functional.linear(model.model.norm(hidden), model.lm_head.weight)

    def llm(self, embeds: torch.Tensor, indicators: torch.Tensor) -> torch.Tensor:
        t = embeds.shape[1]
        positions = torch.arange(t)[None]
        mask = torch.full((t, t), torch.finfo(embeds.dtype).min, dtype=embeds.dtype).triu(1)[None, None]
        hidden = embeds
        # official_style.py's decoder layer, which also builds the (unused) KV tuple as the official forward does
        for layer in self.pipe.model.model.layers:
            hidden, _ = self.decoder._layer(layer, hidden, indicators, positions, mask, None)
        return hidden

    @torch.inference_mode()
    def score(self, image: Image.Image) -> float:
        model = self.pipe.model
        pixels = self.preprocess(image).to(model.dtype)
        ids = torch.tensor([self.tokenize()])
        batch = owl2.prepare_official_inputs(ids, pixel_values=pixels, config=model.config)
        embeds, image_mask = model.model.embed(batch["input_ids"], batch["pixel_values"], None, check_text=True)
        logits = self.all_logits(self.llm(embeds, image_mask.long()))  # [1, T, V]
        probs = logits[0, -1, self.level_ids].double().softmax(-1)
        return float(probs @ self.weights)

    def rate(self, images: Sequence[Image.Image]) -> list[float]:
        return [self.score(image) for image in images]


def time_owl2(pipe: Pipeline, images: Sequence[Image.Image], batch: int) -> tuple[float, list[float]]:
    pipe.engine.image_cache = ImageEmbeddingCache()
    start = time.perf_counter()
    ratings = pipe.rate(list(images), batch_size=batch)
    return time.perf_counter() - start, [r.score for r in ratings]


def time_official(scorer: OfficialStyleScorer, images: Sequence[Image.Image]) -> tuple[float, list[float]]:
    start = time.perf_counter()
    scores = scorer.rate(images)
    return time.perf_counter() - start, scores


def profiled() -> list[tuple[str, Any]]:
    """The functions whose cumulative time makes up the profile table."""
    from owl2.model.modeling import Owl2ForCausalLM, Owl2Model
    from owl2.processing.tokenizer import Owl2Tokenizer

    return [
        ("preprocess (pad + CLIP)", ImageProcessor.__call__),
        ("tokenise prompt", Owl2Tokenizer.encode_prompt),
        ("visual-token cache key (sha256)", ImageEmbeddingCache.key),
        ("vision tower + abstractor", Owl2Model.encode_images),
        ("owl2 model forward (LLM + last logits)", Owl2ForCausalLM.forward),
        ("official-style LLM layers", OfficialStyleScorer.llm),
        ("official full-vocabulary logits", OfficialStyleScorer.all_logits),
    ]


def profile(run: Callable[[], Any], count: int) -> dict[str, float]:
    """Milliseconds per image spent in each :func:`profiled` function (cumulative: nested calls are inside their
    callers' figures) and in all."""
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(run)
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    out = {}
    for label, function in profiled():
        code = function.__code__
        entry = stats.get((code.co_filename, code.co_firstlineno, code.co_name))
        if entry:
            out[label] = 1000 * entry[3] / count
    out["total"] = 1000 * total / count
    return out


def gflop_per_image(run: Callable[[], Any], count: int) -> float:
    """Matrix-multiply and attention work per image, counted by torch (elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops() / count / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="synthetic images rated per pass (default 32)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--runs", type=int, default=1,
                        help="rounds over all cases, interleaved; the fastest pass of each case is reported (other "
                             "jobs on the machine only ever add time)")
    parser.add_argument("--check", type=int, default=4, help="images for the rounding-free agreement check")
    parser.add_argument("--profile", action="store_true", help="also print where the time goes")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 steadies the numbers on a machine shared with other "
                             "jobs, where every parallel op waits for a descheduled thread")
    parser.add_argument("--no-official-fp16", dest="official_fp16", action="store_false",
                        help="skip the float16 run of the baseline (the official scorers cast pixels and weights "
                             "to float16, so float16 is the only dtype they run in; on a CPU without float16 "
                             "matmuls that is their real speed)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = DTYPES[args.dtype]
    pipe = build_pipeline(dtype)
    official = OfficialStyleScorer(pipe)
    # What the official scorers must run: .half() pixels need a float16 model. The same weights, rounded to fp16.
    fp16_pipe = Pipeline(copy.deepcopy(pipe.model).half(), pipe.tokenizer, pipe.image_processor)
    official_fp16 = OfficialStyleScorer(fp16_pipe) if args.official_fp16 and dtype != torch.float16 else None
    images = synthetic_images(args.images)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, {args.images} images "
          f"({len(set(i.size for i in images))} sizes), {pipe.model.config.tokens_per_image} visual tokens per image; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    warm = synthetic_images(2, seed=1)
    pipe.rate(warm, batch_size=2)
    official.rate(warm[:1])
    cases: list[tuple[str, int, Callable[[], tuple[float, list[float]]]]] = [
        ("official-style", 1, lambda: time_official(official, images)),
        *(("owl2 pipe.rate", b, lambda b=b: time_owl2(pipe, images, b)) for b in args.batch),
    ]
    if official_fp16 is not None:
        official_fp16.rate(warm[:1])
        cases.append(("official-style fp16", 1, lambda: time_official(official_fp16, images)))
    best = [float("inf")] * len(cases)
    scores: list[list[float]] = [[] for _ in cases]
    for _ in range(args.runs):
        for i, (_, _, run) in enumerate(cases):  # interleaved, so a burst of load does not hit one case only
            seconds, scores[i] = run()
            best[i] = min(best[i], seconds)
    baseline = args.images / best[0]
    fp16_baseline = args.images / best[-1] if official_fp16 is not None else None
    print(f"{'':22} {'batch':>5} {'images/s':>9} {'x baseline':>10} {'x fp16 official':>16} {'max |d score|':>14}")
    results = []
    for (name, batch, _), seconds, got in zip(cases, best, scores, strict=True):
        speed = args.images / seconds
        diff = float(np.max(np.abs(np.subtract(got, scores[0]))))
        versus_fp16 = speed / fp16_baseline if fp16_baseline else None
        results.append({"impl": name, "batch": batch, "images_per_s": speed, "ratio": speed / baseline,
                        "ratio_vs_fp16_official": versus_fp16, "max_abs_score_diff": diff})
        shown = "-" if name == "official-style" else f"{diff:.2e}"
        fp16_shown = "-" if versus_fp16 is None else f"{versus_fp16:.2f}"
        print(f"{name:22} {batch:5d} {speed:9.2f} {speed / baseline:10.2f} {fp16_shown:>16} {shown:>14}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")

    check = images[:args.check]
    exact = OfficialStyleScorer(pipe, round_pixels=False).rate(check)
    _, ours = time_owl2(pipe, check, len(check))
    print(f"same algorithm: max |d score| {float(np.max(np.abs(np.subtract(ours, exact)))):.2e} over {len(check)} "
          "images with the baseline's float16 pixel rounding off (the differences above are that rounding)")
    flops = {"owl2": gflop_per_image(lambda: time_owl2(pipe, check, len(check)), len(check)),
             "official-style": gflop_per_image(lambda: official.rate(check), len(check))}
    print(f"GFLOP per image (matmuls and attention): owl2 {flops['owl2']:.1f}, official-style "
          f"{flops['official-style']:.1f} ({flops['official-style'] / flops['owl2']:.2f}x)")
    results.append({"gflop_per_image": flops})

    if args.profile:
        largest = max(args.batch)
        rows = {
            f"owl2 batch {largest}": profile(lambda: time_owl2(pipe, images, largest), args.images),
            "official-style": profile(lambda: official.rate(images), args.images),
        }
        labels = [label for label, _ in profiled() if any(label in r for r in rows.values())] + ["total"]
        print(f"\nms per image (cProfile, cumulative; it adds overhead to both) {'':4}" +
              "".join(f"{name:>22}" for name in rows))
        for label in labels:
            print(f"{label:66}" + "".join(f"{r.get(label, 0.0):22.1f}" for r in rows.values()))
        results.append({"profile_ms_per_image": rows})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
