"""``owl2 convert``: an official checkpoint (pickled shards) -> owl2 layout (sharded safetensors + config.json),
optionally with the language model's linear layers quantised (``--quantize int8|int4``).

The conversion streams one source shard at a time, so it needs memory for one source shard plus one output shard,
never the whole model. A quantised conversion quantises each linear layer as its weight arrives, so it holds no more
float weights than that either. Afterwards every output tensor is read back and compared with its source (cast to
the target dtype), and each quantised layer with the source weight quantised again: the conversion only succeeds if
all of them are identical. The tokenizer and image-processor files are copied along, so the output is a checkpoint
:func:`owl2.load` can use on its own.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from owl2.checkpoint.io import (
    QUANTIZATION_KEY,
    RECOMPUTED_KEYS,
    CheckpointError,
    ShardWriter,
    build_empty,
    check_capacity,
    check_keys,
    check_processing_files,
    check_shape,
    copy_processing_files,
    expected_keys,
    iter_checkpoint,
    parse_dtype,
    read_shard,
    resolve_checkpoint,
    saved_quantization,
    weight_files,
)
from owl2.model.config import Owl2Config
from owl2.model.quantize import DEFAULT_INT4_GROUP_SIZE, SAVABLE_MODES, LayerQuantizer, check_int4_shape
from owl2.utils import progress


@dataclass
class ConversionReport:
    files: list[Path]
    tensors: int
    bytes: int
    skipped: list[str]
    verified: bool
    quantization: dict[str, Any] | None = None
    """The ``owl2_quantization`` entry written to ``config.json``, or None for a float conversion."""
    copied: list[str] = field(default_factory=list)
    """The tokenizer and image-processor files copied from the source."""


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def quantization_entry(quantize: str | None, group_size: int | None) -> dict[str, Any] | None:
    """The ``config.json`` entry a conversion with ``quantize`` and ``group_size`` writes (None without
    ``quantize``); ValueError for a mode a checkpoint cannot hold or a group size that is not int4's."""
    if quantize is None:
        if group_size is not None:
            raise ValueError("a group size applies to int4 quantisation only; add --quantize int4")
        return None
    if quantize == "int8-dynamic":
        raise ValueError("int8-dynamic cannot be saved (fbgemm's packed weights have no file format); "
                         "use --quantize int8 or int4")
    if quantize not in SAVABLE_MODES:
        raise ValueError(f"unknown quantisation {quantize!r}; a checkpoint holds {' or '.join(SAVABLE_MODES)}")
    if quantize == "int8":
        if group_size is not None:
            raise ValueError("int8 is quantised per output channel and takes no group size; drop --group-size")
        return {"mode": "int8"}
    size = DEFAULT_INT4_GROUP_SIZE if group_size is None else group_size
    check_int4_shape(0, size)
    return {"mode": "int4", "group_size": size}


def _layer_quantizer(model: nn.Module, settings: dict[str, Any]) -> LayerQuantizer:
    return LayerQuantizer(model, settings["mode"], settings.get("group_size", DEFAULT_INT4_GROUP_SIZE))


def _quantized_tensors(layers: LayerQuantizer, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Hand ``tensor`` (already cast) to ``layers``; once its layer is complete, the quantised layer's (key, tensor)
    pairs, named as the checkpoint names them (none before)."""
    done = layers.add(key, tensor)
    if done is None:
        return []
    name, layer = done
    return [(f"{name}.{suffix}", value) for suffix, value in layer.state_dict().items()]


def convert_checkpoint(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "2GB",
    verify: bool = True,
    show_progress: bool = True,
    quantize: str | None = None,
    group_size: int | None = None,
) -> ConversionReport:
    """Convert ``source`` (official or owl2 layout, local or hub id) into sharded safetensors at ``destination``.

    ``dtype`` casts floating tensors (default: keep the stored dtype). The recomputed buffers of the official model
    are dropped. ``quantize`` (``"int8"`` or ``"int4"``, ``group_size`` for int4, default 64) stores the language
    model's linear layers quantised from their weights in ``dtype``, as ``load_model(source, dtype=dtype,
    quantize=..., group_size=...)`` would quantise them; the vision tower, the abstractor, the embeddings and the
    norms keep their floating-point tensors. The tokenizer and image-processor files of ``source`` are copied.
    Raises :class:`CheckpointError` on missing/unexpected keys, wrong shapes, a corrupt, refused or outside source
    file (as :func:`owl2.load_model` does), a source already quantised or a failed verification; ``ValueError`` for
    ``quantize="int8-dynamic"`` (fbgemm's packed weights cannot be saved) or a group size int4 does not take.
    """
    settings = quantization_entry(quantize, group_size)
    dtype = parse_dtype(dtype)
    src = resolve_checkpoint(source)
    dst = Path(destination)
    if dst.resolve() == src.resolve():
        raise CheckpointError("destination must differ from the source directory")
    config = Owl2Config.from_json(src)
    stored = saved_quantization(config)
    if stored is not None:
        raise CheckpointError(f"{src} is already quantised ({stored['mode']}); convert reads floating-point "
                              "checkpoints (load this one directly, or convert its floating-point source)")
    files = weight_files(src)
    check_capacity(src, config, files)  # before the model is laid out, which an absurd config makes slow
    processing = check_processing_files(src)  # a tokenizer linked from outside fails now, not after the weights
    model = build_empty(config)
    expected = expected_keys(model, config)
    try:
        layers = None if settings is None else _layer_quantizer(model, settings)
    except ValueError as exc:
        raise CheckpointError(f"{src}: {exc}") from None

    writer = ShardWriter(dst, max_shard_size)
    seen: set[str] = set()
    unexpected: list[str] = []
    skipped: list[str] = []
    written = 0
    for key, tensor in iter_checkpoint(src, show_progress=show_progress, desc="converting", files=files):
        if key not in expected.shapes:
            (skipped if RECOMPUTED_KEYS.search(key) else unexpected).append(key)
            continue
        check_shape(key, tensor, expected)
        seen.add(key)
        if layers is not None and key in layers:
            for name, value in _quantized_tensors(layers, key, _cast(tensor, dtype)):
                writer.add(name, value)
                written += 1
        else:
            writer.add(key, _cast(tensor, dtype).clone())
            written += 1
    check_keys(expected, seen, unexpected, src)
    files = writer.finish()
    if dtype is not None:
        config.extra["torch_dtype"] = str(dtype).removeprefix("torch.")
    if settings is not None:
        config.extra[QUANTIZATION_KEY] = settings
    config.save(dst)
    copied = copy_processing_files(src, dst) if processing else []

    if verify:
        verify_conversion(src, files, dtype, show_progress=show_progress, quantization=settings)
    return ConversionReport(files, written, writer.total_bytes, skipped, verify, settings, copied)


def verify_conversion(
    source: Path, files: list[Path], dtype: torch.dtype | None, *, show_progress: bool = True,
    quantization: dict[str, Any] | None = None,
) -> None:
    """Check that every tensor in ``files`` equals its source tensor after the cast; with ``quantization`` (the
    conversion's ``owl2_quantization`` entry), that each quantised layer's tensors equal the source weight quantised
    again."""
    layers = None
    if quantization is not None:
        config = Owl2Config.from_json(source)
        layers = _layer_quantizer(build_empty(config), quantization)
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), file))
    checked = 0
    source_files = weight_files(source)
    for source_file in progress(source_files, total=len(source_files), desc="verifying", enabled=show_progress):
        # The converted files are opened afresh for each source shard: a handle keeps the pages it has read mapped,
        # so handles held for the whole run would end up holding the whole converted model in memory.
        with contextlib.ExitStack() as stack:
            handles: dict[Path, Any] = {}
            for key, tensor in read_shard(source_file):
                if RECOMPUTED_KEYS.search(key):
                    continue
                if layers is not None and key in layers:
                    pairs = _quantized_tensors(layers, key, _cast(tensor, dtype))
                else:
                    pairs = [(key, _cast(tensor, dtype))]
                for name, expected in pairs:
                    if name not in where:
                        raise CheckpointError(f"verification failed: {name} is missing from the converted checkpoint")
                    file = where[name]
                    if file not in handles:
                        handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
                    if not torch.equal(handles[file].get_tensor(name), expected):
                        what = "after conversion" if name == key else "from the source weight quantised again"
                        raise CheckpointError(f"verification failed: {name} differs {what}")
                    checked += 1
    if checked != len(where):
        raise CheckpointError(f"verification failed: {len(where) - checked} converted tensor(s) have no source")
