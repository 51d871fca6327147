"""Video loading for video-quality scoring: decode a clip with PyAV and sample frames as RGB PIL images.

The reference behaviour is the video loader of Q-Align / OneAlign (the mPLUG-Owl2 fine-tunes that score image and
video quality). It reads a clip with decord and gives the model one frame per second:

* ``fps`` is the stream's average frame rate (decord's ``get_avg_fps()``: FFmpeg's ``avg_frame_rate`` as a
  double) and ``n`` its frame count (decord's ``len()``);
* the frames taken are ``int(fps * i)`` for ``i = 0, 1, ..., int(n / fps) - 1``, in float arithmetic.

So a 4 s clip at 25 fps (100 frames) gives frames 0, 25, 50 and 75; 90 frames at 29.97 fps give 0, 29 and 59; a
clip shorter than one second gives no frame at all (Q-Align then has nothing to score; :func:`load_video` raises
:class:`VideoError` instead and suggests ``num_frames``). :func:`one_per_second_indices` is that rule alone.

How the two numbers are obtained here, so that they equal decord's:

* decord's frame count is not the container header's ``nb_frames``: when it opens a file it reads every packet of
  the video stream once and counts them. :func:`load_video` does the same (a demux pass, no decoding), which also
  covers containers whose header has no frame count (Matroska, WebM, MPEG-PS, FLV);
* the rate is ``avg_frame_rate`` as a double; a stream without one (0/0, where decord's ``get_avg_fps()`` is NaN
  and its caller fails) falls back to FFmpeg's guessed rate;
* the video stream is FFmpeg's "best" one (``av_find_best_stream``), as decord picks it;
* frame ``k`` is the ``k``-th frame the decoder outputs (presentation order), i.e. the frame of the ``k``-th
  smallest packet timestamp, which is decord's indexing on ordinary files.

Checked by hand against decord 0.6.0 (the PyPI wheel) on clips made with PyAV: identical frame counts and rates for
MP4 (MPEG-4 part 2, H.264, 25 and 30000/1001 fps), MOV, MKV (H.264, FFV1), WebM (VP8), AVI, MPEG-PS and FLV, and
pixel-identical RGB frames for H.264, MJPEG and PNG (both convert with swscale's defaults).

Where :func:`load_video` deliberately differs from that decord loader:

* display rotation: frames are turned upright by the stream's display matrix for any quarter turn (phone videos).
  decord does the same for 180 degrees, but 0.6.0 fails on 90 and 270 with an array-size error; mirroring in the
  matrix is ignored, as decord ignores it;
* GIF: decoded like any other clip (decord 0.6.0 refuses the GIFs we tried: "Failed to measure duration/frame-count").
  ``.gif`` is nevertheless not in :data:`VIDEO_SUFFIXES`, because the official image pipeline opens a GIF as an
  image (its first frame) and :func:`is_video_path` routes paths between the two;
* MPEG-PS seeking: on an MPEG-2 ``.mpg`` clip, decord 0.6.0's ``get_batch`` (which the Q-Align loader calls)
  returned frame 0 for every index, while its own frame-by-frame reads agree with the frames returned here;
* damaged streams: if the decoder outputs fewer frames than the container has packets, sampled indices past the
  last decoded frame repeat it (with a warning) rather than failing;
* problems are reported as :class:`VideoError` (a ``ValueError``) with a one-line message naming the file.

``num_frames=N`` replaces the 1-fps rule by :func:`uniform_indices`: ``N`` frames at the centres of ``N`` equal
segments, the usual sampler of video LLMs, for clips shorter than a second or too long for one frame per second.

The file is read twice: a demux pass counts the packets (cheap: no decoding), then one sequential decode from the
start (no seeking) stops after the last sampled frame; only the sampled frames are converted to RGB. Needs PyAV
(``pip install 'owl2[video]'``), imported on first use, so the index functions and :func:`is_video_path` work
without it.
"""

from __future__ import annotations

import math
import os
import warnings
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any

from PIL import Image

__all__ = [
    "VIDEO_SUFFIXES",
    "VideoError",
    "is_video_path",
    "load_video",
    "one_per_second_indices",
    "uniform_indices",
]

#: Lower-case file suffixes that :func:`is_video_path` treats as video. ``.gif`` is left out on purpose: the official
#: pipeline reads a GIF as an image (its first frame); call :func:`load_video` directly to sample an animated GIF.
VIDEO_SUFFIXES: frozenset[str] = frozenset(
    {
        ".3gp",
        ".avi",
        ".flv",
        ".m2ts",
        ".m4v",
        ".mkv",
        ".mov",
        ".mp4",
        ".mpeg",
        ".mpg",
        ".mts",
        ".ogv",
        ".ts",
        ".webm",
        ".wmv",
    }
)

# PIL turns counter-clockwise, like the display matrix's angle, so a quarter turn maps straight onto a transpose.
_UPRIGHT = {
    90: Image.Transpose.ROTATE_90,
    180: Image.Transpose.ROTATE_180,
    270: Image.Transpose.ROTATE_270,
}


class VideoError(ValueError):
    """A video that cannot be used: the message names the file and the problem."""


def is_video_path(source: object) -> bool:
    """True when ``source`` is a ``str`` or ``os.PathLike`` path whose suffix (any case) is in :data:`VIDEO_SUFFIXES`.

    Only the name is looked at; the file need not exist. Anything else (bytes, images, arrays, file objects) is False.
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        return False
    return Path(source).suffix.lower() in VIDEO_SUFFIXES


def one_per_second_indices(num_frames: int, fps: float) -> list[int]:
    """Q-Align's one-frame-per-second rule: ``[int(fps * i) for i in range(int(num_frames / fps))]``.

    ``fps`` (a ``float``, or a ``Fraction`` such as PyAV's rates) is converted to ``float`` and the arithmetic done
    in doubles, as the reference does. Fewer than ``fps`` frames give ``[]``. A rate below 1 fps repeats frames, as
    the reference does.
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    rate = float(fps)
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"fps must be a positive finite number, got {fps}")
    return [int(rate * i) for i in range(int(num_frames / rate))]


def uniform_indices(num_frames: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly over ``num_frames``: the frame at the centre of each of ``count`` equal
    segments, ``floor((i + 0.5) * num_frames / count)``; all frames when ``count >= num_frames``.

    Computed in integers, so the result does not depend on float rounding. 100 frames, 4 samples: [12, 37, 62, 87].
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if count >= num_frames:
        return list(range(num_frames))
    return [(2 * i + 1) * num_frames // (2 * count) for i in range(count)]


def load_video(
    source: str | os.PathLike[str],
    *,
    num_frames: int | None = None,
    max_frames: int | None = None,
) -> list[Image.Image]:
    """Decode the video at ``source`` and return the sampled frames as RGB ``PIL.Image.Image`` objects, in order.

    ``num_frames=None`` samples one frame per second exactly as Q-Align does (see the module docstring);
    ``num_frames=N`` samples ``N`` frames evenly (:func:`uniform_indices`; all frames of a clip with fewer). Frames
    are turned upright by the stream's display rotation. Each returned image is a separate object, even where the
    rule repeats a frame (rates below 1 fps).

    Raises :class:`VideoError` (a ``ValueError``) when ``num_frames`` or ``max_frames`` is below 1, the file is
    missing or not a file, it cannot be read as media, it has no video stream or no frames, the 1-fps rule samples
    no frame (a clip shorter than one second) or the stream has no frame rate, more than ``max_frames`` frames would
    be sampled (checked before decoding), or decoding fails.
    """
    if num_frames is not None and num_frames < 1:
        raise VideoError(f"num_frames must be at least 1, got {num_frames}")
    if max_frames is not None and max_frames < 1:
        raise VideoError(f"max_frames must be at least 1 or None, got {max_frames}")
    name = os.fspath(source)
    path = Path(name)
    if not path.exists():
        raise VideoError(f"{name} does not exist")
    if not path.is_file():
        raise VideoError(f"{name} is not a file")
    av = _import_av()
    try:
        stream_index, frame_count, rate = _probe(av, name)
        indices = _sample(name, frame_count, rate, num_frames, max_frames)
        return _decode(av, name, stream_index, indices, frame_count)
    except av.FFmpegError as exc:
        reason = exc.strerror or str(exc)
        raise VideoError(f"{name} is not a readable video: {reason}") from exc


def _import_av() -> ModuleType:
    try:
        import av
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("load_video needs PyAV: pip install 'owl2[video]' (or pip install av)") from exc
    return av


def _ffmpeg_path(name: str) -> str:
    # FFmpeg reads a leading "word:" as a protocol ("concat:", "http:", ...); an absolute path cannot start with one,
    # so a local file is always opened as the file it names.
    return os.path.abspath(name)


def _probe(av: ModuleType, name: str) -> tuple[int, int, Fraction | None]:
    """The index of the video stream decord would pick, its packet count (decord's ``len``) and its frame rate."""
    with av.open(_ffmpeg_path(name)) as container:
        stream = container.streams.best("video")
        if stream is None:
            raise VideoError(f"{name} has no video stream")
        # decord's get_avg_fps() is avg_frame_rate; it is 0/0 (None here) only for odd streams, where the guess is the
        # best estimate left instead of decord's NaN.
        rate = stream.average_rate or stream.guessed_rate or None
        # PyAV ends the demux with an empty flush packet (no data, no timestamp); FFmpeg's av_read_frame, which decord
        # counts with, never returns that one, while a genuine empty packet still carries a timestamp.
        count = sum(1 for packet in container.demux(stream) if packet.size > 0 or packet.dts is not None)
        return stream.index, count, rate


def _sample(name: str, count: int, rate: Fraction | None, num_frames: int | None, max_frames: int | None) -> list[int]:
    if count == 0:
        raise VideoError(f"{name} has a video stream but no frames")
    fps = float(rate) if rate else None
    if num_frames is not None:
        indices = uniform_indices(count, num_frames)
        how = f"{count} frames, num_frames={num_frames}"
    else:
        if fps is None:
            raise VideoError(
                f"{name} reports no frame rate, so the 1-frame-per-second rule cannot be applied; pass num_frames=N"
            )
        indices = one_per_second_indices(count, fps)
        if not indices:
            raise VideoError(
                f"{name} is {count / fps:.3g} s long ({count} frames at {fps:.4g} fps): "
                "the 1-frame-per-second rule samples no frame; pass num_frames=N"
            )
        how = f"{count / fps:.4g} s at {fps:.4g} fps, one frame per second; pass num_frames=N to sample fewer"
    if max_frames is not None and len(indices) > max_frames:
        raise VideoError(f"{name} samples {len(indices)} frames, more than max_frames={max_frames} ({how})")
    return indices


def _decode(av: ModuleType, name: str, stream_index: int, indices: list[int], count: int) -> list[Image.Image]:
    wanted = set(indices)
    last = max(indices)
    images: dict[int, Image.Image] = {}
    previous: Any = None
    decoded = 0
    with av.open(_ffmpeg_path(name)) as container:
        stream = container.streams[stream_index]
        # PyAV's default (slice threading) keeps one core busy on streams coded as a single slice; frame threading can
        # use them all, and the decoder still outputs the same frames in the same order.
        stream.codec_context.thread_type = "AUTO"
        for frame in container.decode(stream):
            if decoded in wanted:
                images[decoded] = _upright_rgb(frame)
            previous = frame
            decoded += 1
            if decoded > last:
                break
        if decoded <= last:
            if previous is None:
                raise VideoError(f"{name} has {count} video packets but none of them decodes to a frame")
            warnings.warn(
                f"{name}: the decoder gave {decoded} frames where the container has {count} packets; "
                f"sampled frames past {decoded - 1} repeat the last decoded frame",
                stacklevel=3,
            )
            tail = _upright_rgb(previous)
            images.update((index, tail) for index in wanted if index >= decoded)
    result: list[Image.Image] = []
    handed_out: set[int] = set()
    for index in indices:
        image = images[index]
        # A frame sampled twice (rates below 1 fps, or the damaged-stream tail) must not come back as one shared
        # object that a caller could edit in place.
        if id(image) in handed_out:
            image = image.copy()
        handed_out.add(id(image))
        result.append(image)
    return result


def _upright_rgb(frame: Any) -> Image.Image:
    image = frame.to_image()
    quarter = round(frame.rotation) % 360
    if quarter in _UPRIGHT:
        image = image.transpose(_UPRIGHT[quarter])
    return image
