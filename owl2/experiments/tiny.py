"""``owl2-tiny``: the mPLUG-Owl2 architecture at small scale, trained here on the shapes world, shipped in the package.

:func:`build_tiny` is the whole recipe, run by ``owl2 experiment build-tiny``:

1. the shapes world: a training set (scenes with multi-turn QA and captions, plus text-only instructions) from the
   ``train`` seed stream, and a held-out set from the ``eval`` stream (:mod:`owl2.data.shapes`);
2. a SentencePiece tokenizer in the LLaMA-2 layout trained on the training texts (:mod:`owl2.experiments.tokenizer`);
3. ``owl2 train`` from the random initialisation of ``configs/tiny/model.json``: ``configs/tiny/stage0.toml`` (the
   language model on the conversations as plain text: the pre-trained LLM the paper starts from), the MAM's image
   branch copied from the text branch, ``stage1.toml`` (vision encoder, abstractor and image branch, LLM frozen:
   first on one-object scenes, then on all) and ``stage2.toml`` (everything, all data);
4. ``owl2 eval --task shapes`` on the held-out set, and a model card with the figures.

:func:`default_model_dir` is where the shipped copy lives; ``owl2.load()``, ``owl2 ask`` and ``owl2 chat`` use it
when no model is given.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owl2.utils import atomic_write_text

PACKAGE_DIR = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_NAME = "owl2-tiny"
REPO_CONFIGS = PACKAGE_DIR.parent / "configs" / "tiny"
IMAGE_SIZE = 64
EVAL_FILE = "eval_results.json"
"""The held-out figures of the model card, machine-readable (the accuracy test compares with them)."""
SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."


def default_model_dir() -> Path:
    """The shipped ``owl2-tiny`` checkpoint (``owl2/assets/owl2-tiny``)."""
    return PACKAGE_DIR / "assets" / DEFAULT_MODEL_NAME


@dataclass
class TinyBuild:
    """Sizes and budget of one build (the defaults are those of the shipped model)."""

    scenes: int = 20000
    text_items: int = 6000
    eval_scenes: int = 1000
    eval_text_items: int = 200
    seed: int = 0
    vocab_size: int = 768
    stage0_steps: int | None = None
    """None: the recipe's ``train.max_steps`` (likewise for the other stages)."""
    simple_scenes: int = 5000
    """One-object scenes for the first part of stage 1 (a curriculum: global features suffice there)."""
    simple_steps: int = 800
    stage1_steps: int | None = None
    stage2_steps: int | None = None


def _corpus(records: list[dict[str, Any]]) -> list[str]:
    """Every training text as the template renders it, so USER:/ASSISTANT: become pieces of their own."""
    lines = []
    for record in records:
        turns = record["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2], strict=False):
            lines.append(f"USER: {human['value'].replace('<|image|>', '')} ASSISTANT: {gpt['value']}")
    return lines


def vary_prompts(records: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The training records with the prompt written the ways users write it: half without the newline after the
    image placeholder (``owl2 ask`` and the official CLI put the text right after the image), and a third of the
    short-answer questions without the "Answer the question using a single word or phrase." suffix."""
    import random

    rng = random.Random(f"owl2-tiny/prompts/{seed}")
    varied = []
    for record in records:
        turns = [dict(turn) for turn in record["conversations"]]
        for turn in turns[::2]:
            if rng.random() < 1 / 3:
                turn["value"] = turn["value"].replace(f"\n{SHORT_ANSWER_SUFFIX}", "")
        if turns[0]["value"].startswith("<|image|>\n") and rng.random() < 0.5:
            turns[0]["value"] = "<|image|>" + turns[0]["value"].removeprefix("<|image|>\n")
        varied.append({**record, "conversations": turns})
    return varied


def without_image(record: dict[str, Any]) -> dict[str, Any]:
    """The record as plain text (stage 0): no image, no placeholder."""
    turns = [dict(turn) for turn in record["conversations"]]
    turns[0]["value"] = turns[0]["value"].replace("<|image|>\n", "").replace("<|image|>", "")
    return {"id": record["id"], "conversations": turns}


def prepare(workdir: Path, build: TinyBuild, configs: Path = REPO_CONFIGS) -> dict[str, Path]:
    """Data, tokenizer and the initial model directory (config + tokenizer + image processor) under ``workdir``."""
    from owl2.data.shapes import write_eval_set, write_training_set
    from owl2.experiments.tokenizer import train_sentencepiece
    from owl2.model.config import Owl2Config
    from owl2.processing.image import PREPROCESSOR_CONFIG_NAME, ImageProcessor

    data_dir = workdir / "data"
    train_json = data_dir / "train.json"
    if not train_json.is_file():
        train_json = write_training_set(data_dir, scenes=build.scenes, text_items=build.text_items, seed=build.seed,
                                        size=IMAGE_SIZE)
    records = json.loads(train_json.read_text(encoding="utf-8"))
    mixed = data_dir / "train-mixed.json"
    atomic_write_text(mixed, json.dumps(vary_prompts(records, build.seed)))
    simple_json = data_dir / "simple" / "train.json"
    if not simple_json.is_file():
        simple_json = write_training_set(data_dir / "simple", scenes=build.simple_scenes, text_items=0,
                                         seed=build.seed + 1, size=IMAGE_SIZE, max_objects=1)
    simple = data_dir / "simple" / "train-mixed.json"
    atomic_write_text(simple, json.dumps(vary_prompts(json.loads(simple_json.read_text(encoding="utf-8")),
                                                      build.seed + 1)))
    text_view = data_dir / "text-view.json"
    atomic_write_text(text_view, json.dumps([without_image(r) for r in records]))
    eval_dir = workdir / "eval"
    if not (eval_dir / "eval.jsonl").is_file():
        write_eval_set(eval_dir, scenes=build.eval_scenes, seed=build.seed, size=IMAGE_SIZE,
                       text_items=build.eval_text_items)

    init = workdir / "init"
    init.mkdir(parents=True, exist_ok=True)
    if not (init / "tokenizer.model").is_file():
        train_sentencepiece(_corpus(records), init, build.vocab_size)
    data = json.loads((configs / "model.json").read_text(encoding="utf-8"))
    data["vocab_size"] = build.vocab_size
    Owl2Config.from_dict(data).save(init)
    processor = ImageProcessor(size=IMAGE_SIZE, crop_size=IMAGE_SIZE, default_policy="stretch")
    atomic_write_text(init / PREPROCESSOR_CONFIG_NAME, json.dumps(processor.to_dict(), indent=2) + "\n")
    return {"train": mixed, "simple": simple, "text": text_view, "eval": eval_dir, "init": init}


def train_stages(workdir: Path, paths: dict[str, Path], build: TinyBuild, configs: Path = REPO_CONFIGS) -> Path:
    """Stage 0 (the language model on text), the MAM's image branch copied from its text branch, stage 1 (vision
    side, LLM frozen: first on one-object scenes, then on all), stage 2 (everything); returns the final checkpoint
    directory."""
    import owl2
    from owl2.checkpoint.io import copy_processing_files
    from owl2.model.init import copy_text_branch_to_image_branch
    from owl2.training.config import load_recipe
    from owl2.training.trainer import train

    def quoted(path: Path) -> str:
        return json.dumps(str(path))

    def run(recipe: str, output: str, start: list[str], data: Path, steps: int | None) -> Path:
        overrides = [f"output_dir={quoted(workdir / output)}", f"data.path={quoted(data)}", *start]
        if steps is not None:
            overrides.append(f"train.max_steps={steps}")
        return train(load_recipe(configs / recipe, overrides), resume=True).final_dir

    language = run("stage0.toml", "stage0", [f"model.init_config={quoted(paths['init'] / 'config.json')}",
                                              f"model.tokenizer={quoted(paths['init'])}",
                                              f"model.image_processor={quoted(paths['init'])}"],
                   paths["text"], build.stage0_steps)
    start = workdir / "stage0" / "mam-init"
    if not (start / "model.safetensors").is_file():
        model = copy_text_branch_to_image_branch(owl2.load_model(language, show_progress=False))
        owl2.save_model(model, start)
        copy_processing_files(language, start)
    simple = run("stage1.toml", "stage1-simple", [f"model.path={quoted(start)}"], paths["simple"],
                 build.simple_steps)
    vision = run("stage1.toml", "stage1", [f"model.path={quoted(simple)}"], paths["train"], build.stage1_steps)
    return run("stage2.toml", "stage2", [f"model.path={quoted(vision)}"], paths["train"], build.stage2_steps)


def evaluate_tiny(model_dir: Path, eval_dir: Path, output: Path, *, limit: int | None = None) -> dict[str, Any]:
    """The shapes-world report of ``model_dir`` (``owl2 eval --task shapes``)."""
    import owl2
    from owl2.evaluation import evaluate

    pipe = owl2.load(model_dir, dtype="bf16", device="cpu", show_progress=False)
    result = evaluate(pipe, "shapes", eval_dir, output, limit=limit, batch_size=32)
    return {"metrics": result.report.metrics, "breakdown": result.report.breakdown}


def model_card(build: TinyBuild, report: dict[str, Any], minutes: dict[str, float], config: dict[str, Any]) -> str:
    rows = "\n".join(f"| {kind} | {row['accuracy']:.1f} | {int(row['count'])} |"
                     for kind, row in report["breakdown"].items())
    metrics = report["metrics"]
    return f"""# owl2-tiny

The mPLUG-Owl2 architecture at small scale (vision encoder, visual abstractor, LLaMA decoder with the
Modality-Adaptive Module), trained from scratch on this machine's CPU with owl2's own pipeline on the synthetic
shapes world. It answers questions about coloured shapes; it knows nothing else. It is the default model of
`owl2 ask`, `owl2 chat` and `owl2.load()`.

## Model
- LLM: hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, {config['num_attention_heads']} heads,
  intermediate {config['intermediate_size']}, vocabulary {config['vocab_size']} (a SentencePiece BPE model in the
  LLaMA-2 layout, trained on the training texts).
- Vision: ViT {config['visual_config']['visual_model']['hidden_size']} wide,
  {config['visual_config']['visual_model']['num_hidden_layers']} layers, {IMAGE_SIZE} px images, patch
  {config['visual_config']['visual_model']['patch_size']}; abstractor
  {config['visual_config']['visual_abstractor']['num_hidden_layers']} layers,
  {config['visual_config']['visual_abstractor']['num_learnable_queries']} queries (+ the end token per image).
- Weights in bf16 safetensors.

## Data
The shapes world (`owl2.data.shapes`): {build.scenes} training scenes (`train` seed stream, seed {build.seed}) with
a caption and multi-turn questions each (existence, colour, counting, position, shape, multiple choice), and
{build.text_items} text-only instructions (arithmetic, spelling, alphabetical order, letter counts, reversal).

## Recipe
`owl2 experiment build-tiny` runs `owl2 train` three times from a random initialisation:
1. `configs/tiny/stage0.toml`: the language model on the conversations as plain text. The paper starts from
   LLaMA-2, so a model trained from scratch needs this step first.
2. The MAM's image branch is copied from the text branch, as in the paper.
3. `stage1.toml`: the vision encoder, the abstractor and the image branch, with the LLM frozen; first on
   one-object scenes, then on all scenes.
4. `stage2.toml`: everything, on all data.

Stage 1 starts with {build.simple_steps} steps on {build.simple_scenes} one-object scenes (a curriculum), then
continues on the full data. Training time on 2 CPU cores: stage 0 {minutes['stage0']:.1f} min, stage 1
{minutes['stage1-simple'] + minutes['stage1']:.1f} min, stage 2 {minutes['stage2']:.1f} min.

## Held-out accuracy (`owl2 eval --task shapes`, {build.eval_scenes} scenes of the `eval` stream)
Overall: **{metrics['accuracy']:.1f} %** (caption CIDEr-D {metrics.get('caption_CIDEr', float('nan')):.1f}).

| question type | accuracy (%) | questions |
|---|---|---|
{rows}
"""


def build_tiny(workdir: str | os.PathLike[str], build: TinyBuild | None = None, *, install: bool = False,
               configs: Path = REPO_CONFIGS) -> dict[str, Any]:
    """The whole recipe (module docstring); with ``install`` the result replaces the shipped model."""
    build = build or TinyBuild()
    workdir = Path(workdir)
    started = time.perf_counter()
    paths = prepare(workdir, build, configs)
    prepared = time.perf_counter()
    final = train_stages(workdir, paths, build, configs)
    trained = time.perf_counter()
    minutes = {"prepare": (prepared - started) / 60, "total": (trained - prepared) / 60,
               **{stage: _stage_minutes(workdir / stage) for stage in ("stage0", "stage1-simple", "stage1", "stage2")}}
    report = evaluate_tiny(final, paths["eval"], workdir / "eval-results")
    config = json.loads((final / "config.json").read_text(encoding="utf-8"))
    atomic_write_text(final / "README.md", model_card(build, report, minutes, config))
    atomic_write_text(final / EVAL_FILE, json.dumps({"eval_scenes": build.eval_scenes, "seed": build.seed, **report},
                                                    indent=2) + "\n")
    atomic_write_text(workdir / "build.json", json.dumps({"minutes": minutes, "report": report}, indent=2) + "\n")
    if install:
        install_model(final, default_model_dir())
    return {"final": final, "report": report, "minutes": minutes}


def _stage_minutes(run_dir: Path) -> float:
    from owl2.training.metrics import read_metrics

    return sum(r.get("step_seconds", 0.0) for r in read_metrics(run_dir)) / 60


def install_model(source: Path, destination: Path) -> None:
    """Copy a checkpoint directory into the package (only the files a pipeline reads, plus the model card)."""
    from owl2.checkpoint.io import copy_processing_files

    tmp = destination.with_name(destination.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copy_processing_files(source, tmp)
    for name in ("config.json", "model.safetensors", "README.md", EVAL_FILE):
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    if destination.exists():
        shutil.rmtree(destination)
    tmp.rename(destination)
