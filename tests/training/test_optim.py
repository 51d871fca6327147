"""Stage freezing, parameter groups and the schedule; a real optimizer step proves what changes."""

from __future__ import annotations

import pytest
import torch

import owl2
from owl2.training import OptimConfig, build_optimizer, build_scheduler, lr_multiplier, param_groups, set_trainable
from owl2.training.optim import group_parameters
from tests.conftest import OFFICIAL_TINY, official


def fresh_model() -> owl2.Owl2ForCausalLM:
    return owl2.load_model(OFFICIAL_TINY, show_progress=False).train()


def one_step(model, oracle, config: OptimConfig) -> set[str]:
    """Take one optimizer step on an image batch and a text batch; return the names of the parameters that moved."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, config)
    image = official(oracle["input_ids_image"], pixel_values=oracle["image"], labels=oracle["input_ids_image"])
    text = official(oracle["input_ids_text"], labels=oracle["input_ids_text"])
    loss = model(**image).loss + model(**text).loss
    loss.backward()
    optimizer.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


@pytest.mark.parametrize("stage", ["stage1", "stage2", "language"])
def test_exactly_the_stage_parameters_change(oracle, stage):
    model = fresh_model()
    trainable = set(set_trainable(model, stage))
    changed = one_step(model, oracle, OptimConfig(lr=1e-3, warmup_steps=0))
    assert changed == trainable
    names = {n for n, _ in model.named_parameters()}
    if stage == "stage2":
        assert trainable == names
    elif stage == "language":
        frozen = {n for n in names if n.startswith(("model.vision_model.", "model.visual_abstractor.encoder."))}
        frozen.add("model.visual_abstractor.query_embeds")
        assert trainable == names - frozen
        assert {"model.visual_abstractor.visual_fc.weight", "model.visual_abstractor.vit_eos",
                "model.layers.0.self_attn.k_proj.multiway.1.weight", "lm_head.weight"} <= trainable
    else:
        expected = {n for n in names if n.startswith(("model.vision_model.", "model.visual_abstractor."))
                    or ".multiway.1." in n}
        assert trainable == expected
        assert "model.layers.0.self_attn.k_proj.multiway.1.weight" in trainable
        assert "model.layers.0.self_attn.k_proj.multiway.0.weight" not in trainable
        assert "model.layers.0.self_attn.q_proj.weight" not in trainable
        assert "lm_head.weight" not in trainable and "model.embed_tokens.weight" not in trainable


def test_abstractor_lr_and_vit_layer_decay():
    model = fresh_model()
    set_trainable(model, "stage2")
    config = OptimConfig(lr=1e-4, abstractor_lr=3e-5, vit_layer_decay=0.5, weight_decay=0.05)
    lr_of = {name: g["lr"] for g in param_groups(model, config) for name in g["names"]}
    decay_of = {name: g["weight_decay"] for g in param_groups(model, config) for name in g["names"]}
    layers = len(model.model.vision_model.encoder.layers)  # 2: scales 0.5**3 (embeddings), 0.5**2, 0.5, 1 (post-LN)
    assert lr_of["model.vision_model.embeddings.patch_embed.weight"] == pytest.approx(1e-4 * 0.5 ** (layers + 1))
    assert lr_of["model.vision_model.encoder.layers.0.mlp.fc1.weight"] == pytest.approx(1e-4 * 0.5**2)
    assert lr_of["model.vision_model.encoder.layers.1.mlp.fc1.weight"] == pytest.approx(1e-4 * 0.5)
    assert lr_of["model.vision_model.post_layernorm.weight"] == pytest.approx(1e-4)
    assert lr_of["model.visual_abstractor.encoder.layers.0.crossattention.attention.query.weight"] == 3e-5
    assert lr_of["model.layers.0.mlp.up_proj.weight"] == 1e-4
    assert decay_of["model.layers.0.mlp.up_proj.weight"] == 0.05
    for no_decay in ("model.layers.0.input_layernorm.multiway.1.weight", "model.vision_model.embeddings.cls_token",
                     "model.visual_abstractor.query_embeds", "model.vision_model.encoder.layers.0.mlp.fc1.bias"):
        assert decay_of[no_decay] == 0.0
    optimizer = build_optimizer(model, config)
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-6


def test_warmup_then_cosine_schedule():
    config = OptimConfig(lr=1e-4, min_lr=1e-6, warmup_steps=10, total_steps=110)
    assert lr_multiplier(0, config) == pytest.approx(0.1)
    assert lr_multiplier(9, config) == pytest.approx(1.0)
    assert lr_multiplier(60, config) == pytest.approx(0.01 + 0.99 * 0.5)  # half way through the cosine
    assert lr_multiplier(110, config) == pytest.approx(0.01)
    assert lr_multiplier(500, config) == pytest.approx(0.01)
    model = fresh_model()
    set_trainable(model, "stage1")
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4, abstractor_lr=5e-5, warmup_steps=10, total_steps=110))
    scheduler = build_scheduler(optimizer, OptimConfig(lr=1e-4, warmup_steps=10, total_steps=110))
    group_lrs = [g["lr"] for g in optimizer.param_groups]
    assert group_lrs == pytest.approx([g["base_lr"] * 0.1 for g in optimizer.param_groups])
    for _ in range(9):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([g["base_lr"] for g in optimizer.param_groups])


def test_unknown_stage_and_frozen_model_are_errors():
    model = fresh_model()
    with pytest.raises(ValueError, match="unknown stage"):
        set_trainable(model, "stage3")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, OptimConfig())


def test_named_parameters_outside_a_model_group_like_the_model():
    """Stage V groups the vision side with read-out heads the model does not hold: the same rules apply by name."""
    model = fresh_model()
    set_trainable(model, "stage2")
    config = OptimConfig(lr=1e-4, abstractor_lr=3e-5, vit_layer_decay=0.5, weight_decay=0.05)
    layers = len(model.model.vision_model.encoder.layers)
    assert group_parameters(((n, p) for n, p in model.named_parameters()), config, layers) == param_groups(
        model, config)

    heads = torch.nn.Linear(4, 2)
    named = [(n, p) for n, p in model.named_parameters() if n.startswith("model.vision_model.")]
    named += [(f"heads.{n}", p) for n, p in heads.named_parameters()]
    flat = OptimConfig(lr=1e-3, vit_layer_decay=1.0, weight_decay=0.05)
    groups = group_parameters(named, flat, layers)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.0), (1e-3, 0.05)]  # the cls token comes first
    decayed = groups[1]["names"]
    assert "heads.weight" in decayed and "heads.bias" in groups[0]["names"]
    assert "model.vision_model.encoder.layers.0.mlp.fc1.weight" in decayed
    assert sum(len(g["params"]) for g in groups) == len(named)
