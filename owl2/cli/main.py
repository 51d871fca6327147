"""``owl2`` command-line entry point (argparse: no dependencies beyond the core)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from owl2.checkpoint import CheckpointError, convert_checkpoint
from owl2.cli import ADAPTER_HELP, QUANTIZE_CHOICES, QUANTIZE_HELP
from owl2.model.config import ConfigError


def _convert(args: argparse.Namespace) -> int:
    report = convert_checkpoint(
        args.source,
        args.destination,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        verify=not args.no_verify,
        show_progress=not args.quiet,
        quantize=args.quantize,
        group_size=args.group_size,
    )
    settings = report.quantization
    if not report.verified:
        status = "not verified"
    elif settings is None:
        status = "verified: every tensor equals its source"
    else:
        status = ("verified: every floating-point tensor equals its source and every quantised layer the source "
                  "weight quantised again")
    quantized = ""
    if settings is not None:
        group = f", group size {settings['group_size']}" if "group_size" in settings else ""
        quantized = f" (language model's linear layers {settings['mode']}{group})"
    print(
        f"wrote {report.tensors} tensors ({report.bytes / 1e9:.2f} GB) in {len(report.files)} file(s) to "
        f"{args.destination}{quantized}; {status}; dropped {len(report.skipped)} recomputed buffer(s)"
    )
    return 0


def _sampling(args: argparse.Namespace) -> dict[str, object]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }


def _load_pipeline(args: argparse.Namespace, *, notice: bool = False):  # -> owl2.api.Pipeline, imported on use
    """The pipeline of ``--model``; ``notice``: say on stderr what the embedded model can do, when it is the one."""
    from owl2.api import EMBEDDED_MODEL_NOTICE, load

    quiet = getattr(args, "quiet", False)
    if not quiet:
        print(f"loading {args.model or 'owl2-tiny (the embedded default)'} ...", file=sys.stderr, flush=True)
    pipe = load(args.model, dtype=args.dtype, device=args.device, policy=args.policy,
                adapter=getattr(args, "adapter", None), show_progress=not quiet, quantize=args.quantize)
    if notice and pipe.is_embedded:
        print(EMBEDDED_MODEL_NOTICE, file=sys.stderr, flush=True)
    return pipe


def _jsonl_image(image: object, folder: Path) -> object:
    """An image path of a JSONL line, relative ones taken from the JSONL file's folder (as training data reads
    them), so a question file works from any working directory; absolute paths and URLs stay as written."""
    if not isinstance(image, str) or not image or image.startswith(("data:", "http://", "https://", "file://")):
        return image
    path = Path(image).expanduser()
    return str(path if path.is_absolute() else folder / path)


def _jsonl_images(record: dict[str, object], where: str) -> list[str]:
    """The image paths or URLs of one JSONL record: ``"images"`` (a list, one string or null) or ``"image"`` (one
    string, or null/empty for none); ValueError naming ``where`` for any other shape (a number, an object, a list of
    lists), which would otherwise fail deep in the pipeline without the line's number."""
    if "images" in record:
        images = record["images"]
        images = [] if images is None else [images] if isinstance(images, str) else images
        if not isinstance(images, list):
            raise ValueError(f'{where}: "images" must be a list of image paths or URLs, got {type(images).__name__}')
    else:
        images = [record["image"]] if record.get("image") else []
    for image in images:
        if not isinstance(image, str) or not image:
            raise ValueError(f"{where}: an image must be a path or URL (a non-empty string), got {image!r:.60}")
    return images


def _ask(args: argparse.Namespace) -> int:
    import json

    if (args.prompt is None) == (args.jsonl is None):
        raise ValueError("give exactly one of --prompt or --jsonl")
    if args.prompt is not None:
        jobs = [{"prompt": args.prompt, "images": list(args.image or [])}]
    else:  # read before the model loads: a bad line is reported at once
        jobs = []
        folder = Path(args.jsonl).parent
        if Path(args.jsonl).is_dir():
            raise ValueError(f"--jsonl {args.jsonl}: is a directory; give a file of JSON lines")
        with open(args.jsonl, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{args.jsonl} line {number}: not valid JSON ({exc})") from None
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise ValueError(f'{args.jsonl} line {number}: expected {{"prompt": str, "image": ...}}')
                images = _jsonl_images(record, f"{args.jsonl} line {number}")
                jobs.append({**record, "prompt": record["prompt"],
                             "images": [_jsonl_image(image, folder) for image in images]})
    pipe = _load_pipeline(args, notice=True)
    imageless = sum(not job["images"] for job in jobs)
    if imageless and pipe.is_embedded:
        from owl2.api import EMBEDDED_NO_IMAGE_HINT

        some = "" if args.prompt is not None else f" ({imageless} of {len(jobs)} lines have no image)"
        print(EMBEDDED_NO_IMAGE_HINT + some, file=sys.stderr, flush=True)
    results = pipe.generate([j["prompt"] for j in jobs], [j["images"] for j in jobs], **_sampling(args))
    for job, result in zip(jobs, results, strict=True):
        if args.json or args.jsonl:
            record = {k: v for k, v in job.items() if k != "images"}
            record.update(answer=result.text, finish_reason=result.finish_reason,
                          prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids))
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(result.text)
    return 0


def _chat(args: argparse.Namespace) -> int:
    try:
        return _chat_loop(args)
    except KeyboardInterrupt:
        # Ctrl-C at the prompt or mid-answer: end the open "USER: " or answer line on stdout, then one line on
        # stderr, as for every other way a command stops early.
        print(flush=True)
        print("owl2 chat: interrupted", file=sys.stderr)
        return 2


def _chat_loop(args: argparse.Namespace) -> int:
    from owl2.processing.conversation import prompt_parts

    pipe = _load_pipeline(args, notice=True)
    images = list(args.image or [])
    messages: list[dict] = []
    hint = pipe.is_embedded  # the no-image hint, at most once
    print("owl2 chat: type a message; /image PATH adds an image, /reset starts over, /quit leaves.", file=sys.stderr)
    while True:
        try:
            line = input("USER: ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            messages, images = [], []
            print("(conversation and images cleared)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line.removeprefix("/image").strip()
            try:
                from owl2.processing.image import load_image

                load_image(path)
            except (ValueError, OSError) as exc:
                print(f"cannot use that image: {exc}", file=sys.stderr)
                continue
            images.append(path)
            print(f"(image added: {path}; it goes with your next message)", file=sys.stderr)
            continue
        try:
            content = prompt_parts(line, images)  # a typed <|image|> is where the image goes
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        if hint and not images and not any(part["type"] == "image" for message in messages
                                           if isinstance(message["content"], list) for part in message["content"]):
            from owl2.api import EMBEDDED_NO_IMAGE_HINT

            print(EMBEDDED_NO_IMAGE_HINT.replace("--image", "/image PATH"), file=sys.stderr, flush=True)
            hint = False
        images = []
        messages.append({"role": "user", "content": content})
        print("ASSISTANT: ", end="", flush=True)
        answer = ""
        try:
            for delta in pipe.stream(messages, **_sampling(args)):
                answer += delta
                print(delta, end="", flush=True)
        except ValueError as exc:
            messages.pop()
            print(f"\nerror: {exc}", file=sys.stderr)
            continue
        print()
        messages.append({"role": "assistant", "content": answer})


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="checkpoint directory or Hugging Face hub id (default: the embedded owl2-tiny)")
    parser.add_argument("--adapter", default=None, help=ADAPTER_HELP)
    parser.add_argument("--image", action="append", help="image file (repeat for several)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None, help=QUANTIZE_HELP)
    parser.add_argument("--quiet", action="store_true", help="no loading line or progress bar")
    parser.add_argument("--policy", choices=["crop", "pad", "stretch"], default=None,
                        help="how images become squares (default: the processor's)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def _train(args: argparse.Namespace) -> int:
    import os

    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun, one report instead of one per process
    run: dict[str, str | float] = {}  # output_dir, save_every, start time once the recipe is read (Ctrl-C report)
    try:
        return _run_training(args, main_process, run)
    except KeyboardInterrupt:
        # Ctrl-C is how a user stops a run: no traceback, but where the work is and how to go on from it.
        if main_process:
            print(f"owl2 train: {_interrupted_report(args, run)}", file=sys.stderr)
        return 2


def _run_training(args: argparse.Namespace, main_process: bool, run: dict[str, str | float]) -> int:
    import time
    import warnings

    from owl2.api import default_model
    from owl2.data.records import SkippedRecordWarning
    from owl2.training.config import load_recipe
    from owl2.training.trainer import TrainingDiverged, train

    config = load_recipe(args.recipe, args.overrides)
    run.update(output_dir=config.output_dir, save_every=config.train.save_every, started=time.time())
    if main_process and config.model.path == str(default_model()):
        print(f"owl2 train: starting from owl2-tiny, the embedded default ({config.model.path}); set model.path to "
              "train another model", file=sys.stderr)
    resume: str | bool | None = True if args.resume == "latest" else args.resume
    show_warning = warnings.showwarning

    def one_line(message: Warning | str, category: type[Warning], *rest: object) -> None:
        # A skipped record is the data's problem, not the code's: its message alone, without a source location.
        if issubclass(category, SkippedRecordWarning):
            if main_process:
                print(f"owl2 train: warning: {message}", file=sys.stderr)
        else:
            show_warning(message, category, *rest)  # type: ignore[arg-type]

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line
            result = train(config, resume=resume)
    except TrainingDiverged as exc:
        print(f"owl2 train: {exc}", file=sys.stderr)
        return 3
    except ImportError as exc:  # an optional dependency (peft, DeepSpeed); the message names what to install
        print(f"owl2 train: error: {exc}", file=sys.stderr)
        return 2
    if result.losses:
        where = result.final_dir or result.adapter_dir
        steps = f"{result.steps} step{'s' if result.steps != 1 else ''}"
        print(f"trained {steps}; loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; "
              f"saved {where}; metrics in {result.output_dir / 'metrics.jsonl'}")
    return 0


def _interrupted_report(args: argparse.Namespace, run: dict[str, str | float]) -> str:
    """One line for Ctrl-C: the newest checkpoint of this run under its ``output_dir`` (or that there is none) and the
    command that goes on from there."""
    import shlex

    from owl2.training.checkpointing import checkpoint_step, latest_checkpoint

    command = shlex.join(["owl2", "train", args.recipe, *args.overrides])
    if not run:
        return f"interrupted before training started; nothing was saved; start again with: {command}"
    last = latest_checkpoint(str(run["output_dir"]))
    # A fresh run (no --resume) does not continue an older run's checkpoints left in the same output_dir.
    if last is not None and (args.resume or last.stat().st_mtime >= float(run["started"])):
        return (f"interrupted; the last checkpoint is {last} (step {checkpoint_step(last)}); continue from it with: "
                f"{command} --resume")
    save_every = int(run["save_every"])
    when = (f"the first comes at step {save_every}" if save_every else
            "train.save_every is 0, so only the end saves; set train.save_every=N to save every N steps")
    return f"interrupted before the first checkpoint, so nothing was saved ({when}); start again with: {command}"


def _eval(args: argparse.Namespace) -> int:
    from owl2.evaluation import TASKS, evaluate, get_task

    if args.list:
        for name in sorted(TASKS):
            task = get_task(name)
            print(f"{name:14s} {task.mode:13s} {task.data_format}")
        return 0
    missing = [flag for flag, value in (("--task", args.task), ("--data", args.data)) if value is None]
    if missing:
        raise ValueError(f"give {', '.join(missing)} (or --list to see the tasks)")
    task = get_task(args.task)
    output = args.output or str(Path("eval-results") / Path(args.model or "owl2-tiny").name)
    # what the arguments alone show is reported before the model loads
    if args.limit is not None and args.limit < 1:  # a negative one would slice off the end of the data set
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    data = Path(args.data)
    if data.exists() and not (data.is_file() or data.is_dir()):  # reading a FIFO would wait for a writer
        raise ValueError(f"--data {args.data}: not a regular file or directory (a FIFO, socket or device)")
    if Path(output).exists() and not Path(output).is_dir():
        raise ValueError(f"--output {output}: exists and is not a directory (the results go into a directory)")
    pipe = _load_pipeline(args)
    from owl2.evaluation.harness import EvaluationInterrupted

    try:
        result = evaluate(pipe, task, args.data, output, limit=args.limit, batch_size=args.batch_size,
                          show_progress=not args.quiet)
    except EvaluationInterrupted as stop:
        # Every finished batch is on disk (the harness syncs each one), so say so, and how to go on from there.
        print(f"{_fresh_line()}owl2 eval: interrupted; {stop.saved} of {stop.total} predictions are saved in "
              f"{stop.predictions_path}; run the same command again (same --output) to resume from them",
              file=sys.stderr)
        return 2
    headline = ", ".join(f"{k} {v:.2f}" for k, v in result.report.metrics.items())
    print(f"{task.name}: {headline} ({result.ran} new predictions); report: {result.report_paths[1]}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import os
    import random
    import tempfile

    from owl2.assets import EMBEDDED_IMAGE_SIZE
    from owl2.experiments.shapes import generate_scene, render_scene, scene_questions, score_answer

    if args.image:
        return _demo_images(args)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**9)
    scene = generate_scene(f"demo/{seed}")
    image = render_scene(scene, size=EMBEDDED_IMAGE_SIZE)  # the resolution owl2-tiny is trained at
    if args.output is None:  # a fresh file of our own: a scene.png of the user's in this folder is never touched
        handle, output = tempfile.mkstemp(prefix=f"owl2-demo-{seed}-", suffix=".png")
        os.close(handle)
    else:
        output = args.output
    image.save(output)
    print(f"drew a new scene (seed {seed}) into {output}")
    pipe = _load_pipeline(args)
    items = scene_questions(scene, random.Random(seed))
    chosen = [next(i for i in items if i.type == kind) for kind in ("caption", "count", "existence", "colour")
              if any(i.type == kind for i in items)]
    right = 0
    for item in chosen:
        answer = pipe.chat(item.question, [output], max_new_tokens=48)
        ok = score_answer(item.type, answer, item.answer, choices=item.choices)
        right += ok
        print(f"Q: {item.question.splitlines()[0]}\nA: {answer}    [{'right' if ok else 'wrong: ' + item.answer}]")
    print(f"{right}/{len(chosen)} right")
    return 0


def _demo_images(args: argparse.Namespace) -> int:
    """``owl2 demo --image PATH``: the demo's questions about the user's own images, unmarked (their answers are
    known only for the scenes the demo draws)."""
    from owl2.api import EMBEDDED_EXAMPLE_QUESTIONS
    from owl2.processing.image import load_image

    if args.output is not None:
        raise ValueError("--output is where owl2 demo saves the scene it draws; with --image it draws none")
    for path in args.image:
        load_image(path)  # a bad path fails here, in one line, before the model loads
    pipe = _load_pipeline(args, notice=True)
    for path in args.image:
        print(f"{path}:")
        for question in EMBEDDED_EXAMPLE_QUESTIONS:
            print(f"Q: {question}\nA: {pipe.chat(question, path, max_new_tokens=48)}")
    print("(not marked: owl2 demo knows the answers only for the scenes it draws)")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from owl2.experiments.tiny import TinyBuild, build_tiny

    if args.name == "build-tiny":
        build = TinyBuild(scenes=args.scenes or TinyBuild.scenes, answer_style=args.answer_style,
                          object_pieces=args.object_pieces)
        result = build_tiny(args.workdir or "runs/owl2-tiny", build, install=args.install)
        print(f"owl2-tiny: held-out accuracy {result['report']['metrics']['accuracy']:.1f} %; checkpoint "
              f"{result['final']}" + ("; installed as the embedded default" if args.install else ""))
        return 0
    from owl2.experiments.ablation import run_mam_ablation

    report = run_mam_ablation(args.workdir or "runs/mam-ablation", scenes=args.scenes, steps=args.steps,
                              build=TinyBuild() if args.full or args.from_build else None, mam_build=args.from_build)
    print(report["markdown"])
    return 0


def _fresh_line() -> str:
    """A newline when stderr is a terminal: there Ctrl-C leaves ``^C`` (or a progress bar) on the current line."""
    return "\n" if sys.stderr.isatty() else ""


def _version() -> str:
    """The installed distribution's version; the package's own when run from a source tree that is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("owl2")
    except PackageNotFoundError:
        from owl2 import __version__

        return __version__


class _CommandParser(argparse.ArgumentParser):
    """A command's parser that can add some of its arguments only when the command is parsed or its help shown
    (:meth:`defer`): building the whole command line then imports only what every command needs, and
    ``owl2 convert --help`` does not import the shapes world or the tiny recipe for ``experiment``'s options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list[Callable[[argparse.ArgumentParser], None]] = []

    def defer(self, add_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
        """Call ``add_arguments(self)`` before this parser is first used; arguments keep their order of calls."""
        self._deferred.append(add_arguments)

    def _complete(self) -> None:
        while self._deferred:
            self._deferred.pop(0)(self)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None,
                         ) -> tuple[argparse.Namespace, list[str]]:
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._complete()
        return super().format_usage()

    def format_help(self) -> str:
        self._complete()
        return super().format_help()


def _add_build_options(experiment: argparse.ArgumentParser) -> None:
    """``owl2 experiment``'s options of the tiny build, whose choices and defaults come from the recipe."""
    from owl2.experiments.shapes import ANSWER_EXAMPLES, ANSWER_STYLES
    from owl2.experiments.tiny import TinyBuild

    experiment.add_argument("--answer-style", choices=ANSWER_STYLES, default=TinyBuild.answer_style,
                            help="build-tiny: the form of the training answers, e.g. for \"Is there a red circle?\": "
                            + "; ".join(f'"{example}" ({style})' for style, example in ANSWER_EXAMPLES.items())
                            + f" (default: {TinyBuild.answer_style}, the recipe)")
    experiment.add_argument("--object-pieces", action=argparse.BooleanOptionalAction, default=TinyBuild.object_pieces,
                            help='build-tiny: one tokenizer piece per object phrase ("red circle", "small red circle"; '
                            "off in the recipe)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="owl2", description="mPLUG-Owl2 in plain PyTorch.")
    parser.add_argument("--version", action="version", version=f"owl2 {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    convert = commands.add_parser(
        "convert",
        help="convert an official checkpoint to sharded safetensors",
        description="Convert an official mPLUG-Owl2 checkpoint (pickled .bin shards or safetensors; local directory "
        "or hub id) into the owl2 layout: sharded safetensors plus config.json, verified tensor by tensor.",
    )
    convert.add_argument("source", help="checkpoint directory or Hugging Face hub id")
    convert.add_argument("destination", help="output directory")
    convert.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                         help="cast floating tensors (default: keep the stored dtype)")
    convert.add_argument("--max-shard-size", default="2GB", help="largest output shard (default: 2GB)")
    convert.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                         help="store the language model's linear layers quantised: int8 (per-channel int8 weights) or "
                         "int4 (group-wise int4 weights); the vision tower, abstractor, embeddings and norms keep "
                         "their dtype. Loads back quantised as saved (int8-dynamic cannot be saved)")
    convert.add_argument("--group-size", type=int, default=None, metavar="N",
                         help="int4 only: inputs per scale and zero, 32, 64, 128 or 256 (default: 64)")
    convert.add_argument("--no-verify", action="store_true", help="skip reading every tensor back")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(handler=_convert)

    ask = commands.add_parser("ask", help="answer one prompt, or every line of a JSONL file",
                              description="One-shot answers. JSONL lines: {\"prompt\": str, \"image\": path} "
                              "(or \"images\": [paths]); with --jsonl every line is answered, batched.")
    _add_model_options(ask)
    ask.add_argument("--prompt", help="the question")
    ask.add_argument("--jsonl", help="a file of prompts, one JSON object per line")
    ask.add_argument("--json", action="store_true", help="print a JSON object with the answer and token counts")
    ask.set_defaults(handler=_ask)

    chat = commands.add_parser("chat", help="multi-turn chat with streamed answers",
                               description="Interactive chat. Commands: /image PATH, /reset, /quit.")
    _add_model_options(chat)
    chat.set_defaults(handler=_chat)

    evaluation = commands.add_parser(
        "eval", help="evaluate on a benchmark's released files (owl2 eval --list shows the tasks)",
        description="Batched greedy evaluation with the benchmark's official prompt and metric. Predictions are "
        "cached in OUTPUT/TASK.predictions.jsonl as they are made, so a rerun resumes; the report goes to "
        "OUTPUT/TASK.report.{json,md} (and a per-category plot).",
    )
    evaluation.add_argument("--model", help="checkpoint directory or hub id (default: the embedded owl2-tiny)")
    evaluation.add_argument("--task", help="task name (see --list)")
    evaluation.add_argument("--data", help="the benchmark's files on local disk")
    evaluation.add_argument("--limit", type=int, default=None, help="only the first N samples")
    evaluation.add_argument("--batch-size", type=int, default=8)
    evaluation.add_argument("--output", default=None, help="results directory (default eval-results/MODEL)")
    evaluation.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16")
    evaluation.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    evaluation.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None, help=QUANTIZE_HELP)
    evaluation.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluation.add_argument("--list", action="store_true", help="list the tasks and the file layout each reads")
    evaluation.set_defaults(handler=_eval, policy=None)

    demo = commands.add_parser("demo", help="draw a fresh shapes scene and ask the model about it",
                               description="Draws a new scene of coloured shapes, saves it, and asks the model "
                               "(default: the embedded owl2-tiny) a few questions, marking each answer. With --image, "
                               "asks the same kinds of questions about your images instead, unmarked.")
    _add_model_options(demo)
    demo.add_argument("--output", default=None,
                      help="where the scene is saved (default: a new owl2-demo-SEED-*.png in the temp folder)")
    demo.set_defaults(handler=_demo)

    experiment = commands.add_parser(
        "experiment", help="build-tiny (train the embedded model) or mam-ablation (the paper's Table 5, small)",
        description="build-tiny: the shapes-world data, a tokenizer, stages V and 0 to 4 with the recipes in "
        "owl2/experiments/recipes/tiny/, the held-out evaluation and the model card (--install replaces the embedded "
        "model). mam-ablation: trains the "
        "tiny model with and without the Modality-Adaptive Module on the same data and budget and reports "
        "multimodal and text-only accuracy side by side.",
    )
    experiment.add_argument("name", choices=["build-tiny", "mam-ablation"])
    experiment.add_argument("--workdir", default=None, help="where data, runs and reports go")
    experiment.add_argument("--scenes", type=int, default=None, help="training scenes")
    experiment.add_argument("--steps", type=int, default=None, help="mam-ablation: stage-0 steps per variant")
    experiment.add_argument("--install", action="store_true", help="build-tiny: replace the embedded model")
    experiment.add_argument("--full", action="store_true",
                            help="mam-ablation: both variants with the shipped model's whole recipe and budget")
    experiment.add_argument("--from-build", default=None, metavar="DIR",
                            help="mam-ablation: the folder of a finished build-tiny run is the MAM variant (implies "
                                 "--full); only the no-MAM variant is trained")
    experiment.defer(_add_build_options)
    experiment.set_defaults(handler=_experiment)

    train = commands.add_parser(
        "train", help="train with a recipe (stage1, stage2, lora, or a TOML file)",
        description="Train with a recipe: a packaged name (stage1, stage2, lora) or a TOML file, changed by "
        "section.key=value overrides, e.g. `owl2 train stage2 model.path=./owl2-7b data.path=train.json "
        "optim.lr=1e-5`. Without model.path (or model.init_config) the run starts from the embedded owl2-tiny. "
        "Ctrl-C stops the run and says which checkpoint --resume continues from. Under torchrun every process runs "
        "the same command.",
    )
    train.add_argument("recipe", help="recipe name or TOML path")
    train.add_argument("overrides", nargs="*", help="section.key=value (TOML values)")
    train.add_argument("--resume", nargs="?", const="latest", default=None,
                       help="continue from the latest checkpoint in output_dir, or from the given checkpoint")
    train.set_defaults(handler=_train)

    from owl2.cli.merge import register as register_merge

    register_merge(commands)
    from owl2.cli.serve import register as register_serve

    register_serve(commands)
    from owl2.cli.rate import register as register_rate

    register_rate(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (CheckpointError, ConfigError, ValueError, OSError) as exc:  # FileNotFoundError is an OSError
        print(f"owl2 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C where a command has no report of its own (loading, ask, ...)
        print(f"{_fresh_line()}owl2 {args.command}: interrupted", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
