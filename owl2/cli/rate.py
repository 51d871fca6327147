"""``owl2 rate PATHS...``: rate image and video quality (or aesthetics) with a Q-Align-family scorer.

Every path is an image, a video or a folder (searched recursively for images and videos, sorted). Without
``--output`` the ratings are printed as a table. With ``--output ratings.csv`` or ``ratings.jsonl`` they go to that
file, which is also the run's cache:

* Each record carries the settings it was made with: ``task``, ``prompt``, ``policy`` (the image policy in effect:
  ``--policy`` or the checkpoint's), ``model`` (``--model`` as given, ``owl2-tiny`` for the default) and, for videos,
  ``num_frames`` (empty: one frame per second). A rerun skips every path that already has a rating with the same
  settings and rates the rest; records made with other settings stay in the file untouched, so one file can hold
  e.g. quality and aesthetics ratings side by side. ``--dtype`` and ``--device`` are not settings: they change a
  rating only by rounding. Paths are compared as written (folder contents as ``FOLDER/relative/path``), so rerun
  from the same directory.
* The file is first rewritten atomically with what it already holds, then each finished batch is appended and
  synced before the next starts (as ``owl2 eval`` caches its predictions), so a killed run keeps every finished
  batch; a torn last line is dropped on the next read. At the end the merged result is written atomically once more
  in a fixed order: records of other paths or settings first, as they were, then this run's paths in order. So a
  resumed run leaves the same file as an uninterrupted one.
* A file that is not one this command wrote (other CSV columns, lines that are not rating records) is an error,
  never overwritten.

A file that cannot be rated (missing, not an image, a video too short or too long) stops the run with a one-line
error naming it and exit code 2; the batches finished before it are kept. With ``--skip-errors`` it is recorded
instead (CSV column ``error``, JSONL key ``error``), the run goes on and the exit code is 1. Recorded errors are
retried by the next run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from owl2.cli import ADAPTER_HELP, QUANTIZE_CHOICES, QUANTIZE_HELP
from owl2.rating.scale import LEVELS, PROMPTS, TASKS
from owl2.utils import atomic_write_text, progress

__all__ = ["CSV_COLUMNS", "RatingsFile", "Settings", "collect_paths", "image_suffixes", "register"]

NOT_A_SCORER_NOTE = ("note: no --model given, so the embedded owl2-tiny rates; it is a shapes-world chat model, not a "
                     "quality scorer, and its ratings mean nothing. Pass a Q-Align-family checkpoint, e.g. --model "
                     "q-future/one-align")
SETTING_KEYS: tuple[str, ...] = ("task", "prompt", "policy", "num_frames", "model")
CSV_COLUMNS: tuple[str, ...] = ("path", "media", "score", "normalized", "std", "level",
                                *(f"p_{level}" for level in LEVELS), *SETTING_KEYS, "error")


# ------------------------------------------------------------------------------------------------------- paths
def image_suffixes() -> frozenset[str]:
    """Lower-case suffixes of the formats Pillow can open, less its stub formats (HDF5, GRIB, BUFR, WMF/EMF), which
    it only identifies: a data folder's ``.h5`` files would otherwise fail the run."""
    import inspect

    from PIL import Image, ImageFile

    Image.init()
    stubs = {name for name, (factory, _) in Image.OPEN.items()
             if inspect.isclass(factory) and issubclass(factory, ImageFile.StubImageFile)}
    return frozenset(ext.lower() for ext, name in Image.registered_extensions().items()
                     if name in Image.OPEN and name not in stubs)


def _video_suffixes() -> frozenset[str]:
    from owl2.processing.video import VIDEO_SUFFIXES  # PyAV itself is imported only when a video is decoded

    return VIDEO_SUFFIXES


def _is_video(path: Path) -> bool:
    from owl2.processing.video import is_video_path

    return is_video_path(path)


def collect_paths(paths: Sequence[str | os.PathLike[str]], *, allow_missing: bool = False) -> list[Path]:
    """The items to rate: files as given (any suffix: naming a file is asking for it), and the images and videos of
    folders, recursively, sorted, skipping hidden entries (names starting with a dot: macOS's ``._*`` twins, editor
    and temporary files). Duplicates are dropped, the first occurrence kept. A missing path is a ValueError unless
    ``allow_missing`` (then it is kept, and fails as an item)."""
    # Video suffixes win: Pillow claims .mpg/.mpeg for an MPEG header it can only identify.
    wanted = image_suffixes() | _video_suffixes()
    found: dict[str, Path] = {}
    for given in paths:
        root = Path(given)
        if root.is_dir():
            inside = sorted(_walk(root, wanted), key=lambda p: p.relative_to(root).parts)
            if not inside:
                raise ValueError(f"{root}: no images or videos in this folder (looked for {len(wanted)} suffixes, "
                                 "e.g. .jpg .png .webp .mp4)")
            found.update((str(p), p) for p in inside if str(p) not in found)
        elif root.exists() or allow_missing:
            found.setdefault(str(root), root)
        else:
            raise ValueError(f"{root}: no such file or directory")
    return list(found.values())


def _walk(root: Path, suffixes: frozenset[str]) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # pruned in place, so os.walk does not descend
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in suffixes:
                yield Path(folder) / name


# ---------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Settings:
    """What a rating depends on besides the file; stored in every record and compared on resume."""

    task: str
    prompt: str
    policy: str
    num_frames: int | None
    model: str

    def fields(self, media: str) -> dict[str, Any]:
        # num_frames does not touch an image, so an image's record leaves it empty and a rerun with another
        # --num-frames keeps the image ratings.
        return {"task": self.task, "prompt": self.prompt, "policy": self.policy,
                "num_frames": self.num_frames if media == "video" else None, "model": self.model}


def record_key(record: dict[str, Any]) -> tuple[str, ...]:
    """Path and settings as strings, so a CSV row (all strings) and a JSONL object (typed) of the same rating get the
    same key."""
    values = [record.get("path"), *(record.get(k) for k in SETTING_KEYS)]
    if record.get("media") != "video":
        values[1 + SETTING_KEYS.index("num_frames")] = None
    return tuple("" if v is None else str(v) for v in values)


def rating_record(path: Path, media: str, settings: Settings, rating: Any = None, error: str | None = None
                  ) -> dict[str, Any]:
    """The JSONL form of one result: ``Rating.to_dict()`` plus path, media and settings; or the error."""
    body = {"error": error} if rating is None else rating.to_dict()
    return {"path": str(path), "media": media, **body, **settings.fields(media)}


def _done(record: dict[str, Any]) -> bool:
    return not record.get("error") and record.get("score") not in (None, "")


class _Jsonl:
    header = ""

    @staticmethod
    def stored(record: dict[str, Any]) -> dict[str, Any]:
        return record

    @staticmethod
    def line(record: dict[str, Any]) -> str:
        return json.dumps(record, ensure_ascii=False) + "\n"

    @staticmethod
    def parse(path: Path, text: str) -> list[dict[str, Any]]:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("path"), str) or "task" not in record:
                raise ValueError(f"{path} line {number} is not an owl2 rate record; choose another --output "
                                 "(it is never overwritten)")
            records.append(record)
        return records


class _Csv:
    header = ",".join(CSV_COLUMNS) + "\n"

    @staticmethod
    def stored(record: dict[str, Any]) -> dict[str, Any]:
        """The CSV row of a JSONL-form record: probabilities flattened to ``p_<level>``, logits left out; floats as
        ``str(float)``, which reads back to the same float."""
        row = {k: record.get(k) for k in CSV_COLUMNS}
        for level, p in (record.get("probs") or {}).items():
            row[f"p_{level}"] = p
        return {k: "" if v is None else str(v) for k, v in row.items()}

    @staticmethod
    def line(record: dict[str, Any]) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow([record.get(k, "") for k in CSV_COLUMNS])
        return buffer.getvalue()

    @staticmethod
    def parse(path: Path, text: str) -> list[dict[str, Any]]:
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return []
        if tuple(rows[0]) != CSV_COLUMNS:
            raise ValueError(f"{path} has other columns than owl2 rate writes ({', '.join(rows[0][:6])}, ...); "
                             "choose another --output (it is never overwritten)")
        records = []
        for number, row in enumerate(rows[1:], 2):
            if len(row) != len(CSV_COLUMNS):
                raise ValueError(f"{path} row {number} has {len(row)} fields, not {len(CSV_COLUMNS)}; not an owl2 "
                                 "rate file? choose another --output (it is never overwritten)")
            records.append(dict(zip(CSV_COLUMNS, row, strict=True)))
        return records


def _format_of(path: Path) -> type[_Csv] | type[_Jsonl]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _Csv
    if suffix in (".jsonl", ".ndjson"):
        return _Jsonl
    raise ValueError(f"--output {path}: the name must end in .csv or .jsonl (it picks the format)")


class RatingsFile:
    """The ``--output`` file: existing records by key, per-batch durable appends, a final atomic merge."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.format = _format_of(self.path)
        self.records: dict[tuple[str, ...], dict[str, Any]] = {}
        self._handle: IO[str] | None = None
        if self.path.is_dir():
            raise ValueError(f"--output {self.path} is a directory")
        if self.path.exists() and not self.path.is_file():
            # the atomic rewrite would replace a FIFO or a device by a plain file, and reading it could block
            raise ValueError(f"--output {self.path} is not a regular file (a FIFO, socket or device)")
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8")
            if text and not text.endswith("\n"):
                text = text[:text.rfind("\n") + 1]  # the torn last line of a killed run; its item is rated again
            for record in self.format.parse(self.path, text):
                self.records[record_key(record)] = record  # a later record of the same key supersedes

    def done(self, key: tuple[str, ...]) -> bool:
        return key in self.records and _done(self.records[key])

    def start(self, redo: set[tuple[str, ...]]) -> None:
        """Rewrite the file atomically without the records about to be redone (recorded errors), then open it for
        appending: the file is complete after every batch."""
        for key in redo & self.records.keys():
            del self.records[key]
        atomic_write_text(self.path, self._text(self.records.values()))
        self._handle = self.path.open("a", encoding="utf-8")

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        assert self._handle is not None, "start() first"
        stored = [self.format.stored(r) for r in records]
        self._handle.write("".join(self.format.line(r) for r in stored))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.records.update((record_key(r), r) for r in stored)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def finish(self, order: Sequence[tuple[str, ...]]) -> None:
        """Write the merged result atomically: other records first, as they were, then ``order``'s."""
        self.close()
        ours = [key for key in order if key in self.records]
        chosen = set(ours)
        others = [record for key, record in self.records.items() if key not in chosen]
        atomic_write_text(self.path, self._text([*others, *(self.records[key] for key in ours)]))

    def _text(self, records: Any) -> str:
        return self.format.header + "".join(self.format.line(r) for r in records)


# -------------------------------------------------------------------------------------------------------- rating
def _error_text(path: Path, exc: BaseException) -> str:
    """One line that names the file. ``pipe.rate`` wraps preprocessing errors as ``item N (name): <cause>``, where N
    is the place in the batch, meaningless here: the cause is reported instead."""
    cause = exc.__cause__ if isinstance(exc, ValueError) and exc.__cause__ is not None else exc
    text = " ".join(re.sub(r"^item \d+ \([^)]*\): ", "", str(cause)).split())
    return text if str(path) in text else f"{path}: {text}"


def _rate_batch(pipe: Any, batch: Sequence[Path], settings: Settings) -> list[tuple[Any, str | None]]:
    """(rating, None) or (None, error) per path. One prefill for the batch; when it fails, each path alone, to
    tell the bad file from the good ones (a rating does not depend on the rest of its batch)."""
    def run(paths: Sequence[Path]) -> list[Any]:
        return pipe.rate(list(paths), task=settings.task, prompt=settings.prompt, batch_size=len(paths),
                         num_frames=settings.num_frames)

    try:
        return [(rating, None) for rating in run(batch)]
    except (ValueError, OSError, ImportError) as exc:  # ImportError: a video without PyAV installed
        if len(batch) == 1:
            return [(None, _error_text(batch[0], exc))]
    results: list[tuple[Any, str | None]] = []
    for path in batch:
        try:
            results.append((run([path])[0], None))
        except (ValueError, OSError, ImportError) as exc:
            results.append((None, _error_text(path, exc)))
    return results


def _rate_all(pipe: Any, todo: Sequence[Path], settings: Settings, args: argparse.Namespace,
              sink: RatingsFile | None) -> Iterator[dict[str, Any]]:
    """Records one by one, each yielded after its batch was rated and saved, so a progress bar over this iterator
    counts finished items. Stops with a ValueError at a bad file unless ``--skip-errors``."""
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start:start + args.batch_size]
        records, first_error = [], None
        for path, (rating, error) in zip(batch, _rate_batch(pipe, batch, settings), strict=True):
            records.append(rating_record(path, "video" if _is_video(path) else "image", settings, rating, error))
            first_error = first_error or error
        if first_error and not args.skip_errors:
            # the good ratings of the batch are kept, as the earlier batches are; only the bad file is missing
            good = [r for r in records if _done(r)]
            if sink is not None and good:
                sink.append(good)
            raise ValueError(f"{first_error} (--skip-errors records such files and goes on)")
        if sink is not None:
            sink.append(records)
        yield from records


def _model_name(model: str | None, adapter: str | None, quantize: str | None = None) -> str:
    """The model a rating came from, as the resume check compares it: an adapter, or quantising the weights, makes
    another model."""
    name = model or "owl2-tiny"
    name = name if adapter is None else f"{name} + {adapter}"
    return name if quantize is None else f"{name} ({quantize})"


def _load(args: argparse.Namespace, directory: Path) -> Any:
    from owl2.api import load

    print(f"loading {args.model or 'owl2-tiny (the embedded default)'} ...", file=sys.stderr, flush=True)
    return load(directory, dtype=args.dtype, device=args.device, policy=args.policy, adapter=args.adapter,
                show_progress=not args.quiet, quantize=args.quantize)


def _print_table(records: Sequence[dict[str, Any]]) -> None:
    width = max([4, *(len(r["path"]) for r in records)])
    print(f"{'path':<{width}}  {'score':>5}  {'0-1':>5}  {'std':>5}  level")
    for r in records:
        if r.get("error"):
            print(f"{r['path']:<{width}}  error: {r['error']}")
        else:
            print(f"{r['path']:<{width}}  {r['score']:5.3f}  {r['normalized']:5.3f}  {r['std']:5.3f}  {r['level']}")


def _rate(args: argparse.Namespace) -> int:
    from owl2.api import default_model
    from owl2.checkpoint.io import resolve_checkpoint
    from owl2.processing.image import load_image_processor

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.num_frames is not None and args.num_frames < 1:
        raise ValueError(f"--num-frames must be at least 1, got {args.num_frames}")
    sink = RatingsFile(args.output) if args.output else None  # a bad --output fails before anything is loaded
    paths = collect_paths(args.paths, allow_missing=args.skip_errors)
    if args.model is None:
        print(NOT_A_SCORER_NOTE, file=sys.stderr)
    directory = default_model() if args.model is None else resolve_checkpoint(args.model)
    # The policy in effect is a setting of every record; reading it from the checkpoint's configs (not loading the
    # weights) lets a finished run be resumed without loading the model at all.
    policy = args.policy or load_image_processor(directory).default_policy
    settings = Settings(args.task, args.prompt, policy, args.num_frames,
                        _model_name(args.model, args.adapter, args.quantize))
    keys = [record_key(rating_record(p, "video" if _is_video(p) else "image", settings, error="")) for p in paths]
    todo = [p for p, k in zip(paths, keys, strict=True) if sink is None or not sink.done(k)]
    kept = len(paths) - len(todo)
    made: list[dict[str, Any]] = []
    if todo:
        pipe = _load(args, directory)
        if sink is not None:
            pending = set(todo)
            sink.start({k for p, k in zip(paths, keys, strict=True) if p in pending})
        try:
            made = list(progress(_rate_all(pipe, todo, settings, args, sink), total=len(todo), desc="rating",
                                 enabled=not args.quiet, unit="item"))
        except KeyboardInterrupt:
            if sink is None:
                raise
            # every finished batch is already in the file; say so, rather than a bare "interrupted"
            print(f"\nowl2 rate: interrupted; {len(sink.records)} record(s) are saved in {sink.path}; run the same "
                  "command again to rate the rest", file=sys.stderr)
            return 2
        finally:
            if sink is not None:
                sink.close()
    errors = sum(1 for r in made if r.get("error"))
    summary = f"rated {len(made) - errors}, kept {kept}" + (f", {errors} error(s)" if errors else "")
    if sink is not None:
        sink.finish(keys)
        print(f"{summary}; {len(sink.records)} record(s) in {sink.path}", file=sys.stderr)
    else:
        _print_table(made)
        print(summary, file=sys.stderr)
    return 1 if errors else 0


def register(commands: Any) -> None:
    """Add the ``rate`` subcommand to ``commands`` (the object ``ArgumentParser.add_subparsers`` returns)."""
    rate = commands.add_parser(
        "rate", help="rate image / video quality or aesthetics with a Q-Align-family scorer",
        description="Rate images and videos (files, or folders searched recursively) with a Q-Align / OneAlign / "
        "DeQA-Score checkpoint: the score (1-5), the same on 0-1, its spread and the likeliest level word. Prints a "
        "table, or writes --output FILE.csv / FILE.jsonl, which a rerun resumes: paths already rated with the same "
        "task, prompt, image policy, model (and, for videos, --num-frames) are skipped, other records are kept; "
        "every finished batch is saved at once and the file is rewritten atomically. A file that cannot be rated "
        "stops the run (exit 2) unless --skip-errors, which records it and exits 1.",
    )
    rate.add_argument("paths", nargs="+", metavar="PATH", help="image, video or folder")
    rate.add_argument("--model", default=None,
                      help="checkpoint directory or hub id, e.g. q-future/one-align (default: the embedded owl2-tiny, "
                           "which is not a quality scorer)")
    rate.add_argument("--task", choices=TASKS, default="quality", help="what is rated (default: quality)")
    rate.add_argument("--prompt", choices=[p for p in PROMPTS if p != "github_score"], default="scorer",
                      help="scorer: the Q-Align scorer classes and DeQA-Score (default); eval: Q-Align's evaluation "
                           "scripts")
    rate.add_argument("--batch-size", type=int, default=8, help="items per prefill (default 8)")
    rate.add_argument("--num-frames", type=int, default=None,
                      help="frames sampled evenly from each video (default: one per second, as Q-Align does)")
    rate.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16")
    rate.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    rate.add_argument("--adapter", default=None, help=ADAPTER_HELP)
    rate.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None, help=QUANTIZE_HELP)
    rate.add_argument("--policy", choices=["crop", "pad", "stretch"], default=None,
                      help="how images become squares (default: the checkpoint's; Q-Align's is pad)")
    rate.add_argument("--output", default=None, metavar="FILE",
                      help="write ratings.csv or ratings.jsonl (resumed on rerun) instead of printing a table")
    rate.add_argument("--skip-errors", action="store_true",
                      help="record files that cannot be rated and go on (exit code 1) instead of stopping (exit 2)")
    rate.add_argument("--quiet", action="store_true", help="no progress bars")
    rate.set_defaults(handler=_rate)
