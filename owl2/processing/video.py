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
start (no seeking) stops after the last sampled frame; only the sampled frames are converted to RGB.

Limits, so that a hostile or broken file costs little and fails with a one-line :class:`VideoError`:

* frame size: the stream's width x height and aspect ratio are checked against ``max_pixels`` and
  ``max_aspect_ratio`` (the image limits of :mod:`owl2.processing.image`, 8192 x 8192 pixels and 100:1 by default)
  before any frame is decoded by us, and FFmpeg's decoders are told the same pixel limit, so that they do not
  allocate a larger frame while opening the file or when a stream changes size midway. (For the few containers that
  announce their streams only while being read, MPEG-PS and FLV, FFmpeg may decode one frame while opening the file,
  under its own size limit, before the check.) ``check_size`` adds a caller's own check, such as an
  :class:`~owl2.processing.image.ImageProcessor`'s bound on its policy;
* frame count: more than ``max_frames`` sampled frames (:data:`DEFAULT_MAX_FRAMES` unless given) is refused before
  anything is decoded; under the 1-fps rule the demux pass stops as soon as the clip is known to be too long, so an
  hour-long clip is refused after reading ``max_frames + 1`` seconds of it. This also bounds a clip whose timestamps
  claim an absurd duration (two frames a million seconds apart would otherwise sample a million copies);
* what FFmpeg may open: only local files (no network protocol) and only demuxers that read the one file they are
  given: playlists (HLS), concat lists, SDP descriptions, image-sequence patterns and capture devices are refused,
  so a file named ``.mp4`` cannot make FFmpeg fetch a URL or read other files;
* ``convert`` turns each sampled frame into what the caller keeps (a preprocessed tensor, say) as soon as it is
  decoded, so that only one full-size RGB frame is alive at a time.

Needs PyAV
(``pip install 'owl2[video]'``), imported on first use, so the index functions and :func:`is_video_path` work
without it.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any

from PIL import Image

from owl2.processing.image import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_PIXELS, check_aspect_ratio

__all__ = [
    "DEFAULT_MAX_FRAMES",
    "VIDEO_SUFFIXES",
    "TooManyFramesError",
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


#: Default ``max_frames`` of :func:`load_video`: at one frame per second, a clip of up to 17 minutes. Far more than the
#: context of any model of the family holds (a 2048-position context takes 31 frames of 65 visual tokens), and a bound
#: on memory for callers that keep every frame.
DEFAULT_MAX_FRAMES = 1024

# FFmpeg's max_pixels option is an int64 capped at INT_MAX.
_FFMPEG_MAX_PIXELS = 2**31 - 1
# Frame threading keeps about one frame per decoder thread in flight: for very large frames the thread count is capped
# so that those frames (4:2:0, 1.5 bytes a pixel) stay within this many bytes.
_DECODER_BUDGET_BYTES = 1 << 30

#: Demuxers that open more than the file they are given: playlists and lists of other files (which could read any
#: file the process can, or fetch URLs), session descriptions that open network sockets. Input devices, the network
#: demuxers and image-sequence patterns carry FFmpeg's "no file" flag and are left out as well.
_REFUSED_DEMUXERS = frozenset({"avisynth", "concat", "dash", "hls", "imf", "sdp", "vapoursynth", "webm_dash_manifest"})


class VideoError(ValueError):
    """A video that cannot be used: the message names the file and the problem."""


class TooManyFramesError(VideoError):
    """The sampling rule would take more than ``max_frames`` frames; raised before any frame is decoded.

    ``frames`` is the number the rule takes, or a lower bound of it when ``at_least`` (the demux pass stopped as soon
    as the clip was known to be too long)."""

    def __init__(self, message: str, frames: int, max_frames: int, *, at_least: bool = False) -> None:
        super().__init__(message)
        self.frames, self.max_frames, self.at_least = frames, max_frames, at_least


@dataclass(frozen=True)
class _Limits:
    """What :func:`load_video` checks before it decodes."""

    num_frames: int | None = None
    max_frames: int | None = DEFAULT_MAX_FRAMES
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO
    check_size: Callable[[int, int, str], None] | None = None


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
    max_frames: int | None = DEFAULT_MAX_FRAMES,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
    check_size: Callable[[int, int, str], None] | None = None,
    convert: Callable[[Image.Image], Any] | None = None,
) -> list[Any]:
    """Decode the video at ``source`` and return the sampled frames as RGB ``PIL.Image.Image`` objects, in order.

    ``num_frames=None`` samples one frame per second exactly as Q-Align does (see the module docstring);
    ``num_frames=N`` samples ``N`` frames evenly (:func:`uniform_indices`; all frames of a clip with fewer). Frames
    are turned upright by the stream's display rotation. Each returned image is a separate object, even where the
    rule repeats a frame (rates below 1 fps).

    Limits (see the module docstring), all checked before a frame is decoded: at most ``max_frames`` sampled frames
    (``None``: no limit), frames of at most ``max_pixels`` pixels and an aspect ratio (long side over short side) of
    at most ``max_aspect_ratio`` (``None``: no limit of ours), and ``check_size(width, height, what)``, when given,
    raising ``ValueError`` for frames the caller cannot use. A frame whose size differs from the stream's header is
    checked again before it is converted.

    ``convert``, when given, is applied to each sampled frame (the upright RGB image) as soon as it is decoded, and
    the list holds its results instead of images; a frame the rule samples twice is converted once, and both
    places hold the same result.

    Raises :class:`VideoError` (a ``ValueError``) when ``num_frames`` or ``max_frames`` is below 1, the file is
    missing or not a file, it cannot be read as media (or only by a demuxer that opens other files or URLs), it has
    no video stream, no decoder for it or no frames, the 1-fps rule samples no frame (a clip shorter than one second)
    or the stream has no frame rate, the frames are over the size limits, more than ``max_frames`` frames would be
    sampled (:class:`TooManyFramesError`), or decoding fails.
    """
    if num_frames is not None and num_frames < 1:
        raise VideoError(f"num_frames must be at least 1, got {num_frames}")
    if max_frames is not None and max_frames < 1:
        raise VideoError(f"max_frames must be at least 1 or None, got {max_frames}")
    if max_pixels is not None and max_pixels < 1:
        raise VideoError(f"max_pixels must be at least 1 or None, got {max_pixels}")
    if max_aspect_ratio is not None and not max_aspect_ratio >= 1:
        raise VideoError(f"max_aspect_ratio must be at least 1 or None, got {max_aspect_ratio}")
    limits = _Limits(num_frames, max_frames, max_pixels, max_aspect_ratio, check_size)
    name = os.fspath(source)
    path = Path(name)
    if not path.exists():
        raise VideoError(f"{name} does not exist")
    if not path.is_file():
        raise VideoError(f"{name} is not a file")
    av = _import_av()
    try:
        stream_index, frame_count, rate = _probe(av, name, limits)
        indices = _sample(name, frame_count, rate, num_frames, max_frames)
        return _decode(av, name, stream_index, indices, frame_count, limits, convert)
    except av.FFmpegError as exc:
        raise VideoError(f"{name} is not a readable video: {_reason(exc)}") from exc


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


def _reason(exc: Any) -> str:
    return exc.strerror or str(exc)


@functools.cache
def _accepted_demuxers(av: ModuleType) -> str:
    """FFmpeg's ``format_whitelist``: every demuxer of this FFmpeg that reads just the file it is given."""
    names = []
    for name in sorted(av.formats_available):
        try:
            container_format = av.format.ContainerFormat(name, "r")
        except (ValueError, av.FFmpegError):  # an output-only format
            continue
        if not container_format.no_file and not set(name.split(",")) & _REFUSED_DEMUXERS:
            names.append(name)
    return ",".join(names)


def _open(av: ModuleType, name: str, limits: _Limits) -> Any:
    """Open ``name`` for reading: local files only, accepted demuxers only, and the decoders FFmpeg opens to probe
    the streams held to ``max_pixels`` (they zero the size of a larger stream instead of allocating its frame)."""
    options = {}
    if limits.max_pixels is not None:
        options["max_pixels"] = str(min(limits.max_pixels, _FFMPEG_MAX_PIXELS))
    container_options = {"protocol_whitelist": "file", "format_whitelist": _accepted_demuxers(av)}
    try:
        return av.open(_ffmpeg_path(name), options=options, container_options=container_options)
    except av.ArgumentError as exc:
        # A demuxer left out of the whitelist is refused with EINVAL, which FFmpeg reports only in its log.
        raise VideoError(
            f"{name} is not a readable video: {_reason(exc)} (playlists, concat lists, SDP files and image-sequence "
            "patterns are not read as videos)"
        ) from exc


def _check_size(name: str, width: int, height: int, limits: _Limits) -> None:
    """The frame-size limits of :func:`load_video`, from a stream header or a decoded frame."""
    if width <= 0 or height <= 0:
        over = "" if limits.max_pixels is None else f", or its frames are over max_pixels={limits.max_pixels:,}"
        raise VideoError(f"{name}: the video stream has no frame size ({width}x{height}: a damaged stream{over})")
    if limits.max_pixels is not None and width * height > limits.max_pixels:
        raise VideoError(
            f"{name}: video frames are {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{limits.max_pixels:,} (max_pixels); downscale the video"
        )
    what = f"{name} (video frames)"
    try:
        check_aspect_ratio(width, height, limits.max_aspect_ratio, what)
        if limits.check_size is not None:
            limits.check_size(width, height, what)
    except VideoError:
        raise
    except ValueError as exc:  # ImageError, or the caller's own: a VideoError like every other refusal
        raise VideoError(str(exc)) from exc


def _no_rate(name: str) -> VideoError:
    return VideoError(
        f"{name} reports no frame rate, so the 1-frame-per-second rule cannot be applied; pass num_frames=N"
    )


def _probe(av: ModuleType, name: str, limits: _Limits = _Limits()) -> tuple[int, int, Fraction | None]:
    """The index of the video stream decord would pick, its packet count (decord's ``len``) and its frame rate.

    The stream's frame size is checked first. Under the 1-fps rule with a ``max_frames``, counting stops (with
    :class:`TooManyFramesError`) as soon as the clip is too long."""
    with _open(av, name, limits) as container:
        stream = container.streams.best("video")
        if stream is None:
            raise VideoError(f"{name} has no video stream")
        if stream.codec_context is None:
            raise VideoError(f"{name} has a video stream in a codec this FFmpeg cannot decode")
        _check_size(name, stream.codec_context.width, stream.codec_context.height, limits)
        # decord's get_avg_fps() is avg_frame_rate; it is 0/0 (None here) only for odd streams, where the guess is the
        # best estimate left instead of decord's NaN. A rate that is not positive is no rate at all.
        rate = stream.average_rate or stream.guessed_rate or None
        if rate is not None and rate <= 0:
            rate = None
        one_per_second = limits.num_frames is None
        if one_per_second and rate is None:
            raise _no_rate(name)  # before the demux pass: nothing it counts could help
        fps = float(rate) if rate is not None else 0.0
        stop = limits.max_frames if one_per_second and fps > 0 else None
        count = 0
        for packet in container.demux(stream):
            # PyAV ends the demux with an empty flush packet (no data, no timestamp); FFmpeg's av_read_frame, which
            # decord counts with, never returns that one, while a genuine empty packet still carries a timestamp.
            if packet.size > 0 or packet.dts is not None:
                count += 1
                if stop is not None and int(count / fps) > stop:
                    raise TooManyFramesError(
                        f"{name} samples at least {int(count / fps)} frames, more than max_frames={stop} (over "
                        f"{count / fps:.4g} s at {fps:.4g} fps, one frame per second; pass num_frames=N to sample "
                        "fewer)",
                        int(count / fps), stop, at_least=True,
                    )
        return stream.index, count, rate


def _sample(name: str, count: int, rate: Fraction | None, num_frames: int | None, max_frames: int | None) -> list[int]:
    if count == 0:
        raise VideoError(f"{name} has a video stream but no frames")
    fps = float(rate) if rate else None
    if num_frames is not None:
        sampled = min(count, num_frames)
        how = f"{count} frames, num_frames={num_frames}"
    else:
        if fps is None or not (math.isfinite(fps) and fps > 0):
            raise _no_rate(name)
        sampled = int(count / fps)
        if not sampled:
            raise VideoError(
                f"{name} is {count / fps:.3g} s long ({count} frames at {fps:.4g} fps): "
                "the 1-frame-per-second rule samples no frame; pass num_frames=N"
            )
        how = f"{count / fps:.4g} s at {fps:.4g} fps, one frame per second; pass num_frames=N to sample fewer"
    # Counted before the list is built: a clip claiming an absurd duration would make a list of millions.
    if max_frames is not None and sampled > max_frames:
        raise TooManyFramesError(f"{name} samples {sampled} frames, more than max_frames={max_frames} ({how})",
                                 sampled, max_frames)
    return uniform_indices(count, num_frames) if num_frames is not None else one_per_second_indices(count, fps)


def _decode(av: ModuleType, name: str, stream_index: int, indices: list[int], count: int,
            limits: _Limits = _Limits(), convert: Callable[[Image.Image], Any] | None = None) -> list[Any]:
    wanted = set(indices)
    last = max(indices)
    images: dict[int, Any] = {}
    previous: Any = None
    decoded = 0
    checked: tuple[int, int] | None = None

    def take(frame: Any) -> Any:
        nonlocal checked
        if (frame.width, frame.height) != checked:  # a stream may change size midway
            _check_size(name, frame.width, frame.height, limits)
            checked = (frame.width, frame.height)
        image = _upright_rgb(frame)
        return image if convert is None else convert(image)

    with _open(av, name, limits) as container:
        stream = container.streams[stream_index]
        if stream.codec_context is None:
            raise VideoError(f"{name} has a video stream in a codec this FFmpeg cannot decode")
        if limits.max_pixels is not None:
            # The decoder then refuses a frame over the limit instead of allocating it, wherever it comes in the file.
            stream.codec_context.options = {"max_pixels": str(min(limits.max_pixels, _FFMPEG_MAX_PIXELS))}
        # PyAV's default (slice threading) keeps one core busy on streams coded as a single slice; frame threading can
        # use them all, and the decoder still outputs the same frames in the same order.
        stream.codec_context.thread_type = "AUTO"
        pixels = max(1, stream.codec_context.width * stream.codec_context.height)
        threads = max(1, _DECODER_BUDGET_BYTES * 2 // (3 * pixels))
        if threads <= (os.cpu_count() or 1):
            stream.codec_context.thread_count = threads
        try:
            for frame in container.decode(stream):
                if decoded in wanted:
                    images[decoded] = take(frame)
                previous = frame
                decoded += 1
                if decoded > last:
                    break
        except av.ArgumentError as exc:
            # What FFmpeg's decoders answer for a frame over their max_pixels, among other invalid input.
            over = "" if limits.max_pixels is None else f"; frames over max_pixels={limits.max_pixels:,} fail this way"
            raise VideoError(f"{name} is not a readable video: decoding frame {decoded} failed: {_reason(exc)}{over}"
                             ) from exc
        if decoded <= last:
            if previous is None:
                raise VideoError(f"{name} has {count} video packets but none of them decodes to a frame")
            warnings.warn(
                f"{name}: the decoder gave {decoded} frames where the container has {count} packets; "
                f"sampled frames past {decoded - 1} repeat the last decoded frame",
                stacklevel=3,
            )
            tail = take(previous)
            images.update((index, tail) for index in wanted if index >= decoded)
    result: list[Any] = []
    handed_out: set[int] = set()
    for index in indices:
        image = images[index]
        # A frame sampled twice (rates below 1 fps, or the damaged-stream tail) must not come back as one shared
        # image that a caller could edit in place; converted results are the caller's own, shared as documented.
        if convert is None and id(image) in handed_out:
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
