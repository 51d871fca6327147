"""Image loading and preprocessing: exact parity with the official outputs, every input kind, every rejection."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from owl2.processing.image import (
    DEFAULT_POLICY,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    POLICIES,
    ImageError,
    ImageProcessor,
    expand_to_square,
    load_image,
    load_image_processor,
    stretch_to_square,
)

PREPROC = Path(__file__).resolve().parents[1] / "fixtures" / "preproc"
MANIFEST = json.loads((PREPROC / "manifest.json").read_text())
FIXTURE_NAMES = sorted(MANIFEST["images"])
# The fixture files name the "crop" policy "plain" (the processor alone).
FIXTURE_POLICY = {"crop": "plain", "pad": "pad", "stretch": "stretch"}


@pytest.fixture(scope="module")
def processor() -> ImageProcessor:
    return load_image_processor(PREPROC)


def png_bytes(image: Image.Image, **save_kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **save_kwargs)
    return buffer.getvalue()


def gradient(width: int = 64, height: int = 40) -> Image.Image:
    """A small RGB image with distinct values everywhere, so flips, crops and channel swaps show."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but whose pixel data is garbage (never to be decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------- fixture parity
def fixture_reference(name: str, policy: str) -> np.ndarray:
    arrays = np.load(PREPROC / f"{name}.npz")
    aliases = dict(alias.split("=") for alias in arrays["aliases"])
    stored = FIXTURE_POLICY[policy]
    return arrays[f"pixel_values_{aliases.get(stored, stored)}"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_parity_is_exact(processor: ImageProcessor, name: str, policy: str) -> None:
    """Bit-exact: fp16 equal to the stored arrays, and the float32 bytes hash to the official float32 output's."""
    image = Image.open(PREPROC / f"{name}.png").convert("RGB")  # the official loader
    out = processor.preprocess(image, policy)
    assert out.dtype == torch.float32 and out.shape == (3, 448, 448)
    reference = fixture_reference(name, policy)
    np.testing.assert_array_equal(out.numpy().astype(np.float16), reference)
    recorded = MANIFEST["images"][name]["policies"][FIXTURE_POLICY[policy]]["sha256_float32"]
    assert hashlib.sha256(out.numpy().tobytes()).hexdigest() == recorded


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_parity_through_load_image(processor: ImageProcessor, name: str) -> None:
    """The path -> load_image route (any mode: the fixtures include L and RGBA PNGs) gives the same pixels."""
    batch = processor([PREPROC / f"{name}.png"], policy="pad")
    np.testing.assert_array_equal(batch[0].numpy().astype(np.float16), fixture_reference(name, "pad"))


def test_fixture_config_is_the_release() -> None:
    config = json.loads((PREPROC / "preprocessor_config.json").read_text())
    assert config == MANIFEST["preprocessor_config"]
    assert load_image_processor(PREPROC) == ImageProcessor()
    assert ImageProcessor().pad_color == tuple(MANIFEST["pad_background"]) == (122, 116, 104)


def test_resize_keeps_transformers_truncation() -> None:
    """Long edge ``int(448 * long / short)``: 448 * 512 / 251 = 913.8 -> 913 (rounding would give 914)."""
    processor = ImageProcessor()
    assert processor._resize_target(251, 512) == (448, 913)
    assert processor._resize_target(512, 277) == (828, 448)
    assert processor._resize_target(448, 448) == (448, 448)


def test_square_helpers_match_the_official_geometry() -> None:
    wide = Image.new("RGB", (7, 4), (255, 255, 255))
    square = expand_to_square(wide, (1, 2, 3))
    assert square.size == (7, 7)
    rows = np.asarray(square)[:, 0]
    # (7 - 4) // 2 = 1 row of background above, 2 below.
    assert [tuple(r) for r in rows] == [(1, 2, 3)] + [(255, 255, 255)] * 4 + [(1, 2, 3)] * 2
    tall = expand_to_square(Image.new("RGB", (4, 7), (255, 255, 255)), (1, 2, 3))
    assert [tuple(c) for c in np.asarray(tall)[0]] == [(1, 2, 3)] + [(255, 255, 255)] * 4 + [(1, 2, 3)] * 2
    same = Image.new("RGB", (5, 5))
    assert expand_to_square(same, (0, 0, 0)) is same
    image = gradient(30, 12)
    assert np.array_equal(np.asarray(stretch_to_square(image)), np.asarray(image.resize((30, 30))))


def test_default_policy_is_stretch() -> None:
    processor = ImageProcessor()
    assert DEFAULT_POLICY == processor.default_policy == "stretch"
    image = gradient(90, 50)
    stretched = processor.preprocess(image, "stretch")
    assert torch.equal(processor.preprocess(image), stretched)
    assert torch.equal(processor([image])[0], stretched)
    assert not torch.equal(processor.preprocess(image, "crop"), stretched)
    assert not torch.equal(processor.preprocess(image, "pad"), stretched)
    with pytest.raises(ValueError, match="unknown image policy 'resize'"):
        processor.preprocess(image, "resize")


# --------------------------------------------------------------------------------------------------- input kinds
def test_every_source_kind_gives_the_same_image(tmp_path: Path) -> None:
    path = PREPROC / "astronaut_tall_odd.png"
    expected = np.asarray(Image.open(path).convert("RGB"))
    data = path.read_bytes()
    data_url = "data:image/png;base64," + base64.b64encode(data).decode()
    sources: list[object] = [
        str(path),
        path,
        data,
        bytearray(data),
        memoryview(data),
        io.BytesIO(data),
        Image.open(path),
        expected.copy(),
        data_url,
        data_url[:40] + "\n" + data_url[40:],  # line-wrapped base64
    ]
    for source in sources:
        image = load_image(source)  # type: ignore[arg-type]
        assert image.mode == "RGB", type(source)
        np.testing.assert_array_equal(np.asarray(image), expected, err_msg=type(source).__name__)
    with path.open("rb") as handle:
        np.testing.assert_array_equal(np.asarray(load_image(handle)), expected)


def test_pil_input_is_not_modified_or_shared() -> None:
    original = gradient()
    before = np.asarray(original).copy()
    loaded = load_image(original)
    assert loaded is not original
    loaded.putpixel((0, 0), (1, 2, 3))
    np.testing.assert_array_equal(np.asarray(original), before)


def test_numpy_arrays() -> None:
    rgb = np.asarray(gradient())
    gray = rgb[:, :, 0]
    np.testing.assert_array_equal(np.asarray(load_image(gray)), np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(np.asarray(load_image(gray[:, :, None])), np.repeat(gray[:, :, None], 3, axis=2))
    rgba = np.concatenate([rgb, np.zeros_like(rgb[:, :, :1])], axis=2)
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), rgb)  # alpha dropped, colour kept
    wide = rgb.astype(np.uint16) * 257
    np.testing.assert_array_equal(np.asarray(load_image(wide)), rgb)
    for dtype in (np.float16, np.float32, np.float64):
        np.testing.assert_array_equal(np.asarray(load_image((rgb / 255).astype(dtype))), rgb)
    np.testing.assert_array_equal(np.asarray(load_image(rgb[:, ::-1])), rgb[:, ::-1])  # non-contiguous view
    assert ImageProcessor()(rgb).shape == (1, 3, 448, 448)


# ---------------------------------------------------------------------------------------------------------- modes
def p_with_transparency() -> Image.Image:
    image = Image.new("P", (16, 12), 0)
    image.putpalette([200, 10, 10, 10, 200, 10] + [0, 0, 0] * 254)
    image.paste(1, (8, 0, 16, 12))
    image.info["transparency"] = 0
    return image


MODE_IMAGES = {
    "RGBA": lambda: Image.new("RGBA", (16, 12), (10, 20, 30, 0)),
    "LA": lambda: Image.new("LA", (16, 12), (77, 0)),
    "P": lambda: gradient(16, 12).convert("P"),
    "P+transparency": p_with_transparency,
    "L": lambda: Image.new("L", (16, 12), 77),
    "1": lambda: Image.new("1", (16, 12), 1),
    "CMYK": lambda: Image.new("CMYK", (16, 12), (0, 255, 255, 0)),
    "I;16": lambda: Image.fromarray(np.full((12, 16), 65535, dtype=np.uint16)),
    "I": lambda: Image.fromarray(np.full((12, 16), 1000, dtype=np.int32)),
    "F": lambda: Image.fromarray(np.full((12, 16), 0.5, dtype=np.float32)),
}
# The colour of pixel (0, 0) after loading (alpha dropped, as the official .convert("RGB") does).
MODE_PIXEL = {
    "RGBA": (10, 20, 30),
    "LA": (77, 77, 77),
    "P+transparency": (200, 10, 10),
    "L": (77, 77, 77),
    "1": (255, 255, 255),
    "CMYK": (255, 0, 0),
    "I;16": (255, 255, 255),  # 16-bit white; Pillow's convert("RGB") would also give 255 here
    "I": (4, 4, 4),  # round(1000 / 257); Pillow's convert("RGB") would saturate to 255
    "F": (128, 128, 128),  # 0.5 of full scale; Pillow's convert("RGB") would give 0 or 1
}


@pytest.mark.parametrize("mode", sorted(MODE_IMAGES))
def test_every_mode_converts_and_preprocesses(mode: str) -> None:
    """In memory and after a file round trip (PNG, or TIFF for the modes PNG cannot write)."""
    source = MODE_IMAGES[mode]()
    assert source.mode == mode.split("+")[0]
    encoded = io.BytesIO()
    source.save(encoded, "TIFF" if mode in ("CMYK", "F", "I") else "PNG")
    for image in (source, Image.open(io.BytesIO(encoded.getvalue()))):
        loaded = load_image(image)
        assert loaded.mode == "RGB" and loaded.size == (16, 12)
        if mode in MODE_PIXEL:
            assert loaded.getpixel((0, 0)) == MODE_PIXEL[mode]
    batch = ImageProcessor()([source, encoded.getvalue()], policy="pad")
    assert batch.shape == (2, 3, 448, 448) and batch.dtype == torch.float32
    assert torch.equal(batch[0], batch[1])


def test_sixteen_bit_scaling() -> None:
    values = np.array([[0, 128, 257, 32896, 65535]], dtype=np.uint16)
    expected = [0, 0, 1, 128, 255]
    assert np.asarray(load_image(Image.fromarray(values)))[0, :, 0].tolist() == expected
    assert np.asarray(load_image(Image.fromarray(values.astype(np.int32))))[0, :, 0].tolist() == expected
    # A 16-bit PNG file round trip.
    reopened = Image.open(io.BytesIO(png_bytes(Image.fromarray(values))))
    assert reopened.mode.startswith("I")
    assert np.asarray(load_image(reopened))[0, :, 0].tolist() == expected
    # An "I" image that fits in 8 bits is read as 8 bits.
    assert np.asarray(load_image(Image.new("L", (3, 1), 200).convert("I")))[0, :, 0].tolist() == [200] * 3


def test_background_composites_transparency() -> None:
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    loaded = load_image(rgba, background=(255, 255, 255))
    assert loaded.getpixel((0, 0)) == (10, 20, 30)
    assert loaded.getpixel((1, 1)) == (255, 255, 255)
    assert load_image(p_with_transparency(), background=(0, 0, 255)).getpixel((0, 0)) == (0, 0, 255)
    assert load_image(Image.new("RGB", (2, 2), (5, 6, 7)), background=(0, 0, 0)).getpixel((0, 0)) == (5, 6, 7)


def test_exif_orientation_is_applied() -> None:
    source = gradient(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    source.save(buffer, "JPEG", exif=exif, quality=95)
    data = buffer.getvalue()
    upright = load_image(data)
    assert upright.size == (20, 40)
    stored = load_image(data, exif_transpose=False)  # what the official loader sees
    assert stored.size == (40, 20)
    np.testing.assert_array_equal(np.asarray(upright), np.asarray(stored.transpose(Image.Transpose.ROTATE_270)))
    assert load_image(upright).size == (20, 40)  # orientation removed once applied: no double rotation


# ----------------------------------------------------------------------------------------------------- rejections
def test_rejections(tmp_path: Path) -> None:
    good = png_bytes(gradient())
    jpeg = io.BytesIO()
    gradient(200, 200).save(jpeg, "JPEG")
    empty_file = tmp_path / "empty.png"
    empty_file.write_bytes(b"")
    truncated_file = tmp_path / "truncated.png"
    truncated_file.write_bytes(good[: len(good) // 2])
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    cases: list[tuple[object, str]] = [
        (b"", "empty data"),
        (bytearray(), "empty data"),
        (io.BytesIO(b""), "empty data"),
        (empty_file, "file is empty"),
        (tmp_path / "missing.png", "file not found"),
        (str(tmp_path / "missing.png"), "file not found"),
        ("", "empty image path"),
        (tmp_path, "is a directory"),
        (truncated_file, "truncated or corrupt"),
        (text_file, "not an image"),
        (good[: len(good) // 2], "truncated or corrupt"),
        (jpeg.getvalue()[:-300], "truncated or corrupt"),
        (b"hello, not an image", "not an image"),
        (np.zeros((0, 5, 3), np.uint8), "zero-size image"),
        (Image.new("RGB", (0, 0)), "zero-size image"),
        (np.zeros((3, 8, 8), np.uint8), "unsupported shape.*channels-first"),
        (np.zeros((8, 8, 2), np.uint8), "unsupported shape"),
        (np.zeros((1, 8, 8, 3), np.uint8), "unsupported shape"),
        (np.zeros((8, 8), np.int64), "unsupported dtype int64"),
        (np.zeros((8, 8), bool), "unsupported dtype bool"),
        (np.full((8, 8), 2.0), r"must lie in \[0, 1\]"),
        (np.full((8, 8), np.nan), "must be finite"),
        ("data:text/plain;base64,aGVsbG8=", "media type is 'text/plain'"),
        ("data:image/png;base64,@@@@", "invalid base64"),
        ("data:image/png;base64", "malformed"),
        ("https://example.com/cat.png", "remote URLs are not fetched"),
        (io.StringIO("text"), "text mode"),
        (12345, "unsupported image source type int"),
    ]
    for source, message in cases:
        with pytest.raises(ImageError, match=message):
            load_image(source)  # type: ignore[arg-type]
    assert issubclass(ImageError, ValueError)


def test_truncation_is_caught_for_lazy_pil_images(processor: ImageProcessor) -> None:
    good = png_bytes(gradient())
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(Image.open(io.BytesIO(good[: len(good) // 2])))
    with pytest.raises(ImageError, match="truncated or corrupt"):
        processor.preprocess(Image.open(io.BytesIO(good[: len(good) // 2])))


def test_pixel_limit_is_checked_before_decoding() -> None:
    # 9000 x 9000 = 81 M pixels: over our 64 Mi default, under Pillow's warning threshold (~89 M). The pixel data is
    # garbage, so the message proves the size was rejected before any decoding was tried.
    with pytest.raises(ImageError, match="9000x9000 = 81,000,000 pixels, over the limit of 67,108,864"):
        load_image(png_header_only(9000, 9000))
    with pytest.raises(ImageError, match="over the limit of 100"):
        load_image(png_bytes(gradient()), max_pixels=100)
    with pytest.raises(ImageError, match="over the limit of 100"):
        load_image(np.zeros((20, 20), np.uint8), max_pixels=100)
    with pytest.raises(ImageError, match="over the limit of 100"):
        load_image(gradient(), max_pixels=100)
    # Over Pillow's own error threshold: its DecompressionBombError comes back as ImageError, even with no limit.
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(png_header_only(20000, 20000), max_pixels=None)
    # Raising the limit lets the header through, so the garbage data is then found.
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(png_header_only(9000, 9000), max_pixels=10**8)
    with pytest.raises(ValueError, match="max_pixels must be positive"):
        load_image(png_bytes(gradient()), max_pixels=0)


# -------------------------------------------------------------------------------------------------------- batching
def test_call_batches(processor: ImageProcessor) -> None:
    images = [gradient(64, 40), gradient(30, 90), PREPROC / "camera.png"]
    batch = processor(images, policy="crop")
    assert batch.shape == (3, 3, 448, 448) and batch.dtype == torch.float32
    for row, image in zip(batch, images, strict=True):
        assert torch.equal(row, processor.preprocess(image, "crop"))
    assert processor(tuple(images)).shape == (3, 3, 448, 448)
    assert processor(gradient()).shape == (1, 3, 448, 448)
    assert processor([]).shape == (0, 3, 448, 448)


# ------------------------------------------------------------------------------------------------- configuration
def test_config_forms(tmp_path: Path) -> None:
    release = ImageProcessor()
    assert release.size == {"shortest_edge": 448} and release.crop_size == {"height": 448, "width": 448}
    assert release.resample == 3 and release.output_size == (448, 448)
    assert release.image_mean == OPENAI_CLIP_MEAN and release.image_std == OPENAI_CLIP_STD
    newer = {
        "crop_size": {"height": 448, "width": 448},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(OPENAI_CLIP_STD),
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 448},
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(newer))
    assert load_image_processor(tmp_path) == release
    assert load_image_processor(tmp_path / "preprocessor_config.json") == release
    assert ImageProcessor.from_dict(release.to_dict()) == release

    empty_dir = tmp_path / "no-config"
    empty_dir.mkdir()
    assert load_image_processor(empty_dir) == release  # absent file: the release defaults
    with pytest.raises(FileNotFoundError):
        load_image_processor(tmp_path / "nowhere")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_image_processor(bad)
    bad.write_text(json.dumps({"size": {"longest_edge": 448}}))
    with pytest.raises(ValueError, match="size must be"):
        load_image_processor(bad)
    with pytest.raises(ValueError, match="crop_size must be"):
        ImageProcessor(crop_size={"shortest_edge": 448})
    with pytest.raises(ValueError, match="positive int"):
        ImageProcessor(size=0)
    with pytest.raises(ValueError, match="resample"):
        ImageProcessor(resample=9)
    with pytest.raises(ValueError, match="image_mean must have 3"):
        ImageProcessor(image_mean=[0.5])


def test_height_width_size_resizes_exactly() -> None:
    processor = ImageProcessor(size={"height": 336, "width": 336}, crop_size=336)
    assert processor.output_size == (336, 336)
    image = gradient(100, 60)
    out = processor.preprocess(image, "crop")
    manual = ImageProcessor(do_resize=False, crop_size=336).preprocess(image.resize((336, 336), Image.BICUBIC), "crop")
    assert torch.equal(out, manual)


def test_small_image_without_resize_is_zero_padded_by_the_crop() -> None:
    """An image smaller than the crop is centred on 8-bit zeros, as transformers' center_crop does.

    For an odd difference (5 rows into 8) transformers 4.31 returns one row short (7); owl2 returns the full crop,
    which is the official output plus one more row of zeros at the bottom.
    """
    processor = ImageProcessor(do_resize=False, crop_size=8)
    out = processor.preprocess(Image.new("RGB", (4, 5), (255, 255, 255)), "crop")
    assert out.shape == (3, 8, 8)
    white = (1.0 - np.float32(OPENAI_CLIP_MEAN[0])) / np.float32(OPENAI_CLIP_STD[0])
    black = (0.0 - np.float32(OPENAI_CLIP_MEAN[0])) / np.float32(OPENAI_CLIP_STD[0])
    inside = out[0].numpy() == np.float32(white)
    assert inside.sum() == 20 and inside[1:6, 2:6].all()  # top pad (8 - 5) // 2 = 1, left pad (8 - 4) // 2 = 2
    assert (out[0].numpy()[~inside] == np.float32(black)).all()
    # Larger on one side, smaller on the other: crop rows (9 - 8) // 2 = 0.., pad columns.
    tall = processor.preprocess(Image.new("RGB", (6, 9), (255, 255, 255)), "crop")[0].numpy()
    assert tall.shape == (8, 8) and (tall[:, 1:7] == np.float32(white)).all() and (tall[:, [0, 7]] == black).all()


def test_values_match_the_formula() -> None:
    """Rescale in float64 then float32, normalise in float32 (the 4.31 arithmetic), for all 256 levels."""
    levels = np.arange(256, dtype=np.uint8)
    image = Image.fromarray(np.stack([levels.reshape(16, 16)] * 3, axis=-1))
    out = ImageProcessor(do_resize=False, do_center_crop=False).preprocess(image, "crop").numpy()
    x = (levels.reshape(16, 16) * (1 / 255)).astype(np.float32)
    for channel in range(3):
        expected = (x - np.float32(OPENAI_CLIP_MEAN[channel])) / np.float32(OPENAI_CLIP_STD[channel])
        np.testing.assert_array_equal(out[channel], expected)
