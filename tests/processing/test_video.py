"""Tests for owl2.processing.video: Q-Align's 1-fps rule, uniform sampling and PyAV decoding of small generated clips.

Every clip is written by PyAV into tmp_path. Lossy clips encode the frame index in two flat grey bands (left: index
mod 25, right: index div 25), which survive compression, so a test can tell WHICH frames came back; lossless clips
(PNG in AVI or MOV) carry random pixels that must come back exactly.
"""

from __future__ import annotations

import itertools
import os
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

from PIL import Image  # noqa: E402

from owl2.processing.video import (  # noqa: E402
    VIDEO_SUFFIXES,
    VideoError,
    is_video_path,
    load_video,
    one_per_second_indices,
    uniform_indices,
)

WIDTH, HEIGHT = 64, 48
_BASE, _STEP, _PER_BAND = 16, 9, 25


# ------------------------------------------------------------------------------------------------------ clip makers
def _need_encoder(name: str) -> None:
    try:
        av.Codec(name, "w")
    except Exception:  # the exception type for an unknown codec differs between PyAV versions
        pytest.skip(f"this PyAV build has no {name} encoder")


def _banded(index: int) -> np.ndarray:
    image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    image[:, : WIDTH // 2] = _BASE + _STEP * (index % _PER_BAND)
    image[:, WIDTH // 2 :] = _BASE + _STEP * (index // _PER_BAND)
    return image


def _noise(index: int) -> np.ndarray:
    return np.random.default_rng(index).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def _write(
    path: Path,
    count: int,
    rate: int | Fraction,
    codec: str = "mpeg4",
    pix_fmt: str = "yuv420p",
    *,
    content: str = "banded",
    rotation: int | None = None,
) -> Path:
    _need_encoder(codec)
    make = _banded if content == "banded" else _noise
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, pix_fmt
        # Generous for 64 x 48: at the default bit rate, rate control blurs a frame after a big jump in the bands.
        stream.bit_rate = 4_000_000
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(make(index), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _index_of(image: Image.Image) -> int:
    """The frame index a banded frame encodes, read from the band centres (away from block edges)."""
    pixels = np.asarray(image, dtype=np.float64)
    left = pixels[8:-8, 4 : WIDTH // 2 - 4].mean()
    right = pixels[8:-8, WIDTH // 2 + 4 : -4].mean()
    low, high = round((left - _BASE) / _STEP), round((right - _BASE) / _STEP)
    # A wrong frame is off by a whole step (9 grey levels); coding noise on flat bands is far below half of that.
    assert abs(left - (_BASE + _STEP * low)) < _STEP / 2 and abs(right - (_BASE + _STEP * high)) < _STEP / 2
    return low + _PER_BAND * high


def _indices(images: list[Image.Image]) -> list[int]:
    return [_index_of(image) for image in images]


# ------------------------------------------------------------------------------------------------ the index rules
@pytest.mark.parametrize(
    ("num_frames", "fps", "expected"),
    [
        (100, 25, [0, 25, 50, 75]),
        (90, 29.97, [0, 29, 59]),
        (90, Fraction(30000, 1001), [0, 29, 59]),
        (300, Fraction(30000, 1001), [0, 29, 59, 89, 119, 149, 179, 209, 239, 269]),
        (9, 10, []),
        (10, 10, [0]),
        (0, 25, []),
        (124, 25, [0, 25, 50, 75]),  # 4.96 s: the last, partial second gives no frame
        (125, 25, [0, 25, 50, 75, 100]),
        (3, 0.5, [0, 0, 1, 1, 2, 2]),  # below 1 fps the rule repeats frames
    ],
)
def test_one_per_second_indices(num_frames: int, fps: float, expected: list[int]) -> None:
    assert one_per_second_indices(num_frames, fps) == expected


@pytest.mark.parametrize(("num_frames", "fps"), [(10, 0), (10, -25), (10, float("nan")), (10, float("inf")), (-1, 25)])
def test_one_per_second_indices_rejects_bad_arguments(num_frames: int, fps: float) -> None:
    with pytest.raises(ValueError):
        one_per_second_indices(num_frames, fps)


@pytest.mark.parametrize(
    ("num_frames", "count", "expected"),
    [
        (100, 4, [12, 37, 62, 87]),
        (10, 1, [5]),
        (10, 2, [2, 7]),
        (15, 3, [2, 7, 12]),
        (10, 10, list(range(10))),
        (5, 8, [0, 1, 2, 3, 4]),
        (0, 3, []),
    ],
)
def test_uniform_indices(num_frames: int, count: int, expected: list[int]) -> None:
    assert uniform_indices(num_frames, count) == expected


def test_uniform_indices_are_segment_centres() -> None:
    for num_frames in range(1, 60):
        for count in range(1, num_frames):
            indices = uniform_indices(num_frames, count)
            assert len(indices) == count
            assert all(a < b for a, b in itertools.pairwise(indices))
            for i, index in enumerate(indices):
                # index is the frame holding the centre of segment i: index <= centre < index + 1
                assert index <= (i + 0.5) * num_frames / count < index + 1


@pytest.mark.parametrize(("num_frames", "count"), [(10, 0), (10, -1), (-1, 3)])
def test_uniform_indices_rejects_bad_arguments(num_frames: int, count: int) -> None:
    with pytest.raises(ValueError):
        uniform_indices(num_frames, count)


# ------------------------------------------------------------------------------------------------- is_video_path
@pytest.mark.parametrize(
    "source",
    ["clip.mp4", "CLIP.MP4", "a/b/c.webm", "x.mkv", "x.avi", "x.mov", "x.m4v", Path("dir/x.mpeg"), Path("y.MPG")],
)
def test_is_video_path_true(source: str | os.PathLike[str]) -> None:
    assert is_video_path(source)


@pytest.mark.parametrize(
    "source", ["x.png", "x.jpg", "x.gif", "mp4", "x.mp4.txt", "", b"x.mp4", None, 3, Path("x.jpeg")]
)
def test_is_video_path_false(source: object) -> None:
    assert not is_video_path(source)


def test_video_suffixes_are_lower_case_with_dot() -> None:
    assert {".mp4", ".avi", ".mov", ".mkv", ".webm"} <= VIDEO_SUFFIXES
    assert all(s.startswith(".") and s == s.lower() for s in VIDEO_SUFFIXES)
    assert ".gif" not in VIDEO_SUFFIXES


# ----------------------------------------------------------------------------------------------------- load_video
def test_one_frame_per_second_mp4(tmp_path: Path) -> None:
    path = _write(tmp_path / "clip.mp4", 100, 25)
    frames = load_video(path)
    assert _indices(frames) == [0, 25, 50, 75]
    assert all(f.mode == "RGB" and f.size == (WIDTH, HEIGHT) for f in frames)
    assert _indices(load_video(str(path))) == [0, 25, 50, 75]


def test_fractional_frame_rate(tmp_path: Path) -> None:
    path = _write(tmp_path / "ntsc.mp4", 90, Fraction(30000, 1001), "libx264")
    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate == Fraction(30000, 1001)
    assert _indices(load_video(path)) == [0, 29, 59]


def test_container_without_frame_count(tmp_path: Path) -> None:
    path = _write(tmp_path / "clip.mkv", 35, 10, "libx264")
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # Matroska has no frame count: load_video counts packets
    assert _indices(load_video(path)) == [0, 10, 20]


def test_lossless_frames_are_exact(tmp_path: Path) -> None:
    path = _write(tmp_path / "png.avi", 30, 10, "png", "rgb24", content="noise")
    frames = load_video(path)
    assert len(frames) == 3
    for frame, index in zip(frames, [0, 10, 20], strict=True):
        np.testing.assert_array_equal(np.asarray(frame), _noise(index))


def test_mjpeg_avi(tmp_path: Path) -> None:
    path = _write(tmp_path / "clip.avi", 25, 12, "mjpeg", "yuvj420p")
    assert _indices(load_video(path)) == [0, 12]


def test_below_one_fps_repeats_frames_as_separate_images(tmp_path: Path) -> None:
    path = _write(tmp_path / "slow.avi", 3, Fraction(1, 2), "png", "rgb24", content="noise")
    frames = load_video(path)
    assert len(frames) == 6
    assert len({id(f) for f in frames}) == 6
    for frame, index in zip(frames, [0, 0, 1, 1, 2, 2], strict=True):
        np.testing.assert_array_equal(np.asarray(frame), _noise(index))


def test_uniform_sampling(tmp_path: Path) -> None:
    path = _write(tmp_path / "clip.mp4", 100, 25)
    assert _indices(load_video(path, num_frames=4)) == [12, 37, 62, 87]
    assert _indices(load_video(path, num_frames=1)) == [50]
    assert _indices(load_video(path, num_frames=500)) == list(range(100))


def test_uniform_sampling_rescues_a_short_clip(tmp_path: Path) -> None:
    path = _write(tmp_path / "short.mp4", 15, 25)
    assert _indices(load_video(path, num_frames=3)) == [2, 7, 12]


def test_max_frames(tmp_path: Path) -> None:
    path = _write(tmp_path / "long.mp4", 40, 1)
    assert len(load_video(path, max_frames=40)) == 40
    with pytest.raises(VideoError, match=r"long\.mp4 samples at least 33 frames, more than max_frames=32") as info:
        load_video(path, max_frames=32)
    assert "\n" not in str(info.value)
    assert _indices(load_video(path, num_frames=8, max_frames=32)) == uniform_indices(40, 8)
    with pytest.raises(VideoError, match="samples 8 frames, more than max_frames=4"):
        load_video(path, num_frames=8, max_frames=4)


def test_gif_loads_although_not_a_video_suffix(tmp_path: Path) -> None:
    path = _write(tmp_path / "anim.gif", 25, 10, "gif", "rgb8")
    frames = load_video(path)
    assert len(frames) == 2 and all(f.mode == "RGB" for f in frames)


@pytest.mark.parametrize(("rotation", "quarter_turns"), [(90, 1), (-90, 3), (180, 2)])
def test_display_rotation_is_applied(tmp_path: Path, rotation: int, quarter_turns: int) -> None:
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("this PyAV cannot write a display matrix")
    path = _write(tmp_path / "phone.mov", 10, 10, "png", "rgb24", content="noise", rotation=rotation)
    (frame,) = load_video(path)
    # The matrix's angle is counter-clockwise, like np.rot90's direction on an image.
    np.testing.assert_array_equal(np.asarray(frame), np.rot90(_noise(0), quarter_turns))


# ------------------------------------------------------------------------------------------------------- errors
def test_clip_shorter_than_a_second(tmp_path: Path) -> None:
    path = _write(tmp_path / "short.mp4", 15, 25)
    with pytest.raises(VideoError) as info:
        load_video(path)
    assert str(info.value) == (
        f"{path} is 0.6 s long (15 frames at 25 fps): the 1-frame-per-second rule samples no frame; pass num_frames=N"
    )


def test_fractional_rate_in_the_short_clip_message(tmp_path: Path) -> None:
    path = _write(tmp_path / "short.mp4", 20, Fraction(30000, 1001), "libx264")
    with pytest.raises(VideoError, match=r"short\.mp4 is 0\.667 s long \(20 frames at 29\.97 fps\)"):
        load_video(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match=r"nope\.mp4 does not exist"):
        load_video(tmp_path / "nope.mp4")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="is not a file"):
        load_video(tmp_path)


@pytest.mark.parametrize("content", [b"this is not a video\n", b""])
def test_not_a_video(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fake.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoError, match=r"fake\.mp4 is not a readable video: Invalid data") as info:
        load_video(path)
    assert isinstance(info.value.__cause__, av.FFmpegError)


def test_truncated_header(tmp_path: Path) -> None:
    whole = _write(tmp_path / "whole.mp4", 50, 25)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[:200])
    with pytest.raises(VideoError, match=r"cut\.mp4 is not a readable video"):
        load_video(cut)


def test_audio_only_file(tmp_path: Path) -> None:
    path = tmp_path / "sound.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(VideoError, match=r"sound\.wav has no video stream"):
        load_video(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_frames": 0}, "num_frames must be at least 1, got 0"),
        ({"num_frames": -3}, "num_frames must be at least 1, got -3"),
        ({"max_frames": 0}, "max_frames must be at least 1 or None, got 0"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(VideoError, match=message):
        load_video(tmp_path / "any.mp4", **kwargs)


def test_video_error_is_a_value_error() -> None:
    assert issubclass(VideoError, ValueError)


def test_no_warning_on_an_ordinary_clip(tmp_path: Path) -> None:
    path = _write(tmp_path / "clip.webm", 30, 10, "libvpx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _indices(load_video(path)) == [0, 10, 20]


def test_relative_name_that_looks_like_a_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "concat:clip.mp4", 50, 25)
    monkeypatch.chdir(tmp_path)
    assert _indices(load_video("concat:clip.mp4")) == [0, 25]


def test_fewer_decoded_frames_than_packets_repeat_the_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import owl2.processing.video as video

    path = _write(tmp_path / "clip.mp4", 20, 10)
    real_probe = video._probe

    def overcounting_probe(av_module: object, name: str, *limits: object) -> tuple[int, int, Fraction | None]:
        index, count, rate = real_probe(av_module, name, *limits)
        return index, count + 4, rate  # as if 4 packets at the end did not decode

    monkeypatch.setattr(video, "_probe", overcounting_probe)
    with pytest.warns(UserWarning, match=r"clip\.mp4: the decoder gave 20 frames where the container has 24 packets"):
        frames = load_video(path, num_frames=24)
    assert _indices(frames) == [*range(20), 19, 19, 19, 19]
    assert len({id(f) for f in frames}) == 24
