"""Small shared helpers: atomic writes and optional progress bars."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
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
        return 0o666 & ~_umask()


def _umask() -> int:
    # Linux shows the umask in /proc; elsewhere reading it means setting it, which briefly affects other threads
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_output(path, "w") as handle:
        handle.write(text)


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in ``path``; ValueError naming the file when it is not valid JSON or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


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

