"""Small shared helpers: atomic writes and optional progress bars."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one rename.

    A crash or an exception leaves the previous ``path`` untouched and removes the temporary file. The result keeps
    the mode of the file it replaces, or gets the mode a plain ``open`` would give (0666 less the umask), not
    ``mkstemp``'s private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.chmod(handle.fileno(), _mode_for(path))
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return new_file_mode()


def new_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0666 less the process umask."""
    return 0o666 & ~_umask()


def publish_file(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Give ``tmp``, a finished file written by a library that picks its own mode (safetensors writes 0600), the
    mode :func:`atomic_output` would, make it durable, then rename it to ``path`` in one step."""
    os.chmod(tmp, _mode_for(Path(path)))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _umask() -> int:
    # Linux shows the umask in /proc; elsewhere reading it means setting it, which briefly affects other threads
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make the renames inside ``directory`` durable (a no-op where directories cannot be opened, as on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(directory: str | os.PathLike[str]) -> None:
    """Make every file and folder under ``directory``, and ``directory`` itself, durable (before a rename publishes
    it)."""
    directory = Path(directory)
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(directory)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_output(path, "w") as handle:
        handle.write(text)


JSON_MAX_BYTES = 64 * 2**20
"""The largest settings file :func:`read_json_object` reads (configs, indexes, tokenizer settings are kilobytes)."""
JSON_MAX_DEPTH = 64
"""The deepest nesting :func:`read_json_object` accepts (real settings files nest a few levels)."""


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in ``path``; ValueError naming the file when it is not one.

    Refused, each as one line: a path that is not a regular file (a FIFO would block the read forever, a device
    never end), a file over :data:`JSON_MAX_BYTES`, text that is not UTF-8 or not valid JSON, nesting deeper than
    :data:`JSON_MAX_DEPTH` (which would otherwise surface as a ``RecursionError`` here or wherever the value is
    copied), and a top-level value that is not an object. ``FileNotFoundError`` passes through unchanged.
    """
    path = Path(path)
    raw = _read_regular_file(path, JSON_MAX_BYTES)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text, so not a JSON file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply (more than {JSON_MAX_DEPTH} levels)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if _nesting_depth(data, JSON_MAX_DEPTH) > JSON_MAX_DEPTH:
        raise ValueError(f"{path}: JSON nested too deeply (more than {JSON_MAX_DEPTH} levels)")
    return data


def _read_regular_file(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of ``path``, which must be a regular file; ValueError otherwise."""
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer; it changes nothing for regular files
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path}: not a regular file")
    with os.fdopen(fd, "rb") as handle:
        raw = handle.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"{path}: larger than {limit // 2**20} MiB, far too large for a settings file")
    return raw


def _nesting_depth(value: Any, limit: int) -> int:
    """How deep lists and objects nest in ``value`` (1 for a flat one), counted up to ``limit + 1`` only."""
    deepest, stack = 0, [(value, 1)]
    while stack:  # iterative: the point is to survive values too deep for recursion
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                break
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


_SHOWN_DROPPED = 5
"""How many dropped lines :func:`describe_dropped` names before it counts the rest."""


def read_json_lines(
    path: str | os.PathLike[str], check: Callable[[dict[str, Any]], str] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON objects of a JSON-lines file in file order, and a note (``"line 7 (not valid JSON)"``) for each
    non-blank line that was dropped; a missing file gives two empty lists.

    The file is read as bytes and split on ``\\n`` before decoding, so one damaged line (bytes that are not UTF-8,
    or the torn last line of a killed writer, which may end inside a multi-byte character) costs only that line.
    A line is dropped when it is not UTF-8, not JSON, not a JSON object, or when ``check`` returns a reason for it.
    Text after the last newline is kept when it is a whole usable record (a writer killed before the newline).
    """
    path = Path(path)
    records: list[dict[str, Any]] = []
    dropped: list[str] = []
    if not path.is_file():
        return records, dropped
    lines = path.read_bytes().split(b"\n")
    torn = lines.pop()  # what follows the last newline: empty unless the last write was cut short
    for number, raw in enumerate([*lines, torn], start=1):
        if not raw.strip():
            continue
        problem = ""
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            problem = "not UTF-8"
        except json.JSONDecodeError:
            problem = "not valid JSON"
        except RecursionError:  # a line of thousands of nested brackets
            problem = "nested too deeply"
        else:
            if not isinstance(record, dict):
                problem = f"a JSON {type(record).__name__}, not an object"
            elif check is not None:
                problem = check(record)
        if not problem:
            records.append(record)
        elif number > len(lines):
            dropped.append("the torn last line (a run killed while writing it)")
        else:
            dropped.append(f"line {number} ({problem})")
    return records, dropped


def describe_dropped(dropped: list[str]) -> str:
    """The notes of :func:`read_json_lines` as one short phrase (the first few, then how many more)."""
    shown = ", ".join(dropped[:_SHOWN_DROPPED])
    more = f" and {len(dropped) - _SHOWN_DROPPED} more" if len(dropped) > _SHOWN_DROPPED else ""
    return shown + more


def progress(items: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True,
             unit: str = "shard") -> Iterable[T]:
    """Wrap ``items`` in a tqdm bar when tqdm is installed, else print a line per item to stderr."""
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _plain_progress(items, total, desc)
    return tqdm(items, total=total, desc=desc, unit=unit, dynamic_ncols=True)


def _plain_progress(items: Iterable[T], total: int | None, desc: str) -> Iterator[T]:
    for i, item in enumerate(items, 1):
        yield item
        print(f"{desc}: {i}/{total if total is not None else '?'}", file=sys.stderr, flush=True)


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(figure: Any, path: str | os.PathLike[str]) -> None:
    """Write ``figure`` as a PNG atomically and release it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_output(path, "wb") as handle:
        figure.savefig(handle, format="png")
    plt.close(figure)

