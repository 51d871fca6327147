"""Rating against the official Q-Align / DeQA-Score outputs (tests/fixtures/qalign), batching, scales and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import owl2
from owl2.rating import LEVELS, RatingScale, Video, rating_row, render_rating_prompt
from tests.conftest import FIXTURES

QALIGN = FIXTURES / "qalign"
CHECKPOINT = QALIGN / "checkpoint"
CASES = json.loads((QALIGN / "cases.json").read_text())["cases"]
OUTPUTS = np.load(QALIGN / "qalign_outputs.npz")
OUTPUTS_FP16 = np.load(QALIGN / "qalign_outputs_fp16.npz")


def frame(name: str) -> Image.Image:
    """An item as the official loaders see it: ``Image.open(png).convert("RGB")``."""
    with Image.open(QALIGN / "images" / f"{name}.png") as image:
        return image.convert("RGB")


def item_of(case: dict) -> Image.Image | list[Image.Image]:
    frames = [frame(name) for name in case["items"]]
    return frames[0] if case["input"] == "image" else frames


@pytest.fixture(scope="module")
def pipe() -> owl2.api.Pipeline:
    return owl2.load(CHECKPOINT, dtype=torch.float32, device="cpu", show_progress=False)


def assert_matches(rating, name: str, *, logits: float = 1e-4, probs: float = 1e-5, score: float = 1e-4) -> None:
    np.testing.assert_allclose(rating.logits, OUTPUTS[f"{name}__logits5"], rtol=0, atol=logits)
    np.testing.assert_allclose(rating.probs, OUTPUTS[f"{name}__probs"], rtol=0, atol=probs)
    assert rating.score == pytest.approx(float(OUTPUTS[f"{name}__score"]), abs=score)
    assert rating.normalized == pytest.approx(float(OUTPUTS[f"{name}__score_w10"]), abs=score)
    assert rating.std == pytest.approx(float(OUTPUTS[f"{name}__std"]), abs=score)


def test_level_ids_and_policy_from_the_checkpoint(pipe):
    scale = RatingScale(pipe.tokenizer)
    assert scale.levels == LEVELS
    assert scale.token_ids.tolist() == [json.loads((QALIGN / "cases.json").read_text())["level_ids"]]
    assert scale.weights == (5.0, 4.0, 3.0, 2.0, 1.0)
    # config.json says image_aspect_ratio "pad": the letterbox is the default of the whole pipeline
    assert pipe.image_processor.default_policy == "pad" and pipe.image_processor.checkpoint_policy == "pad"
    assert pipe.policy is None


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_every_official_case(pipe, case):
    row = rating_row(pipe.tokenizer, pipe.image_processor, item_of(case), task=case["task"], prompt=case["prompt"])
    assert render_rating_prompt(case["prompt"], case["task"], case["input"]) == case["prompt_string"]
    frames = len(case["items"])
    # the official form holds one -200 for the whole video; owl2 writes one per frame, in the same slot
    slot = case["input_ids"].index(-200)
    assert row.prompt_ids == case["input_ids"][:slot] + [-200] * frames + case["input_ids"][slot + 1:]
    for name, pixels in zip(case["items"], row.pixels, strict=True):  # recorded in float16 (one value per 8-bit level)
        assert torch.equal(pixels.half(), torch.from_numpy(OUTPUTS[f"pixel_values__{name}"]))
    assert_matches(pipe.rate([item_of(case)], task=case["task"], prompt=case["prompt"])[0], case["name"])


def test_full_logits_of_an_image_and_a_video(pipe):
    for name, item in (("img_chelsea_square_scorer_quality", frame("chelsea_square")),
                       ("video_coffee_4f_scorer_quality", [frame(f"vB_f{i}") for i in range(4)])):
        media = "image" if isinstance(item, Image.Image) else "video"
        row = rating_row(pipe.tokenizer, pipe.image_processor, item)
        logits = pipe.engine.next_token_logits([row.prompt_ids], [row.pixels])[0]
        assert row.media == media
        # owl2's float32 logits are within 2e-6 of a float64 run; the recorded official float32 ones are up to
        # 1.8e-4 off both, over 32000 logits of magnitude up to 4.2
        np.testing.assert_allclose(logits.numpy(), OUTPUTS[f"{name}__logits_full"], rtol=0, atol=3e-4)


def test_paths_equal_the_official_loading(pipe):
    """Paths (grayscale and RGBA PNGs included) give the official ``convert("RGB")`` pixels, hence its ratings."""
    names = ["camera_gray_tall", "logo_rgba_wide", "astronaut_wide"]
    ratings = pipe.rate([QALIGN / "images" / f"{n}.png" for n in names])
    for name, rating in zip(names, ratings, strict=True):
        assert_matches(rating, f"img_{name}_scorer_quality")


def test_a_mixed_batch_equals_each_item_alone(pipe):
    """Images and videos of 3 and 4 frames in one left-padded prefill; the official code cannot do this."""
    cases = {c["name"]: c for c in CASES}
    names = ["video_astronaut_3f_scorer_quality", "img_coffee_tall_scorer_quality",
             "video_coffee_4f_scorer_quality", "img_logo_rgba_wide_scorer_quality", "img_ihc_wide_scorer_quality"]
    items = [item_of(cases[n]) for n in names]
    together = pipe.rate(items, batch_size=8)
    alone = [pipe.rate([item])[0] for item in items]
    for name, batched, single in zip(names, together, alone, strict=True):
        np.testing.assert_allclose(batched.logits, single.logits, rtol=0, atol=1e-5)
        assert_matches(batched, name)
    # batches of two split the same list differently and still agree
    np.testing.assert_allclose([r.score for r in pipe.rate(items, batch_size=2)], [r.score for r in alone],
                               rtol=0, atol=1e-5)


def test_a_video_item_in_every_form(pipe):
    frames = [frame(f"vA_f{i}") for i in range(3)]
    expected = OUTPUTS["video_astronaut_3f_scorer_quality__score"]
    as_array = np.stack([np.asarray(f) for f in frames])  # [T, H, W, 3]
    for item in (frames, tuple(frames), Video(frames), as_array):
        assert pipe.rate([item])[0].score == pytest.approx(float(expected), abs=1e-4)
    # num_frames samples evenly: 1 of 3 frames is the middle one, rated as a one-frame video
    single = pipe.rate([Video(frames, num_frames=1)])[0]
    assert single.score == pytest.approx(pipe.rate([[frames[1]]])[0].score, abs=1e-6)


def test_other_level_scales(pipe):
    """Q-Boost's nine words in three triads (logits averaged per level, weights 1, 0.5, 0), by hand from the
    recorded full-vocabulary logits."""
    ids = json.loads((QALIGN / "cases.json").read_text())["eval_script_toks"]
    triads = [["good", "average", "poor"], ["high", "medium", "low"], ["fine", "acceptable", "bad"]]
    full = torch.from_numpy(OUTPUTS["img_chelsea_square_scorer_quality__logits_full"]).double()
    per_level = full[torch.tensor([[ids[w] for w in t] for t in triads])].mean(0)
    probs = per_level.softmax(-1)
    rating = pipe.rate([frame("chelsea_square")], levels=triads, weights=[1, 0.5, 0])[0]
    np.testing.assert_allclose(rating.probs, probs.numpy(), rtol=0, atol=1e-5)
    assert rating.score == pytest.approx(float(probs @ torch.tensor([1, 0.5, 0]).double()), abs=1e-5)
    assert rating.levels == ("good/high/fine", "average/medium/acceptable", "poor/low/bad")
    assert rating.normalized == pytest.approx(rating.score)
    # a custom two-word scale: default weights 2, 1
    two = pipe.rate([frame("chelsea_square")], levels=["high", "low"])[0]
    expected = full[[ids["high"], ids["low"]]].softmax(-1)
    assert two.score == pytest.approx(float(expected @ torch.tensor([2.0, 1.0]).double()), abs=1e-5)
    assert two.level in ("high", "low") and two.to_dict()["probs"].keys() == {"high", "low"}


def test_float16_stays_within_the_official_fp16_bound(pipe):
    """The official scorers run only in float16; owl2 in float16 lands as close to the fp32 truth as they do."""
    half = owl2.load(CHECKPOINT, dtype=torch.float16, device="cpu", show_progress=False)
    name = "img_chelsea_square_scorer_quality"
    rating = half.rate([frame("chelsea_square")])[0]
    official = float(OUTPUTS_FP16[f"{name}__score"])
    truth = float(OUTPUTS[f"{name}__score"])
    assert abs(rating.score - truth) <= max(2 * abs(official - truth), 2e-3)


def test_explicit_policy_wins_and_configs_without_the_key(tmp_path, pipe):
    stretched = owl2.load(CHECKPOINT, dtype=torch.float32, device="cpu", policy="stretch", show_progress=False)
    image = frame("astronaut_wide")
    assert not torch.equal(stretched.pixels([image]), pipe.pixels([image]))
    assert torch.equal(stretched.pixels([image]), pipe.image_processor([image], policy="stretch"))
    for value, policy in ((None, "stretch"), ("resize", "stretch"), ("square", "crop"), ("pad", "pad")):
        directory = tmp_path / str(value)
        shutil.copytree(CHECKPOINT, directory)
        config = json.loads((directory / "config.json").read_text())
        config.pop("image_aspect_ratio")
        if value is not None:
            config["image_aspect_ratio"] = value
        (directory / "config.json").write_text(json.dumps(config))
        processor = owl2.load_image_processor(directory)
        assert processor.default_policy == policy
        assert processor.checkpoint_policy == (None if value is None else policy)


def test_bad_input_gives_one_line_errors(pipe):
    image = frame("chelsea_square")
    with pytest.raises(ValueError, match="task must be a word"):
        pipe.rate([image], task="")
    with pytest.raises(ValueError, match="prompt must be one of scorer, eval"):
        pipe.rate([image], prompt="rate this")
    with pytest.raises(ValueError, match="got 2 weights for 5 levels"):
        pipe.rate([image], weights=[1, 0])
    with pytest.raises(ValueError, match="not all equal"):
        pipe.rate([image], weights=[1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="same length"):
        pipe.rate([image], levels=[["good", "bad"], ["high", "medium", "low"]])
    with pytest.raises(ValueError, match="item 1: a video needs at least one frame"):
        pipe.rate([image, []])
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        pipe.rate([image], batch_size=0)
    with pytest.raises(ValueError, match=r"item 0 \(missing.png\)"):
        pipe.rate([QALIGN / "missing.png"])
    # 121 frames of 17 visual tokens do not fit in the context of 2048
    with pytest.raises(ValueError, match=r"121 frames \(121 x 17 visual tokens\).*context of 2048.*num_frames"):
        pipe.rate([[image] * 121])


def test_one_item_without_a_list(pipe):
    rating = pipe.rate(QALIGN / "images" / "chelsea_square.png")
    assert len(rating) == 1
    assert_matches(rating[0], "img_chelsea_square_scorer_quality")


def test_fixture_files_are_the_recorded_ones():
    """The copied checkpoint is the one the outputs were recorded from (hashes in the fixture's manifest)."""
    import hashlib

    manifest = json.loads((QALIGN / "manifest.json").read_text())
    text = json.dumps(manifest)
    for path in sorted(Path(CHECKPOINT).glob("*.bin")):
        assert hashlib.sha256(path.read_bytes()).hexdigest() in text


def write_lossless_video(path: Path, frames: list[Image.Image], fps: int) -> None:
    """A PNG-in-AVI clip: its decoded frames equal ``frames`` exactly."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "rgb24"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())


def test_a_video_file_is_sampled_at_one_frame_per_second(pipe, tmp_path):
    """Six frames at 2 fps: Q-Align's rule keeps frames 0, 2 and 4, and the file rates as those frames do."""
    frames = [frame(f"vB_f{i % 4}") for i in range(6)]
    clip = tmp_path / "clip.avi"
    write_lossless_video(clip, frames, fps=2)
    by_file, by_frames, two = pipe.rate([clip, [frames[0], frames[2], frames[4]], Video(clip, num_frames=2)])
    assert by_file.score == pytest.approx(by_frames.score, abs=1e-6)
    assert two.score == pytest.approx(pipe.rate([[frames[1], frames[4]]])[0].score, abs=1e-6)
    with pytest.raises(ValueError, match=r"item 0 \(short.avi\).*samples no frame"):
        write_lossless_video(tmp_path / "short.avi", frames[:1], fps=2)
        pipe.rate([tmp_path / "short.avi"])
