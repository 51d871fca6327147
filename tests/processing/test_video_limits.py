"""Hostile and broken videos for :func:`owl2.processing.video.load_video`: huge or thin frames, clips too long for
their limit or claiming absurd durations, streams without a decoder, damaged data, playlists and concat lists, many
streams, files that are not videos. Each gives frames or a one-line :class:`VideoError`, quickly and in bounded memory.

Clips are written with PyAV into tmp_path. The size tests mux hand-made PNG packets (1-bit palette, so a 16000 x 16000
frame is a few hundred kB on disk) into AVI without encoding anything; a packet whose image data is garbage cannot be
decoded, so an error that names the frame size proves the check came before any decoding.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

av = pytest.importorskip("av")

from owl2.processing.video import DEFAULT_MAX_FRAMES, TooManyFramesError, VideoError, load_video  # noqa: E402
from tests.conftest import in_thread  # noqa: E402

# ---------------------------------------------------------------------------------------------------------- helpers


def video_error(function: Callable[[], Any], limit: float = 20.0) -> VideoError:
    """The one-line :class:`VideoError` that ``function()`` raises within ``limit`` seconds."""
    outcome = in_thread(function, limit)
    assert isinstance(outcome, VideoError), outcome
    assert "\n" not in str(outcome)
    return outcome


def png(width: int, height: int, *, garbage: bool = False) -> bytes:
    """A black 1-bit palette PNG (FFmpeg decodes it to one byte a pixel); ``garbage``: its image data does not
    inflate, so decoding it fails."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    if garbage:
        idat = b"\xde\xad\xbe\xef" * 16
    else:
        deflate, row = zlib.compressobj(1), bytes((width + 7) // 8 + 1)
        idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 3, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"PLTE", b"\x00\x00\x00\xff\xff\xff")
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def png_avi(path: Path, packets: list[bytes], width: int, height: int, rate: Fraction = Fraction(1)) -> Path:
    """An AVI whose header says ``width`` x ``height`` at ``rate`` fps, holding ``packets`` as they are."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "pal8"
        for index, data in enumerate(packets):
            packet = av.Packet(data)
            packet.stream, packet.time_base, packet.pts, packet.dts = stream, 1 / rate, index, index
            container.mux(packet)
    return path


def encoded(path: Path, count: int, rate: int | Fraction = 10, codec: str = "mpeg4", size: tuple[int, int] = (32, 24),
            pix_fmt: str = "yuv420p") -> Path:
    """An ordinary clip of ``count`` random frames."""
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for index in range(count):
            pixels = np.random.default_rng(index).integers(0, 256, (height, width, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


# ------------------------------------------------------------------------------------------------------ frame size
def test_huge_frames_are_refused_without_allocating_them(tmp_path: Path) -> None:
    """Two 16000 x 16000 frames in 300 kB: FFmpeg decoded one while opening the file, and load_video returned both,
    for 4.6 GB and 12 s. Now the file is refused with no frame decoded (measured in a fresh process: its peak memory
    is the number that matters, and this one's is already higher)."""
    path = png_avi(tmp_path / "huge.avi", [png(16000, 16000)] * 2, 16000, 16000)
    assert path.stat().st_size < 1_000_000
    script = textwrap.dedent(f"""
        import resource, sys
        from owl2.processing.video import VideoError, load_video
        import av  # imported before the baseline: what counts is what the call allocates
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_video({str(path)!r})
        except VideoError as exc:
            print("refused:", exc)
        else:
            print("loaded")
        print("grew_kb:", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.strip().splitlines())
    assert "over max_pixels=67,108,864" in lines.get("refused", ""), done.stdout
    assert int(lines["grew_kb"]) < 100_000, done.stdout  # one decoded frame alone is 256 MB


def test_frame_size_is_checked_from_the_header_before_decoding(tmp_path: Path) -> None:
    """The packets cannot be decoded, so these messages show the limits were checked first (the old code failed
    only in the decoder, or not at all)."""
    strip = png_avi(tmp_path / "strip.avi", [png(2, 20000, garbage=True)] * 2, 2, 20000)
    error = video_error(lambda: load_video(strip))
    assert str(error) == (
        f"{strip} (video frames): image is 2x20000, an aspect ratio of 10,000.0:1, over the limit of 100:1 "
        "(max_aspect_ratio); crop or pad it to a less extreme shape"
    )
    assert "aspect ratio" in str(video_error(lambda: load_video(strip, num_frames=1)))
    wide = png_avi(tmp_path / "wide.avi", [png(3000, 100, garbage=True)] * 2, 3000, 100)
    # FFmpeg's probing decoders, told the limit, blank the size of a larger stream instead of decoding a frame.
    error = video_error(lambda: load_video(wide, max_pixels=100_000))
    assert str(error) == (f"{wide}: the video stream has no frame size (0x0: a damaged stream, or its frames are "
                          "over max_pixels=100,000)")
    # Where the header's size survives FFmpeg's probing (H.264 in Matroska), the message names it.
    clip = encoded(tmp_path / "clip.mkv", 12, codec="libx264", size=(64, 48))
    error = video_error(lambda: load_video(clip, max_pixels=1000))
    assert str(error) == (f"{clip}: video frames are 64x48 = 3,072 pixels, over the limit of 1,000 (max_pixels); "
                          "downscale the video")
    assert "aspect ratio of 30.0:1" in str(video_error(lambda: load_video(wide, max_aspect_ratio=10)))

    def policy_check(width: int, height: int, what: str) -> None:
        raise ValueError(f"{what}: {width}x{height} refused by the caller")

    # A caller's own check (ImageProcessor.check_size, in pipe.rate) runs on the header too; its error becomes a
    # VideoError like the others.
    error = video_error(lambda: load_video(wide, check_size=policy_check, max_pixels=None))
    assert str(error) == f"{wide} (video frames): 3000x100 refused by the caller"


def test_a_stream_that_changes_size_midway_is_checked_frame_by_frame(tmp_path: Path) -> None:
    """The header says 64 x 48; frames 3 and 4 are 2 x 20000 strips. They used to come back as strips."""
    path = png_avi(tmp_path / "change.avi", [png(64, 48)] * 3 + [png(2, 20000)] * 2, 64, 48)
    assert load_video(path, num_frames=1)[0].size == (64, 48)  # frame 2: the strips are never reached
    error = video_error(lambda: load_video(path, num_frames=5))
    assert "image is 2x20000, an aspect ratio of 10,000.0:1" in str(error)
    # A 16000 x 16000 frame midway: the decoder, told the pixel limit, refuses it instead of allocating 256 MB.
    path = png_avi(tmp_path / "grow.avi", [png(64, 48)] * 3 + [png(16000, 16000)] * 2, 64, 48)
    error = video_error(lambda: load_video(path, num_frames=5))
    assert str(error).startswith(f"{path} is not a readable video: decoding frame ")  # 3, or later with threads
    assert str(error).endswith("failed: Invalid argument; frames over max_pixels=67,108,864 fail this way")


@pytest.mark.parametrize("bad", [{"max_pixels": 0}, {"max_aspect_ratio": 0.5}])
def test_bad_limits(tmp_path: Path, bad: dict[str, float]) -> None:
    with pytest.raises(VideoError, match=f"{next(iter(bad))} must be at least 1 or None"):
        load_video(tmp_path / "any.mp4", **bad)


# ----------------------------------------------------------------------------------------------- length, duration
def test_a_long_clip_is_refused_after_reading_only_what_the_limit_allows(tmp_path: Path) -> None:
    """200 s at 1 fps with max_frames=5: the demux pass stops at packet 6 (the message's "at least 6"); nothing is
    decoded. Uniform sampling needs the whole count, so its refusal is exact."""
    path = encoded(tmp_path / "long.mkv", 200, rate=1, codec="libx264", size=(16, 16))
    error = video_error(lambda: load_video(path, max_frames=5))
    assert isinstance(error, TooManyFramesError)
    assert (error.frames, error.max_frames, error.at_least) == (6, 5, True)
    assert str(error) == (f"{path} samples at least 6 frames, more than max_frames=5 (over 6 s at 1 fps, one frame "
                          "per second; pass num_frames=N to sample fewer)")
    error = video_error(lambda: load_video(path, num_frames=8, max_frames=5))
    assert (error.frames, error.at_least) == (8, False)
    assert len(load_video(path, num_frames=5, max_frames=5)) == 5


def test_an_absurd_duration_is_refused_not_expanded(tmp_path: Path) -> None:
    """Three frames at one per million seconds: the 1-fps rule's 3,000,000 copies of three frames took 20 s and ran
    out of memory. Now the default max_frames refuses it at the first packet."""
    path = png_avi(tmp_path / "slow.avi", [png(8, 8)] * 3, 8, 8, rate=Fraction(1, 10**6))
    error = video_error(lambda: load_video(path), limit=10)
    assert isinstance(error, TooManyFramesError)
    assert error.max_frames == DEFAULT_MAX_FRAMES and error.at_least
    assert "samples at least 1000000 frames" in str(error)
    assert len(load_video(path, num_frames=3)) == 3


def test_container_duration_metadata_is_not_trusted(tmp_path: Path) -> None:
    """Five frames at 10 fps whose timestamps put 46 days between the first and the last: the frame count and the
    rate decide, as in decord, not the container's duration."""
    source = encoded(tmp_path / "source.mkv", 5, codec="ffv1", pix_fmt="yuv420p")
    with av.open(str(source)) as container:
        packets = [bytes(packet) for packet in container.demux(video=0) if packet.size]
    path = tmp_path / "far.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for index, data in enumerate(packets):
            packet = av.Packet(data)
            packet.stream, packet.time_base = stream, Fraction(1, 1000)
            packet.pts = packet.dts = index * 10**9
            container.mux(packet)
    with av.open(str(path)) as container:
        assert container.duration > 10**12  # microseconds: over 46 days
    assert len(in_thread(lambda: load_video(path, num_frames=5), limit=10)) == 5
    assert "0.5 s long (5 frames at 10 fps)" in str(video_error(lambda: load_video(path)))


def test_a_zero_rate_in_the_header_falls_back_to_ffmpegs_default(tmp_path: Path) -> None:
    """An AVI whose stream and main headers both say 0 frames per second: FFmpeg assumes 25, so the clip is 0.2 s
    long; nothing divides by zero."""
    path = png_avi(tmp_path / "zero.avi", [png(16, 16)] * 5, 16, 16)
    data = bytearray(path.read_bytes())
    stream_header, main_header = data.find(b"strh") + 8, data.find(b"avih") + 8
    data[stream_header + 20:stream_header + 28] = struct.pack("<II", 0, 0)  # dwScale, dwRate
    data[main_header:main_header + 4] = struct.pack("<I", 0)  # dwMicroSecPerFrame
    path.write_bytes(bytes(data))
    assert "0.2 s long (5 frames at 25 fps)" in str(video_error(lambda: load_video(path)))
    assert len(load_video(path, num_frames=5)) == 5


# ------------------------------------------------------------------------------------------- broken and not video
def test_a_stream_without_a_decoder(tmp_path: Path) -> None:
    """A Matroska codec id FFmpeg does not know: the stream is video but has no decoder. This was an AttributeError."""
    path = encoded(tmp_path / "known.mkv", 12, codec="libx264")
    data = path.read_bytes()
    assert data.count(b"V_MPEG4/ISO/AVC") == 1
    unknown = tmp_path / "unknown.mkv"
    unknown.write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_XXXXX/ISO/AVC"))
    error = video_error(lambda: load_video(unknown, num_frames=2))
    assert str(error) == f"{unknown} has a video stream in a codec this FFmpeg cannot decode"


@pytest.mark.parametrize(("suffix", "codec", "pix_fmt"),
                         [("mp4", "mpeg4", "yuv420p"), ("mkv", "libx264", "yuv420p"), ("avi", "mjpeg", "yuvj420p"),
                          ("webm", "libvpx", "yuv420p")])
def test_damaged_data_gives_frames_or_a_one_line_error(tmp_path: Path, suffix: str, codec: str, pix_fmt: str) -> None:
    """500 random bytes written over a third of the way into the file, at three places: frames or a VideoError,
    never another exception or a hang."""
    try:
        av.Codec(codec, "w")
    except Exception:  # the exception type for an unknown codec differs between PyAV versions
        pytest.skip(f"this PyAV build has no {codec} encoder")
    data = encoded(tmp_path / f"clip.{suffix}", 30, codec=codec, pix_fmt=pix_fmt).read_bytes()
    for seed in range(3):
        damaged = bytearray(data)
        start = len(damaged) // 3 + 100 * seed
        damaged[start:start + 500] = np.random.default_rng(seed).integers(0, 256, 500, dtype=np.uint8).tobytes()
        path = tmp_path / f"damaged{seed}.{suffix}"
        path.write_bytes(bytes(damaged))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the short-stream warning, where the damage cost frames
            outcome = in_thread(lambda path=path: load_video(path), limit=20)
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, VideoError) and "\n" not in str(outcome), (seed, outcome)
        else:
            assert 1 <= len(outcome) <= 3 and all(frame.size == (32, 24) for frame in outcome)


def test_files_that_are_not_videos(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 100)
    assert "is not a readable video" in str(video_error(lambda: load_video(text)))
    archive = tmp_path / "archive.mp4"
    archive.write_bytes(b"PK\x03\x04" + bytes(1000))
    assert "is not a readable video" in str(video_error(lambda: load_video(archive)))
    # An image named as a video opens as a one-frame stream; its size limits apply as to any video.
    image = tmp_path / "image.mp4"
    image.write_bytes(png(16, 16))
    assert "samples no frame" in str(video_error(lambda: load_video(image)))
    assert len(load_video(image, num_frames=1)) == 1
    strip = tmp_path / "strip.mp4"
    strip.write_bytes(png(1, 20000))
    assert "image is 1x20000, an aspect ratio" in str(video_error(lambda: load_video(strip, num_frames=1)))


def test_a_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        assert "is not a file" in str(video_error(lambda path=path: load_video(path), limit=5))


# --------------------------------------------------------------------------------------- what FFmpeg may open
def test_concat_lists_do_not_read_other_files(tmp_path: Path) -> None:
    """An ffconcat list named .mp4 made FFmpeg read the clips it names (any file beside it); now it is refused."""
    encoded(tmp_path / "secret.mkv", 20, codec="libx264")
    listing = tmp_path / "upload.mp4"
    listing.write_text("ffconcat version 1.0\nfile secret.mkv\n")
    error = video_error(lambda: load_video(listing, num_frames=2))
    assert str(error).startswith(f"{listing} is not a readable video: ")
    assert "concat lists" in str(error)


def test_playlists_do_not_fetch_urls_or_read_segments(tmp_path: Path) -> None:
    """An HLS playlist named .m3u8 (the suffix FFmpeg's HLS demuxer wants) made FFmpeg open every URL it lists:
    network requests from a video file, and reads of other local files."""
    encoded(tmp_path / "segment.mp4", 20)
    playlist = tmp_path / "clip.m3u8"
    playlist.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10.0,\nhttp://192.0.2.1/a.ts\n"
                        "#EXTINF:10.0,\nsegment.mp4\n#EXT-X-ENDLIST\n")
    error = video_error(lambda: load_video(playlist, num_frames=2), limit=10)
    assert "playlists" in str(error)


def test_ordinary_containers_still_open(tmp_path: Path) -> None:
    """The demuxer whitelist keeps every container the loader is documented for."""
    for suffix, codec, pix_fmt in [("mp4", "mpeg4", "yuv420p"), ("mov", "mpeg4", "yuv420p"),
                                   ("mkv", "libx264", "yuv420p"), ("webm", "libvpx", "yuv420p"),
                                   ("avi", "mjpeg", "yuvj420p"), ("mpg", "mpeg2video", "yuv420p"),
                                   ("ts", "libx264", "yuv420p"), ("flv", "flv", "yuv420p"), ("gif", "gif", "rgb8")]:
        try:
            path = encoded(tmp_path / f"clip.{suffix}", 20, codec=codec, pix_fmt=pix_fmt)
        except Exception:  # an encoder this PyAV build lacks
            continue
        assert len(load_video(path)) == 2, suffix


def test_many_streams(tmp_path: Path) -> None:
    """300 video streams: opened in well under a second, the best one decoded."""
    path = tmp_path / "many.mov"
    frame = av.VideoFrame.from_ndarray(np.zeros((8, 8, 3), np.uint8), format="rgb24")
    with av.open(str(path), "w") as container:
        streams = []
        for _ in range(300):
            stream = container.add_stream("png", rate=1)
            stream.width, stream.height, stream.pix_fmt = 8, 8, "rgb24"
            streams.append(stream)
        for index in range(2):
            for stream in streams:
                frame.pts = index
                container.mux(stream.encode(frame))
        for stream in streams:
            container.mux(stream.encode())
    frames = in_thread(lambda: load_video(path), limit=10)
    assert len(frames) == 2 and frames[0].size == (8, 8)


def test_convert_is_applied_as_frames_are_decoded(tmp_path: Path) -> None:
    """``convert`` sees each sampled frame once, upright RGB; its results are returned in order."""
    path = encoded(tmp_path / "clip.mkv", 30, codec="libx264")
    seen: list[tuple[str, tuple[int, int]]] = []

    def convert(image: Any) -> int:
        seen.append((image.mode, image.size))
        return len(seen)

    assert load_video(path, convert=convert) == [1, 2, 3]
    assert seen == [("RGB", (32, 24))] * 3
