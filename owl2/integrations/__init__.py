"""Adapters that plug owl2 into third-party evaluation harnesses.

Nothing here is imported by ``import owl2``: each adapter imports its harness, which is an optional dependency.

* :mod:`owl2.integrations.lmms_eval`: the ``owl2`` model of lmms-eval (``lmms-eval --model owl2``). lmms-eval finds
  it through the ``lmms_eval.models`` entry point, which names :func:`lmms_eval_models`.
"""

from __future__ import annotations

from typing import Any

LMMS_EVAL_MODEL_ID = "owl2"
LMMS_EVAL_ALIASES = ("mplug_owl2",)
LMMS_EVAL_CLASS_PATH = "owl2.integrations.lmms_eval.Owl2LMMS"


def lmms_eval_models() -> list[Any]:
    """The manifests lmms-eval's registry loads from our ``lmms_eval.models`` entry point.

    It lives here, not in :mod:`owl2.integrations.lmms_eval`, because lmms-eval loads every entry point while it
    builds its registry, i.e. on every run: this keeps that cheap and independent of whether the adapter itself
    imports; the adapter module is imported only when ``--model owl2`` is asked for.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=LMMS_EVAL_MODEL_ID, simple_class_path=LMMS_EVAL_CLASS_PATH,
                          aliases=LMMS_EVAL_ALIASES)]


__all__ = ["LMMS_EVAL_ALIASES", "LMMS_EVAL_CLASS_PATH", "LMMS_EVAL_MODEL_ID", "lmms_eval_models"]
