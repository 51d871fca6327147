"""Training recipes: one TOML file per run, plus ``section.key=value`` overrides from the command line.

A recipe has a few top-level keys and six sections (every key has a default; see the dataclasses below)::

    stage = "stage2"            # "stage1", "stage2" or "language" (what trains: owl2.training.optim)
    output_dir = "runs/stage2"
    seed = 0

    [model]  path = "./owl2-7b"           # checkpoint to start from (or init_config = "config.json": random init;
                                          # neither: the embedded owl2-tiny, as every other command)
    [data]   path = "train.json"          # LLaVA or messages records (owl2.data)
    [train]  batch_size = 2               # per process; plus grad_accum, max_steps/epochs, bf16, checkpoints ...
    [optim]  lr = 2e-5                    # owl2.training.optim.OptimConfig
    [lora]   enabled = false              # owl2.training.lora.LoraSettings
    [loss]   soft_label_weight = 0.0      # DeQA-Score's KL at the level word (owl2.training.losses)

Recipes shipped with the package (``owl2 train stage1``) live in ``owl2/training/recipes/``; a recipe may name another
with ``base = "stage2"`` and change only what differs. Relative paths in a recipe file are resolved against the file's
directory. Overrides use TOML values (``optim.lr=1e-4``, ``train.bf16=false``, ``lora.preset="text"``); a bare word
that is not a TOML value is taken as a string (``data.path=train.json``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owl2.constants import DEFAULT_TEMPLATE
from owl2.data.quality import LEVELS, QUALITY_PREFIX
from owl2.training.optim import STAGES, OptimConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

RECIPES_DIR = Path(__file__).parent / "recipes"
DISTRIBUTED = ("auto", "none", "ddp", "fsdp", "deepspeed")


class RecipeError(ValueError):
    """A recipe or an override is malformed; the message names the key."""


@dataclass
class ModelSection:
    path: str | None = None
    """Checkpoint directory or hub id to start from (its tokenizer and image processor are used too). With neither
    ``path`` nor ``init_config``, the embedded owl2-tiny (:func:`owl2.default_model`)."""
    init_config: str | None = None
    """Instead of ``path``: a ``config.json`` (or a directory holding one) for a randomly initialised model."""
    tokenizer: str | None = None
    """Tokenizer directory; default ``path``."""
    image_processor: str | None = None
    """Directory or ``preprocessor_config.json``; default ``path``, else a processor at the model's image size."""


@dataclass
class DataSection:
    path: str | None = None
    image_root: str | None = None
    """Where relative image paths point; default the data file's directory."""
    max_length: int = 2048
    template: str = DEFAULT_TEMPLATE
    image_policy: str = "pad"
    num_workers: int = 0


@dataclass
class TrainSection:
    batch_size: int = 2
    """Samples per process and micro-batch."""
    grad_accum: int = 1
    max_steps: int = 0
    """Optimizer steps; 0 means ``epochs`` passes over the data."""
    epochs: float = 1.0
    warmup_ratio: float | None = None
    """Warm-up as a fraction of the steps (the official 0.03); overrides ``optim.warmup_steps`` when set."""
    bf16: bool = True
    """bf16 autocast around forward and loss; weights and optimizer state stay float32."""
    gradient_checkpointing: bool = False
    distributed: str = "auto"
    """``auto`` (DDP when launched by torchrun, else none), ``none``, ``ddp``, ``fsdp`` (FSDP2) or ``deepspeed``."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON config (ZeRO stage etc.); ``owl2/training/recipes/zero2.json`` when unset."""
    log_every: int = 1
    save_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    keep_last: int = 2
    save_dtype: str | None = None
    """dtype of the final model (``bf16``, ``fp16``, ``fp32``); default float32."""
    progress: bool = True
    tensorboard: bool = True
    """Also write TensorBoard events when ``tensorboard`` is installed."""
    plot: bool = True
    """Write ``loss.png`` at the end (needs matplotlib)."""
    device: str | None = None
    """Default: this process's CUDA device when available, else the CPU."""


@dataclass
class LoraSection:
    enabled: bool = False
    preset: str = "both"
    target_pattern: str | None = None
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    train_abstractor: bool = True
    quantize_base: str | None = None


@dataclass
class LossSection:
    ce_weight: float = 1.0
    """Weight of the next-token cross-entropy over the answer tokens (without the level words of soft-labelled
    samples while ``soft_label_weight`` > 0)."""
    soft_label_weight: float = 0.0
    """Weight of DeQA-Score's KL loss at the level word of samples with a ``soft_label`` (0: off; their soft labels
    are then ignored and the level word is an ordinary cross-entropy target)."""
    levels: tuple[str, ...] = LEVELS
    """The rating level words, best first, in the order of the soft labels."""
    level_prefix: str = QUALITY_PREFIX
    """The answer words right before the level word (how the level word is found)."""


@dataclass
class TrainConfig:
    stage: str = "stage2"
    output_dir: str = "runs/owl2"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    loss: LossSection = field(default_factory=LossSection)

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise RecipeError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.model.path is not None and self.model.init_config is not None:
            raise RecipeError("give exactly one of model.path (a checkpoint) or model.init_config (random init)")
        if self.data.path is None:
            raise RecipeError("data.path is required (a LLaVA-style or messages JSON/JSONL file)")
        if self.train.distributed not in DISTRIBUTED:
            raise RecipeError(f"train.distributed must be one of {', '.join(DISTRIBUTED)}, "
                              f"got {self.train.distributed!r}")
        for key in ("batch_size", "grad_accum", "log_every", "keep_last"):
            if getattr(self.train, key) < 1:
                raise RecipeError(f"train.{key} must be at least 1, got {getattr(self.train, key)}")
        if self.train.max_steps < 0 or self.train.save_every < 0 or self.train.epochs <= 0:
            raise RecipeError("train.max_steps and train.save_every must be >= 0 and train.epochs > 0")
        if self.train.warmup_ratio is not None and not 0 <= self.train.warmup_ratio <= 1:
            raise RecipeError(f"train.warmup_ratio is a fraction of the steps, from 0 to 1; got "
                              f"{self.train.warmup_ratio}")
        if min(self.loss.ce_weight, self.loss.soft_label_weight) < 0 or not (
                self.loss.ce_weight > 0 or self.loss.soft_label_weight > 0):
            raise RecipeError("loss.ce_weight and loss.soft_label_weight must be >= 0, and one of them > 0")
        if not self.loss.levels or not self.loss.level_prefix.strip():
            raise RecipeError("loss.levels and loss.level_prefix must not be empty")
        if self.model.init_config is not None and self.model.tokenizer is None:
            raise RecipeError("a randomly initialised model (model.init_config) needs model.tokenizer")

    def with_default_model(self) -> TrainConfig:
        """This config, or a copy starting from the embedded owl2-tiny when it names no model at all (neither
        ``model.path`` nor ``model.init_config``), so ``owl2 train`` defaults like every other command."""
        if self.model.path is not None or self.model.init_config is not None:
            return self
        from owl2.api import default_model  # lazily: the API module pulls in the generation engine

        return dataclasses.replace(self, model=dataclasses.replace(self.model, path=str(default_model())))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The recipe as TOML (what a run records next to its outputs)."""
        data = self.to_dict()
        lines = [f"{key} = {_toml_value(value)}" for key, value in data.items() if not isinstance(value, dict)]
        for section, values in data.items():
            if isinstance(values, dict):
                lines.append(f"\n[{section}]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


_PATH_KEYS = {("model", "path"), ("model", "init_config"), ("model", "tokenizer"), ("model", "image_processor"),
              ("data", "path"), ("data", "image_root"), ("train", "deepspeed_config")}


def _resolve_recipe_file(name_or_path: str | os.PathLike[str]) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.exists():
        raise RecipeError(f"recipe {str(path)!r} is not a regular file (give a TOML file)")
    packaged = RECIPES_DIR / f"{name_or_path}.toml"
    if packaged.is_file():
        return packaged
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
    raise RecipeError(f"no recipe file {str(name_or_path)!r}; give a TOML path or a packaged recipe name: "
                      f"{', '.join(names)}")


def _read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe in ``path`` merged over its ``base`` chain, with relative paths made absolute."""
    if path.resolve() in seen:
        raise RecipeError(f"recipe {path} names itself as a base (cycle)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from None
    for section, key in _PATH_KEYS:
        value = data.get(section, {}).get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (path.parent / value).exists():
            data[section][key] = str((path.parent / value).resolve())
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_recipe(_resolve_recipe_file(base), (*seen, path.resolve()))
    for key, value in data.items():
        if isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4"`` -> (``["optim", "lr"]``, ``1e-4``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {text!r} must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise RecipeError(f"unknown key {where}{key}; known keys: {', '.join(fields)}")
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise RecipeError(f"{where}{key} must be a table of settings")
            value = _build(type(default), value, f"{where}{key}.")
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif default is not None and not isinstance(value, type(default)):
            raise RecipeError(f"{where}{key} must be {type(default).__name__}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def read_recipe_file(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The tables of the TOML file ``path`` as plain values: merged over its ``base`` chain, relative paths made
    absolute, then ``overrides`` (``section.key=value``, see :func:`parse_override`) applied. Nothing is checked
    against :class:`TrainConfig`, so other TOML settings files (owl2-tiny's stage V) read through it too."""
    return _apply_overrides(_read_recipe(Path(path)), overrides)


def _apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        target = data
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise RecipeError(f"override {text!r}: {key} is not a section")
        target[keys[-1]] = value
    return data


def load_recipe(name_or_path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = (), *,
                validate: bool = True) -> TrainConfig:
    """The :class:`TrainConfig` of a recipe file or packaged recipe name, with ``overrides`` applied.

    A recipe that names no model starts from the embedded owl2-tiny (:meth:`TrainConfig.with_default_model`).
    ``validate=False`` reads a recipe that is not complete on its own (``owl2/experiments/recipes/tiny/``: the build
    fills in the model and the data) without checking it or filling in the default model."""
    if name_or_path is not None:
        data = read_recipe_file(_resolve_recipe_file(name_or_path), overrides)
    else:
        data = _apply_overrides({}, overrides)
    config = _build(TrainConfig, data, "")
    if validate:
        config = config.with_default_model()
        config.validate()
    return config
