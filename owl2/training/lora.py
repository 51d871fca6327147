"""LoRA and QLoRA-style fine-tuning of :class:`~owl2.model.modeling.Owl2ForCausalLM` through ``peft``.

The official recipe (``finetune_lora.sh``) puts rank-128 adapters (alpha 256, dropout 0.05, no bias) on every
linear layer of the language model except ``lm_head`` -- Q and O, both MAM branches of K and V, and the MLP -- and
trains the visual abstractor alongside at full rank, with the vision encoder frozen. :data:`LORA_PRESETS` names that
set (``"both"``) and its text-only and image-only halves; ``target_pattern`` takes any regex instead.

Target patterns are matched with ``re.fullmatch`` against module names such as
``model.layers.0.self_attn.k_proj.multiway.1`` (peft's rule for a string ``target_modules``).

The abstractor trains as a peft ``modules_to_save`` module: peft keeps the frozen original beside a trainable copy
and saves the copy in the adapter, so one adapter directory restores everything that was trained.

``quantize_base="int8"`` first replaces the LLM's linear layers with :class:`~owl2.model.quantize.
WeightOnlyInt8Linear` (frozen int8 weights, per-channel scales) and puts :class:`~owl2.training._lora_int8.
Int8LoraLinear` adapters on the targeted ones -- QLoRA's idea with our int8 kernel, since bitsandbytes is not
required. Such an adapter is merged into the float base checkpoint.

peft is an optional dependency (``pip install "owl2[train]"``); it is imported on first use.

Besides owl2's own adapter directories, :func:`merge_into` and :func:`merge_adapter` read the layout that the
LLaVA-style training code of Q-Align and DeQA-Score publishes (``adapter_config.json``, ``adapter_model.bin`` and
``non_lora_trainables.bin``; see :func:`adapter_layout`). That layout is merged with plain torch, without peft:
the fully trained tensors replace the base's, then each LoRA pair is folded in as
``W + scale * B @ A`` (``scale = lora_alpha / r``) computed in float32.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from owl2.checkpoint.io import (
    RECOMPUTED_KEYS,
    CheckpointError,
    copy_processing_files,
    load_model,
    parse_dtype,
    read_tensor_file,
    resolve_checkpoint,
    save_model,
)
from owl2.model.config import Owl2Config
from owl2.model.modeling import Owl2ForCausalLM
from owl2.training.checkpointing import put_back
from owl2.utils import atomic_write_text, fsync_dir, fsync_tree, new_file_mode, read_json_object

_LAYER = r"model\.layers\.\d+\."
_MLP = r"mlp\.(gate_proj|up_proj|down_proj)"

LORA_PRESETS: dict[str, str] = {
    # The text path: shared Q/O and MLP plus the text branch of the MAM's K/V.
    "text": _LAYER + r"(self_attn\.(q_proj|o_proj|[kv]_proj\.multiway\.0)|" + _MLP + ")",
    # Only the image branch of the MAM's K/V.
    "image": _LAYER + r"self_attn\.[kv]_proj\.multiway\.1",
    # The official set: every LLM linear except lm_head.
    "both": _LAYER + r"(self_attn\.(q_proj|o_proj|[kv]_proj\.multiway\.[01])|" + _MLP + ")",
}

ABSTRACTOR = "model.visual_abstractor"
QUANTIZE_MODES = ("int8",)

# Written beside peft's files: what peft's adapter_config.json cannot say (the preset, the int8 base).
SETTINGS_FILE = "owl2_lora.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The LLaVA-style layout of Q-Align / DeQA-Score: peft's pickled weights plus the fully trained tensors.
ADAPTER_WEIGHTS_PICKLE = "adapter_model.bin"
NON_LORA_FILE = "non_lora_trainables.bin"
LAYOUTS = ("owl2", "llava")


@dataclass
class LoraSettings:
    """What to adapt and how; the defaults are the official ``finetune_lora.sh`` values."""

    preset: str = "both"
    target_pattern: str | None = None  # a regex over module names; overrides ``preset``
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    train_abstractor: bool = True
    quantize_base: str | None = None  # None, or "int8": frozen int8 weight-only base linears under the adapters

    @property
    def pattern(self) -> str:
        """The regex that selects the adapted modules."""
        if self.target_pattern is not None:
            return self.target_pattern
        if self.preset not in LORA_PRESETS:
            raise ValueError(f"unknown LoRA preset {self.preset!r}; use one of {', '.join(LORA_PRESETS)}")
        return LORA_PRESETS[self.preset]

    def validate(self) -> None:
        _ = self.pattern
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.quantize_base is not None and self.quantize_base not in QUANTIZE_MODES:
            raise ValueError(
                f"unknown quantize_base {self.quantize_base!r}; use None or one of {', '.join(QUANTIZE_MODES)}"
            )
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"target_pattern {self.pattern!r} is not a valid regex: {exc}") from None


def _require_peft() -> Any:
    """peft, or an ImportError whose one-line message names the extra to install (quoted: shells glob brackets)."""
    try:
        import peft
    except ModuleNotFoundError as exc:
        if exc.name != "peft":  # peft is there but one of its own imports fails: that error is the news
            raise ImportError(f'peft cannot be imported ({exc}); reinstall it: pip install "owl2[train]"') from exc
        # "from None": the CLI prints this message alone, and "No module named 'peft'" adds nothing to it.
        raise ImportError('LoRA needs peft, which is not installed: pip install "owl2[train]"') from None
    return peft


def _is_linear(module: nn.Module) -> bool:
    from owl2.model.quantize import WeightOnlyInt8Linear

    return isinstance(module, (nn.Linear, WeightOnlyInt8Linear))


def target_module_names(model: nn.Module, pattern: str) -> list[str]:
    """Names of the modules of ``model`` that ``pattern`` fully matches (in module order).

    Raises ValueError when nothing matches, when a match is not a linear layer (say ``...k_proj`` itself, the
    two-branch container, rather than ``...k_proj.multiway.0``), or when a match lies inside the abstractor, which
    trains at full rank.
    """
    regex = re.compile(pattern)
    names = [name for name, _ in model.named_modules() if name and regex.fullmatch(name)]
    if not names:
        raise ValueError(f"LoRA target pattern {pattern!r} matches no module of the model")
    modules = dict(model.named_modules())
    not_linear = [n for n in names if not _is_linear(modules[n])]
    if not_linear:
        raise ValueError(
            f"LoRA target pattern {pattern!r} matches modules that are not linear layers: {', '.join(not_linear[:5])}"
        )
    inside = [n for n in names if n == ABSTRACTOR or n.startswith(ABSTRACTOR + ".")]
    if inside:
        raise ValueError(
            f"LoRA target pattern {pattern!r} matches abstractor layers ({inside[0]}, ...); the abstractor trains at "
            "full rank (train_abstractor)"
        )
    return names


def _lora_config(settings: LoraSettings, *, for_int8: bool) -> Any:
    peft = _require_peft()
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        bias="none",
        target_modules=settings.pattern,
        modules_to_save=[ABSTRACTOR] if settings.train_abstractor else None,
    )
    if for_int8:
        _register_int8(config)
    return config


def _register_int8(config: Any) -> None:
    from owl2.model.quantize import WeightOnlyInt8Linear
    from owl2.training._lora_int8 import Int8LoraLinear

    # peft's (experimental) hook for layer types it does not ship: adapt our int8 linear with our LoRA layer.
    config._register_custom_module({WeightOnlyInt8Linear: Int8LoraLinear})


def _quantize(model: Owl2ForCausalLM, mode: str) -> None:
    from owl2.model.quantize import quantization, quantize_language_model

    current = quantization(model)
    if current is None:
        quantize_language_model(model, mode)
    elif current != mode:
        raise ValueError(f"the base model is already quantised ({current!r}); load it unquantised for {mode!r}")


def _check_base(model: nn.Module) -> None:
    if not isinstance(model, Owl2ForCausalLM):
        what = "a peft model (already adapted?)" if hasattr(model, "peft_config") else type(model).__name__
        raise ValueError(f"expected an owl2 Owl2ForCausalLM, got {what}")


def apply_lora(model: Owl2ForCausalLM, settings: LoraSettings | None = None) -> nn.Module:
    """Wrap ``model`` (modified in place) in a peft ``PeftModel`` with LoRA adapters on ``settings``' targets.

    Afterwards exactly the LoRA A/B matrices, and with ``train_abstractor`` the (copied) abstractor, require grad.
    The result is called like the base model (``model(input_ids=..., labels=...)`` -> ``Owl2Output``); its
    ``get_base_model()`` is the adapted ``Owl2ForCausalLM`` (parameter names without peft's ``base_model.model.``
    prefix, e.g. for :func:`owl2.training.optim.param_groups`). The training/eval mode is left as it was.
    """
    settings = settings or LoraSettings()
    settings.validate()
    _check_base(model)
    peft = _require_peft()
    if settings.quantize_base is not None:
        _quantize(model, settings.quantize_base)
    target_module_names(model, settings.pattern)  # clear errors before peft's
    config = _lora_config(settings, for_int8=settings.quantize_base is not None)
    was_training = model.training
    peft_model = peft.get_peft_model(model, config)
    # peft's new modules (dropout, the abstractor copy) start in training mode; match the base's mode throughout.
    peft_model.train(was_training)
    return peft_model


def _settings_of(model: nn.Module) -> LoraSettings:
    """The :class:`LoraSettings` of a peft model from :func:`apply_lora` or :func:`load_adapter`, read back from
    what it is: peft's LoRA config gives the rank, alpha, dropout, targets and whether the abstractor trains, the
    types of the base's layers whether it is int8 (:func:`owl2.model.quantize.quantization`). A target pattern
    that is one of :data:`LORA_PRESETS` is given as that preset."""
    from owl2.model.quantize import quantization

    config = getattr(model, "peft_config", {}).get("default")
    base = model.get_base_model() if hasattr(model, "get_base_model") else None
    if config is None or not isinstance(base, Owl2ForCausalLM):
        raise ValueError("save_adapter expects the model returned by apply_lora or load_adapter")
    settings = _settings_from_peft_config(config.to_dict())
    presets = {pattern: name for name, pattern in LORA_PRESETS.items()}
    if settings.target_pattern in presets:
        settings.preset, settings.target_pattern = presets[settings.target_pattern], None
    settings.quantize_base = "int8" if quantization(base) == "int8" else None
    return settings


def _settings_from_peft_config(config: dict[str, Any]) -> LoraSettings:
    """:class:`LoraSettings` from peft's ``adapter_config.json`` fields (peft's defaults where one is missing);
    a list of target module names becomes a pattern that matches their full names."""
    targets = config.get("target_modules")
    if isinstance(targets, (set, frozenset)):  # peft keeps a list given to it as a set
        targets = sorted(targets)
    pattern = targets if isinstance(targets, str) else "|".join(f"(.*\\.)?{re.escape(t)}" for t in targets or [])
    return LoraSettings(
        target_pattern=pattern,
        r=config.get("r", 8),
        alpha=config.get("lora_alpha", 8),
        dropout=float(config.get("lora_dropout", 0.0)),
        train_abstractor=bool(config.get("modules_to_save")),
    )


# save_adapter's hidden working directories beside ``NAME``: ``.NAME.<random>.tmp`` (the new adapter being written)
# and ``.NAME.<random>.old`` (the previous one, moved aside for the swap). Older versions drew the random part with
# tempfile.mkdtemp, which the pattern also matches.
_HIDDEN_SUFFIX = re.compile(r"\.[a-z0-9_]+\.(?P<kind>tmp|old)")


def _new_hidden_dir(directory: Path, kind: str) -> Path:
    """A new empty ``.NAME.<random>.<kind>`` beside ``directory``, with the mode a plain ``mkdir`` gives: it
    becomes the published adapter, and ``tempfile.mkdtemp``'s 0700 would hide that from the owner's group."""
    for _ in range(100):
        path = directory.parent / f".{directory.name}.{secrets.token_hex(4)}.{kind}"
        try:
            path.mkdir()
        except FileExistsError:  # taken: draw another name
            continue
        return path
    raise FileExistsError(f"no free name for a temporary directory beside {directory}")


def _hidden_dirs(directory: Path) -> list[tuple[Path, str]]:
    """The hidden working directories of :func:`save_adapter` beside ``directory``, with their kind (tmp or old)."""
    prefix = f".{directory.name}"
    try:
        entries = list(directory.parent.iterdir())
    except OSError:  # no parent yet, or not listable: nothing of ours there
        return []
    found = []
    for path in entries:
        match = _HIDDEN_SUFFIX.fullmatch(path.name[len(prefix):]) if path.name.startswith(prefix) else None
        if match is not None and path.is_dir() and not path.is_symlink():
            found.append((path, match["kind"]))
    return found


def _is_complete_adapter(directory: Path) -> bool:
    """Whether ``directory`` holds every file :func:`save_adapter` writes."""
    return all((directory / name).is_file() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, SETTINGS_FILE))


def _recover_adapter(directory: Path) -> Path:
    """Where the adapter ``directory`` is to be read from, after putting back one that a killed save left aside.

    A save killed between its two renames leaves no ``directory`` and the previous adapter, complete, at
    ``.NAME.<random>.old/NAME``: it is renamed back (only when complete; the newest if several). If the rename is
    not possible (a read-only parent), the hidden copy is returned to be read where it lies. Nothing is deleted
    here: readers may run beside a save in progress."""
    if directory.exists():
        return directory
    moved = []
    for old, kind in _hidden_dirs(directory):
        candidate = old / directory.name
        if kind == "old" and _is_complete_adapter(candidate):
            with contextlib.suppress(OSError):  # gone meanwhile: another process put it back
                moved.append((old.stat().st_mtime_ns, candidate))
    if not moved:
        return directory
    candidate = max(moved)[1]
    if put_back(candidate, directory):
        with contextlib.suppress(OSError):
            os.rmdir(candidate.parent)  # the emptied .old directory; only ever removed when empty
        return directory
    return directory if directory.exists() else candidate


def save_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Save the adapter of ``model`` (from :func:`apply_lora`) as one peft adapter directory; returns its path.

    The directory holds peft's ``adapter_config.json`` and ``adapter_model.safetensors`` (LoRA matrices and, when
    trained, the abstractor) plus ``owl2_lora.json`` (the :class:`LoraSettings`). Everything is written to a
    hidden temporary directory beside ``directory``, flushed to disk and renamed into place, so ``directory`` is
    always a complete adapter, the previous one or the new one: an earlier adapter is renamed aside first and
    removed only after the new one is in place. A process killed between those two renames leaves the previous
    adapter complete in a hidden ``.NAME.<random>.old`` directory; reading the adapter (:func:`load_adapter`,
    :func:`read_settings`, :func:`adapter_layout`, merging) or the next save puts it back. The next save also
    deletes the hidden leftovers of a killed save, so only one process may save to ``directory`` at a time.
    """
    settings = _settings_of(model)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _recover_adapter(directory)
    for leftover, _ in _hidden_dirs(directory):  # a killed save's half-written or replaced copies
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = _new_hidden_dir(directory, "tmp")
    old: Path | None = None
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        atomic_write_text(tmp / SETTINGS_FILE, json.dumps(asdict(settings), indent=2, sort_keys=True) + "\n")
        for file in tmp.iterdir():  # safetensors writes 0600; give what a plain open gives, as elsewhere
            os.chmod(file, new_file_mode())
        fsync_tree(tmp)  # peft writes plainly; make the contents durable before the rename publishes them
        if directory.exists():
            old = _new_hidden_dir(directory, "old")
            os.replace(directory, old / directory.name)
            fsync_dir(directory.parent)
        os.replace(tmp, directory)
        fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not directory.exists() and (old / directory.name).exists():
            put_back(old / directory.name, directory)  # the previous adapter, as it was
        if old is not None and not (old / directory.name).exists():
            shutil.rmtree(old, ignore_errors=True)  # else it stays hidden for the next read or save to put back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return directory


# The JSON types of the fields of owl2_lora.json (a bool is never taken for a number).
_SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "preset": (str,), "target_pattern": (str, type(None)), "r": (int,), "alpha": (int, float),
    "dropout": (int, float), "train_abstractor": (bool,), "quantize_base": (str, type(None)),
}


def _has_type(value: Any, kinds: tuple[type, ...]) -> bool:
    return isinstance(value, kinds) and (not isinstance(value, bool) or bool in kinds)


def _adapter_config(directory: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict: :class:`CheckpointError` naming the file when it is not a JSON object, or
    when a rank, alpha, dropout or target list it gives has the wrong type (peft's own errors would not name it)."""
    where = directory / ADAPTER_CONFIG
    try:
        config = read_json_object(where)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    checks = {"r": ("a positive integer", lambda v: _has_type(v, (int,)) and v > 0),
              "lora_alpha": ("a positive number", lambda v: _has_type(v, (int, float)) and v > 0),
              "lora_dropout": ("a number in [0, 1)", lambda v: _has_type(v, (int, float)) and 0 <= v < 1),
              "target_modules": ("a regex or a list of module names", lambda v: v is None or isinstance(v, str)
                                 or (isinstance(v, list) and all(isinstance(t, str) for t in v)))}
    for name, (wanted, valid) in checks.items():
        if name in config and not valid(config[name]):
            raise CheckpointError(f"{where}: {name} must be {wanted}, got {json.dumps(config[name])[:80]}")
    return config


def _settings_file(file: Path) -> LoraSettings:
    """The :class:`LoraSettings` in ``owl2_lora.json``, checked: one :class:`CheckpointError` line naming the file
    and the field when a value has the wrong type or is not a valid setting."""
    try:
        data = read_json_object(file)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    known = {k: v for k, v in data.items() if k in _SETTING_TYPES}
    for key, value in known.items():
        if not _has_type(value, _SETTING_TYPES[key]):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in _SETTING_TYPES[key])
            raise CheckpointError(f"{file}: {key} must be {wanted}, got {json.dumps(value)[:80]}")
    settings = LoraSettings(**known)
    try:
        settings.validate()
    except ValueError as exc:
        raise CheckpointError(f"{file}: {exc}") from None
    return settings


def _check_weights(file: Path) -> None:
    """One :class:`CheckpointError` line naming ``file`` when its safetensors header cannot be read or promises
    more bytes than the file holds (truncated, corrupt); only the header is read."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read it ({exc.strerror or exc})") from None
    except Exception as exc:  # safetensors raises its own error type for a bad file
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{file}: not a safetensors file owl2 can read (truncated or corrupt?): "
                              f"{reason}") from None


def read_settings(directory: str | os.PathLike[str]) -> LoraSettings:
    """The :class:`LoraSettings` recorded in an adapter directory.

    An adapter saved by peft itself (no ``owl2_lora.json``) gets settings rebuilt from its ``adapter_config.json``.
    A file that is not valid JSON, a value of the wrong type in it, or weights whose safetensors header is
    unreadable or promises more bytes than the file holds raise :class:`CheckpointError` naming the file.
    """
    directory = _recover_adapter(Path(directory))
    if not (directory / ADAPTER_CONFIG).is_file() or not (directory / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{directory} is not a LoRA adapter directory: expected {ADAPTER_CONFIG} and "
                              f"{ADAPTER_WEIGHTS}")
    config = _adapter_config(directory)
    _check_weights(directory / ADAPTER_WEIGHTS)  # peft would raise safetensors' own error, naming no file
    if (directory / SETTINGS_FILE).is_file():
        return _settings_file(directory / SETTINGS_FILE)
    settings = _settings_from_peft_config(config)
    try:
        settings.validate()
    except ValueError as exc:
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: {exc}") from None
    return settings


def load_adapter(
    base_model: Owl2ForCausalLM,
    directory: str | os.PathLike[str],
    *,
    is_trainable: bool = False,
    quantize_base: bool = True,
) -> nn.Module:
    """Put the adapter saved in ``directory`` onto ``base_model`` (modified in place); returns the peft model.

    With ``quantize_base`` (the default) an adapter trained over an int8 base gets its base quantised the same way
    first, so outputs equal the trained model's; ``quantize_base=False`` keeps the base in floating point (what
    merging does). ``is_trainable`` leaves the adapter trainable, to continue training.
    """
    _check_base(base_model)
    peft = _require_peft()
    directory = _recover_adapter(Path(directory))
    settings = read_settings(directory)
    int8 = quantize_base and settings.quantize_base is not None
    if int8:
        _quantize(base_model, settings.quantize_base)
    config = peft.LoraConfig.from_pretrained(str(directory))
    if int8:
        _register_int8(config)
    # Passing the config keeps peft from resolving ``directory`` as a hub id; the weights are read locally.
    was_training = base_model.training
    model = peft.PeftModel.from_pretrained(base_model, str(directory), config=config, is_trainable=is_trainable)
    model.train(was_training)
    return model


# ------------------------------------------------------------------------------------- the two adapter layouts
def adapter_layout(directory: str | os.PathLike[str]) -> str:
    """Which layout the adapter directory uses: ``"owl2"`` or ``"llava"``.

    ``"owl2"``: :func:`save_adapter`'s directory (``owl2_lora.json``), or any peft adapter saved as
    ``adapter_model.safetensors``; loaded through peft. ``"llava"``: what Q-Align's and DeQA-Score's training code
    publishes, ``adapter_model.bin`` (or ``.safetensors``) with ``non_lora_trainables.bin`` (the tensors trained at
    full rank: abstractor, vision tower); a peft adapter saved as ``adapter_model.bin`` alone is read the same way.
    Raises :class:`CheckpointError` naming what is missing.
    """
    directory = _recover_adapter(Path(directory))
    if not directory.is_dir():
        raise CheckpointError(f"no LoRA adapter directory at {directory}")
    if not (directory / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{directory} is not a LoRA adapter directory: {ADAPTER_CONFIG} is missing")
    if (directory / SETTINGS_FILE).is_file():
        return "owl2"
    has_safetensors = (directory / ADAPTER_WEIGHTS).is_file()
    has_pickle = (directory / ADAPTER_WEIGHTS_PICKLE).is_file()
    if (directory / NON_LORA_FILE).is_file():
        if not (has_safetensors or has_pickle):
            raise CheckpointError(f"{directory} has {NON_LORA_FILE} but no LoRA weights: expected "
                                  f"{ADAPTER_WEIGHTS_PICKLE} or {ADAPTER_WEIGHTS}")
        return "llava"
    if has_safetensors:
        return "owl2"
    if has_pickle:
        return "llava"
    raise CheckpointError(f"{directory} is not a LoRA adapter directory: expected {ADAPTER_WEIGHTS} (owl2, peft) "
                          f"or {ADAPTER_WEIGHTS_PICKLE} with {NON_LORA_FILE} (Q-Align, DeQA-Score) beside "
                          f"{ADAPTER_CONFIG}")


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` file, read as checkpoints are: pickles with ``weights_only=True`` so no code in them
    can run, and a corrupt, truncated or refused file is one :class:`CheckpointError` line naming it."""
    return read_tensor_file(file)


_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<side>[AB])(?:\.default)?\.weight")
# peft's wrappers put their own names into parameter names; the model's own names are without them.
_PEFT_WRAPPERS = re.compile(r"\.(?:base_layer|modules_to_save\.default)\.")


def _model_key(key: str) -> str:
    """The model's name for a key saved from peft's wrapper (``base_model.model.model.x`` -> ``model.x``)."""
    key = key.removeprefix("base_model.model.")
    return _PEFT_WRAPPERS.sub(".", key)


def _pattern_value(patterns: Any, module: str, default: Any) -> Any:
    # peft's rank_pattern / alpha_pattern: a key matches a module name that ends with it after a dot.
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return default


def _llava_config(directory: Path) -> dict[str, Any]:
    config = _adapter_config(directory)
    where = directory / ADAPTER_CONFIG
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA")
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise CheckpointError(f"{where}: {flag} adapters are not supported")
    for name in ("r", "lora_alpha"):
        if not isinstance(config.get(name), (int, float)) or config[name] <= 0:
            raise CheckpointError(f"{where}: {name} must be a positive number, got {config.get(name)!r}")
    return config


@dataclass
class _Merge:
    """One adapter's changes, checked against the model before anything is written."""

    replace: list[tuple[torch.Tensor, torch.Tensor]]  # (model tensor, new value)
    lora: list[tuple[nn.Linear, torch.Tensor, torch.Tensor, float]]  # (layer, A, B, scale)


def _plan_llava(model: Owl2ForCausalLM, directory: Path) -> _Merge:
    config = _llava_config(directory)
    weights_file = directory / ADAPTER_WEIGHTS_PICKLE
    if not weights_file.is_file():
        weights_file = directory / ADAPTER_WEIGHTS
    targets = model.state_dict(keep_vars=True)
    modules = dict(model.named_modules())
    plan = _Merge([], [])

    def replacement(file: Path, key: str, tensor: torch.Tensor) -> None:
        name = _model_key(key)
        if name not in targets:
            if RECOMPUTED_KEYS.search(name):
                return  # buffers owl2 recomputes (as in checkpoints)
            raise CheckpointError(f"{file.name}: key {key!r} maps to {name!r}, which is not a tensor of the model")
        if tensor.shape != targets[name].shape:
            raise CheckpointError(f"{file.name}: key {key!r} has shape {list(tensor.shape)}, the model's {name} has "
                                  f"{list(targets[name].shape)}")
        plan.replace.append((targets[name], tensor))

    # LLaVA's loader order: the fully trained tensors first, then the LoRA pairs on top of them.
    non_lora = directory / NON_LORA_FILE
    if non_lora.is_file():
        for key, tensor in _read_tensors(non_lora).items():
            replacement(non_lora, key, tensor)

    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in _read_tensors(weights_file).items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            if ".lora_" in key:
                raise CheckpointError(f"{weights_file.name}: key {key!r} is a LoRA tensor of a kind owl2 does not "
                                      "merge (only lora_A / lora_B weights of linear layers)")
            replacement(weights_file, key, tensor)  # peft's modules_to_save: full tensors
            continue
        pairs.setdefault(_model_key(match["module"]), {})[match["side"]] = (key, tensor)

    for name, sides in pairs.items():
        key = next(iter(sides.values()))[0]
        module = modules.get(name)
        if module is None:
            raise CheckpointError(f"{weights_file.name}: key {key!r} targets {name!r}, which is not a module of the "
                                  "model")
        if not isinstance(module, nn.Linear):
            raise CheckpointError(f"{weights_file.name}: key {key!r} targets {name!r}, a {type(module).__name__}, "
                                  "not a float linear layer (load the base unquantised to merge)")
        if set(sides) != {"A", "B"}:
            missing = "lora_B" if "A" in sides else "lora_A"
            raise CheckpointError(f"{weights_file.name}: key {key!r} has no {missing} partner for {name!r}")
        (key_a, a), (key_b, b) = sides["A"], sides["B"]
        rank = a.shape[0]
        if a.dim() != 2 or a.shape[1] != module.in_features:
            raise CheckpointError(f"{weights_file.name}: key {key_a!r} has shape {list(a.shape)}, expected "
                                  f"[r, {module.in_features}] for {name!r}")
        if b.dim() != 2 or b.shape != (module.out_features, rank):
            raise CheckpointError(f"{weights_file.name}: key {key_b!r} has shape {list(b.shape)}, expected "
                                  f"[{module.out_features}, {rank}] for {name!r}")
        r = _pattern_value(config.get("rank_pattern"), name, config["r"])
        if rank != r:
            raise CheckpointError(f"{weights_file.name}: key {key_a!r} has rank {rank} but {ADAPTER_CONFIG} says r "
                                  f"{r}")
        alpha = _pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        plan.lora.append((module, a, b, float(scale)))
    if not plan.lora and not plan.replace:
        raise CheckpointError(f"{directory}: the adapter holds no tensors")
    return plan


@torch.no_grad()
def _apply(plan: _Merge) -> None:
    for target, value in plan.replace:
        target.copy_(value)  # copy_ casts to the model's dtype and device
    for module, a, b, scale in plan.lora:
        weight = module.weight
        delta = (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)) * scale
        weight.copy_(weight.float() + delta)


def merge_into(model: Owl2ForCausalLM, directory: str | os.PathLike[str]) -> Owl2ForCausalLM:
    """Fold the adapter in ``directory`` (either layout, :func:`adapter_layout`) into ``model``; returns the model.

    The result is a plain :class:`Owl2ForCausalLM` with the adapter merged into its weights. ``"owl2"`` adapters go
    through peft (:func:`load_adapter` with a float base, then ``merge_and_unload``). ``"llava"`` adapters (Q-Align,
    DeQA-Score) are merged with plain torch and need no peft: every key is checked against the model first -- a key
    that names no tensor or module of the model, a non-linear target or a shape mismatch raises
    :class:`CheckpointError` naming the key, with the model untouched -- then the fully trained tensors are copied in
    and ``W + (lora_alpha / r) * B @ A`` (``alpha / sqrt(r)`` for rsLoRA) is computed in float32 and stored in the
    weight's dtype.
    """
    _check_base(model)
    directory = _recover_adapter(Path(directory))
    if adapter_layout(directory) == "llava":
        _apply(_plan_llava(model, directory))
        return model
    merged = load_adapter(model, directory, quantize_base=False).merge_and_unload()
    merged.train(model.training)
    return merged


def merge_adapter(
    base_path: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    show_progress: bool = True,
) -> list[Path]:
    """Fold the adapter in ``adapter_dir`` (owl2's or Q-Align's layout) into the base checkpoint and save a plain
    owl2 checkpoint.

    The base is loaded in float32 (also for adapters trained over an int8 base) so the merge
    ``W + scaling * B @ A`` is exact to float32 (:func:`merge_into`); the result is saved in ``dtype`` (default: the
    base's recorded ``torch_dtype``, else float32) with :func:`owl2.save_model`, and the tokenizer and
    image-processor files of the base directory are copied. ``owl2.load_model(out_dir)`` then gives
    base+adapter's logits. Returns the weight files written.
    """
    base_dir = resolve_checkpoint(base_path)
    adapter_dir = _recover_adapter(Path(adapter_dir))
    # Clear errors for a wrong directory before the (slow) base load.
    if adapter_layout(adapter_dir) == "owl2":
        read_settings(adapter_dir)
    out_dtype = parse_dtype(dtype) if dtype is not None else _recorded_dtype(base_dir)
    model = load_model(base_dir, dtype=torch.float32, show_progress=show_progress)
    merged = merge_into(model, adapter_dir)
    files = save_model(merged, out_dir, dtype=out_dtype)
    copy_processing_files(base_dir, out_dir)
    return files


def _recorded_dtype(directory: Path) -> torch.dtype:
    recorded = Owl2Config.from_json(directory).extra.get("torch_dtype")
    try:
        return parse_dtype(recorded) if isinstance(recorded, str) else torch.float32
    except ValueError:
        return torch.float32


__all__ = [
    "LAYOUTS",
    "LORA_PRESETS",
    "LoraSettings",
    "adapter_layout",
    "apply_lora",
    "load_adapter",
    "merge_adapter",
    "merge_into",
    "read_settings",
    "save_adapter",
    "target_module_names",
]
