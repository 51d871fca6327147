"""``pipe.rate`` and ``owl2 rate`` with videos too long for the context or with frames the policy cannot afford: refused
with one line before the frames are decoded or preprocessed.

The clips hold frames that cannot be decoded (PNG packets with garbage image data) or preprocessed (a thin strip) past
the point where the refusal must happen: an error that names the context or the policy, not the bad frame, proves
nothing past that point was touched.
"""

from __future__ import annotations

import struct
import zlib
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from PIL import Image

import owl2
from owl2.cli.main import main as cli
from owl2.processing.image import ImageProcessor
from owl2.rating import Video
from owl2.rating.scale import render_rating_prompt
from tests.conftest import FIXTURES

av = pytest.importorskip("av")

CHECKPOINT = FIXTURES / "qalign" / "checkpoint"


@pytest.fixture(scope="module")
def pipe() -> owl2.api.Pipeline:
    return owl2.load(CHECKPOINT, dtype=torch.float32, device="cpu", show_progress=False)


def frames_that_fit(pipe: owl2.api.Pipeline) -> tuple[int, int]:
    """(frames of a video that fit in the context with the scorer prompt, that prompt's text positions)."""
    text = len(pipe.tokenizer.encode_prompt(render_rating_prompt("scorer", "quality", "video"))) - 1
    per_frame = pipe.model.config.tokens_per_image
    return (pipe.engine.context_length - 1 - text) // per_frame, text


def png(width: int, height: int, *, garbage: bool = False) -> bytes:
    """A black 1-bit palette PNG; ``garbage``: its image data does not inflate, so it cannot be decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    idat = b"\xde\xad\xbe\xef" * 16 if garbage else zlib.compress(bytes((width + 7) // 8 + 1) * height)
    header = struct.pack(">IIBBBBB", width, height, 1, 3, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"PLTE", b"\x00\x00\x00\xff\xff\xff")
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def png_avi(path: Path, packets: list[bytes], width: int, height: int) -> Path:
    """An AVI at 1 fps whose header says ``width`` x ``height``, holding ``packets`` as they are."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, "pal8"
        for index, data in enumerate(packets):
            packet = av.Packet(data)
            packet.stream, packet.time_base, packet.pts, packet.dts = stream, Fraction(1), index, index
            container.mux(packet)
    return path


def long_clip(path: Path, seconds: int) -> Path:
    """``seconds`` frames at 1 fps: three good 16 x 16 frames, then frames that cannot be decoded."""
    return png_avi(path, [png(16, 16)] * 3 + [png(16, 16, garbage=True)] * (seconds - 3), 16, 16)


def test_a_long_video_file_is_refused_before_decoding(pipe, tmp_path):
    """One frame per second of a clip longer than the context holds: the old path decoded and preprocessed every
    sampled frame, and only then did check_fits refuse the row (here it met the undecodable frames first)."""
    fit, text = frames_that_fit(pipe)
    per_frame, context = pipe.model.config.tokens_per_image, pipe.engine.context_length
    path = long_clip(tmp_path / "long.avi", fit + 40)
    with pytest.raises(ValueError) as info:
        pipe.rate([path])
    more = fit + 1  # the demux pass stops at the first packet too many
    assert str(info.value) == (
        f"item 0 (long.avi): at least {more} frames ({more} x {per_frame} visual tokens) and the prompt take at "
        f"least {text + more * per_frame} positions, more than the context of {context}; at most {fit} frames fit: "
        "sample fewer frames (num_frames=N)"
    )
    # num_frames over the budget is refused exactly (uniform sampling needs the whole count), still before decoding
    with pytest.raises(ValueError, match=rf"item 0 \(long.avi\): {fit + 1} frames \({fit + 1} x {per_frame} visual"):
        pipe.rate([Video(path, num_frames=fit + 1)])
    # a clip that fits rates as before: only its three good frames are sampled
    good = long_clip(tmp_path / "short.avi", 3)
    frames = [Image.new("RGB", (16, 16))] * 3
    assert pipe.rate([good])[0].score == pytest.approx(pipe.rate([frames])[0].score, abs=1e-6)


def test_a_long_list_of_frames_is_refused_before_preprocessing(pipe):
    """The last frame is a thin strip the policy refuses: the old path preprocessed frames first and reported it."""
    fit, _ = frames_that_fit(pipe)
    frames = [Image.new("RGB", (16, 16))] * fit + [Image.new("RGB", (1, 20000))]
    with pytest.raises(ValueError, match=rf"^item 0: {fit + 1} frames .* at most {fit} frames fit"):
        pipe.rate([frames])


def test_the_processors_limits_apply_to_a_video_files_header(pipe, tmp_path):
    """A 2000 x 100 stream under ``pad`` and a 1 M-pixel budget: refused from the header with the processor's own
    message, not by the decoder (the packets cannot be decoded)."""
    processor = ImageProcessor(max_pixels=1_000_000)
    padded = owl2.Pipeline(pipe.model, pipe.tokenizer, processor, policy="pad")
    path = png_avi(tmp_path / "wide.avi", [png(2000, 100, garbage=True)] * 3, 2000, 100)
    with pytest.raises(ValueError, match=r"wide\.avi \(video frames\): image is 2000x100; the 'pad' policy would make "
                                         r"a 2000x2000 square"):
        padded.rate([path])


def test_owl2_rate_reports_a_long_video_on_one_line(pipe, tmp_path, capsys):
    fit, _ = frames_that_fit(pipe)  # the CLI loads the same checkpoint
    path = long_clip(tmp_path / "long.avi", fit + 40)
    assert cli(["rate", "--model", str(CHECKPOINT), "--dtype", "fp32", "--device", "cpu", "--quiet", str(path)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("owl2 rate: error: ") and "long.avi" in last
    assert f"at least {fit + 1} frames" in last and f"at most {fit} frames fit" in last
