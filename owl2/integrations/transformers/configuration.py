"""mPLUG-Owl2's configuration as a transformers ``PretrainedConfig`` (``model_type: "mplug_owl2"``).

:class:`~owl2.model.config.Owl2Config` stays the one description of the model: its fields are this class's
attributes, every value is checked by it, and :meth:`MPLUGOwl2Config.to_owl2` gives the model its config. The file
transformers writes is the official ``config.json`` layout (the LLaMA fields at the top level, the ViT and the
abstractor under ``visual_config``, ``torch_dtype``), with every key the class does not know kept, such as the
training options Q-Align writes, so owl2, the official code and transformers read each other's files.
"""

from __future__ import annotations

import copy
from dataclasses import fields
from typing import Any

from transformers import PretrainedConfig

from owl2.model.config import Owl2Config

_NESTED = ("vision", "abstractor", "extra", "visual_extra")
OWL2_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Owl2Config) if f.name not in _NESTED)
"""The top-level keys of the official layout, as :class:`Owl2Config` declares them."""
VISUAL_KEY: str = Owl2Config._VISUAL_KEY
OFFICIAL_KEYS: tuple[str, ...] = (*OWL2_FIELDS, VISUAL_KEY)


class MPLUGOwl2Config(PretrainedConfig):
    """The official ``config.json`` as a transformers config; ``MPLUGOwl2Config(**json.load(f))`` reads it as-is.

    Every field of :class:`Owl2Config` is an attribute of the same name (``visual_config`` the nested dict); keys
    Owl2Config does not know are kept as attributes and written back. Values are validated by Owl2Config, so a
    config that cannot describe a working model fails here with its :class:`~owl2.model.config.ConfigError`.
    """

    model_type = "mplug_owl2"
    # transformers 5 turns an attribute called rope_scaling into rope_parameters; the official layout keeps it as it
    # is (null or a linear factor), so this class holds it as a plain attribute.
    rope_scaling = None

    def __init__(self, **kwargs: Any) -> None:
        official = {key: kwargs.pop(key) for key in OFFICIAL_KEYS if key in kwargs}
        config = Owl2Config.from_dict(copy.deepcopy(official))
        super().__init__(**kwargs)
        self._set_official(config)

    # ------------------------------------------------------------------------------------------------ owl2 <-> here
    def _set_official(self, config: Owl2Config) -> None:
        layout = config.to_dict()
        for name in OWL2_FIELDS:
            setattr(self, name, copy.deepcopy(getattr(config, name)))
        setattr(self, VISUAL_KEY, layout[VISUAL_KEY])

    def _official(self) -> Owl2Config:
        """The :class:`Owl2Config` of the official keys as this config holds them now (attributes may have been set
        after construction), validated."""
        data = {name: copy.deepcopy(getattr(self, name)) for name in OWL2_FIELDS}
        data[VISUAL_KEY] = copy.deepcopy(getattr(self, VISUAL_KEY))
        return Owl2Config.from_dict(data)

    def to_owl2(self) -> Owl2Config:
        """The :class:`Owl2Config` of the ``config.json`` this config writes (validated again: attributes may have
        changed); keys Owl2Config does not know, such as Q-Align's ``image_aspect_ratio``, are in its ``extra``."""
        return Owl2Config.from_dict(self.to_diff_dict())

    @classmethod
    def from_owl2(cls, config: Owl2Config, **kwargs: Any) -> MPLUGOwl2Config:
        """The transformers config of ``config``; its unknown keys become attributes, ``kwargs`` override."""
        return cls(**{**config.to_dict(), **kwargs})

    @property
    def tokens_per_image(self) -> int:
        """Positions one image takes in expanded ``input_ids`` (the abstractor's queries plus its end token)."""
        return self._official().tokens_per_image

    @property
    def image_token_index(self) -> int:
        """The id that fills an image's positions in expanded ``input_ids`` (``image_token_id``, else
        ``vocab_size``)."""
        return self._official().image_token_index

    # ------------------------------------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """transformers' dictionary with the official keys written as :meth:`Owl2Config.to_dict` writes them
        (``image_token_id`` and ``modality_adaptive`` only when not the default)."""
        out = super().to_dict()
        for name in OWL2_FIELDS:
            out.pop(name, None)
        official = self._official().to_dict()
        for key in OFFICIAL_KEYS:
            if key in official:
                out[key] = official[key]
        if out.get("rope_parameters") is None:
            out.pop("rope_parameters", None)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """What ``save_pretrained`` writes: transformers' difference from its defaults, plus every official key even
        where it equals a default, so the file is complete for the official code and owl2; the weights' dtype is
        written under the official name ``torch_dtype`` (which transformers 5 still reads)."""
        out = super().to_diff_dict()
        full = self.to_dict()
        for key in OFFICIAL_KEYS:
            if key in full:
                out[key] = full[key]
        dtype = out.pop("dtype", None)
        if dtype is not None:
            out["torch_dtype"] = dtype
        return out


__all__ = ["OFFICIAL_KEYS", "OWL2_FIELDS", "MPLUGOwl2Config"]
