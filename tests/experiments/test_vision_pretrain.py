"""Stage V of owl2-tiny: the dense labels are those of the scene, and a short run trains exactly the vision side."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from owl2.experiments.shapes import Scene, ShapeObject
from owl2.experiments.tiny import IMAGE_SIZE, TINY_CONFIGS, VISION_SIDE, random_model, start_from_vision
from owl2.experiments.vision_pretrain import VisionPretrainConfig, grid_targets, pretrain_vision
from owl2.model.config import Owl2Config
from owl2.processing.image import ImageProcessor


def test_grid_targets_by_hand():
    scene = Scene((ShapeObject("triangle", "blue", "large", x=0.1, y=0.9, extent=0.2),
                   ShapeObject("circle", "red", "small", x=0.6, y=0.3, extent=0.12),
                   ShapeObject("cross", "white", "small", x=0.65, y=0.4, extent=0.12)), "beige", "noise")
    targets = grid_targets(scene, 4)
    # (0.1, 0.9) is column 0, row 3: cell 12; (0.6, 0.3) and (0.65, 0.4) both fall in column 2, row 1: cell 6,
    # which keeps the first object
    assert targets["present"].nonzero().flatten().tolist() == [6, 12]
    assert targets["objects"][12].tolist() == [2, 2, 1]  # triangle, blue, large
    assert targets["objects"][6].tolist() == [0, 0, 0]  # circle, red, small
    assert (targets["objects"][0] == -100).all()
    torch.testing.assert_close(targets["offset"][12], torch.tensor([0.4, 0.6]))
    torch.testing.assert_close(targets["offset"][6], torch.tensor([0.4, 0.2]))
    assert targets["scene"].tolist() == [1, 2]  # beige, noise


def test_short_run_trains_the_vision_side_only(tmp_path):
    init = tmp_path / "init"
    data = json.loads((TINY_CONFIGS / "model.json").read_text())
    data["vocab_size"] = 400
    Owl2Config.from_dict(data).save(init)
    model = random_model(init, seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = VisionPretrainConfig(scenes=96, probe_scenes=32, steps=30, batch_size=16, log_every=5, warmup_steps=3)
    processor = ImageProcessor(size=IMAGE_SIZE, crop_size=IMAGE_SIZE, default_policy="stretch")
    report = pretrain_vision(model, config, tmp_path / "stage-v", image_size=IMAGE_SIZE, processor=processor,
                             show_progress=False)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed and all(name.startswith(VISION_SIDE) for name in changed)
    assert "model.visual_abstractor.query_embeds" in changed
    assert "model.visual_abstractor.visual_fc.weight" not in changed
    losses = [json.loads(line)["loss"] for line in (tmp_path / "stage-v" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert 0.0 <= report["presence"] <= 1.0 and json.loads((tmp_path / "stage-v" / "probe.json").read_text()) == report

    # a later stage starts from a fresh initialisation with exactly this vision side
    import owl2

    owl2.save_model(model, tmp_path / "vision")
    start = start_from_vision(tmp_path / "vision", init, tmp_path / "start", seed=1)
    restarted = dict(owl2.load_model(start, show_progress=False).named_parameters())
    fresh = dict(random_model(init, seed=1).named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(restarted[name], param if name.startswith(VISION_SIDE) else fresh[name]), name


def test_runs_without_tqdm(tmp_path, monkeypatch, capsys):
    # tqdm is optional (the progress extra): without it stage V reports each logged loss on stderr instead
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    init = tmp_path / "init"
    data = json.loads((TINY_CONFIGS / "model.json").read_text())
    data["vocab_size"] = 400
    Owl2Config.from_dict(data).save(init)
    config = VisionPretrainConfig(scenes=8, probe_scenes=4, steps=2, batch_size=4, log_every=1, warmup_steps=1)
    processor = ImageProcessor(size=IMAGE_SIZE, crop_size=IMAGE_SIZE, default_policy="stretch")
    pretrain_vision(random_model(init, seed=0), config, tmp_path / "stage-v", image_size=IMAGE_SIZE,
                    processor=processor)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines if line.startswith("owl2 stage V")] == [
        "owl2 stage V: step 1/2", "owl2 stage V: step 2/2"]


def test_settings_file_reads_like_a_recipe_with_overrides(tmp_path):
    path = tmp_path / "vision.toml"
    path.write_text("seed = 4\nscenes = 100\n\n[train]\nsteps = 50\nbatch_size = 8\n\n[optim]\nlr = 1e-3\n\n"
                    "[loss_weights]\nobjects = 2.0\noffset = 1.0\nscene = 0.5\n")
    config = VisionPretrainConfig.from_toml(path, ["train.steps=20", "optim.min_lr=1e-5", "loss_weights.scene=0.25"],
                                            batch_size=4, seed=None)
    assert (config.seed, config.scenes, config.steps, config.batch_size) == (4, 100, 20, 4)
    assert (config.lr, config.min_lr) == (1e-3, 1e-5)
    assert config.loss_weights == {"objects": 2.0, "offset": 1.0, "scene": 0.25}
    with pytest.raises(ValueError, match="unknown stage-V settings epochs"):
        VisionPretrainConfig.from_toml(path, ["train.epochs=2"])


def test_logged_rate_follows_the_trainer_schedule(tmp_path):
    from owl2.training.optim import OptimConfig, lr_multiplier

    init = tmp_path / "init"
    data = json.loads((TINY_CONFIGS / "model.json").read_text())
    data["vocab_size"] = 400
    Owl2Config.from_dict(data).save(init)
    config = VisionPretrainConfig(scenes=8, probe_scenes=4, steps=4, batch_size=2, log_every=1, warmup_steps=2,
                                  lr=1e-3, min_lr=1e-4)
    processor = ImageProcessor(size=IMAGE_SIZE, crop_size=IMAGE_SIZE, default_policy="stretch")
    pretrain_vision(random_model(init, seed=0), config, tmp_path / "stage-v", image_size=IMAGE_SIZE,
                    processor=processor, show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "stage-v" / "metrics.jsonl").read_text().splitlines()]
    schedule = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2, total_steps=4)
    # Each record shows the rate its own step trained with: warm-up 0.5, 1.0, then the cosine down to min_lr
    assert [r["lr"] for r in records] == pytest.approx([1e-3 * lr_multiplier(s, schedule) for s in range(4)],
                                                       rel=1e-12)
    assert records[0]["lr"] == pytest.approx(5e-4) and records[-1]["lr"] == pytest.approx(1e-3 * (1 + 0.1) / 2)
