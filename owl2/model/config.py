"""One configuration object for mPLUG-Owl2, in the official ``config.json`` layout.

The official file keeps the LLaMA fields at the top level and nests the two visual configs under
``visual_config.visual_model`` (the ViT) and ``visual_config.visual_abstractor``. :class:`Owl2Config` reads that
file as-is, keeps every key it does not know (so a round trip loses nothing) and rejects values that cannot describe
a working model. Defaults equal the released 7B checkpoint (``MAGAer13/mplug-owl2-llama2-7b``).
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A configuration value is missing, contradictory or unsupported."""


def _split_known(cls: type, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = {f.name for f in fields(cls) if f.name != "extra"}
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: copy.deepcopy(v) for k, v in data.items() if k not in names}
    return known, extra


def _to_dict(obj: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj.extra)
    for f in fields(obj):
        if f.name != "extra" and not isinstance(getattr(obj, f.name), _SubConfig):
            out[f.name] = copy.deepcopy(getattr(obj, f.name))
    return out


_KINDS: dict[str, tuple[str, Any]] = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a finite number", lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "None": ("null", lambda v: v is None),
    "dict[str, Any]": ("an object", lambda v: isinstance(v, dict)),
    "list[str]": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
}
"""What each field annotation in this module admits from JSON, as (description, test). A float field takes an int
(``"rope_theta": 10000``); an int field takes no float, not even 4.0, since sizes and counts are whole numbers."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_types(obj: Any, prefix: str) -> None:
    """Raise :class:`ConfigError` for the first field of ``obj`` whose value its annotation does not admit, named by
    its key in ``config.json`` (``prefix`` + field name): arithmetic on a string or a float layer count would
    otherwise fail later as a ``TypeError`` deep inside model construction."""
    for f in fields(obj):
        if f.name in ("extra", "visual_extra") or f.type in ("VisionConfig", "AbstractorConfig"):
            continue  # the nested configs are checked on their own
        kinds = [_KINDS[kind] for kind in str(f.type).split(" | ")]
        value = getattr(obj, f.name)
        if not any(test(value) for _, test in kinds):
            wanted = " or ".join(description for description, _ in kinds)
            raise ConfigError(f"{prefix}{f.name} must be {wanted}, got {_short(value)}")


def _check_range(value: int | float, low: float, high: float, name: str) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {_short(value)}")


# Upper bounds far above any released model (LLaMA-3 405B: 126 layers, hidden 16384, vocabulary 128256) that stop a
# config from describing millions of layers or a trillion-row embedding: those would take minutes and gigabytes just to
# lay the model out, before a single weight is read.
MAX_LAYERS = 1024
MAX_HIDDEN_SIZE = 65536
MAX_INTERMEDIATE_SIZE = 2**20
MAX_VOCAB_SIZE = 2**22
MAX_POSITIONS = 2**20
MAX_IMAGE_SIZE = 8192
MAX_GRID_SIZE = 1024
MAX_QUERIES = 65536
MAX_CHANNELS = 64


class _SubConfig:
    """Marker base for nested configs (serialised by the parent)."""


@dataclass
class VisionConfig(_SubConfig):
    """CLIP ViT-L/14-style encoder (``visual_config.visual_model``)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 448
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    projection_dim: int = 768
    use_cls_token: bool = True
    use_post_layernorm: bool = True
    use_flash_attn: bool = False
    model_type: str = "mplug_owl_vision_model"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Tokens out of the encoder: one cls token plus ``grid_size**2`` patches."""
        return self.grid_size**2 + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class AbstractorConfig(_SubConfig):
    """Visual abstractor (``visual_config.visual_abstractor``): learnable queries over the ViT output."""

    hidden_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 16
    intermediate_size: int = 2816
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    encoder_hidden_size: int = 1024
    grid_size: int | None = None
    num_learnable_queries: int = 64
    use_cls_token: bool = True
    add_v2t_pos_emb: bool = False
    model_type: str = "mplug_owl_visual_abstract"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class Owl2Config:
    """mPLUG-Owl2 configuration: LLaMA fields at the top level plus the two visual sub-configs.

    ``image_token_id`` is owl2's own field: the id that marks image positions in expanded ``input_ids``. It defaults
    to ``vocab_size`` (outside the text vocabulary, so it can never collide with a real token).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None
    pretraining_tp: int = 1
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    use_cache: bool = True
    image_token_id: int | None = None
    modality_adaptive: bool = True
    """owl2's switch for the paper's ablation: False shares the norms and K/V projections between text and image
    positions (one ``multiway.0`` branch, no ``multiway.1``)."""
    model_type: str = "mplug_owl2"
    architectures: list[str] = field(default_factory=lambda: ["MPLUGOwl2LlamaForCausalLM"])
    vision: VisionConfig = field(default_factory=VisionConfig)
    abstractor: AbstractorConfig = field(default_factory=AbstractorConfig)
    extra: dict[str, Any] = field(default_factory=dict)
    visual_extra: dict[str, Any] = field(default_factory=dict)

    _VISUAL_KEY: ClassVar[str] = "visual_config"

    def __post_init__(self) -> None:
        self._check_types()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.abstractor.grid_size is None and self.vision.patch_size > 0:
            self.abstractor.grid_size = self.vision.grid_size
        self.validate()

    def _check_types(self) -> None:
        if not isinstance(self.vision, VisionConfig) or not isinstance(self.abstractor, AbstractorConfig):
            raise ConfigError("vision and abstractor must be a VisionConfig and an AbstractorConfig")
        _check_types(self, "")
        _check_types(self.vision, "visual_config.visual_model.")
        _check_types(self.abstractor, "visual_config.visual_abstractor.")

    # ----------------------------------------------------------------------------------------------- derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def tokens_per_image(self) -> int:
        """Positions one image occupies in the LLM sequence: the queries plus the learned end token."""
        return self.abstractor.num_learnable_queries + 1

    @property
    def image_token_index(self) -> int:
        """The reserved id of image positions (``image_token_id`` or, unset, ``vocab_size``)."""
        return self.vocab_size if self.image_token_id is None else self.image_token_id

    # -------------------------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first value of the wrong type, out of bounds, contradictory or
        unsupported.

        Every size and count must be a positive integer within a bound far above any released model
        (:data:`MAX_LAYERS` layers per stack, :data:`MAX_HIDDEN_SIZE`, :data:`MAX_INTERMEDIATE_SIZE`,
        :data:`MAX_VOCAB_SIZE`, :data:`MAX_POSITIONS`, images up to :data:`MAX_IMAGE_SIZE` pixels and
        :data:`MAX_GRID_SIZE` patches a side, :data:`MAX_QUERIES` queries), every epsilon positive and finite,
        every dropout within [0, 1].
        """
        self._check_types()
        v, a = self.vision, self.abstractor

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        bounds = [
            ("vocab_size", self.vocab_size, MAX_VOCAB_SIZE),
            ("hidden_size", self.hidden_size, MAX_HIDDEN_SIZE),
            ("intermediate_size", self.intermediate_size, MAX_INTERMEDIATE_SIZE),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_HIDDEN_SIZE),
            ("max_position_embeddings", self.max_position_embeddings, MAX_POSITIONS),
            ("vision hidden_size", v.hidden_size, MAX_HIDDEN_SIZE),
            ("vision intermediate_size", v.intermediate_size, MAX_INTERMEDIATE_SIZE),
            ("vision num_hidden_layers", v.num_hidden_layers, MAX_LAYERS),
            ("vision num_attention_heads", v.num_attention_heads, MAX_HIDDEN_SIZE),
            ("vision num_channels", v.num_channels, MAX_CHANNELS),
            ("vision image_size", v.image_size, MAX_IMAGE_SIZE),
            ("vision patch_size", v.patch_size, MAX_IMAGE_SIZE),
            ("abstractor hidden_size", a.hidden_size, MAX_HIDDEN_SIZE),
            ("abstractor intermediate_size", a.intermediate_size, MAX_INTERMEDIATE_SIZE),
            ("abstractor num_hidden_layers", a.num_hidden_layers, MAX_LAYERS),
            ("abstractor num_attention_heads", a.num_attention_heads, MAX_HIDDEN_SIZE),
            ("abstractor num_learnable_queries", a.num_learnable_queries, MAX_QUERIES),
        ]
        for name, value, high in bounds:
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
            _check_range(value, 1, high, name)
        for name, value in (("rms_norm_eps", self.rms_norm_eps), ("rope_theta", self.rope_theta),
                            ("vision layer_norm_eps", v.layer_norm_eps),
                            ("abstractor layer_norm_eps", a.layer_norm_eps)):
            need(value > 0, f"{name} must be positive, got {value}")
        for name, value in (("initializer_range", self.initializer_range),
                            ("vision initializer_range", v.initializer_range),
                            ("abstractor initializer_range", a.initializer_range)):
            need(value >= 0, f"{name} must not be negative, got {value}")
        for name, value in (("vision attention_dropout", v.attention_dropout),
                            ("abstractor attention_probs_dropout_prob", a.attention_probs_dropout_prob)):
            _check_range(value, 0, 1, name)
        need(v.image_size // v.patch_size <= MAX_GRID_SIZE,
             f"vision image_size / patch_size must be at most {MAX_GRID_SIZE}, got {v.image_size // v.patch_size}")
        need(self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads ({self.num_attention_heads})")
        need(self.head_dim % 2 == 0, f"the attention head size ({self.head_dim}) must be even for rotary embeddings")
        kv = self.num_key_value_heads
        need(kv is not None and kv > 0 and self.num_attention_heads % kv == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads ({kv})")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (LLaMA uses 'silu')")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            factor = self.rope_scaling.get("factor", 0)
            need(kind == "linear" and _KINDS["float"][1](factor) and factor > 0,
                 f"rope_scaling {self.rope_scaling!r} is not supported (only null or linear with a positive factor)")
        need(self.image_token_index >= 0 and not 0 <= self.image_token_index < self.vocab_size,
             f"image_token_id ({self.image_token_index}) must not be a text token id (vocab_size {self.vocab_size})")

        need(v.image_size % v.patch_size == 0,
             f"vision image_size ({v.image_size}) must be a multiple of patch_size ({v.patch_size})")
        need(v.hidden_size % v.num_attention_heads == 0,
             f"vision hidden_size ({v.hidden_size}) must be a multiple of its num_attention_heads "
             f"({v.num_attention_heads})")
        need(v.hidden_act == "quick_gelu", f"vision hidden_act {v.hidden_act!r} is not supported (only 'quick_gelu')")
        need(v.use_cls_token and v.use_post_layernorm,
             "vision use_cls_token and use_post_layernorm must be true (the released architecture)")

        need(a.hidden_size == v.hidden_size,
             f"abstractor hidden_size ({a.hidden_size}) must equal the vision hidden_size ({v.hidden_size}): the "
             "queries and the visual tokens share one key/value sequence")
        need(a.encoder_hidden_size == v.hidden_size,
             f"abstractor encoder_hidden_size ({a.encoder_hidden_size}) must equal the vision hidden_size "
             f"({v.hidden_size})")
        need(a.hidden_size % a.num_attention_heads == 0,
             f"abstractor hidden_size ({a.hidden_size}) must be a multiple of its num_attention_heads "
             f"({a.num_attention_heads})")
        need(a.hidden_size % 4 == 0,
             f"abstractor hidden_size ({a.hidden_size}) must be a multiple of 4 (2-D sin-cos table)")
        need(a.grid_size == v.grid_size,
             f"abstractor grid_size ({a.grid_size}) must equal vision image_size / patch_size ({v.grid_size})")
        need(a.num_learnable_queries > 0, "abstractor num_learnable_queries must be positive")
        need(a.use_cls_token, "abstractor use_cls_token must be true (the vision encoder keeps its cls token)")
        need(not a.add_v2t_pos_emb, "abstractor add_v2t_pos_emb is not supported (it is broken in the official code)")

    # ------------------------------------------------------------------------------------------------ serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Owl2Config:
        """Build from the official ``config.json`` dictionary (unknown keys are kept)."""
        def section(value: Any, key: str) -> dict[str, Any]:
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be an object, got {type(value).__name__}")
            return dict(value)

        data = section(data, "the config")
        visual = section(data.pop(cls._VISUAL_KEY, None), cls._VISUAL_KEY)
        try:
            vision_known, vision_extra = _split_known(
                VisionConfig, section(visual.pop("visual_model", None), f"{cls._VISUAL_KEY}.visual_model"))
            abs_known, abs_extra = _split_known(AbstractorConfig, section(
                visual.pop("visual_abstractor", None), f"{cls._VISUAL_KEY}.visual_abstractor"))
            known, extra = _split_known(cls, data)
            for internal in ("vision", "abstractor", "visual_extra"):
                if internal in known:
                    extra[internal] = known.pop(internal)
            return cls(
                **known,
                vision=VisionConfig(**vision_known, extra=vision_extra),
                abstractor=AbstractorConfig(**abs_known, extra=abs_extra),
                extra=extra,
                visual_extra=copy.deepcopy(visual),
            )
        except TypeError as exc:  # e.g. a field given a value of the wrong kind
            raise ConfigError(f"invalid config: {exc}") from exc
        except RecursionError:  # deepcopy of an unknown key nested thousands deep
            raise ConfigError("invalid config: a value is nested too deeply") from None

    def to_dict(self) -> dict[str, Any]:
        """The official ``config.json`` layout, with every unknown key written back."""
        out = _to_dict(self)
        for internal in ("visual_extra",):
            out.pop(internal, None)
        if self.image_token_id is None:
            out.pop("image_token_id")
        if self.modality_adaptive:  # the released layout; only the ablation writes the key
            out.pop("modality_adaptive")
        visual = copy.deepcopy(self.visual_extra)
        visual["visual_model"] = _to_dict(self.vision)
        visual["visual_abstractor"] = _to_dict(self.abstractor)
        out[self._VISUAL_KEY] = visual
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Owl2Config:
        """Read ``config.json`` (or the one in directory ``path``); every problem is one :class:`ConfigError` line
        that starts with the file's path."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        from owl2.utils import read_json_object

        try:
            data = read_json_object(path)
        except FileNotFoundError as exc:
            raise ConfigError(f"no config.json at {path}") from exc
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        except OSError as exc:  # a directory called config.json, no permission to read it, ...
            raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` into ``directory`` atomically."""
        from owl2.utils import atomic_write_text

        target = Path(directory) / "config.json"
        atomic_write_text(target, self.to_json_string())
        return target
