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

from owl2.constants import OFFICIAL_IMAGE_TOKEN
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

    source = _video_source(item, num_frames)
    if source is None:
        return None
    frames, num_frames = source
    if isinstance(frames, list):
        return frames
    return video.load_video(frames, num_frames=num_frames)


def _video_source(item: Any, num_frames: int | None) -> tuple[list[Any] | str | os.PathLike[str], int | None] | None:
    """``None`` for an image; for a video, its frames (sampled by ``num_frames``, a list) or its file path, and the
    ``num_frames`` that applies to it (a :class:`Video`'s own wins)."""
    from owl2.processing import video

    if isinstance(item, Video):
        num_frames = item.num_frames if item.num_frames is not None else num_frames
        item = item.source
        if isinstance(item, (str, os.PathLike)):
            return item, num_frames
    if isinstance(item, (str, os.PathLike)):
        return (item, num_frames) if video.is_video_path(item) else None
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
        return frames, num_frames
    return None


def rating_row(tokenizer: Any, image_processor: Any, item: Any, *, task: str = "quality", prompt: str = "scorer",
               policy: str | None = None, num_frames: int | None = None, tokens_per_image: int | None = None,
               context_length: int | None = None) -> RatingRow:
    """Preprocess one image or video and render its prompt (``media`` is ``image`` or ``video`` accordingly).

    Given the model's ``tokens_per_image`` and ``context_length``, a video that samples more frames than the context
    holds is refused (``ValueError``, the message of :func:`check_fits`) before any frame is decoded or preprocessed:
    a video file's demux pass stops as soon as the clip is known to be too long. A video file's frames are checked
    against the image processor's ``max_pixels``, ``max_aspect_ratio`` and policy from the stream header, and each
    frame is preprocessed as soon as it is decoded, so one full-size frame at a time is held in memory."""
    source = _video_source(item, num_frames)
    media = "image" if source is None else "video"
    ids = tokenizer.encode_prompt(render_rating_prompt(prompt, task, media))
    if ids.count(OFFICIAL_IMAGE_TOKEN) != 1:
        raise ValueError(f"a rating prompt needs exactly one <|image|>, got {ids.count(OFFICIAL_IMAGE_TOKEN)}")
    if source is None:
        pixels = image_processor([item], policy=policy)  # [1, 3, S, S]
    else:
        fit = None
        if tokens_per_image is not None and context_length is not None:
            fit = _FrameBudget(len(ids) - 1, tokens_per_image, context_length)
        pixels = _video_pixels(image_processor, *source, policy, fit)  # [T, 3, S, S]
    slot = ids.index(OFFICIAL_IMAGE_TOKEN)
    ids[slot:slot + 1] = [OFFICIAL_IMAGE_TOKEN] * int(pixels.shape[0])
    return RatingRow(ids, pixels, media)


@dataclass(frozen=True)
class _FrameBudget:
    """How many frames of ``tokens_per_image`` visual tokens fit beside ``text`` positions in the context."""

    text: int
    tokens_per_image: int
    context_length: int

    @property
    def frames(self) -> int:
        # check_fits accepts text + frames * tokens_per_image <= context_length - 1
        return (self.context_length - 1 - self.text) // self.tokens_per_image

    def error(self, frames: int, *, at_least: bool = False) -> ValueError:
        """check_fits's message for a video of ``frames`` frames (a lower bound when ``at_least``)."""
        more = "at least " if at_least else ""
        positions = self.text + frames * self.tokens_per_image
        fit = self.frames
        hint = (f"at most {fit} frames fit: sample fewer frames (num_frames=N)" if fit >= 1
                else "not even one frame fits")
        noun = "frame" if frames == 1 else "frames"
        return ValueError(f"{more}{frames} {noun} ({frames} x {self.tokens_per_image} visual tokens) and the prompt "
                          f"take {more}{positions} positions, more than the context of {self.context_length}; {hint}")


def _video_pixels(image_processor: Any, source: list[Any] | str | os.PathLike[str], num_frames: int | None,
                  policy: str | None, fit: _FrameBudget | None) -> torch.Tensor:
    """The preprocessed frames [T, 3, S, S] of a video, refused before any decoding when more than ``fit`` frames."""
    from owl2.processing import video

    if fit is not None and fit.frames < 1:
        raise fit.error(len(source) if isinstance(source, list) else 1, at_least=not isinstance(source, list))
    if isinstance(source, list):
        if fit is not None and len(source) > fit.frames:
            raise fit.error(len(source))
        return image_processor(source, policy=policy)
    check = getattr(image_processor, "check_size", None)
    limits = {"max_pixels": getattr(image_processor, "max_pixels", video.DEFAULT_MAX_PIXELS),
              "max_aspect_ratio": getattr(image_processor, "max_aspect_ratio", video.DEFAULT_MAX_ASPECT_RATIO)}
    try:
        tensors = video.load_video(
            source, num_frames=num_frames, max_frames=video.DEFAULT_MAX_FRAMES if fit is None else fit.frames,
            check_size=None if check is None else lambda width, height, what: check(width, height, policy, what),
            convert=lambda image: image_processor([image], policy=policy)[0], **limits)
    except video.TooManyFramesError as exc:
        if fit is None:
            raise
        raise fit.error(exc.frames, at_least=exc.at_least) from exc
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"frames preprocess to different shapes {sorted(shapes)}; enable the centre crop")
    return torch.stack(tensors)


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
                                 prompt=prompt, policy=pipeline.policy, num_frames=num_frames,
                                 tokens_per_image=config.tokens_per_image, context_length=engine.context_length)
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
