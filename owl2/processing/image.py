"""Image loading and preprocessing, pixel-exact with the official mPLUG-Owl2 pipeline.

The official code turns an image into ``pixel_values`` with transformers-4.31's ``CLIPImageProcessor`` configured
by the checkpoint's ``preprocessor_config.json``, optionally after reshaping the image to a square. This module
reimplements it with Pillow and numpy only. The CLIP step is:

1. resize so the shortest edge is ``size`` (448) with PIL bicubic; the long edge becomes
   ``int(448 * long / short)`` (truncated, not rounded);
2. centre crop 448 x 448 (offsets ``(h - 448) // 2`` and ``(w - 448) // 2``);
3. rescale: ``float32(float64(u8) * (1/255))``;
4. normalise in float32: ``(x - mean) / std`` with the CLIP mean and std;
5. channels first, float32.

Every step is computed exactly as the official code does. Steps 3 and 4 are a function of the 8-bit value alone, so
they go through a per-channel 256-entry table. The outputs match the recorded official outputs bit for bit in float32
(``tests/fixtures/preproc``).

Policies (what happens to a non-square image before the CLIP step):

========= ============================================================== ==============================================
policy    what it does                                                   where the official code uses it
========= ============================================================== ==============================================
stretch   ``image.resize((m, m))`` with ``m = max(w, h)`` (Pillow's      README quick start and every ``evaluate/*.py``
          default filter for RGB, bicubic), so the aspect ratio is lost  (``process_images`` with ``model_cfg=None``,
          and nothing is cut off. The CLIP step then resizes again.      the ``'resize'`` branch). "Recommended for
          **The default.**                                               best performance"
pad       letterbox to ``m x m`` with the mean colour                    ``serve/cli.py`` (``--image-aspect-ratio
          ``tuple(int(c * 255) for c in mean)`` = (122, 116, 104), the   pad``) and training (``expand2square``)
          image pasted at ``((m - w) // 2, 0)`` or ``(0, (m - h) // 2)``
crop      nothing: the CLIP step alone (shortest edge 448, centre        the Gradio/model-worker demo (config without
          crop), which cuts off the sides of a non-square image          ``image_aspect_ratio``) and training's
                                                                         default ``square``
========= ============================================================== ==============================================

Square images give the same result under all three.

Loading (:func:`load_image`) differs from the official ``Image.open(path).convert("RGB")`` in these ways:

* EXIF orientation is applied (``ImageOps.exif_transpose``). The official code ignores it, so a rotated phone photo
  reaches the official model on its side. Pass ``exif_transpose=False`` for strict parity.
* 16-bit and 32-bit integer images (``I;16*``, ``I``) and float images (``F``) are scaled to 8 bits. Pillow's
  ``convert("RGB")`` saturates them instead, so most 16-bit images become nearly white.
* Alpha is dropped as ``convert("RGB")`` does (parity: the colour under a transparent pixel is kept). This includes
  palette transparency. Pass ``background=(r, g, b)`` to composite onto a colour instead.
* Bad input is rejected with :class:`ImageError` instead of failing later: empty, truncated, not an image,
  zero-sized, not a regular file, over ``max_pixels`` or over ``max_aspect_ratio`` (checked from the header before
  any pixel is decoded).

:class:`ImageProcessor` also bounds the work of its policy before it decodes anything: an image whose square
(``pad``, ``stretch``) or shortest-edge resize would be over its ``max_pixels`` is refused with :class:`ImageError`,
as is one over its ``max_aspect_ratio``, instead of allocating gigabytes for a thin strip.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
import urllib.parse
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from owl2.utils import read_json_object

__all__ = [
    "DEFAULT_MAX_ASPECT_RATIO",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_POLICY",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "POLICIES",
    "PREPROCESSOR_CONFIG_NAME",
    "ImageError",
    "ImageProcessor",
    "ImageSource",
    "check_aspect_ratio",
    "checkpoint_policy",
    "expand_to_square",
    "load_image",
    "load_image_processor",
    "policy_of_aspect_ratio",
    "stretch_to_square",
]

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
POLICIES: tuple[str, ...] = ("crop", "pad", "stretch")
DEFAULT_POLICY = "stretch"
#: Default pixel limit for :func:`load_image`: 64 Mi pixels (8192 x 8192). Lower than Pillow's own warning threshold
#: (about 89 M pixels), which is only a warning, and its error threshold (about 179 M pixels).
DEFAULT_MAX_PIXELS = 8192 * 8192
#: Default limit on the long side over the short side, for :func:`load_image` and :class:`ImageProcessor`. A thin
#: strip costs next to nothing to send, but every policy blows it up: ``pad`` and ``stretch`` into a square of its
#: long side (a 1 x 20000 PNG of 162 bytes becomes 400 M pixels), ``crop`` into a shortest-edge-448 resize whose long
#: side grows with the ratio. 100:1 leaves room for long screenshots and panoramas, which are far below it.
DEFAULT_MAX_ASPECT_RATIO = 100.0

#: Anything :func:`load_image` accepts.
ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image | np.ndarray

_RELEASE_SIZE = 448
_RESAMPLE_NAMES = {int(r): r.name.lower() for r in Image.Resampling}
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_INT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class ImageError(ValueError):
    """An image that cannot be used: the message names the source and the problem."""


@dataclass(frozen=True)
class _Limits:
    """What an image must satisfy before any pixel is decoded (see :func:`load_image`)."""

    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO
    formats: tuple[str, ...] | None = None
    check: Callable[[int, int, str], None] | None = None
    """A further check of (width, height, what) from the header: the processor's bound on its policy's work."""


# ------------------------------------------------------------------------------------------------------------ loading
def load_image(
    source: ImageSource,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    *,
    exif_transpose: bool = True,
    background: tuple[int, int, int] | None = None,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
    formats: Sequence[str] | None = None,
) -> Image.Image:
    """Load ``source`` as a fully decoded RGB ``PIL.Image.Image`` that shares nothing with the input.

    ``source`` may be a path (``str`` or ``os.PathLike``), raw encoded bytes (``bytes``, ``bytearray`` or
    ``memoryview``), a binary file object, a ``data:image/...;base64,...`` URL, a ``PIL.Image.Image`` or a numpy
    array. Arrays are channels-last: H x W (gray), H x W x 1, H x W x 3 (RGB) or H x W x 4 (RGBA), with dtype uint8,
    uint16 (scaled to 8 bits, ``round(v / 257)``) or float in [0, 1] (``round(v * 255)``).

    ``max_pixels`` limits width x height (``None``: no limit of ours; Pillow's own error at about 179 M pixels still
    applies and is reported as :class:`ImageError`) and ``max_aspect_ratio`` the long side over the short side
    (``None``: no limit). For encoded input both are checked from the header before any pixel is decoded, which
    defuses decompression bombs and thin strips that preprocessing would blow up. Then the whole image is decoded, so
    truncated files fail here and not halfway through preprocessing. Multi-frame files (animated GIF, PNG or WebP,
    multi-page TIFF) give their first frame; the other frames are never decoded. ``formats`` restricts the file
    formats tried (Pillow format names such as ``"PNG"``, ``"JPEG"``, ``"WEBP"``; names this Pillow cannot open
    are ignored; ``None``: every format Pillow reads), for input from untrusted sources. A path must name a regular
    file: a FIFO or a device is refused before it is opened, so reading never blocks on one or reads forever.

    Conversion to RGB follows the official ``.convert("RGB")`` (alpha dropped, palette expanded, CMYK converted
    naively, no ICC colour management), except that 16/32-bit and float images are scaled to 8 bits and
    ``background`` (when given) composites images with transparency onto that colour. ``exif_transpose`` applies
    the EXIF orientation (the official code does not). A malformed EXIF block is ignored, not an error.

    Raises :class:`ImageError` (a ``ValueError``) for a missing or empty file, a path that is not a regular file,
    empty data, data that is not an image (or not in ``formats``), truncated or corrupt data, a zero-size image, an
    image over ``max_pixels`` or ``max_aspect_ratio``, an unsupported array shape or dtype, or an unsupported source
    type.
    """
    return _load(source, _limits(max_pixels, max_aspect_ratio, formats), exif_transpose=exif_transpose,
                 background=background)


def _limits(max_pixels: int | None, max_aspect_ratio: float | None, formats: Sequence[str] | None,
            check: Callable[[int, int, str], None] | None = None) -> _Limits:
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive or None, got {max_pixels}")
    if max_aspect_ratio is not None and not max_aspect_ratio >= 1:
        raise ValueError(f"max_aspect_ratio must be at least 1 or None, got {max_aspect_ratio}")
    if isinstance(formats, str):
        raise ValueError(f"formats must be a sequence of format names, not the string {formats!r}")
    names = None
    if formats is not None:
        Image.init()  # registers every plugin, so that Image.OPEN lists what this Pillow can open
        # MPO is opened by the JPEG plugin, and AVIF needs a Pillow built with libavif: names it cannot open are moot.
        names = tuple(dict.fromkeys(n for n in (str(f).upper() for f in formats) if n in Image.OPEN))
        if "MPO" in (str(f).upper() for f in formats) and "JPEG" not in names:
            names += ("JPEG",)
    return _Limits(max_pixels, max_aspect_ratio, names, check)


def _load(source: ImageSource, limits: _Limits, *, exif_transpose: bool = True,
          background: tuple[int, int, int] | None = None) -> Image.Image:
    """:func:`load_image` under ``limits``."""
    if isinstance(source, Image.Image):
        image = _load_pil(source, "PIL image", limits)
        owned = False
    elif isinstance(source, np.ndarray):
        image = _from_array(source, limits)
        owned = True
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        image = _decode_bytes(data, f"image data ({len(data)} bytes)", limits)
        owned = True
    elif isinstance(source, str) and source[:5].lower() == "data:":
        image = _decode_bytes(_parse_data_url(source), "data URL", limits)
        owned = True
    elif isinstance(source, str) and source.lower().startswith(("http://", "https://")):
        raise ImageError(f"remote URLs are not fetched; download the image first: {source[:200]!r}")
    elif isinstance(source, (str, os.PathLike)):
        if not os.fspath(source):
            raise ImageError("empty image path")
        image = _decode_path(Path(source), limits)
        owned = True
    elif hasattr(source, "read"):
        image = _decode_bytes(_read_stream(source), "file object", limits)
        owned = True
    else:
        raise ImageError(f"unsupported image source type {type(source).__name__}")
    try:
        rgb = _finish(image, exif_transpose=exif_transpose, background=background)
    finally:
        if owned:
            image.close()
    return rgb


def _check_dims(width: int, height: int, limits: _Limits, what: str) -> None:
    """The header checks: size, pixel count, aspect ratio, then the caller's own."""
    if width <= 0 or height <= 0:
        raise ImageError(f"{what}: zero-size image ({width}x{height})")
    max_pixels = limits.max_pixels
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"{what}: image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(max_pixels; a possible decompression bomb)"
        )
    check_aspect_ratio(width, height, limits.max_aspect_ratio, what)
    if limits.check is not None:
        limits.check(width, height, what)


def check_aspect_ratio(width: int, height: int, max_aspect_ratio: float | None, what: str = "image") -> None:
    """Raise :class:`ImageError` when the long side of ``width`` x ``height`` over its short side is above
    ``max_aspect_ratio`` (``None``: no limit)."""
    if max_aspect_ratio is None or width <= 0 or height <= 0:
        return
    long, short = max(width, height), min(width, height)
    if long > max_aspect_ratio * short:
        raise ImageError(
            f"{what}: image is {width}x{height}, an aspect ratio of {long / short:,.1f}:1, over the limit of "
            f"{max_aspect_ratio:g}:1 (max_aspect_ratio); crop or pad it to a less extreme shape"
        )


def _decode_path(path: Path, limits: _Limits) -> Image.Image:
    what = f"image file {str(path)!r}"
    try:
        info = path.stat()
    except FileNotFoundError as exc:
        raise ImageError(f"{what}: file not found") from exc
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ImageError(f"{what}: cannot access it ({exc})") from exc
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{what}: is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        # Opening a FIFO blocks until a writer comes, and a device such as /dev/zero never ends.
        raise ImageError(f"{what}: not a regular file (a FIFO, socket or device)")
    if info.st_size == 0:
        raise ImageError(f"{what}: file is empty")
    return _decode(path, what, limits)  # Pillow reads the header first, so a huge file is not read in full


def _read_stream(stream: Any) -> bytes:
    try:
        data = stream.read()
    except OSError as exc:
        raise ImageError(f"file object: cannot read it ({exc})") from exc
    if isinstance(data, str):
        raise ImageError("file object: opened in text mode; open image files with 'rb'")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"file object: read() returned {type(data).__name__}, expected bytes")
    return bytes(data)


def _parse_data_url(url: str) -> bytes:
    """The payload of a ``data:[<media type>][;base64],<data>`` URL (RFC 2397); the media type must be image/*."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise ImageError("data URL: malformed, no ',' between the header and the data")
    params = [part.strip().lower() for part in header[5:].split(";")]
    media_type, is_base64 = params[0], "base64" in params[1:]
    if media_type and not media_type.startswith("image/"):
        raise ImageError(f"data URL: media type is {media_type!r}, expected image/*")
    if not is_base64:
        return urllib.parse.unquote_to_bytes(payload)
    text = "".join(urllib.parse.unquote(payload).split())
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"data URL: invalid base64 data ({exc})") from exc


def _decode_bytes(data: bytes, what: str, limits: _Limits) -> Image.Image:
    if not data:
        raise ImageError(f"{what}: empty data")
    return _decode(io.BytesIO(data), what, limits)


def _decode(source: Path | BinaryIO, what: str, limits: _Limits) -> Image.Image:
    """Open ``source``, check the header's size against ``limits``, then decode every pixel."""
    try:
        with warnings.catch_warnings():
            # Our own limit (checked next) is the guard; Pillow's warning would be noise or come too late.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source, formats=limits.formats)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{what}: image too large, a possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        if limits.formats is not None:
            raise ImageError(f"{what}: not an image in an accepted format ({', '.join(limits.formats)})") from exc
        raise ImageError(f"{what}: not an image, or a format Pillow cannot read") from exc
    except Exception as exc:  # unreadable file, or one of the many types Pillow's plugins raise for bad headers
        raise ImageError(f"{what}: cannot read the image header ({type(exc).__name__}: {exc})") from exc
    try:
        _check_dims(image.width, image.height, limits, what)
        _force_load(image, what)
    except BaseException:
        image.close()
        raise
    return image


def _force_load(image: Image.Image, what: str) -> None:
    """Decode every pixel now, so truncation and corruption surface as :class:`ImageError` here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{what}: image too large, a possible decompression bomb ({exc})") from exc
    except Exception as exc:
        raise ImageError(f"{what}: truncated or corrupt image data ({type(exc).__name__}: {exc})") from exc


def _load_pil(image: Image.Image, what: str, limits: _Limits) -> Image.Image:
    _check_dims(image.width, image.height, limits, what)
    _force_load(image, what)  # a lazily opened Image.open(...) is decoded here
    return image


def _from_array(array: np.ndarray, limits: _Limits) -> Image.Image:
    """A channels-last uint8/uint16/float array as an L, RGB or RGBA image."""
    what = f"array of shape {tuple(array.shape)} and dtype {array.dtype}"
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        hint = " (channels-first? transpose to H x W x C)" if array.ndim == 3 and array.shape[0] in (1, 3, 4) else ""
        raise ImageError(f"{what}: unsupported shape, expected H x W, H x W x 1, H x W x 3 or H x W x 4{hint}")
    _check_dims(array.shape[1], array.shape[0], limits, what)
    if array.dtype == np.uint8:
        u8 = array
    elif array.dtype == np.uint16:
        u8 = _uint16_to_uint8(array)
    elif np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float64)
        if not np.isfinite(values).all():
            raise ImageError(f"{what}: float pixels must be finite")
        low, high = float(values.min()), float(values.max())
        if low < 0.0 or high > 1.0:
            raise ImageError(f"{what}: float pixels must lie in [0, 1], got [{low:g}, {high:g}]")
        u8 = np.rint(values * 255.0).astype(np.uint8)
    else:
        raise ImageError(f"{what}: unsupported dtype {array.dtype}, expected uint8, uint16 or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(u8))


def _uint16_to_uint8(values: np.ndarray) -> np.ndarray:
    """``round(v / 257)``: 0 -> 0 and 65535 -> 255, in exact integer arithmetic (a table of all 65536 levels)."""
    return _U16_TABLE[values]


_U16_TABLE = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
#: Rows per block when wide gray levels are converted: temporaries stay a few MB, whatever the image size, instead
#: of several times the image (a 16-bit PNG of 100 kB can hold 64 M pixels).
_BLOCK_PIXELS = 1 << 18


def _finish(image: Image.Image, *, exif_transpose: bool, background: tuple[int, int, int] | None) -> Image.Image:
    if exif_transpose:
        try:
            oriented = ImageOps.exif_transpose(image)
        except Exception:  # a malformed EXIF block: keep the stored orientation
            oriented = None
        image = oriented if oriented is not None else image
    return _to_rgb(image, background)


def _to_rgb(image: Image.Image, background: tuple[int, int, int] | None = None) -> Image.Image:
    """A new RGB image with the pixels of ``image`` (see :func:`load_image` for the rules per mode)."""
    mode = image.mode
    if mode in _INT16_MODES or mode in ("I", "F"):
        return Image.fromarray(_wide_gray_to_uint8(np.asarray(image), mode)).convert("RGB")
    has_alpha = mode in _ALPHA_MODES or "transparency" in image.info
    try:
        with warnings.catch_warnings():
            # "Palette images with Transparency expressed in bytes should be converted to RGBA": dropping the
            # alpha is deliberate (it is what the official .convert("RGB") does).
            warnings.simplefilter("ignore", UserWarning)
            if background is not None and has_alpha:
                rgba = image.convert("RGBA")
                canvas = Image.new("RGBA", rgba.size, (*_rgb_triple(background), 255))
                return Image.alpha_composite(canvas, rgba).convert("RGB")
            return image.convert("RGB")  # for an RGB image this is a copy
    except ValueError as exc:
        raise ImageError(f"image mode {mode!r}: cannot convert it to RGB ({exc})") from exc


def _wide_gray_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit integer or float gray levels -> uint8.

    ``I;16*`` is 16-bit by definition: ``round(v / 257)``. ``I`` (32-bit) is read as 16-bit when any value exceeds
    255 (16-bit PNG and TIFF files) and as 8-bit otherwise (``convert("I")`` of an 8-bit image); values are clipped
    to the range first. ``F`` is read as [0, 1] when all values lie there, else as 0..255 and clipped like Pillow's
    own conversion; NaN becomes 0. Converted block by block, so memory beyond the input and output stays small.
    """
    if mode in _INT16_MODES:
        return _uint16_to_uint8(values)
    out = np.empty(values.shape, dtype=np.uint8)
    if not values.size:
        return out
    blocks = _row_blocks(values)
    if mode == "I":
        sixteen = int(values.max()) > 255
        for rows in blocks:
            if sixteen:
                out[rows] = _uint16_to_uint8(np.clip(values[rows], 0, 65535))
            else:
                out[rows] = np.clip(values[rows], 0, 255)
        return out
    unit = True
    for rows in blocks:
        block = _finite(values[rows])
        unit = unit and float(block.min()) >= 0.0 and float(block.max()) <= 1.0
    for rows in blocks:
        floats = _finite(values[rows])
        if unit:
            floats *= 255.0
        np.rint(floats, out=floats)
        out[rows] = np.clip(floats, 0, 255, out=floats)
    return out


def _row_blocks(values: np.ndarray) -> list[slice]:
    step = max(1, _BLOCK_PIXELS // max(1, values.shape[1] if values.ndim > 1 else 1))
    return [slice(top, top + step) for top in range(0, values.shape[0], step)]


def _finite(values: np.ndarray) -> np.ndarray:
    """float64 copy with NaN -> 0, +inf -> 255, -inf -> 0 (Pillow's own conversion saturates infinities)."""
    return np.nan_to_num(values.astype(np.float64), copy=False, nan=0.0, posinf=255.0, neginf=0.0)


def _rgb_triple(color: Iterable[int]) -> tuple[int, int, int]:
    triple = tuple(int(c) for c in color)
    if len(triple) != 3 or not all(0 <= c <= 255 for c in triple):
        raise ValueError(f"background must be three integers in 0..255, got {color!r}")
    return triple  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------ square shapes
def expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """The official ``expand2square``: letterbox ``image`` to a square of its longer edge filled with ``background``.

    The image is pasted at ``(0, (w - h) // 2)`` for a wide image and at ``((h - w) // 2, 0)`` for a tall one, so an
    odd margin puts the extra pixel after the image. A square image is returned as is.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def stretch_to_square(image: Image.Image) -> Image.Image:
    """The official ``image.resize((max_edge, max_edge))``: stretch to a square of the longer edge, bicubic.

    The official call names no filter. Pillow's default for RGB (and every mode but "1", "P" and the ``;``-modes)
    has been bicubic since Pillow 7, so bicubic is used here explicitly, whatever the processor's ``resample``.
    """
    side = max(image.size)
    return image.resize((side, side), Image.Resampling.BICUBIC)


# ----------------------------------------------------------------------------------------------------- the processor
class ImageProcessor:
    """The official preprocessing: an optional square policy, then transformers-4.31 ``CLIPImageProcessor``.

    The keyword arguments are the ``preprocessor_config.json`` fields; the defaults are the released checkpoint's
    (``MAGAer13/mplug-owl2-llama2-7b``): shortest edge 448, bicubic, centre crop 448, rescale 1/255, CLIP mean/std.
    ``size`` may be an int (the shortest edge, the released form), ``{"shortest_edge": n}`` or
    ``{"height": h, "width": w}`` (resize to exactly that, ignoring the aspect ratio, as newer transformers do).
    ``crop_size`` may be an int or ``{"height": h, "width": w}``. ``default_policy`` is the policy used when a call
    passes none (``"stretch"``, the official README's and evaluation scripts' choice; see the module docstring).

    ``preprocess`` gives one [3, H, W] float32 tensor, ``__call__`` a batch [N, 3, H, W]; (H, W) is ``output_size``
    (448 x 448 for the release). Both take anything :func:`load_image` accepts. A ``PIL.Image.Image`` is used as given
    (converted to RGB like :func:`load_image`, but without EXIF transposition or a limit on its own pixels), so the
    same PIL image gives exactly the official ``pixel_values``. Every other source goes through :func:`load_image`
    with this processor's ``max_pixels`` and ``max_aspect_ratio``.

    ``max_pixels`` and ``max_aspect_ratio`` are not part of the checkpoint's config: they bound the work of one call.
    Every image, PIL ones included, must have an aspect ratio of at most ``max_aspect_ratio`` (``None``: any), and
    no image the policy or the resize creates may exceed ``max_pixels`` (``None``: no bound), see
    :meth:`check_size`. For encoded sources both are checked from the header, before any pixel is decoded.
    """

    def __init__(
        self,
        *,
        do_resize: bool = True,
        size: int | Mapping[str, int] = _RELEASE_SIZE,
        resample: int = int(Image.Resampling.BICUBIC),
        do_center_crop: bool = True,
        crop_size: int | Mapping[str, int] = _RELEASE_SIZE,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        default_policy: str = DEFAULT_POLICY,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
    ) -> None:
        self.do_resize = bool(do_resize)
        self.size = _size_dict(size, "size", shortest_edge_ok=True)
        if int(resample) not in _RESAMPLE_NAMES:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE_NAMES)} (PIL filters), got {resample!r}")
        self.resample = int(resample)
        self.do_center_crop = bool(do_center_crop)
        self.crop_size = _size_dict(crop_size, "crop_size", shortest_edge_ok=False)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = _three_floats(image_mean, "image_mean")
        self.image_std = _three_floats(image_std, "image_std")
        if any(s == 0.0 for s in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")
        self.default_policy = _check_policy(default_policy)
        _limits(max_pixels, max_aspect_ratio, None)  # validates both
        self.max_pixels = max_pixels
        self.max_aspect_ratio = max_aspect_ratio
        #: The policy the checkpoint's ``config.json`` names (``image_aspect_ratio``), set by
        #: :func:`load_image_processor`; it overrides a task's own default policy in evaluation.
        self.checkpoint_policy: str | None = None
        self._table = self._value_table()

    # -------------------------------------------------------------------------------------------- configuration
    @classmethod
    def from_dict(cls, config: Mapping[str, Any], **overrides: Any) -> ImageProcessor:
        """Build from a ``preprocessor_config.json`` dict; unknown keys (``feature_extractor_type``, ...) are ignored.

        ``do_convert_rgb`` is ignored too: images are always converted to RGB, as the model needs three channels.
        """
        known = (
            "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std",
        )  # fmt: skip
        kwargs = {key: config[key] for key in known if key in config and config[key] is not None}
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The configuration in ``preprocessor_config.json`` form (sizes as dicts, the newer transformers form)."""
        return {
            "crop_size": dict(self.crop_size),
            "do_center_crop": self.do_center_crop,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": dict(self.size),
        }

    def __repr__(self) -> str:
        return f"ImageProcessor(default_policy={self.default_policy!r}, {self.to_dict()})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageProcessor):
            return NotImplemented
        return self.to_dict() == other.to_dict() and self.default_policy == other.default_policy

    __hash__ = None  # type: ignore[assignment]  # mutable attributes

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of every output, or ``None`` when it depends on the input (no crop, shortest-edge resize)."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        return None

    @property
    def pad_color(self) -> tuple[int, ...]:
        """The ``pad`` policy's background, as the official code computes it: ``int(m * 255)`` per channel."""
        return tuple(int(m * 255) for m in self.image_mean)

    # -------------------------------------------------------------------------------------------------- running
    def preprocess(self, image: ImageSource, policy: str | None = None) -> torch.Tensor:
        """One image -> float32 tensor [3, H, W] (``policy``: ``"stretch"``, ``"pad"`` or ``"crop"``; ``None``:
        ``default_policy``)."""
        policy = self.default_policy if policy is None else _check_policy(policy)
        if isinstance(image, Image.Image):
            self.check_size(image.width, image.height, policy, "PIL image")
            _force_load(image, "PIL image")
            rgb = _to_rgb(image)
        else:
            def check(width: int, height: int, what: str) -> None:
                self.check_size(width, height, policy, what)

            rgb = _load(image, _limits(self.max_pixels, self.max_aspect_ratio, None, check))
        if policy == "pad":
            rgb = expand_to_square(rgb, self.pad_color)
        elif policy == "stretch":
            rgb = stretch_to_square(rgb)
        return torch.from_numpy(self._clip(rgb))

    def check_size(self, width: int, height: int, policy: str | None = None, what: str = "image") -> None:
        """Raise :class:`ImageError` when :meth:`preprocess` of a ``width`` x ``height`` image under ``policy``
        (``None``: ``default_policy``) would go over this processor's limits: an aspect ratio over
        ``max_aspect_ratio``, or a step creating an image of more than ``max_pixels`` pixels (the square of ``pad``
        and ``stretch``, then the resize). Called by :meth:`preprocess` from the image's header, before decoding."""
        policy = self.default_policy if policy is None else _check_policy(policy)
        check_aspect_ratio(width, height, self.max_aspect_ratio, what)
        limit = self.max_pixels
        if limit is None or width <= 0 or height <= 0:
            return
        if policy in ("pad", "stretch") and width != height:
            side = max(width, height)
            if side * side > limit:
                raise ImageError(
                    f"{what}: image is {width}x{height}; the {policy!r} policy would make a {side}x{side} square "
                    f"= {side * side:,} pixels, over the limit of {limit:,} (max_pixels); downscale the image, or "
                    "use the 'crop' policy"
                )
            shape = f"{width}x{height}, made a {side}x{side} square by the {policy!r} policy"
            width = height = side
        else:
            shape = f"{width}x{height}"
        if self.do_resize:
            new_width, new_height = self._resize_target(width, height)
            if new_width * new_height > limit:
                raise ImageError(
                    f"{what}: image is {shape}; resizing it to {new_width}x{new_height} = "
                    f"{new_width * new_height:,} pixels is over the limit of {limit:,} (max_pixels)"
                )

    def __call__(self, images: ImageSource | Sequence[ImageSource], policy: str | None = None) -> torch.Tensor:
        """Images -> float32 batch [N, 3, H, W]. A list or tuple is a batch; anything else is one image (N = 1).

        An empty list gives [0, 3, H, W] when ``output_size`` is fixed. Outputs of different sizes (only possible
        without a centre crop) raise ``ValueError``.
        """
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            if self.output_size is None:
                raise ValueError("no images, and the output size is not fixed (no centre crop)")
            return torch.empty(0, 3, *self.output_size)
        tensors = [self.preprocess(image, policy) for image in batch]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(f"images preprocess to different shapes {sorted(shapes)}; enable the centre crop")
        return torch.stack(tensors)

    # ------------------------------------------------------------------------------------------------ internals
    def _value_table(self) -> np.ndarray:
        """[3, 256] float32: the rescaled and normalised value of each 8-bit level, per channel.

        Rescale is ``float32(float64(u8) * rescale_factor)`` (numpy promotes uint8 times a Python float to float64,
        then transformers casts to float32) and normalise is ``(x - mean) / std`` in float32, as in transformers 4.31.
        Both depend only on the level, so a lookup reproduces them bit for bit.
        """
        levels = np.arange(256, dtype=np.uint8)
        values = (levels * self.rescale_factor).astype(np.float32) if self.do_rescale else levels.astype(np.float32)
        table = np.stack([values] * 3)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None]
            table = (table - mean) / std
        return np.ascontiguousarray(table, dtype=np.float32)

    def _clip(self, rgb: Image.Image) -> np.ndarray:
        """The CLIP processor on an RGB image: resize, centre crop, rescale + normalise -> [3, H, W] float32."""
        if self.do_resize:
            target = self._resize_target(rgb.width, rgb.height)
            rgb = rgb.resize(target, Image.Resampling(self.resample))
        pixels = np.asarray(rgb)
        if self.do_center_crop:
            pixels = _center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
        for channel in range(3):
            np.take(self._table[channel], pixels[:, :, channel], out=out[channel])
        return out

    def _resize_target(self, width: int, height: int) -> tuple[int, int]:
        """(W, H) after the resize: transformers-4.31 ``get_resize_output_image_size`` (long edge truncated)."""
        if "height" in self.size:
            return self.size["width"], self.size["height"]
        short_target = self.size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(short_target * long / short)
        return (short_target, new_long) if width <= height else (new_long, short_target)


def _center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """transformers-4.31 ``center_crop`` on H x W x C: offsets ``(h - ch) // 2``.

    An image smaller than the crop is first centred on zeros (offset ``(ch - h) // 2``), as transformers does. For an
    odd difference transformers 4.31 then returns one row (column) short of the crop; this returns the full crop,
    i.e. the same pixels plus one more row (column) of zeros. The released config never reaches this branch: the
    resize makes the short edge equal to the crop.
    """
    height, width = pixels.shape[:2]
    if height < crop_height or width < crop_width:
        new_height, new_width = max(crop_height, height), max(crop_width, width)
        padded = np.zeros((new_height, new_width, *pixels.shape[2:]), dtype=pixels.dtype)
        top_pad, left_pad = (new_height - height) // 2, (new_width - width) // 2
        padded[top_pad : top_pad + height, left_pad : left_pad + width] = pixels
        pixels, height, width = padded, new_height, new_width
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return pixels[top : top + crop_height, left : left + crop_width]


def _size_dict(value: int | Mapping[str, int], name: str, *, shortest_edge_ok: bool) -> dict[str, int]:
    """An int or a transformers size dict -> ``{"shortest_edge": n}`` or ``{"height": h, "width": w}``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a size dict, got {value!r}")
    if isinstance(value, int):
        result = {"shortest_edge": value} if shortest_edge_ok else {"height": value, "width": value}
    elif isinstance(value, Mapping):
        keys = set(value)
        if keys == {"height", "width"}:
            result = {"height": value["height"], "width": value["width"]}
        elif keys == {"shortest_edge"} and shortest_edge_ok:
            result = {"shortest_edge": value["shortest_edge"]}
        else:
            allowed = '{"shortest_edge": n} or ' if shortest_edge_ok else ""
            raise ValueError(f"{name} must be an int, {allowed}{{'height': h, 'width': w}}, got {dict(value)!r}")
    else:
        raise ValueError(f"{name} must be an int or a size dict, got {value!r}")
    for key, side in result.items():
        if isinstance(side, bool) or not isinstance(side, int) or side <= 0:
            raise ValueError(f"{name}[{key!r}] must be a positive int, got {side!r}")
    return result


def _three_floats(values: Sequence[float], name: str) -> tuple[float, float, float]:
    floats = tuple(float(v) for v in values)
    if len(floats) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {len(floats)}")
    return floats  # type: ignore[return-value]


def _check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown image policy {policy!r}; expected one of {', '.join(POLICIES)}")
    return policy


def policy_of_aspect_ratio(value: Any) -> str | None:
    """The policy that a checkpoint's ``image_aspect_ratio`` (``config.json``) selects in the official
    ``process_images``: ``"pad"`` letterboxes, ``"resize"`` stretches, any other value (training's ``"square"``)
    leaves the image to the CLIP step alone (``crop``). ``None`` when the key is absent."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"image_aspect_ratio must be a string, got {value!r}")
    return {"pad": "pad", "resize": "stretch"}.get(value, "crop")


def checkpoint_policy(directory: str | os.PathLike[str]) -> str | None:
    """The image policy named by ``image_aspect_ratio`` in the ``config.json`` of a checkpoint directory, if any.

    The Q-Align family's checkpoints say ``"pad"``; the released mPLUG-Owl2 says nothing."""
    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        return None
    value = read_json_object(config_path).get("image_aspect_ratio")
    try:
        return policy_of_aspect_ratio(value)
    except ValueError as exc:
        raise ValueError(f"{config_path}: {exc}") from None


def load_image_processor(path: str | os.PathLike[str]) -> ImageProcessor:
    """The :class:`ImageProcessor` for a checkpoint directory (its ``preprocessor_config.json``) or a config file.

    A directory without ``preprocessor_config.json`` gives the defaults, which equal the released checkpoint's config
    (converted checkpoints may not carry the file). For a directory, ``image_aspect_ratio`` in its ``config.json``
    sets ``default_policy`` and ``checkpoint_policy`` (:func:`checkpoint_policy`). A path that does not exist raises
    ``FileNotFoundError``; a file that is not a JSON object, or holds invalid values, raises ``ValueError``.
    """
    path = Path(path)
    named = None
    if path.is_dir():
        named = checkpoint_policy(path)
        config_path = path / PREPROCESSOR_CONFIG_NAME
        if not config_path.is_file():
            processor = ImageProcessor(default_policy=named or DEFAULT_POLICY)
            processor.checkpoint_policy = named
            return processor
    elif path.is_file():
        config_path = path
    else:
        raise FileNotFoundError(f"no checkpoint directory or preprocessor config at {str(path)!r}")
    config = read_json_object(config_path)
    try:
        processor = ImageProcessor.from_dict(config, default_policy=named or DEFAULT_POLICY)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_path}: {exc}") from exc
    processor.checkpoint_policy = named
    return processor
