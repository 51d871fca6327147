"""Reading and writing checkpoints.

Reads the official layout (pickled ``pytorch_model-k-of-33.bin`` shards with ``pytorch_model.bin.index.json``) and
safetensors (one file, or shards with ``model.safetensors.index.json``). Pickles are opened only with
``torch.load(weights_only=True)``. Weights stream shard by shard into a model built on the meta device and are cast
as they arrive, so peak memory is the model in the target dtype plus one shard.

Every file a checkpoint names is read as data, never trusted: weight files must lie inside the checkpoint directory
(symlinks followed), sizes in ``config.json`` are checked against what the weight files can hold before anything is
built, and a corrupt or hostile file is one :class:`CheckpointError` line naming it, never a traceback.

Writes sharded safetensors plus ``config.json``, every file atomically, with the modes a plain ``open`` would give.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from owl2.model.config import Owl2Config
from owl2.model.modeling import Owl2ForCausalLM
from owl2.utils import atomic_output, atomic_write_text, progress, publish_file, read_json_object

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"

QUANTIZATION_KEY = "owl2_quantization"
"""The ``config.json`` entry saying how a checkpoint saved quantised stores its layers (:func:`saved_quantization`)."""
# Buffers the official model saves that owl2 recomputes: accepted in a checkpoint, never used.
RECOMPUTED_KEYS = re.compile(r"(\.rotary_emb\.inv_freq|\.attention\.[qk]_pos_embed)$")

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint directory is missing files, holds a corrupt or refused file, or does not match its config.

    A ``ValueError`` (bad input, as the command line reports it: one line, exit status 2); also a ``RuntimeError``,
    which it was first, so older ``except RuntimeError`` handlers still catch it.
    """


def _one_line(text: object, limit: int = 200) -> str:
    """A library's error message as a clause of ours: its first sentence of its first line, at most ``limit``
    characters (torch follows its point with paragraphs of advice)."""
    lines = str(text).strip().splitlines()
    line = lines[0].strip().split(". ")[0] if lines else ""
    line = "".join(c if c.isprintable() else "?" for c in line)  # it may quote the file: no terminal escapes
    return line if len(line) <= limit else line[: limit - 3] + "..."


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
    """The weight files of a checkpoint directory, preferring safetensors over pickles.

    An index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``) must map tensor names to file
    names; every file, listed or single, must be a regular file inside ``directory`` once symlinks are followed (in a
    Hugging Face hub cache snapshot, inside the repo's cache folder, where the snapshot's links point). Anything
    else is a :class:`CheckpointError` naming the index or file.
    """
    directory = Path(directory)
    root = _containment_root(directory)
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (PICKLE_INDEX, PICKLE_SINGLE)):
        index = directory / index_name
        if index.is_file():
            files = [_inside(directory, name, root, index) for name in _shard_names(index)]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise CheckpointError(f"{index} lists shards that are missing: {', '.join(absent)}")
            return files
        if (directory / single).is_file():
            return [_inside(directory, single, root, None)]
    raise CheckpointError(
        f"no weights in {directory}: expected {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {PICKLE_INDEX} or "
        f"{PICKLE_SINGLE}"
    )


def _shard_names(index: Path) -> list[str]:
    """The distinct file names an index's ``weight_map`` lists, in order of first mention."""
    try:
        data = read_json_object(index)
    except (ValueError, OSError) as exc:
        raise CheckpointError(_one_line(exc) if isinstance(exc, ValueError) else f"{index}: cannot read it "
                              f"({exc.strerror or exc})") from None
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name.strip() or "\0" in name:
            shown = repr(name) if isinstance(name, str) else f"a {type(name).__name__}"
            raise CheckpointError(f"{index}: weight_map[{key[:80]!r}] must name a shard file, got {shown[:80]}")
    return list(dict.fromkeys(weight_map.values()))


def _containment_root(directory: Path) -> Path:
    """The folder every weight file of ``directory`` must resolve into: the directory itself, or for a snapshot of
    the Hugging Face hub cache (``models--owner--name/snapshots/REVISION``, whose files link to ``../../blobs``) the
    repo's cache folder."""
    real = _resolved(directory)
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop, before Python 3.13
        raise CheckpointError(f"{path}: cannot follow its symlinks ({_one_line(exc)})") from None


def _inside(directory: Path, name: str, root: Path, index: Path | None) -> Path:
    """``directory / name`` once it is known to resolve (symlinks followed) inside ``root``; ``index`` is the file
    that named it, if any."""
    where = f"{index}: shard {name!r}" if index is not None else f"{directory / name}"
    if Path(name).is_absolute():
        raise CheckpointError(f"{where} is an absolute path; shards must be files inside the checkpoint directory")
    real = _resolved(directory / name)
    if not real.is_relative_to(root):
        raise CheckpointError(f"{where} resolves to {real}, outside the checkpoint directory {directory}; a "
                              "checkpoint's files must lie inside it (copy the file in rather than linking to it)")
    return directory / name


def read_shard(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from one weight file, tensors on the CPU in their stored dtype.

    Safetensors files are memory-mapped; pickles are opened with ``torch.load(weights_only=True)`` (memory-mapped
    when in the zip format), so a pickle that asks to run code or build anything but tensors is refused. A corrupt,
    truncated or refused file raises :class:`CheckpointError` naming it, never the library's own exception.
    """
    if file.suffix == ".safetensors":
        with contextlib.ExitStack() as stack:
            with _reading(file, "a safetensors file"):
                handle = stack.enter_context(safe_open(str(file), framework="pt"))
                keys = list(handle.keys())
            for key in keys:
                with _reading(file, "a safetensors file"):
                    tensor = handle.get_tensor(key)
                yield key, tensor
        return
    with _reading(file, "a PyTorch weights file"):
        state = _torch_load(file)
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} does not hold a state dict (it holds a {type(state).__name__})")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{file} is not a plain state dict: entry {str(key)[:80]!r} holds a "
                                  f"{type(value).__name__}, not a tensor")
    yield from state.items()
    del state


def read_tensor_file(file: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every (key, tensor) of one safetensors or pickled weights file, read as :func:`read_shard` reads it (a
    corrupt, truncated or refused file is one :class:`CheckpointError` line naming it)."""
    return dict(read_shard(Path(file)))


def _unpickling_reason(exc: Exception) -> str:
    """The reason in torch's refusal of a pickle, without the advice around it (which suggests running the file's
    code with ``weights_only=False``)."""
    for line in str(exc).splitlines():
        line = line.replace("WeightsUnpickler error:", "").strip()
        if line and "weights_only" not in line and not line.startswith(("Check the documentation", "Please file")):
            return _one_line(line)
    return "not a pickle of plain tensors"


def _torch_load(file: Path) -> object:
    with open(file, "rb") as handle:
        zipped = handle.read(4) == b"PK\x03\x04"
    if zipped:
        # Memory-mapped, so tensor data stays in the file until used; a zip that cannot be mapped is corrupt, not a
        # reason to read (and perhaps inflate) it whole into memory.
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    return torch.load(file, map_location="cpu", weights_only=True)  # the legacy format cannot be memory-mapped


@contextlib.contextmanager
def _reading(file: Path, kind: str) -> Iterator[None]:
    """Turn whatever a reader library raises about ``file`` into one :class:`CheckpointError` line.

    torch's message for a refused pickle suggests ``weights_only=False``, i.e. running the file's code: it is
    never passed on."""
    try:
        yield
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        reason = _unpickling_reason(exc)
        culprit = re.search(r"GLOBAL ([\w.]+)", reason)
        if culprit is None:  # no code asked for: the stream itself is broken or not a pickle at all
            raise CheckpointError(f"{file}: not {kind} owl2 can read (truncated or corrupt?): {reason}") from None
        raise CheckpointError(
            f"{file}: refused: the pickle asks to run code or build objects other than tensors "
            f"({culprit.group(1)}); owl2 only loads pickled weights that are plain tensors (a safetensors copy of the "
            "checkpoint avoids pickles)"
        ) from None
    except MemoryError:
        raise CheckpointError(f"{file}: not {kind} owl2 can read: it claims more memory than there is") from None
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read it ({exc.strerror or _one_line(exc)})") from None
    except Exception as exc:  # safetensors, torch, zipfile and pickle each raise their own kinds for a bad file
        raise CheckpointError(f"{file}: not {kind} owl2 can read (truncated or corrupt?): "
                              f"{type(exc).__name__}: {_one_line(exc)}") from None


def iter_checkpoint(directory: Path, *, show_progress: bool = True, desc: str = "loading",
                    files: list[Path] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (key, tensor) of the checkpoint in ``directory`` (of ``files``, its :func:`weight_files`, when given)."""
    files = weight_files(directory) if files is None else files
    for file in progress(files, total=len(files), desc=desc, enabled=show_progress):
        yield from read_shard(file)


# --------------------------------------------------------------------------------------------------------- loading
@dataclass
class ExpectedKeys:
    shapes: dict[str, torch.Size]
    tied: frozenset[str]
    floating: frozenset[str] = frozenset()
    """Keys whose tensors must be floating point (a checkpoint's integer tensor there would break the forward)."""


def expected_keys(model: nn.Module, config: Owl2Config) -> ExpectedKeys:
    state = model.state_dict()
    shapes = {k: v.shape for k, v in state.items()}
    return ExpectedKeys(shapes, _tied(config), frozenset(k for k, v in state.items() if v.is_floating_point()))


def _tied(config: Owl2Config) -> frozenset[str]:
    """Keys a checkpoint of ``config`` need not store: they share another key's tensor."""
    return frozenset({"lm_head.weight"}) if config.tie_word_embeddings else frozenset()


def stored_size(config: Owl2Config) -> int:
    """How many tensor elements a complete checkpoint of ``config`` stores (a tied ``lm_head`` not counted).

    Computed without laying out the model: one layer of each stack is built on the meta device, and the rest scaled
    up, so a config that claims a million layers costs as little as one that claims two.
    """
    from owl2.model.abstractor import AbstractorLayer
    from owl2.model.llama import DecoderLayer
    from owl2.model.vision import VisionEncoderLayer

    def elements(module: nn.Module, skip: frozenset[str] = frozenset()) -> int:
        return sum(t.numel() for k, t in module.state_dict().items() if k not in skip)

    layers = (config.num_hidden_layers, config.vision.num_hidden_layers, config.abstractor.num_hidden_layers)
    shallow = dataclasses.replace(
        config, num_hidden_layers=1, vision=dataclasses.replace(config.vision, num_hidden_layers=1),
        abstractor=dataclasses.replace(config.abstractor, num_hidden_layers=1), extra={}, visual_extra={})
    with torch.device("meta"):
        total = elements(Owl2ForCausalLM(shallow), _tied(config))
        for count, layer in zip(layers, (DecoderLayer(config), VisionEncoderLayer(config.vision),
                                         AbstractorLayer(config.abstractor)), strict=True):
            total += (count - 1) * elements(layer)
    return total


def stored_capacity(files: list[Path]) -> int:
    """The most tensor elements ``files`` can hold: what the safetensors headers declare (the library checks
    them against the file size), and for a pickle its size in bytes (no element takes less than a byte)."""
    total = 0
    for file in files:
        if file.suffix == ".safetensors":
            with _reading(file, "a safetensors file"), safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    shape = handle.get_slice(key).get_shape()
                    total += int(torch.Size(shape).numel())
        else:
            with _reading(file, "a PyTorch weights file"):
                size = file.stat().st_size
            if size == 0:
                raise CheckpointError(f"{file}: not a PyTorch weights file owl2 can read: the file is empty")
            total += size
    return total


def check_capacity(directory: Path, config: Owl2Config, files: list[Path], *, packed: bool = False) -> None:
    """Raise :class:`CheckpointError` when ``config`` describes more than twice the weights ``files`` can hold
    (four times with ``packed``: a quantised checkpoint stores two int4 weights per byte).

    Checked before the model is laid out, which for an absurd config (a million layers) would take minutes and
    gigabytes on its own. A config only a little too large is left to the key and shape checks, whose messages name
    the tensors that differ.
    """
    needed, held = stored_size(config), stored_capacity(files)
    if needed > (4 if packed else 2) * held:
        names = ", ".join(f.name for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise CheckpointError(
            f"{directory / 'config.json'} describes a model of {needed:,} weights but the weight files ({names}) hold "
            f"at most {held:,}: the config does not belong to these weights (num_hidden_layers "
            f"{config.num_hidden_layers}, hidden_size {config.hidden_size}, vocab_size {config.vocab_size})"
        )


def check_keys(expected: ExpectedKeys, seen: set[str], unexpected: list[str], where: Path) -> None:
    missing = sorted(set(expected.shapes) - seen - expected.tied)
    if not missing and not unexpected:
        return

    def listing(keys: list[str]) -> str:
        shown = ", ".join(_shown_key(k) for k in keys[:20])
        return shown + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {listing(sorted(unexpected))}")
    raise CheckpointError(f"checkpoint {where} does not match its config: " + "; ".join(parts))


def _shown_key(key: str) -> str:
    """A tensor name from a file as it goes into a one-line message: as written when short and printable, else its
    ``repr`` cut to 100 characters (a key is the file's text, newlines and terminal escapes included)."""
    if len(key) <= 100 and key.isprintable():
        return key
    text = repr(key)
    return text if len(text) <= 100 else text[:97] + "..."


def check_shape(key: str, tensor: torch.Tensor, expected: ExpectedKeys) -> None:
    """Raise :class:`CheckpointError` unless ``tensor`` has the shape the config gives ``key`` and, where the model
    holds floating-point values, a floating-point dtype."""
    if tensor.shape != expected.shapes[key]:
        raise CheckpointError(
            f"{key}: checkpoint shape {list(tensor.shape)} differs from the config's {list(expected.shapes[key])}"
        )
    if key in expected.floating and not tensor.is_floating_point():
        raise CheckpointError(f"{key}: the checkpoint stores it as {str(tensor.dtype).removeprefix('torch.')}, "
                              "not as floating-point numbers")


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


def saved_quantization(config: Owl2Config) -> dict[str, Any] | None:
    """How a checkpoint saved quantised (``owl2 convert --quantize``) stores its language model's linear layers:
    ``config.json``'s ``owl2_quantization`` entry (``{"mode": "int4", "group_size": 64}``), or None."""
    settings = config.extra.get(QUANTIZATION_KEY)
    if settings is None:
        return None
    from owl2.model.quantize import INT4_GROUP_SIZES, SAVABLE_MODES

    if not isinstance(settings, dict) or settings.get("mode") not in SAVABLE_MODES:
        raise CheckpointError(f"config.json: {QUANTIZATION_KEY} must be an object whose mode is one of "
                              f"{', '.join(SAVABLE_MODES)}; got {_one_line(settings)}")
    if settings["mode"] == "int4" and (type(settings.get("group_size")) is not int
                                       or settings["group_size"] not in INT4_GROUP_SIZES):
        raise CheckpointError(f"config.json: {QUANTIZATION_KEY} of an int4 checkpoint needs a group_size among "
                              f"{', '.join(map(str, INT4_GROUP_SIZES))}; got {_one_line(settings.get('group_size'))}")
    return settings


def load_model(
    path_or_id: str | os.PathLike[str],
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    *,
    revision: str | None = None,
    show_progress: bool = True,
    quantize: str | None = None,
    group_size: int | None = None,
) -> Owl2ForCausalLM:
    """Load a checkpoint (official or owl2 layout) into an :class:`Owl2ForCausalLM` in eval mode.

    Tensors are cast to ``dtype`` shard by shard. Missing or unexpected keys raise :class:`CheckpointError` listing
    them; the official model's recomputed buffers (``rotary_emb.inv_freq``, the abstractor's sin-cos tables) are
    accepted and ignored. ``quantize`` ("int8-dynamic", "int8" or "int4"; ``group_size`` for int4, default 64)
    quantises the LLM's linear layers for inference (see :mod:`owl2.model.quantize`) as each weight arrives, so the
    float weights of the whole model are never in memory at once. A checkpoint saved quantised
    (``owl2 convert --quantize``) loads into quantised layers directly; ``quantize`` may then only name its mode.
    """
    from owl2.model.quantize import DEFAULT_INT4_GROUP_SIZE, LayerQuantizer, quantized_modules

    dtype = parse_dtype(dtype)
    device = torch.device(device)
    directory = resolve_checkpoint(path_or_id, revision=revision)
    config = Owl2Config.from_json(directory)
    saved = saved_quantization(config)
    files = weight_files(directory)
    check_capacity(directory, config, files, packed=saved is not None)
    model = build_empty(config)
    layers: LayerQuantizer | None = None  # quantises the LLM's linear layers as their weights arrive
    try:
        if saved is not None:
            if quantize is not None and quantize != saved["mode"]:
                raise CheckpointError(f"{directory} holds {saved['mode']} weights; load it with quantize=None or "
                                      f"quantize={saved['mode']!r}, not {quantize!r}")
            if group_size is not None and group_size != saved.get("group_size"):
                raise CheckpointError(f"{directory} holds {saved['mode']} weights of group size "
                                      f"{saved.get('group_size')}; it cannot be loaded at group size {group_size}")
            quantized_modules(model, saved["mode"], saved.get("group_size", DEFAULT_INT4_GROUP_SIZE))
        elif quantize is not None:
            layers = LayerQuantizer(model, quantize, group_size or DEFAULT_INT4_GROUP_SIZE)
    except ValueError as exc:
        raise CheckpointError(f"{directory}: {exc}") from None
    expected = expected_keys(model, config)
    seen: set[str] = set()
    unexpected: list[str] = []
    for key, tensor in iter_checkpoint(directory, show_progress=show_progress, files=files):
        if key not in expected.shapes:
            if not RECOMPUTED_KEYS.search(key):
                unexpected.append(key)
            continue
        check_shape(key, tensor, expected)
        # int8 layers keep their per-channel scales in float32 whatever the model dtype (they are cast per call)
        target = (torch.float32 if saved is not None and saved["mode"] == "int8" and key.endswith(".scale")
                  else dtype)
        value = tensor.to(device=device, dtype=target if tensor.is_floating_point() else tensor.dtype)
        if value.data_ptr() == tensor.data_ptr():  # own the memory rather than keep a file mapping alive
            value = value.clone()
        seen.add(key)
        if layers is not None and key in layers:
            done = layers.add(key, value)
            if done is not None:
                model.set_submodule(*done)
        else:
            _set_tensor(model, key, value)
    check_keys(expected, seen, unexpected, directory)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialize_buffers(model, device)
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


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str],
                     metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to the safetensors file ``path`` atomically and durably, with the mode a plain ``open``
    would give it (0666 less the umask; safetensors' own ``save_file`` makes every file private, 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        publish_file(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
        save_safetensors(self.pending, part, metadata={"format": "pt"})
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


def check_processing_files(source: str | os.PathLike[str]) -> list[str]:
    """The tokenizer and image-processor files that ``source`` has, each checked to resolve inside it (what
    :func:`copy_processing_files` will copy; a training run checks them before its first step, not at its end)."""
    source = Path(source)
    root = _containment_root(source)
    names = [name for name in PROCESSING_FILES if (source / name).is_file()]
    for name in names:
        _inside(source, name, root, None)
    return names


def copy_processing_files(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> list[str]:
    """Copy the tokenizer and image-processor files that ``source`` has into ``destination`` (each atomically).

    Each must resolve inside ``source``, as weight files must (:func:`weight_files`): a link to a file elsewhere
    would otherwise publish that file's contents with the checkpoint ``owl2 merge`` or training writes. All are
    checked before any is copied.
    """
    source, destination = Path(source), Path(destination)
    names = check_processing_files(source)
    for name in names:
        with atomic_output(destination / name) as handle:
            handle.write((source / name).read_bytes())
    return names


def save_model(
    model: Owl2ForCausalLM,
    directory: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "2GB",
) -> list[Path]:
    """Save parameters as sharded safetensors plus ``config.json`` (the owl2 layout, loadable by :func:`load_model`).
    A model quantised int8 or int4 saves its quantised layers as they are, and ``config.json`` says so."""
    from owl2.model.quantize import quantization_settings

    config = model.config
    settings = quantization_settings(model)
    if settings is not None:
        config = Owl2Config.from_dict(config.to_dict())
        config.extra[QUANTIZATION_KEY] = settings
    return save_state_dict(model.state_dict(), config, directory, dtype=dtype, max_shard_size=max_shard_size)


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
    "QUANTIZATION_KEY",
    "CheckpointError",
    "ShardWriter",
    "atomic_output",
    "build_empty",
    "check_capacity",
    "check_keys",
    "check_processing_files",
    "copy_processing_files",
    "iter_checkpoint",
    "load_model",
    "parse_dtype",
    "read_shard",
    "read_tensor_file",
    "resolve_checkpoint",
    "save_model",
    "save_safetensors",
    "save_state_dict",
    "saved_quantization",
    "weight_files",
]
