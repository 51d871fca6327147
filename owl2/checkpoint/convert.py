"""``owl2 convert``: an official checkpoint (pickled shards) -> owl2 layout (sharded safetensors + config.json).

The conversion streams one source shard at a time, so it needs memory for one source shard plus one output shard,
never the whole model. Afterwards every output tensor is read back and compared with its source (cast to the target
dtype): the conversion only succeeds if all of them are identical.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from owl2.checkpoint.io import (
    RECOMPUTED_KEYS,
    CheckpointError,
    ShardWriter,
    build_empty,
    check_capacity,
    check_keys,
    check_shape,
    expected_keys,
    iter_checkpoint,
    parse_dtype,
    resolve_checkpoint,
    weight_files,
)
from owl2.model.config import Owl2Config


@dataclass
class ConversionReport:
    files: list[Path]
    tensors: int
    bytes: int
    skipped: list[str]
    verified: bool


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def convert_checkpoint(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "2GB",
    verify: bool = True,
    show_progress: bool = True,
) -> ConversionReport:
    """Convert ``source`` (official or owl2 layout, local or hub id) into sharded safetensors at ``destination``.

    ``dtype`` casts floating tensors (default: keep the stored dtype). The recomputed buffers of the official model
    are dropped. Raises :class:`CheckpointError` on missing/unexpected keys, wrong shapes, a corrupt, refused or
    outside source file (as :func:`owl2.load_model` does) or a failed verification.
    """
    dtype = parse_dtype(dtype)
    src = resolve_checkpoint(source)
    dst = Path(destination)
    if dst.resolve() == src.resolve():
        raise CheckpointError("destination must differ from the source directory")
    config = Owl2Config.from_json(src)
    files = weight_files(src)
    check_capacity(src, config, files)  # before the model is laid out, which an absurd config makes slow
    expected = expected_keys(build_empty(config), config)

    writer = ShardWriter(dst, max_shard_size)
    seen: set[str] = set()
    unexpected: list[str] = []
    skipped: list[str] = []
    for key, tensor in iter_checkpoint(src, show_progress=show_progress, desc="converting", files=files):
        if key not in expected.shapes:
            (skipped if RECOMPUTED_KEYS.search(key) else unexpected).append(key)
            continue
        check_shape(key, tensor, expected)
        writer.add(key, _cast(tensor, dtype).clone())
        seen.add(key)
    check_keys(expected, seen, unexpected, src)
    files = writer.finish()
    if dtype is not None:
        config.extra["torch_dtype"] = str(dtype).removeprefix("torch.")
    config.save(dst)

    if verify:
        verify_conversion(src, files, dtype, show_progress=show_progress)
    return ConversionReport(files, len(seen), writer.total_bytes, skipped, verify)


def verify_conversion(
    source: Path, files: list[Path], dtype: torch.dtype | None, *, show_progress: bool = True
) -> None:
    """Check that every tensor in ``files`` equals its source tensor after the cast."""
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
        where = {key: handle for handle in handles for key in handle.keys()}  # noqa: SIM118
        checked = 0
        for key, tensor in iter_checkpoint(source, show_progress=show_progress, desc="verifying"):
            if RECOMPUTED_KEYS.search(key):
                continue
            if key not in where:
                raise CheckpointError(f"verification failed: {key} is missing from the converted checkpoint")
            converted = where[key].get_tensor(key)
            if not torch.equal(converted, _cast(tensor, dtype)):
                raise CheckpointError(f"verification failed: {key} differs after conversion")
            checked += 1
        if checked != len(where):
            raise CheckpointError(f"verification failed: {len(where) - checked} converted tensor(s) have no source")
