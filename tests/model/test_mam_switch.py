"""The MAM ablation switch: ``modality_adaptive=False`` shares norms and K/V between text and image positions."""

from __future__ import annotations

import dataclasses

import torch

import owl2
from owl2.model import init_weights
from tests.conftest import TINY_CONFIG, official, random_official_ids


def test_mam_off_has_one_branch_and_equals_mam_with_identical_branches():
    on = init_weights(owl2.Owl2ForCausalLM(TINY_CONFIG), seed=3).eval()  # branch 1 starts as a copy of branch 0
    off_config = dataclasses.replace(TINY_CONFIG, modality_adaptive=False)
    off = owl2.Owl2ForCausalLM(off_config).eval()
    names = {n for n, _ in off.named_parameters()}
    assert not any(".multiway.1." in n for n in names)
    assert names == {n for n, _ in on.named_parameters() if ".multiway.1." not in n}
    off.load_state_dict({k: v for k, v in on.state_dict().items() if k in off.state_dict()})

    g = torch.Generator().manual_seed(0)
    ids = random_official_ids(g, 12, 2, TINY_CONFIG.vocab_size)[None]
    size = TINY_CONFIG.vision.image_size
    batch = official(ids, pixel_values=torch.randn(2, 3, size, size, generator=g))
    with torch.no_grad():
        assert torch.allclose(on(**batch).logits, off(**batch).logits, atol=1e-5)
        # Once the image branch differs, the MAM model's outputs change and the shared model's do not.
        on.model.layers[0].self_attn.k_proj.multiway[1].weight.mul_(2.0)
        assert not torch.allclose(on(**batch).logits, off(**batch).logits, atol=1e-3)


def test_mam_switch_round_trips_through_config_json(tmp_path):
    config = dataclasses.replace(TINY_CONFIG, modality_adaptive=False)
    config.save(tmp_path)
    assert owl2.Owl2Config.from_json(tmp_path).modality_adaptive is False
    TINY_CONFIG.save(tmp_path / "on")
    assert "modality_adaptive" not in (tmp_path / "on" / "config.json").read_text()  # the released layout
