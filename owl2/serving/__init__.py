"""Serving: an OpenAI-compatible HTTP server with continuous batching, ratings (``POST /v1/rate``), a chat page,
and Ray Serve replicas."""

from owl2.serving.batcher import ContinuousBatcher, PrefillRow, QueueFullError
from owl2.serving.images import ImagePolicy

__all__ = ["ContinuousBatcher", "ImagePolicy", "PrefillRow", "QueueFullError", "ServerSettings", "create_app"]


def __getattr__(name: str):  # the app needs FastAPI (the "serve" extra); the batcher does not
    if name in ("ServerSettings", "create_app"):
        from owl2.serving import app

        return getattr(app, name)
    raise AttributeError(name)
