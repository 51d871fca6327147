"""``owl2-tiny``: the mPLUG-Owl2 architecture at small scale, trained here on the shapes world, shipped in the package.

:func:`build_tiny` is the whole recipe, run by ``owl2 experiment build-tiny``:

1. the shapes world: a training set of single questions (every question and caption of the training scenes, plus
   text-only instructions; :func:`~owl2.experiments.shapes.write_focus_set`) from the ``train`` seed stream, with the
   answers in the chained style (:func:`~owl2.experiments.shapes.chained_answer`), and a held-out set from the ``eval``
   stream (:mod:`owl2.experiments.shapes`);
2. a SentencePiece tokenizer in the LLaMA-2 layout trained on the training texts (:mod:`owl2.experiments.tokenizer`);
3. the pre-trained parts the paper starts from (CLIP ViT-L/14 and LLaMA-2), made here from the random
   initialisation of ``recipes/tiny/model.json`` (:data:`TINY_CONFIGS`, the recipe's files, shipped in the package
   so that an installed owl2 builds too): stage V (``vision.toml``, :mod:`owl2.experiments.vision_pretrain`) trains
   the vision encoder and the abstractor on dense labels of the scenes; stage 0 (``stage0.toml``, stage
   ``language``) trains the language model from scratch on all the data at 256 questions a step, next to the frozen
   stage-V vision side;
4. the paper's two stages with ``owl2 train``: ``stage1.toml`` (vision encoder, abstractor and the MAM's image
   branch; language model frozen) and ``stage2.toml`` (everything, all data);
5. stage 3 (``stage3.toml``): a short focus on what stages 0-2 leave weakest (the top-or-bottom side questions,
   existence questions about a shape present more than once), mixed 1:1 with the rest (:func:`stage3_focus`);
6. stage 4 (``stage4.toml``): conversations. One 2-3-turn dialogue per training scene
   (:func:`~owl2.experiments.shapes.write_dialogue_set`) mixed 1:1 with stage 3's single questions (:func:`stage4_mix`):
   trained on one question per record, the model answered the second and third questions of an ``owl2 chat``
   conversation far worse than the same questions asked alone;
7. ``owl2 eval --task shapes`` on the held-out set, the multi-turn check (:func:`evaluate_multi_turn`), and a model
   card with the figures.

A stage whose ``final/`` checkpoint exists is kept, and the build goes on after the last such stage: a build that
stopped resumes, and a copy of the shipped model as ``stage3/final`` runs only stage 4.

A language model pre-trained on the conversations as plain text, as LLaMA-2 is, did not learn to read the visual
tokens in stages 1 and 2 (its attention had settled on text positions; ``docs/experiments.md``), so stage 0 gives it
the images from the start.

:func:`owl2.assets.default_model_dir` is where the shipped copy lives; ``owl2.load()``, ``owl2 ask`` and
``owl2 chat`` use it when no model is given.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owl2.assets import EMBEDDED_IMAGE_SIZE, default_model_dir
from owl2.constants import IMAGE_PLACEHOLDER
from owl2.experiments.shapes import ANSWER_EXAMPLES, SHORT_ANSWER_PROMPT
from owl2.experiments.vision_pretrain import PROBE_FILE
from owl2.training.optim import VISION_SIDE
from owl2.utils import atomic_write_text

PACKAGE_DIR = Path(__file__).resolve().parents[1]
TINY_CONFIGS = Path(__file__).resolve().parent / "recipes" / "tiny"
"""The recipe's model config and stage files, in the package (an installed owl2 has no repository around it)."""
IMAGE_SIZE = EMBEDDED_IMAGE_SIZE
EVAL_FILE = "eval_results.json"
"""The held-out figures of the model card, machine-readable (the accuracy tests compare with them)."""
STAGE_DIRS = ("stage-v", "stage0", "stage1", "stage2", "stage3", "stage4")
MULTI_TURN_SCENES = 200
"""Held-out scenes of the multi-turn check in the model card (:func:`evaluate_multi_turn`)."""


@dataclass
class TinyBuild:
    """Sizes and budget of one build (the defaults are those of the shipped model)."""

    scenes: int = 20000
    text_items: int = 6000
    eval_scenes: int = 1000
    eval_text_items: int = 200
    seed: int = 0
    vocab_size: int = 768
    answer_style: str = "chained"
    """The form of the training answers (:data:`~owl2.experiments.shapes.ANSWER_STYLES`, see
    :func:`~owl2.experiments.shapes.write_training_set`): ``"chained"`` in the recipe (existence through the colours of
    the asked shape, ``"circle blue no"``; relations through the two objects in their order, ``"circle triangle no"``;
    the other answers after the asked object, ``"triangle white"``), with which existence is learned where with
    ``"restated"`` (``"red circle no"``) it stays at chance (``docs/experiments.md``). The others are experiments."""
    vertical_orders: bool = True
    """Add each training scene's :func:`~owl2.experiments.shapes.vertical_order` ("List the objects from top to
    bottom."), a training-only item that trains the vertical coordinate as the captions train the horizontal one."""
    object_pieces: bool = False
    """Give the tokenizer one piece per object phrase (:func:`~owl2.experiments.shapes.object_phrases`: "red circle",
    "small red circle"). Off in the recipe: with words, the lookups of colour questions and existence share the
    shape word (``docs/experiments.md``)."""
    vision_steps: int | None = None
    """None: the recipe's step count (``vision.toml`` of :data:`TINY_CONFIGS`; likewise ``train.max_steps`` for the
    others)."""
    stage0_steps: int | None = None
    stage1_steps: int | None = None
    stage2_steps: int | None = None
    stage3_steps: int | None = None
    """0 leaves stage 3 out (the MAM ablation compares stages V to 2), and stage 4 with it."""
    stage4_steps: int | None = None
    """0 leaves stage 4 out. Stage 4 fine-tunes stage 3's model, so it runs only when stage 3 does."""
    bf16: bool | None = None
    """None: each recipe's own precision (bf16 autocast in stages V to 3). False trains every stage in float32, as
    toy builds on CPUs without bf16 units do (a bf16 step there takes a generic kernel, tens of times slower)."""

    @property
    def runs_stage3(self) -> bool:
        """Whether stage 3 runs (and its data is written): unless ``stage3_steps`` is 0."""
        return self.stage3_steps != 0

    @property
    def runs_stage4(self) -> bool:
        """Whether stage 4 runs (and its data is written): with stage 3, unless ``stage4_steps`` is 0."""
        return self.runs_stage3 and self.stage4_steps != 0


def _corpus(records: list[dict[str, Any]]) -> list[str]:
    """Every training text as the template renders it, so USER:/ASSISTANT: become pieces of their own."""
    lines = []
    for record in records:
        turns = record["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2], strict=False):
            lines.append(f"USER: {human['value'].replace(IMAGE_PLACEHOLDER, '')} ASSISTANT: {gpt['value']}")
    return lines


def vary_prompts(records: list[dict[str, Any]], seed: int, stream: str = "prompts") -> list[dict[str, Any]]:
    """The training records with the prompt written the ways users write it: half without the newline after the
    image placeholder (``owl2 ask`` and the official CLI put the text right after the image), and a third of the
    short-answer questions without the "Answer the question using a single word or phrase." suffix (in every turn).
    ``stream`` names the random stream, so that another set of records gets its own draws."""
    rng = random.Random(f"owl2-tiny/{stream}/{seed}")
    varied = []
    for record in records:
        turns = [dict(turn) for turn in record["conversations"]]
        for turn in turns[::2]:
            if rng.random() < 1 / 3:
                turn["value"] = turn["value"].replace(f"\n{SHORT_ANSWER_PROMPT}", "")
        if turns[0]["value"].startswith(f"{IMAGE_PLACEHOLDER}\n") and rng.random() < 0.5:
            turns[0]["value"] = IMAGE_PLACEHOLDER + turns[0]["value"].removeprefix(f"{IMAGE_PLACEHOLDER}\n")
        varied.append({**record, "conversations": turns})
    return varied


def prepare(workdir: Path, build: TinyBuild, configs: Path = TINY_CONFIGS) -> dict[str, Path]:
    """Data, tokenizer and the initial model directory (config + tokenizer + image processor) under ``workdir``."""
    from owl2.experiments.shapes import object_phrases, write_dialogue_set, write_eval_set, write_focus_set
    from owl2.experiments.tokenizer import train_sentencepiece
    from owl2.model.config import Owl2Config
    from owl2.processing.image import PREPROCESSOR_CONFIG_NAME, ImageProcessor

    data_dir = workdir / "data"
    train_json = data_dir / "focus.json"
    if not train_json.is_file():
        train_json = write_focus_set(data_dir, scenes=build.scenes, seed=build.seed, size=IMAGE_SIZE,
                                     text_items=build.text_items, answer_style=build.answer_style,
                                     vertical_orders=build.vertical_orders)
    records = json.loads(train_json.read_text(encoding="utf-8"))
    mixed = data_dir / "train-mixed.json"
    mixed_records = vary_prompts(records, build.seed)
    atomic_write_text(mixed, json.dumps(mixed_records))
    paths = {"train": mixed}
    if build.runs_stage3:
        paths["stage3"] = data_dir / "stage3-focus.json"
        stage3_records = stage3_focus(mixed_records, build.seed)
        atomic_write_text(paths["stage3"], json.dumps(stage3_records))
    if build.runs_stage4:
        dialogues = data_dir / "dialogues.json"
        if not dialogues.is_file():
            dialogues = write_dialogue_set(data_dir, scenes=build.scenes, seed=build.seed, size=IMAGE_SIZE,
                                           answer_style=build.answer_style)
        dialogue_records = vary_prompts(json.loads(dialogues.read_text(encoding="utf-8")), build.seed, "dialogues")
        paths["stage4"] = data_dir / "stage4-dialogues.json"
        atomic_write_text(paths["stage4"], json.dumps(stage4_mix(dialogue_records, stage3_records, build.seed)))
    eval_dir = workdir / "eval"
    if not (eval_dir / "eval.jsonl").is_file():
        write_eval_set(eval_dir, scenes=build.eval_scenes, seed=build.seed, size=IMAGE_SIZE,
                       text_items=build.eval_text_items)

    init = workdir / "init"
    init.mkdir(parents=True, exist_ok=True)
    if not (init / "tokenizer.model").is_file():
        pieces = object_phrases() if build.object_pieces else ()
        train_sentencepiece(_corpus(records), init, build.vocab_size, pieces)
    data = json.loads((configs / "model.json").read_text(encoding="utf-8"))
    data["vocab_size"] = build.vocab_size
    Owl2Config.from_dict(data).save(init)
    processor = ImageProcessor(size=IMAGE_SIZE, crop_size=IMAGE_SIZE, default_policy="stretch")
    atomic_write_text(init / PREPROCESSOR_CONFIG_NAME, json.dumps(processor.to_dict(), indent=2) + "\n")
    return {**paths, "eval": eval_dir, "init": init}


def stage3_focus(records: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Stage 3's data: the questions stages 0-2 leave weakest, and as many other records drawn at random, shuffled.

    The weak ones (``docs/experiments.md``, thirteenth session): every question that asks whether an object is at
    the top or the bottom (at chance after stage 2, although the model reads the vertical position); every existence
    question about a shape the scene holds more than once (right about 73 % of the time after the twelfth session's
    stage 3, against 97 % for one or none: the looked-up colours miss one); and as many existence questions drawn at
    random from the rest, so the model does not learn to look up more objects than there are."""
    from owl2.experiments.shapes import SIDE_OPTIONS, asked_shape_count, scene_of_training_image

    asked_side = f"{SIDE_OPTIONS[1]}?"
    side, several, single, others = [], [], [], []
    for record in records:
        question = record["conversations"][0]["value"]
        if asked_side in question:
            side.append(record)
        elif "-existence-" in record["id"]:
            many = asked_shape_count(scene_of_training_image(record["image"]), question) > 1
            (several if many else single).append(record)
        else:
            others.append(record)
    rng = random.Random(seed)
    rng.shuffle(single)
    balance = min(len(several), len(single))
    focus, rest = side + several + single[:balance], others + single[balance:]
    chosen = focus + rng.sample(rest, min(len(focus), len(rest)))
    random.Random(seed + 1).shuffle(chosen)
    return chosen


def stage4_mix(dialogues: list[dict[str, Any]], focus: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Stage 4's data: every dialogue, and as many single-question records drawn from stage 3's data (``focus``,
    :func:`stage3_focus`), shuffled.

    The single questions keep what the dialogues do not train on their own: drawn from stage 3's data, they keep its
    weak types (the top-or-bottom side questions, existence about a shape present more than once) as stage 3 left
    them. Drawn from all the training records instead, existence fell 1-2 points below stage 3's."""
    rng = random.Random(f"owl2-tiny/stage4/{seed}")
    chosen = dialogues + rng.sample(focus, min(len(dialogues), len(focus)))
    rng.shuffle(chosen)
    return chosen


def pretrain_vision_side(workdir: Path, paths: dict[str, Path], build: TinyBuild,
                         configs: Path = TINY_CONFIGS) -> Path:
    """Stage V (:mod:`owl2.experiments.vision_pretrain`) on a random initialisation of ``paths["init"]``; returns
    the model directory ``workdir/stage-v/final`` (kept when it exists)."""
    import owl2
    from owl2.checkpoint.io import copy_processing_files
    from owl2.experiments.vision_pretrain import VisionPretrainConfig, pretrain_vision
    from owl2.processing.image import load_image_processor

    run_dir = workdir / "stage-v"
    final = run_dir / "final"
    if (final / "model.safetensors").is_file():
        return final
    model = random_model(paths["init"], build.seed)
    config = VisionPretrainConfig.from_toml(configs / "vision.toml", steps=build.vision_steps, scenes=build.scenes,
                                            seed=build.seed, bf16=build.bf16)
    pretrain_vision(model, config, run_dir, image_size=IMAGE_SIZE, processor=load_image_processor(paths["init"]))
    owl2.save_model(model, final)
    copy_processing_files(paths["init"], final)
    return final


def random_model(init: Path, seed: int) -> Any:
    """The model of ``init/config.json`` with owl2's random initialisation (the MAM's image branch a copy of the
    text branch)."""
    from owl2.model.config import Owl2Config
    from owl2.model.init import init_weights
    from owl2.model.modeling import Owl2ForCausalLM

    return init_weights(Owl2ForCausalLM(Owl2Config.from_json(init)), seed=seed)




def start_from_vision(vision: Path, init: Path, destination: Path, seed: int) -> Path:
    """A random initialisation of ``init``'s config whose vision side (:data:`VISION_SIDE`) is stage V's, saved to
    ``destination`` (kept when it exists). The MAM ablation starts both variants from one stage-V run this way."""
    from safetensors.torch import load_file

    import owl2
    from owl2.checkpoint.io import copy_processing_files

    if (destination / "model.safetensors").is_file():
        return destination
    model = random_model(init, seed)
    trained = {k: v for k, v in load_file(str(vision / "model.safetensors")).items() if k.startswith(VISION_SIDE)}
    _, unexpected = model.load_state_dict(trained, strict=False)
    if unexpected or not trained:
        raise ValueError(f"{vision} holds no vision side of this model ({len(unexpected)} unexpected keys)")
    owl2.save_model(model, destination)
    copy_processing_files(init, destination)
    return destination


def train_stages(workdir: Path, paths: dict[str, Path], build: TinyBuild, configs: Path = TINY_CONFIGS, *,
                 vision: Path | None = None) -> Path:
    """Stage V (unless ``vision``, a stage-V model directory, is given), stage 0 (the language model from scratch
    next to the frozen stage-V vision side), stage 1 (vision side and the MAM's image branch, language model frozen)
    stage 2 (everything), stage 3 (unless ``build.stage3_steps`` is 0) and stage 4 (unless ``build.runs_stage4`` is
    False); returns the final checkpoint directory.

    The stages after the last one with a ``final/`` checkpoint run (each resumes from its latest checkpoint); the
    earlier ones are not touched. So a copy of the shipped model as ``workdir/stage3/final`` runs stage 4 alone, on
    exactly the weights stage 3 handed on (it saves bf16)."""
    from owl2.training.config import load_recipe
    from owl2.training.trainer import train

    def quoted(path: Path) -> str:
        return json.dumps(str(path))

    def run(recipe: str, output: str, start: Path, steps: int | None, data: str = "train") -> Path:
        overrides = [f"output_dir={quoted(workdir / output)}", f"data.path={quoted(paths[data])}",
                     f"model.path={quoted(start)}"]
        if steps is not None:
            overrides.append(f"train.max_steps={steps}")
        if build.bf16 is not None:
            overrides.append(f"train.bf16={str(build.bf16).lower()}")
        return train(load_recipe(configs / recipe, overrides), resume=True).final_dir

    stages = [("stage0", build.stage0_steps, "train"), ("stage1", build.stage1_steps, "train"),
              ("stage2", build.stage2_steps, "train")]
    if build.runs_stage3:
        stages.append(("stage3", build.stage3_steps, "stage3"))
    if build.runs_stage4:
        stages.append(("stage4", build.stage4_steps, "stage4"))
    finished = [k for k, (name, _, _) in enumerate(stages)
                if (workdir / name / "final" / "model.safetensors").is_file()]
    if finished:
        start = workdir / stages[finished[-1]][0] / "final"
        stages = stages[finished[-1] + 1:]
    else:
        vision = vision or pretrain_vision_side(workdir, paths, build, configs)
        start = start_from_vision(vision, paths["init"], workdir / "stage0-init", build.seed)
    for name, steps, data in stages:
        start = run(f"{name}.toml", name, start, steps, data)
    return start


def recipe_steps(build: TinyBuild, configs: Path = TINY_CONFIGS) -> dict[str, int]:
    """The steps of stages V and 0 to 4: the build's, or the recipe's where the build leaves them None (0 for a stage
    the build leaves out)."""
    from owl2.experiments.vision_pretrain import VisionPretrainConfig
    from owl2.training.config import load_recipe

    steps = {"V": build.vision_steps if build.vision_steps is not None
             else VisionPretrainConfig.from_toml(configs / "vision.toml").steps}
    for stage, own in (("0", build.stage0_steps), ("1", build.stage1_steps), ("2", build.stage2_steps),
                       ("3", build.stage3_steps), ("4", build.stage4_steps if build.runs_stage4 else 0)):
        steps[stage] = own if own is not None else load_recipe(configs / f"stage{stage}.toml",
                                                               validate=False).train.max_steps
    return steps


def results_dir(workdir: Path, final: Path) -> Path:
    """Where the held-out evaluation of ``final`` (a stage's final checkpoint under ``workdir``) goes: one folder per
    stage, as the evaluation resumes from the predictions it finds."""
    return workdir / "eval-results" / final.parent.name


def evaluate_tiny(model_dir: Path, eval_dir: Path, output: Path, *, limit: int | None = None) -> dict[str, Any]:
    """The shapes-world report of ``model_dir`` (``owl2 eval --task shapes``)."""
    import owl2
    from owl2.evaluation import evaluate

    pipe = owl2.load(model_dir, dtype="bf16", device="cpu", show_progress=False)
    result = evaluate(pipe, "shapes", eval_dir, output, limit=limit, batch_size=32)
    return {"metrics": result.report.metrics, "breakdown": result.report.breakdown}


def evaluate_multi_turn(model_dir: Path, eval_dir: Path, scenes: int = MULTI_TURN_SCENES) -> dict[str, Any]:
    """The multi-turn check of ``model_dir`` on the first ``scenes`` held-out scenes
    (:func:`owl2.evaluation.tasks.shapes.multi_turn_check`: three questions as an ``owl2 chat`` conversation, and
    the second and third asked alone), loaded as ``owl2 chat`` loads it on a CPU."""
    import owl2
    from owl2.evaluation.tasks.shapes import multi_turn_check

    pipe = owl2.load(model_dir, dtype="bf16", device="cpu", show_progress=False)
    return multi_turn_check(pipe, eval_dir, scenes)


def model_card(build: TinyBuild, report: dict[str, Any], minutes: dict[str, float], config: dict[str, Any],
               probe: dict[str, float], multi_turn: dict[str, Any] | None = None) -> str:
    """The model card (``README.md``): model, data, recipe, training minutes, the held-out report of
    :func:`evaluate_tiny` and, when given, the multi-turn check of :func:`evaluate_multi_turn`."""
    rows = "\n".join(f"| {kind} | {row['accuracy']:.1f} | {int(row['count'])} |"
                     for kind, row in report["breakdown"].items())
    metrics = report["metrics"]
    options = [text for on, text in (
        (build.answer_style != "short", f'training answers in the "{build.answer_style}" style (`answer_style`; '
         f'"{ANSWER_EXAMPLES[build.answer_style]}" for "Is there a red circle?")'),
        (build.vertical_orders, 'each scene\'s objects listed top to bottom, a training-only question '
         '(`vertical_orders`)'),
        (build.object_pieces, 'one tokenizer piece per object phrase such as "red circle" (`object_pieces`)'),
    ) if on]
    data_options = f" With {' and '.join(options)}." if options else ""
    stage3 = ("5. Stage 3, `stage3.toml`: everything, on the top-or-bottom side questions and the existence questions "
              "about a shape present more than once (with as many about one or none), mixed 1:1 with the rest "
              "(`stage3_focus`).\n") if build.runs_stage3 else ""
    stage3_minutes = f", stage 3 {minutes['stage3']:.1f} min" if build.runs_stage3 else ""
    stage4 = ("6. Stage 4, `stage4.toml`: everything, on one 2-3-turn dialogue per training scene (the image in the "
              "first turn, `write_dialogue_set`), mixed 1:1 with single questions from stage 3's data (`stage4_mix`)."
              "\n") if build.runs_stage4 else ""
    stage4_minutes = f", stage 4 {minutes['stage4']:.1f} min" if build.runs_stage4 else ""
    dialogues = (" Stage 4 adds one conversation of 2 or 3 of a scene's questions per training scene "
                 "(`write_dialogue_set`).") if build.runs_stage4 else ""
    conversations = "" if multi_turn is None else f"""
## Conversations (`evaluate_multi_turn`, the first {multi_turn['scenes']} scenes of the `eval` stream)
Three questions about a held-out scene asked as an `owl2 chat` conversation (the image with the first; greedy, each
answer sent back as decoded), and the second and third asked alone, each with the image:

| questions 2 and 3 | accuracy (%) | questions |
|---|---|---|
| asked alone | {multi_turn['alone']:.1f} | {multi_turn['questions']} |
| as turns 2 and 3 of the conversation | {multi_turn['in_conversation']:.1f} | {multi_turn['questions']} |

Turn by turn in the conversation: {', '.join(f'{value:.1f} %' for value in multi_turn['turns'])}.
"""
    return f"""# owl2-tiny

The mPLUG-Owl2 architecture at small scale (vision encoder, visual abstractor, LLaMA decoder with the
Modality-Adaptive Module), trained from scratch on a 2-core CPU with owl2's own pipeline on the synthetic
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
The shapes world (`owl2.experiments.shapes`): {build.scenes} training scenes (`train` seed stream, seed {build.seed})
with a caption and about nine questions each (existence, colour, counting, position, shape, multiple choice), one
question per record (`write_focus_set`; the multiple-choice answers name the option, then its letter: "diamond
B"), and {build.text_items} text-only instructions (arithmetic, spelling, alphabetical order, letter counts,
reversal).{data_options}{dialogues}

## Recipe
`owl2 experiment build-tiny` builds it from a random initialisation. The paper starts from two pre-trained parts,
CLIP ViT-L/14 and LLaMA-2; owl2-tiny makes its own first.
The recipe's files are in `owl2/experiments/recipes/tiny/`.
1. Stage V, `vision.toml`: the vision encoder and the abstractor learn dense labels of the training
   scenes. Each abstractor query predicts what is centred in its cell of a grid over the image.
   Held-out read-out accuracy: presence {probe.get('presence', float('nan')) * 100:.1f} %, shape
   {probe.get('shape', float('nan')) * 100:.1f} %, colour {probe.get('colour', float('nan')) * 100:.1f} %.
2. Stage 0, `stage0.toml` (stage `language`): the language model, trained from scratch on
   all the data next to the frozen stage-V vision side.
3. The paper's stage 1, `stage1.toml`: the vision encoder, the abstractor and the MAM's image branch, with the
   language model frozen.
4. The paper's stage 2, `stage2.toml`: everything, on all the data.
{stage3}{stage4}
Training time on 2 CPU cores: stage V {minutes['stage-v']:.1f} min, stage 0 {minutes['stage0']:.1f} min, stage 1
{minutes['stage1']:.1f} min, stage 2 {minutes['stage2']:.1f} min{stage3_minutes}{stage4_minutes}.

## Held-out accuracy (`owl2 eval --task shapes`, {build.eval_scenes} scenes of the `eval` stream)
Overall: **{metrics['accuracy']:.1f} %** (caption CIDEr-D {metrics.get('caption_CIDEr', float('nan')):.1f}).

| question type | accuracy (%) | questions |
|---|---|---|
{rows}
{conversations}"""


def build_tiny(workdir: str | os.PathLike[str], build: TinyBuild | None = None, *, install: bool = False,
               configs: Path = TINY_CONFIGS) -> dict[str, Any]:
    """The whole recipe (module docstring); with ``install`` the result replaces the shipped model."""
    build = build or TinyBuild()
    workdir = Path(workdir)
    started = time.perf_counter()
    paths = prepare(workdir, build, configs)
    prepared = time.perf_counter()
    final = train_stages(workdir, paths, build, configs)
    trained = time.perf_counter()
    minutes = {"prepare": (prepared - started) / 60, "total": (trained - prepared) / 60,
               **{stage: _stage_minutes(workdir / stage) for stage in STAGE_DIRS}}
    report = evaluate_tiny(final, paths["eval"], results_dir(workdir, final))
    multi_turn = evaluate_multi_turn(final, paths["eval"], min(MULTI_TURN_SCENES, build.eval_scenes))
    config = json.loads((final / "config.json").read_text(encoding="utf-8"))
    probe = json.loads((workdir / "stage-v" / PROBE_FILE).read_text(encoding="utf-8"))
    write_model_card(final, build, report, minutes, config, probe, multi_turn)
    atomic_write_text(workdir / "build.json", json.dumps({"minutes": minutes, "report": report,
                                                          "multi_turn": multi_turn}, indent=2) + "\n")
    if install:
        install_model(final, default_model_dir())
    return {"final": final, "report": report, "minutes": minutes}


def write_model_card(final: Path, build: TinyBuild, report: dict[str, Any], minutes: dict[str, float],
                     config: dict[str, Any], probe: dict[str, float], multi_turn: dict[str, Any]) -> None:
    """``README.md`` (:func:`model_card`) and :data:`EVAL_FILE` (the held-out report and the multi-turn check, which
    the tests compare the shipped model with) in the checkpoint directory ``final``."""
    atomic_write_text(final / "README.md", model_card(build, report, minutes, config, probe, multi_turn))
    atomic_write_text(final / EVAL_FILE, json.dumps({"eval_scenes": build.eval_scenes, "seed": build.seed, **report,
                                                     "multi_turn": multi_turn}, indent=2) + "\n")


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
