"""Batched rating of images and videos: each item becomes one prompt row, a batch of rows one prefill.

An image fills the prompt's ``<|image|>`` slot with its ``tokens_per_image`` visual tokens. A video is its frames,
each preprocessed like an image, all in that one slot as consecutive visual tokens (``frames x tokens_per_image``
positions), as the Q-Align video scorer does. Rows of different lengths (images, videos of any length) are
left-padded together with a mask, so every row's rating equals the rating of the item alone; the official code
pads shorter videos without a mask and reads the padding instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from owl2.model.inputs import OFFICIAL_IMAGE_TOKEN
from owl2.rating.scale import Rating, RatingScale, render_rating_prompt
from owl2.utils import progress

__all__ = ["RatingRow", "Video", "check_fits", "rate", "rating_row", "video_frames"]


@dataclass(frozen=True)
class Video:
    """A video item: a file path (decoded with PyAV) or a sequence of frames (anything an image can be).

    ``num_frames``: sample that many frames evenly; ``None``: one frame per second for a file (Q-Align's rule),
    every given frame for a sequence."""

    source: str | os.PathLike[str] | Sequence[Any]
    num_frames: int | None = None


@dataclass
class RatingRow:
    """The model input of one item: official-form ``prompt_ids`` (one -200 per image or frame, consecutive for a
    video) and ``pixels`` [frames, 3, S, S]."""

    prompt_ids: list[int]
    pixels: torch.Tensor
    media: str


def video_frames(item: Any, num_frames: int | None = None) -> list[Any] | None:
    """The frames of ``item`` when it is a video (a :class:`Video`, a list or tuple of frames, a [T, H, W, C] array
    or a video file path), else ``None`` (an image)."""
    from owl2.processing import video

    if isinstance(item, Video):
        num_frames = item.num_frames if item.num_frames is not None else num_frames
        item = item.source
        if isinstance(item, (str, os.PathLike)):
            return video.load_video(item, num_frames=num_frames)
    if isinstance(item, (str, os.PathLike)):
        return video.load_video(item, num_frames=num_frames) if video.is_video_path(item) else None
    if isinstance(item, np.ndarray):
        if item.ndim != 4:
            return None
        item = list(item)
    if isinstance(item, (list, tuple)):
        frames = list(item)
        if not frames:
            raise ValueError("a video needs at least one frame, got an empty list")
        if num_frames is not None:
            frames = [frames[i] for i in video.uniform_indices(len(frames), num_frames)]
        return frames
    return None


def rating_row(tokenizer: Any, image_processor: Any, item: Any, *, task: str = "quality", prompt: str = "scorer",
               policy: str | None = None, num_frames: int | None = None) -> RatingRow:
    """Preprocess one image or video and render its prompt (``media`` is ``image`` or ``video`` accordingly)."""
    frames = video_frames(item, num_frames)
    media = "image" if frames is None else "video"
    pixels = image_processor([item] if frames is None else frames, policy=policy)  # [T, 3, S, S]
    ids = tokenizer.encode_prompt(render_rating_prompt(prompt, task, media))
    if ids.count(OFFICIAL_IMAGE_TOKEN) != 1:
        raise ValueError(f"a rating prompt needs exactly one <|image|>, got {ids.count(OFFICIAL_IMAGE_TOKEN)}")
    slot = ids.index(OFFICIAL_IMAGE_TOKEN)
    ids[slot:slot + 1] = [OFFICIAL_IMAGE_TOKEN] * int(pixels.shape[0])
    return RatingRow(ids, pixels, media)


def check_fits(row: RatingRow, tokens_per_image: int, context_length: int, where: str,
               hint: str = "sample fewer frames (num_frames=N)") -> int:
    """The positions the row takes, or a clear error (``where``: the item, ``hint``: what to do) when its visual
    tokens and text do not fit in the context."""
    frames = row.prompt_ids.count(OFFICIAL_IMAGE_TOKEN)
    positions = len(row.prompt_ids) - frames + frames * tokens_per_image
    if positions >= context_length:
        what = f"{frames} frames ({frames} x {tokens_per_image} visual tokens)" if row.media == "video" else "the image"
        raise ValueError(f"{where}: {what} and the prompt take {positions} positions, more than the context of "
                         f"{context_length}; {hint}")
    return positions


def _as_items(items: Any) -> list[Any]:
    """A list of items; one image, path or :class:`Video` on its own is a list of one."""
    from PIL import Image

    if isinstance(items, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray, Video)):
        return [items]
    if not isinstance(items, Iterable):
        raise TypeError(f"items must be a list of images or videos, got {type(items).__name__}")
    return list(items)


def rate(pipeline: Any, items: Any, *, task: str = "quality", prompt: str = "scorer",
         levels: Sequence[str] | Sequence[Sequence[str]] | None = None, weights: Sequence[float] | None = None,
         batch_size: int = 8, num_frames: int | None = None, show_progress: bool = False) -> list[Rating]:
    """Rate ``items`` with ``pipeline`` (an :class:`owl2.api.Pipeline`); see :meth:`owl2.api.Pipeline.rate`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    items = _as_items(items)
    scale = RatingScale(pipeline.tokenizer, levels, weights)
    engine, config = pipeline.engine, pipeline.model.config
    ratings: list[Rating] = []
    starts = range(0, len(items), batch_size)
    for start in progress(starts, total=len(starts), desc="rating", enabled=show_progress, unit="batch"):
        rows = []
        for index in range(start, min(start + batch_size, len(items))):
            where = _describe(items[index], index)
            try:
                row = rating_row(pipeline.tokenizer, pipeline.image_processor, items[index], task=task,
                                 prompt=prompt, policy=pipeline.policy, num_frames=num_frames)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from exc
            check_fits(row, config.tokens_per_image, engine.context_length, where)
            rows.append(row)
        logits = engine.next_token_logits([r.prompt_ids for r in rows], [r.pixels for r in rows])  # [B, V]
        ratings.extend(scale.read(scale.gather(logits)))
    return ratings


def _describe(item: Any, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return f"item {index} ({Path(item).name})"
    if isinstance(item, Video) and isinstance(item.source, (str, os.PathLike)):
        return f"item {index} ({Path(item.source).name})"
    return f"item {index}"
