"""Files shipped inside the package: the embedded default model, ``owl2-tiny``.

Only where it lives and what it reads are said here, so that the API and the CLI can find it without importing the
recipe that builds it (:mod:`owl2.experiments.tiny`).
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED_MODEL_NAME = "owl2-tiny"
EMBEDDED_IMAGE_SIZE = 64
"""The image resolution owl2-tiny is trained at (pixels per side of the shapes-world scenes)."""


def default_model_dir() -> Path:
    """The shipped ``owl2-tiny`` checkpoint directory (``owl2/assets/owl2-tiny``), whether or not its weights are
    there (a build installs them; :func:`default_model` checks)."""
    return Path(__file__).resolve().parent / EMBEDDED_MODEL_NAME


def default_model() -> Path:
    """Returns the embedded model's directory: the ``owl2-tiny`` checkpoint shipped in the package, which every
    entry point (``owl2.load()``, ``owl2 ask``/``chat``/``eval``/``train``) uses when no model is given.
    ``owl2.load(owl2.default_model())`` equals ``owl2.load()``. Raises ``FileNotFoundError`` when its weights are
    missing."""
    directory = default_model_dir()
    if not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"the embedded model is missing from {directory}; rebuild it with "
                                "`owl2 experiment build-tiny --install` or pass a model")
    return directory
