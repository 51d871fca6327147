"""One configuration object for mPLUG-Owl2, in the official ``config.json`` layout.

The official file keeps the LLaMA fields at the top level and nests the two visual configs under
``visual_config.visual_model`` (the ViT) and ``visual_config.visual_abstractor``. :class:`Owl2Config` reads that
file as-is, keeps every key it does not know (so a round trip loses nothing) and rejects values that cannot describe
a working model. Defaults equal the released 7B checkpoint (``MAGAer13/mplug-owl2-llama2-7b``).
"""

from __future__ import annotations

import copy
import json
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
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.abstractor.grid_size is None:
            self.abstractor.grid_size = self.vision.grid_size
        self.validate()

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
        """Raise :class:`ConfigError` naming the first contradictory or unsupported value."""
        v, a = self.vision, self.abstractor

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads ({self.num_attention_heads})")
        need(self.head_dim % 2 == 0, f"the attention head size ({self.head_dim}) must be even for rotary embeddings")
        kv = self.num_key_value_heads
        need(kv is not None and kv > 0 and self.num_attention_heads % kv == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads ({kv})")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (LLaMA uses 'silu')")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            need(kind == "linear" and float(self.rope_scaling.get("factor", 0)) > 0,
                 f"rope_scaling {self.rope_scaling!r} is not supported (only null or linear with a positive factor)")
        need(self.image_token_index >= 0 and not 0 <= self.image_token_index < self.vocab_size,
             f"image_token_id ({self.image_token_index}) must not be a text token id (vocab_size {self.vocab_size})")

        need(v.image_size > 0 and v.patch_size > 0, "vision image_size and patch_size must be positive")
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
        data = dict(data)
        visual = dict(data.pop(cls._VISUAL_KEY, None) or {})
        vision_known, vision_extra = _split_known(VisionConfig, dict(visual.pop("visual_model", None) or {}))
        abs_known, abs_extra = _split_known(AbstractorConfig, dict(visual.pop("visual_abstractor", None) or {}))
        known, extra = _split_known(cls, data)
        for internal in ("vision", "abstractor", "visual_extra"):
            if internal in known:
                extra[internal] = known.pop(internal)
        try:
            return cls(
                **known,
                vision=VisionConfig(**vision_known, extra=vision_extra),
                abstractor=AbstractorConfig(**abs_known, extra=abs_extra),
                extra=extra,
                visual_extra=copy.deepcopy(visual),
            )
        except TypeError as exc:  # e.g. a field given a value of the wrong kind
            raise ConfigError(f"invalid config: {exc}") from exc

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
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        from owl2.utils import read_json_object

        try:
            data = read_json_object(path)
        except FileNotFoundError as exc:
            raise ConfigError(f"no config.json at {path}") from exc
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        return cls.from_dict(data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` into ``directory`` atomically."""
        from owl2.utils import atomic_write_text

        target = Path(directory) / "config.json"
        atomic_write_text(target, self.to_json_string())
        return target
