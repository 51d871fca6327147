"""Reading and writing checkpoints.

Reads the official layout (pickled ``pytorch_model-k-of-33.bin`` shards with ``pytorch_model.bin.index.json``) and
safetensors (one file, or shards with ``model.safetensors.index.json``). Pickles are opened only with
``torch.load(weights_only=True)``. Weights stream shard by shard into a model built on the meta device and are cast
as they arrive, so peak memory is the model in the target dtype plus one shard.

Writes sharded safetensors plus ``config.json``, every file atomically.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from owl2.model.config import Owl2Config
from owl2.model.modeling import Owl2ForCausalLM, set_default_layout
from owl2.utils import atomic_output, atomic_write_text, progress

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"

# Buffers the official model saves that owl2 recomputes: accepted in a checkpoint, never used.
RECOMPUTED_KEYS = re.compile(r"(\.rotary_emb\.inv_freq|\.attention\.[qk]_pos_embed)$")

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing files or does not match its config."""


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from None


# ------------------------------------------------------------------------------------------------------- locating
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
"""What a Hugging Face hub repo id looks like (``owner/name``)."""


def resolve_checkpoint(path_or_id: str | os.PathLike[str], *, revision: str | None = None) -> Path:
    """A local checkpoint directory, or a Hugging Face hub id downloaded with ``huggingface_hub`` when installed.

    The hub is asked only for text shaped like ``owner/name`` that is no local path: not starting with ``.``, ``/``
    or ``~``, and with no local folder called ``owner`` (then ``models/owl2-7b`` is surely a path with a typo, not a
    repo). Everything else that is not a directory fails at once. Every failure, the hub's included, is one
    :class:`CheckpointError` line that starts ``no checkpoint directory at '...'`` and says why.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    text = os.fspath(path_or_id)
    missing = f"no checkpoint directory at {text!r}: the path does not exist"
    local_owner = Path(text.split("/", 1)[0]).is_dir()
    if not HUB_ID.fullmatch(text) or text.startswith((".", "/", "~")) or local_owner:
        raise CheckpointError(missing)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{missing}, and to look for a Hugging Face hub repo of that name install huggingface_hub "
            "(pip install huggingface_hub)"
        ) from None
    patterns = ["*.json", "*.safetensors", "*.bin", "tokenizer.model"]
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # the hub's errors are many classes of several lines each; say it in one
        raise CheckpointError(f"{missing}, and {_hub_failure(exc)}") from exc


def _hub_failure(exc: Exception) -> str:
    """Why the hub gave no snapshot, as the end of a sentence (its own messages run to several lines)."""
    kinds = {t.__name__ for t in type(exc).__mro__}  # by name: huggingface_hub moved its error classes over time
    if "GatedRepoError" in kinds:
        return "the Hugging Face hub repo of that name is gated: accept its terms on the hub and log in (hf auth login)"
    if "RepositoryNotFoundError" in kinds:
        return "the Hugging Face hub has no repo of that name (or it is private: log in with hf auth login)"
    if "RevisionNotFoundError" in kinds:
        return "the Hugging Face hub repo of that name has no such revision"
    if "OfflineModeIsEnabled" in kinds or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return "HF_HUB_OFFLINE is set, so the Hugging Face hub was not asked (and no copy of that repo is cached)"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"the Hugging Face hub could not be asked for a repo of that name ({first})"


def weight_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The weight files of a checkpoint directory, preferring safetensors over pickles."""
    directory = Path(directory)
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (PICKLE_INDEX, PICKLE_SINGLE)):
        index = directory / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map")
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise CheckpointError(f"{index} lists shards that are missing: {', '.join(absent)}")
            return files
        if (directory / single).is_file():
            return [directory / single]
    raise CheckpointError(
        f"no weights in {directory}: expected {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {PICKLE_INDEX} or "
        f"{PICKLE_SINGLE}"
    )


def read_shard(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from one weight file, tensors on the CPU in their stored dtype."""
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield key, handle.get_tensor(key)
        return
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) pickle format cannot be memory-mapped
        state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} does not hold a state dict")
    yield from state.items()
    del state


def iter_checkpoint(directory: Path, *, show_progress: bool = True, desc: str = "loading") -> Iterator[
    tuple[str, torch.Tensor]
]:
    files = weight_files(directory)
    for file in progress(files, total=len(files), desc=desc, enabled=show_progress):
        yield from read_shard(file)


# --------------------------------------------------------------------------------------------------------- loading
@dataclass
class ExpectedKeys:
    shapes: dict[str, torch.Size]
    tied: frozenset[str]


def expected_keys(model: nn.Module, config: Owl2Config) -> ExpectedKeys:
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    tied = frozenset({"lm_head.weight"}) if config.tie_word_embeddings else frozenset()
    return ExpectedKeys(shapes, tied)


def check_keys(expected: ExpectedKeys, seen: set[str], unexpected: list[str], where: Path) -> None:
    missing = sorted(set(expected.shapes) - seen - expected.tied)
    if not missing and not unexpected:
        return

    def listing(keys: list[str]) -> str:
        shown = ", ".join(keys[:20])
        return shown + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {listing(sorted(unexpected))}")
    raise CheckpointError(f"checkpoint {where} does not match its config: " + "; ".join(parts))


def check_shape(key: str, tensor: torch.Tensor, expected: ExpectedKeys) -> None:
    if tensor.shape != expected.shapes[key]:
        raise CheckpointError(
            f"{key}: checkpoint shape {list(tensor.shape)} differs from the config's {list(expected.shapes[key])}"
        )


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value


def build_empty(config: Owl2Config) -> Owl2ForCausalLM:
    """The model with every tensor on the meta device (no memory), ready for :func:`_set_tensor`."""
    with torch.device("meta"):
        return Owl2ForCausalLM(config)


def _materialize_buffers(model: Owl2ForCausalLM, device: torch.device) -> None:
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device.type == "meta":
                module._buffers[name] = torch.empty(buf.shape, dtype=torch.float32, device=device)
    model.reset_buffers()


def load_model(
    path_or_id: str | os.PathLike[str],
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    *,
    revision: str | None = None,
    show_progress: bool = True,
    quantize: str | None = None,
) -> Owl2ForCausalLM:
    """Load a checkpoint (official or owl2 layout) into an :class:`Owl2ForCausalLM` in eval mode.

    Tensors are cast to ``dtype`` shard by shard. Missing or unexpected keys raise :class:`CheckpointError` listing
    them; the official model's recomputed buffers (``rotary_emb.inv_freq``, the abstractor's sin-cos tables) are
    accepted and ignored. ``quantize`` ("int8-dynamic" or "int8") quantises the LLM's linear layers for inference
    (see :mod:`owl2.model.quantize`).
    """
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    directory = resolve_checkpoint(path_or_id, revision=revision)
    config = Owl2Config.from_json(directory)
    model = build_empty(config)
    expected = expected_keys(model, config)
    seen: set[str] = set()
    unexpected: list[str] = []
    for key, tensor in iter_checkpoint(directory, show_progress=show_progress):
        if key not in expected.shapes:
            if not RECOMPUTED_KEYS.search(key):
                unexpected.append(key)
            continue
        check_shape(key, tensor, expected)
        value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        if value.data_ptr() == tensor.data_ptr():  # own the memory rather than keep a file mapping alive
            value = value.clone()
        _set_tensor(model, key, value)
        seen.add(key)
    check_keys(expected, seen, unexpected, directory)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialize_buffers(model, device)
    set_default_layout(config)
    if quantize is not None:
        from owl2.model.quantize import quantize_language_model

        quantize_language_model(model, quantize)
    return model.eval()


# --------------------------------------------------------------------------------------------------------- saving
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read a size from {size!r} (examples: 2GB, 500MB, 1048576)")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    return int(float(match.group(1)) * units[(match.group(2) or "").upper()])


class ShardWriter:
    """Collects tensors and writes them as safetensors shards of at most ``max_shard_size`` bytes each.

    Shards are first written under temporary names and renamed once the total count is known, each rename atomic;
    :meth:`finish` writes the index (or a single ``model.safetensors``) and removes shards of an earlier save.
    """

    def __init__(self, directory: str | os.PathLike[str], max_shard_size: int | str = "2GB") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = _parse_size(max_shard_size)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self.pending:
            return
        part = self.directory / f".owl2-part-{len(self.parts):05d}.safetensors.tmp"
        save_file(self.pending, str(part), metadata={"format": "pt"})
        self.parts.append((part, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        self._flush()
        if not self.parts:
            raise CheckpointError("nothing to save")
        if len(self.parts) == 1:
            names = [SAFETENSORS_SINGLE]
        else:
            names = [f"model-{i + 1:05d}-of-{len(self.parts):05d}.safetensors" for i in range(len(self.parts))]
        weight_map: dict[str, str] = {}
        for (part, keys), name in zip(self.parts, names, strict=True):
            os.replace(part, self.directory / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = self.directory / SAFETENSORS_INDEX
        if len(names) > 1:
            payload = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            atomic_write_text(index, json.dumps(payload, indent=2, sort_keys=True) + "\n")
        else:
            index.unlink(missing_ok=True)
        for stale in self.directory.glob("model-*-of-*.safetensors"):
            if stale.name not in names:
                stale.unlink()
        return [self.directory / n for n in names]


PROCESSING_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "preprocessor_config.json")
"""What a pipeline reads besides the weights and config (:func:`owl2.load`)."""


def copy_processing_files(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> list[str]:
    """Copy the tokenizer and image-processor files that ``source`` has into ``destination`` (each atomically)."""
    source, destination = Path(source), Path(destination)
    copied = []
    for name in PROCESSING_FILES:
        if (source / name).is_file():
            with atomic_output(destination / name) as handle:
                handle.write((source / name).read_bytes())
            copied.append(name)
    return copied


def save_model(
    model: Owl2ForCausalLM,
    directory: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "2GB",
) -> list[Path]:
    """Save parameters as sharded safetensors plus ``config.json`` (the owl2 layout, loadable by :func:`load_model`)."""
    return save_state_dict(model.state_dict(), model.config, directory, dtype=dtype, max_shard_size=max_shard_size)


def save_state_dict(
    state: dict[str, torch.Tensor],
    config: Owl2Config,
    directory: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "2GB",
) -> list[Path]:
    """:func:`save_model` for a full state dict (e.g. one gathered from a sharded training run)."""
    dtype = parse_dtype(dtype)
    writer = ShardWriter(directory, max_shard_size)
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        writer.add(key, tensor)
    files = writer.finish()
    config = Owl2Config.from_dict(config.to_dict())
    if dtype is not None:
        config.extra["torch_dtype"] = str(dtype).removeprefix("torch.")
    config.save(directory)
    return files


__all__ = [
    "PROCESSING_FILES",
    "CheckpointError",
    "ShardWriter",
    "atomic_output",
    "build_empty",
    "check_keys",
    "copy_processing_files",
    "iter_checkpoint",
    "load_model",
    "parse_dtype",
    "read_shard",
    "resolve_checkpoint",
    "save_model",
    "save_state_dict",
    "weight_files",
]
