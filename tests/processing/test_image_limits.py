"""Hostile images for the library: thin strips that every policy would blow up, squares too large to make, FIFOs and
devices, 16-bit and float images that are small on disk and large in memory, animated and EXIF-rotated files.
Each is refused with a one-line :class:`ImageError` before the costly step, or handled in bounded memory."""

from __future__ import annotations

import io
import os
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import owl2
from owl2.processing.image import (
    DEFAULT_MAX_ASPECT_RATIO,
    POLICIES,
    ImageError,
    ImageProcessor,
    check_aspect_ratio,
    load_image,
)
from tests.conftest import in_thread


def png(image: Image.Image, **save_kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **save_kwargs)
    return buffer.getvalue()


def header_only_png(width: int, height: int) -> bytes:
    """A PNG header announcing width x height, then garbage: decoding it fails, so an error that names the size
    proves the check came first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")




# ------------------------------------------------------------------------------------------ thin strips, big squares
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("size", [(1, 20000), (20000, 1), (1, 100000), (3, 400)])
def test_thin_strips_are_refused_before_decoding_under_every_policy(policy: str, size: tuple[int, int]) -> None:
    """A 162-byte 1 x 20000 PNG made ``pad`` and ``stretch`` allocate a 20000 x 20000 square (1 x 100000: 30 GB)."""
    width, height = size
    processor = ImageProcessor()
    for source in (header_only_png(width, height), Image.new("RGB", size)):
        with pytest.raises(ImageError, match=rf"image is {width}x{height}, an aspect ratio of .* over the limit of "
                                             r"100:1 \(max_aspect_ratio\)"):
            processor.preprocess(source, policy)
    with pytest.raises(ImageError, match="aspect ratio"):
        load_image(header_only_png(width, height))


@pytest.mark.parametrize("policy", ["pad", "stretch"])
def test_squares_over_the_pixel_limit_are_refused_before_decoding(policy: str) -> None:
    processor = ImageProcessor()
    with pytest.raises(ImageError, match=rf"image is 90x9000; the '{policy}' policy would make a 9000x9000 square "
                                         r"= 81,000,000 pixels, over the limit of 67,108,864"):
        processor.preprocess(header_only_png(90, 9000), policy)
    small = ImageProcessor(max_pixels=500 * 500)
    with pytest.raises(ImageError, match="square = 360,000 pixels"):
        small.preprocess(Image.new("RGB", (60, 600)), policy)
    assert small.preprocess(Image.new("RGB", (60, 450)), policy).shape == (3, 448, 448)


def test_the_resize_of_every_policy_is_bounded_too() -> None:
    """``crop`` makes no square, but its shortest-edge resize grows with the aspect ratio."""
    processor = ImageProcessor(max_pixels=10**6)
    with pytest.raises(ImageError, match=r"image is 100x1000; resizing it to 448x4480 = 2,007,040 pixels"):
        processor.preprocess(Image.new("RGB", (100, 1000)), "crop")
    with pytest.raises(ImageError, match=r"made a 1000x1000 square by the 'pad' policy; resizing it to 2240x448 = "):
        ImageProcessor(max_pixels=10**6, size={"height": 448, "width": 448 * 5}).preprocess(
            Image.new("RGB", (100, 1000)), "pad")
    assert processor.preprocess(Image.new("RGB", (100, 300)), "crop").shape == (3, 448, 448)


def test_limits_can_be_lifted_and_are_validated() -> None:
    lifted = ImageProcessor(max_aspect_ratio=None, max_pixels=None)
    assert lifted.preprocess(Image.new("RGB", (2, 500)), "pad").shape == (3, 448, 448)
    assert load_image(png(Image.new("RGB", (1, 300))), max_aspect_ratio=None).size == (1, 300)
    assert load_image(png(Image.new("RGB", (1, 300))), max_aspect_ratio=300).size == (1, 300)
    for bad in (0, 0.5, float("nan")):
        with pytest.raises(ValueError, match="max_aspect_ratio"):
            load_image(png(Image.new("RGB", (4, 4))), max_aspect_ratio=bad)
        with pytest.raises(ValueError, match="max_aspect_ratio"):
            ImageProcessor(max_aspect_ratio=bad)
    with pytest.raises(ValueError, match="max_pixels"):
        ImageProcessor(max_pixels=0)
    assert DEFAULT_MAX_ASPECT_RATIO == 100
    check_aspect_ratio(100, 1, 100)  # exactly at the limit is fine
    with pytest.raises(ImageError, match="101x1"):
        check_aspect_ratio(101, 1, 100)


def test_the_library_api_refuses_thin_strips(tiny_pipeline, tmp_path: Path) -> None:
    """``owl2.load(...).chat`` and ``.rate`` with a thin strip: a clear ImageError, for every policy."""
    strip = tmp_path / "strip.png"
    strip.write_bytes(png(Image.new("RGB", (1, 20000), "red")))
    for policy in POLICIES:
        pipe = owl2.Pipeline(tiny_pipeline.model, tiny_pipeline.tokenizer, tiny_pipeline.image_processor,
                             policy=policy)
        with pytest.raises(ImageError, match=r"strip.png'?: image is 1x20000, an aspect ratio"):
            pipe.chat("What is it?", images=strip, max_new_tokens=1)
        frames = [Image.new("RGB", (20000, 1))] * 2  # a video of thin frames
        with pytest.raises(ValueError, match="aspect ratio"):
            pipe.rate([frames])


def test_videos_with_thin_frames_are_refused(tiny_pipeline, tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    path = tmp_path / "thin.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=2)
        stream.width, stream.height, stream.pix_fmt = 4, 600, "yuv420p"
        for _ in range(4):
            frame = av.VideoFrame.from_ndarray(np.zeros((600, 4, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(ValueError, match=r"image is 4x600, an aspect ratio of 150\.0:1"):
        tiny_pipeline.rate([path])


# --------------------------------------------------------------------------------------------- files that block
def test_fifos_and_devices_are_refused_without_opening_them(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), Path("/dev/urandom")):
        outcome = in_thread(lambda path=path: load_image(path), limit=5.0)
        assert isinstance(outcome, ImageError) and "not a regular file" in str(outcome), (path, outcome)
    with pytest.raises(ImageError, match="cannot access it"):
        load_image("a\x00b.png")


# ------------------------------------------------------------------------------------------ formats, frames, modes
def test_formats_restricts_what_is_decoded() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "BMP")
    assert load_image(buffer.getvalue()).size == (8, 8)
    with pytest.raises(ImageError, match=r"not an image in an accepted format \(PNG\)"):
        load_image(buffer.getvalue(), formats=["png", "NO-SUCH-FORMAT"])
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(jpeg, "JPEG")
    assert load_image(jpeg.getvalue(), formats=["MPO"]).size == (8, 8)  # the JPEG plugin opens MPO files
    with pytest.raises(ValueError, match="not the string"):
        load_image(jpeg.getvalue(), formats="JPEG")


def test_a_long_animation_decodes_one_frame() -> None:
    frames = [Image.new("RGB", (64, 64), (i, 0, 255 - i)) for i in range(0, 256, 1)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:])  # an APNG of 256 frames
    started = time.monotonic()
    image = load_image(buffer.getvalue())
    assert time.monotonic() - started < 1.0 and image.getpixel((3, 3)) == (0, 0, 255)


@pytest.mark.parametrize("mode, dtype, value, fmt", [("I;16", np.uint16, 40000, "PNG"), ("I", np.int32, 40000, "TIFF"),
                                                     ("F", np.float32, 0.5, "TIFF")])
def test_wide_gray_images_convert_in_bounded_memory(mode: str, dtype, value, fmt: str) -> None:
    """A 16-bit PNG of a few kB can hold 64 M pixels: converting it to 8 bits made several whole-image temporaries
    of 8 bytes a pixel (2.4 GB at 8000 x 8000). Now only the decoded pixels and the output are whole-image."""
    side = 2048
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side), value, dtype=dtype)).save(buffer, fmt)
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).mode == mode
    tracemalloc.start()
    try:
        image = load_image(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.getpixel((0, 0)) == ((156,) * 3 if mode != "F" else (128,) * 3)
    decoded = side * side * np.dtype(dtype).itemsize
    assert peak < 2.5 * decoded + 4 * 2**20, f"peak {peak / 2**20:.1f} MiB for {decoded / 2**20:.1f} MiB of {mode}"


def test_exif_orientation_cannot_dodge_the_limits_or_break_loading() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a 3 x 400 strip stands up as 400 x 3, still 133:1
    with pytest.raises(ImageError, match="aspect ratio"):
        load_image(png(Image.new("RGB", (3, 400)), exif=exif.tobytes()))
    for orientation in (0, 9, 65535):  # values outside 1..8 are ignored
        exif[0x0112] = orientation
        assert load_image(png(Image.new("RGB", (5, 3)), exif=exif.tobytes())).size == (5, 3)
    exif[0x0112] = 8
    assert load_image(png(Image.new("RGB", (5, 3)), exif=exif.tobytes())).size == (3, 5)
    big = Image.Exif()
    for tag in range(0x9000, 0x9000 + 2000):  # thousands of entries: parsed, then ignored
        big[tag] = "x" * 40
    big[0x0112] = 3
    assert load_image(png(Image.new("RGB", (5, 3)), exif=big.tobytes())).size == (5, 3)


@pytest.mark.parametrize("mode", ["CMYK", "P", "PA", "LA", "La", "RGBa", "1", "I;16B", "YCbCr", "LAB", "HSV"])
def test_every_mode_becomes_rgb_or_a_clear_error(mode: str) -> None:
    image = Image.new(mode, (6, 4))
    try:
        rgb = load_image(image)
    except ImageError as exc:
        assert "cannot convert it to RGB" in str(exc)
    else:
        assert rgb.mode == "RGB" and rgb.size == (6, 4)
