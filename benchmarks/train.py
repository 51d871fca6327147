"""Training throughput of owl2's ``Trainer.train_step`` against an official-style training step, in one run.

Model: the mid-size config of ``decode.py`` (LLM hidden 1024, 8 layers, vocab 32000; ViT 512 wide, 6 layers,
224 px; abstractor 2 layers, 64 queries), randomly initialised from a recipe (``model.init_config``). Data: a
synthetic LLaVA-style set written to a temp dir -- generated PIL images of assorted sizes with short Q/A
conversations (one or two rounds, 64-200 text tokens), two multimodal samples for every text-only one, padded to
square (``data.image_policy="pad"``). Batch 4, grad_accum 1.

Cases: stage2 full fine-tuning in fp32, with bf16 autocast, with bf16 plus gradient checkpointing; stage1 (LLM
frozen; text-only samples are left out, as the trainer does); LoRA (r 16 on the official "both" targets, abstractor
trained, bf16). Each case is one ``Trainer``; its own data stream gives the batches (the sampler never mixes
text-only and multimodal samples in a batch), and multimodal and text-only batches are reported in separate rows.

Baseline: on the same Trainer -- same weights, optimizer and batches -- a training step whose forward reproduces
the costs of the official trainer (transformers 4.31 LLaMA as patched by mPLUG-Owl2, ``train/train.py``), not its
bugs: a per-sample Python splice loop for the embeddings; every text-only sample gets a zero dummy image (at the
model's image size, here 224 px rather than the official 448) that is encoded by the ViT and the abstractor and then
dropped through a zero-length slice (so backward runs through the vision tower too, and its parameters get zero
gradients that AdamW steps); every MultiwayNetwork call (both RMSNorms and K and V, 4 per layer) runs ``nonzero``
and gathers/scatters for each branch; eager attention (matmul, additive causal+padding mask, float32 softmax);
RoPE from a cos/sin table. The vision tower and abstractor modules are owl2's (SDPA attention) in both, so the
baseline understates the official vision cost. Loss, backward, clipping and the AdamW step are the same code path
as owl2's. owl2 and baseline steps alternate on each batch (order flipped every step), after one warm-up step of
each on a multimodal and on a text-only batch.

Reported per case and batch kind: median over the timed steps of tokens/s (all non-padding positions, image
positions included), target tokens/s (positions with a loss), step seconds, the baseline's tokens/s and the ratio
(median over steps of baseline step time / owl2 step time on the same batch; > 1 means owl2 is faster).

    python benchmarks/train.py [--steps 3] [--batch-size 4] [--case stage2-fp32 stage2-bf16 ...] [--no-baseline]

``--steps``: timed steps per case and batch kind (``--runs`` is an alias).

Allocator: with glibc's defaults every step frees and re-maps its big buffers (gradients are set to None, activations
are freed), and on this VM the page faults of re-touching them make random steps 3-8x slower (one core busy, the
other waiting), which drowns the comparison. Unless ``--system-malloc`` is given, the script re-runs itself with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>`` so freed memory stays in the process; owl2 and the baseline run
under the same setting either way. ``OWL2_BENCH_DEBUG=1`` prints each timed step's wall, user and system seconds and
page faults: on this 2-vCPU VM a slow step with user time close to its wall time (one core's worth) means a vCPU was
taken away by the host, which is the noise the medians are there to absorb.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import mid_config

from owl2.data import IGNORE_INDEX
from owl2.model.llama import rotate_half
from owl2.model.modeling import Owl2ForCausalLM
from owl2.training.config import load_recipe
from owl2.training.trainer import Trainer

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "llama2-tokenizer"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# case -> recipe sections that differ from the common ones ("" holds the top-level keys)
CASES: dict[str, dict] = {
    "stage2-fp32": {"train": {"bf16": False}},
    "stage2-bf16": {"train": {"bf16": True}},
    "stage2-bf16-ckpt": {"train": {"bf16": True, "gradient_checkpointing": True}},
    "stage1-bf16": {"": {"stage": "stage1"}, "train": {"bf16": True}},
    "lora16-bf16": {"train": {"bf16": True}, "lora": {"enabled": True, "r": 16, "alpha": 32}},
}

WORDS = (
    "the", "a", "picture", "shows", "small", "large", "red", "green", "blue", "yellow", "dog", "cat", "man",
    "woman", "child", "car", "street", "tree", "house", "river", "mountain", "sky", "cloud", "table", "chair",
    "window", "door", "book", "phone", "computer", "screen", "light", "shadow", "left", "right", "front", "behind",
    "near", "far", "under", "over", "holding", "standing", "sitting", "walking", "running", "looking", "wearing",
    "colour", "shape", "corner", "centre", "background", "foreground", "several", "two", "three", "many", "people",
    "animal", "building", "road", "sign", "text", "number", "label", "bright", "dark", "old", "new", "wooden",
    "metal", "glass", "plastic", "paper", "because", "while", "which", "there", "their", "about", "what", "where",
    "how", "why", "describe", "detail", "carefully", "image", "scene", "object",
)
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**46)}
QUESTIONS = ("What is in the picture?", "Describe the image in detail.", "What colour is the largest shape?",
             "How many objects can you see?", "Explain what is happening.", "Summarise the following text.")


# ------------------------------------------------------------------------------------------------------ the world
def write_model_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    mid_config().save(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / name, directory / name)
    return directory


def _sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def write_dataset(directory: Path, samples: int, seed: int = 0) -> Path:
    """LLaVA-style records: two multimodal (one generated image) for every text-only one; 1-2 rounds."""
    rng = random.Random(seed)
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(samples):
        multimodal = i % 3 != 2
        rounds = rng.choice((1, 1, 2))
        budget = rng.randint(45, 150)  # words; ~1.3 tokens per word -> roughly 64-200 text tokens with the template
        turns = []
        for r in range(rounds):
            question = rng.choice(QUESTIONS) + " " + _sentence(rng, rng.randint(3, 12))
            if r == 0 and multimodal:
                question = "<|image|>\n" + question
            answer = _sentence(rng, max(8, budget // rounds - len(question.split())))
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        record = {"id": f"{'img' if multimodal else 'txt'}-{i}", "conversations": turns}
        if multimodal:
            w, h = rng.randint(160, 480), rng.randint(120, 400)
            image = Image.new("RGB", (w, h), tuple(rng.randint(0, 255) for _ in range(3)))
            draw = ImageDraw.Draw(image)
            for _ in range(6):
                x0, y0 = rng.randint(0, w - 20), rng.randint(0, h - 20)
                box = (x0, y0, rng.randint(x0 + 10, w), rng.randint(y0 + 10, h))
                fill = tuple(rng.randint(0, 255) for _ in range(3))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
            image.save(images / f"{i}.png")
            record["image"] = f"images/{i}.png"
        records.append(record)
    path = directory / "train.json"
    path.write_text(json.dumps(records))
    return path


def write_recipe(directory: Path, model_dir: Path, data: Path, batch_size: int, steps: int, case: dict) -> Path:
    values = {
        "": {"stage": "stage2", "output_dir": str(directory / "run"), "seed": 0},
        "model": {"init_config": str(model_dir / "config.json"), "tokenizer": str(model_dir)},
        "data": {"path": str(data), "image_policy": "pad"},
        "train": {"batch_size": batch_size, "grad_accum": 1, "max_steps": steps, "progress": False,
                  "tensorboard": False, "plot": False},
        "optim": {"warmup_steps": 1},
    }
    for section, extra in case.items():
        values.setdefault(section, {}).update(extra)
    lines = []
    for section, table in values.items():
        if section:
            lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "recipe.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------- official-style step
def _core(model: torch.nn.Module) -> Owl2ForCausalLM:
    return next(m for m in model.modules() if isinstance(m, Owl2ForCausalLM))


def _multiway(branches: torch.nn.ModuleList, x: torch.Tensor, indicators: torch.Tensor, out_dim: int) -> torch.Tensor:
    """The official MultiwayNetwork: per branch ``nonzero``, gather [n, 1, D], run, scatter into an empty tensor."""
    out = None
    for idx, branch in enumerate(branches):
        sel = (indicators == idx).nonzero(as_tuple=True)
        if sel[0].numel():
            y = branch(x[sel].unsqueeze(1)).squeeze(1)
            if out is None:  # official: empty_like(x); under autocast the branch output may be bf16
                out = y.new_empty(*x.shape[:-1], out_dim)
            out[sel] = y.to(out.dtype)
    return out


class OfficialStyleTrainStep:
    """An official-style training step on a Trainer's model, optimizer and scheduler (see the module docstring)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.core = _core(trainer.model)
        c = self.core.config
        self.heads, self.head_dim = c.num_attention_heads, c.head_dim
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        t = torch.arange(c.max_position_embeddings, dtype=torch.float32)
        emb = torch.cat([torch.outer(t, inv_freq)] * 2, dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()

    def _embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None):
        """``prepare_inputs_labels_for_multimodal``: one zero image per text-only sample, a per-sample splice loop."""
        m, c = self.core.model, self.core.config
        b = input_ids.shape[0]
        image_mask = input_ids == c.image_token_index
        if pixel_values is None:  # the official collator attaches a zero image to every text-only sample
            size = c.vision.image_size
            pixel_values = torch.zeros(b, 3, size, size, device=input_ids.device)
        features = m.encode_images(pixel_values)
        per_image, rows, indicators, next_image = c.tokens_per_image, [], [], 0
        for i in range(b):
            ids, starts = input_ids[i], image_mask[i].nonzero().squeeze(1)[::per_image].tolist()
            if not starts:  # text-only: [emb(first half), F[idx][0:0], emb(second half)], and the image is used up
                half = ids.shape[0] // 2
                dropped = features[next_image][0:0].to(m.embed_tokens.weight.dtype)
                rows.append(torch.cat([m.embed_tokens(ids[:half]), dropped, m.embed_tokens(ids[half:])]))
                indicators.append(torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device))
                next_image += 1
                continue
            chunks, modality, prev = [], [], 0
            for s in starts:
                chunks += [m.embed_tokens(ids[prev:s]), features[next_image].to(m.embed_tokens.weight.dtype)]
                modality += [torch.zeros(s - prev, dtype=torch.long), torch.ones(per_image, dtype=torch.long)]
                next_image, prev = next_image + 1, s + per_image
            chunks.append(m.embed_tokens(ids[prev:]))
            modality.append(torch.zeros(ids.shape[0] - prev, dtype=torch.long))
            rows.append(torch.cat(chunks))
            indicators.append(torch.cat(modality).to(ids.device))
        return torch.stack(rows), torch.stack(indicators)

    def _layer(self, layer, h, indicators, cos, sin, mask):
        b, t, _ = h.shape
        attn = layer.self_attn
        residual = h
        h = _multiway(layer.input_layernorm.multiway, h, indicators, h.shape[-1])
        q = attn.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = _multiway(attn.k_proj.multiway, h, indicators, attn.k_proj.out_features)
        v = _multiway(attn.v_proj.multiway, h, indicators, attn.v_proj.out_features)
        k = k.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim) + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, t, -1)
        h = residual + attn.o_proj(out)
        residual = h
        h = _multiway(layer.post_attention_layernorm.multiway, h, indicators, h.shape[-1])
        return residual + layer.mlp(h)

    def forward(self, input_ids, attention_mask, pixel_values=None) -> torch.Tensor:
        m = self.core.model
        h, indicators = self._embed(input_ids, pixel_values)
        t = input_ids.shape[1]
        positions = torch.arange(t)
        cos, sin = self.cos[positions][None, None], self.sin[positions][None, None]
        # _prepare_decoder_attention_mask: additive causal mask plus the expanded padding mask
        min_value = torch.finfo(h.dtype).min
        causal = torch.full((t, t), min_value, dtype=h.dtype).triu(1)[None, None]
        padding = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * min_value
        mask = (causal + padding).clamp(min=min_value)
        checkpointing = m.gradient_checkpointing and self.core.training
        for layer in m.layers:
            if checkpointing:
                h = torch.utils.checkpoint.checkpoint(self._layer, layer, h, indicators, cos, sin, mask,
                                                      use_reentrant=False)
            else:
                h = self._layer(layer, h, indicators, cos, sin, mask)
        return self.core.lm_head(m.norm(h))

    def __call__(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        trainer = self.trainer
        targets = max(1, sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches))
        loss_sum = 0.0
        for batch in micro_batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=trainer.config.train.bf16):
                logits = self.forward(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"))
            loss = Owl2ForCausalLM.loss(logits, batch["labels"], batch["attention_mask"].bool(), None,
                                        reduction="sum")
            (loss / targets).backward()
            loss_sum += float(loss.detach())
        clip = trainer.optim_config.grad_clip
        params = [p for p in trainer.model.parameters() if p.requires_grad and p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_sum / targets}


# ---------------------------------------------------------------------------------------------------- measuring
def pick_batches(trainer: Trainer, per_kind: int) -> dict[str, list[dict[str, torch.Tensor]]]:
    """The first ``per_kind`` multimodal and text-only micro-batches of the trainer's own data stream."""
    kinds: dict[str, list] = {"multimodal": [], "text-only": []}
    has_text = not all(trainer.dataset.is_multimodal[i] for i in trainer.data.keep)  # stage1 leaves them out
    wanted = {"multimodal": per_kind, "text-only": per_kind if has_text else 0}
    for seen, (_, _, batch) in enumerate(trainer.data.iterate(0, 0)):
        kind = "multimodal" if "pixel_values" in batch else "text-only"
        if len(kinds[kind]) < wanted[kind]:
            kinds[kind].append(batch)
        if all(len(kinds[k]) >= wanted[k] for k in kinds) or seen > 10 * per_kind + 20:
            break
    return {k: v for k, v in kinds.items() if v}


@torch.no_grad()
def losses_agree(trainer: Trainer, official: OfficialStyleTrainStep, batch: dict[str, torch.Tensor]) -> list[float]:
    """The token-mean loss of owl2's forward and of the baseline's on ``batch`` (same weights, same autocast)."""
    labels, valid = batch["labels"], batch["attention_mask"].bool()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=trainer.config.train.bf16):
        ours = trainer.model(**inputs).logits
        theirs = official.forward(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"))
    return [float(Owl2ForCausalLM.loss(x, labels, valid, None)) for x in (ours, theirs)]


def timed(step, batch) -> float:
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    step([batch])
    dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    if os.environ.get("OWL2_BENCH_DEBUG"):
        print(f"  {getattr(step, '__name__', 'baseline')}: {dt:.2f}s user {r1.ru_utime - r0.ru_utime:.2f} "
              f"sys {r1.ru_stime - r0.ru_stime:.2f} minflt {r1.ru_minflt - r0.ru_minflt}", flush=True)
    return dt


def measure_case(name: str, recipe: Path, steps: int, baseline: bool) -> list[dict]:
    trainer = Trainer(load_recipe(recipe))
    official = OfficialStyleTrainStep(trainer) if baseline else None
    batches = pick_batches(trainer, steps + 1)
    rows = []
    for kind, group in batches.items():
        warm, timed_batches = group[0], group[1:]
        agree = losses_agree(trainer, official, warm) if official is not None else None
        trainer.train_step([warm])
        if official is not None:
            official([warm])
        owl2_s, base_s, ratios, tokens, targets = [], [], [], [], []
        for i, batch in enumerate(timed_batches):
            order = ("owl2", "base") if i % 2 == 0 else ("base", "owl2")
            for who in order:
                if who == "owl2":
                    owl2_s.append(timed(trainer.train_step, batch))
                elif official is not None:
                    base_s.append(timed(official, batch))
            tokens.append(int(batch["attention_mask"].sum()))
            targets.append(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
            if official is not None:
                ratios.append(base_s[-1] / owl2_s[-1])
        row = {
            "case": name, "batches": kind, "batch_size": int(timed_batches[0]["input_ids"].shape[0]),
            "steps": len(timed_batches), "mean_tokens_per_step": statistics.mean(tokens),
            "mean_target_tokens_per_step": statistics.mean(targets),
            "tokens_per_s": statistics.median(n / s for n, s in zip(tokens, owl2_s, strict=True)),
            "target_tokens_per_s": statistics.median(n / s for n, s in zip(targets, owl2_s, strict=True)),
            "step_s": statistics.median(owl2_s), "step_s_all": owl2_s,
            "baseline_tokens_per_s": (statistics.median(n / s for n, s in zip(tokens, base_s, strict=True))
                                      if base_s else float("nan")),
            "baseline_step_s": statistics.median(base_s) if base_s else float("nan"), "baseline_step_s_all": base_s,
            "ratio_vs_baseline": statistics.median(ratios) if ratios else float("nan"),
            "loss_owl2_vs_baseline_forward": agree,
        }
        rows.append(row)
        print(f"| {name:16} | {kind:10} | {row['tokens_per_s']:8.0f} | {row['target_tokens_per_s']:8.0f} | "
              f"{row['step_s']:6.2f} | {row['baseline_tokens_per_s']:8.0f} | {row['ratio_vs_baseline']:5.2f} |",
              flush=True)
    del official, trainer
    gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", "--runs", type=int, default=3,
                        help="timed steps per case and batch kind (the median is reported)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--samples", type=int, default=60, help="size of the synthetic data set")
    parser.add_argument("--case", choices=list(CASES), nargs="+", default=list(CASES))
    parser.add_argument("--no-baseline", action="store_true", help="skip the official-style baseline")
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's default malloc settings (see Allocator above)")
    args = parser.parse_args()
    if not args.system_malloc and "MALLOC_MMAP_MAX_" not in os.environ:
        env = {**os.environ, **MALLOC_ENV}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    logging.getLogger("owl2").setLevel(logging.ERROR)

    root = Path(tempfile.mkdtemp(prefix="owl2-train-bench-"))
    try:
        model_dir = write_model_dir(root / "model")
        data = write_dataset(root / "data", args.samples)
        c = mid_config()
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; mid-size model (LLM {c.hidden_size}x"
              f"{c.num_hidden_layers}, ViT {c.vision.hidden_size}x{c.vision.num_hidden_layers} at "
              f"{c.vision.image_size} px); batch {args.batch_size}, {args.steps} timed steps per row; malloc: "
              f"{' '.join(f'{k}={os.environ[k]}' for k in MALLOC_ENV if k in os.environ) or 'glibc defaults'}")
        print()
        print("| case             | batches    | tokens/s | target/s | step s | baseline | ratio |")
        print("|------------------|------------|---------:|---------:|-------:|---------:|------:|")
        results = []
        for name in args.case:
            recipe = write_recipe(root / name, model_dir, data, args.batch_size, 1000, CASES[name])
            results += measure_case(name, recipe, args.steps, not args.no_baseline)
        print()
        print("tokens/s: non-padding positions (image positions included) per second; target/s: positions with a "
              "loss; baseline: the official-style step (module docstring) on the same weights and batches; ratio: "
              "median of baseline step time / owl2 step time per batch (> 1: owl2 faster)")
        print(json.dumps(results))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
