"""The config object: official config.json in and out, 7B defaults, contradictions rejected."""

from __future__ import annotations

import json
import re

import pytest

from owl2.model.config import ConfigError, Owl2Config
from tests.conftest import OFFICIAL_TINY


def official_tiny_dict() -> dict:
    return json.loads((OFFICIAL_TINY / "config.json").read_text())


def test_defaults_are_the_7b_release():
    c = Owl2Config()
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (32000, 4096, 11008, 32)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 32, 128)
    assert (c.rms_norm_eps, c.rope_theta, c.max_position_embeddings) == (1e-6, 10000.0, 2048)
    assert (c.bos_token_id, c.eos_token_id, c.tie_word_embeddings) == (1, 2, False)
    v, a = c.vision, c.abstractor
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (1024, 4096, 24, 16)
    assert (v.image_size, v.patch_size, v.layer_norm_eps, v.num_positions) == (448, 14, 1e-6, 1025)
    assert (a.hidden_size, a.num_hidden_layers, a.num_attention_heads, a.intermediate_size) == (1024, 6, 16, 2816)
    assert (a.num_learnable_queries, a.grid_size, a.layer_norm_eps) == (64, 32, 1e-6)
    assert c.tokens_per_image == 65
    assert c.image_token_index == 32000


def test_official_config_round_trips_unchanged():
    data = official_tiny_dict()
    config = Owl2Config.from_dict(data)
    assert config.hidden_size == 64 and config.vision.image_size == 56 and config.abstractor.grid_size == 4
    assert config.tokens_per_image == 9
    assert config.to_dict() == data


def test_unknown_keys_are_kept_at_every_level(tmp_path):
    data = official_tiny_dict()
    data["my_top_key"] = {"a": 1}
    data["visual_config"]["my_visual_key"] = 3
    data["visual_config"]["visual_model"]["my_vit_key"] = "x"
    data["visual_config"]["visual_abstractor"]["my_abs_key"] = [1, 2]
    config = Owl2Config.from_dict(data)
    config.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == data
    assert Owl2Config.from_json(tmp_path).to_dict() == data


def test_image_token_id_is_written_only_when_set():
    config = Owl2Config.from_dict({**official_tiny_dict(), "image_token_id": 400})
    assert config.image_token_index == 400
    assert config.to_dict()["image_token_id"] == 400
    assert "image_token_id" not in Owl2Config.from_dict(official_tiny_dict()).to_dict()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["visual_config"]["visual_abstractor"].update(hidden_size=48), "abstractor hidden_size"),
        (lambda d: d["visual_config"]["visual_abstractor"].update(encoder_hidden_size=48), "encoder_hidden_size"),
        (lambda d: d["visual_config"]["visual_model"].update(image_size=60), "multiple of patch_size"),
        (lambda d: d["visual_config"]["visual_abstractor"].update(grid_size=5), "grid_size"),
        (lambda d: d.update(num_attention_heads=5), "multiple of num_attention_heads"),
        (lambda d: d.update(num_key_value_heads=3), "num_key_value_heads"),
        (lambda d: d.update(hidden_act="gelu"), "hidden_act"),
        (lambda d: d.update(image_token_id=5), "image_token_id"),
        (lambda d: d.update(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling"),
        (lambda d: d["visual_config"]["visual_model"].update(hidden_act="gelu"), "vision hidden_act"),
    ],
)
def test_contradictory_values_are_rejected(edit, message):
    data = official_tiny_dict()
    edit(data)
    with pytest.raises(ConfigError, match=message):
        Owl2Config.from_dict(data)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"no config\.json"):
        Owl2Config.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Owl2Config.from_json(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        Owl2Config.from_json(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(num_hidden_layers=4.5), r"^num_hidden_layers must be an integer, got 4\.5$"),
        (lambda d: d.update(num_hidden_layers=4.0), "num_hidden_layers must be an integer"),
        (lambda d: d.update(hidden_size="64"), "hidden_size must be an integer, got '64'"),
        (lambda d: d.update(vocab_size=None), "vocab_size must be an integer, got None"),
        (lambda d: d.update(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
        (lambda d: d.update(rms_norm_eps=float("inf")), "rms_norm_eps must be a finite number"),
        (lambda d: d.update(rms_norm_eps=0), "rms_norm_eps must be positive"),
        (lambda d: d.update(num_key_value_heads=2.0), "num_key_value_heads must be an integer or null"),
        (lambda d: d.update(rope_scaling=[2]), "rope_scaling must be an object or null"),
        (lambda d: d.update(architectures="x"), "architectures must be a list of strings"),
        (lambda d: d["visual_config"]["visual_model"].update(patch_size="14"),
         "visual_config.visual_model.patch_size must be an integer"),
        (lambda d: d["visual_config"]["visual_abstractor"].update(grid_size=4.0),
         "visual_config.visual_abstractor.grid_size must be an integer or null"),
        (lambda d: d.update(num_hidden_layers=1_000_000), "num_hidden_layers must be between 1 and 1024"),
        (lambda d: d.update(vocab_size=-1), "vocab_size must be positive"),
        (lambda d: d.update(intermediate_size=10**12), "intermediate_size must be between"),
        (lambda d: d.update(max_position_embeddings=10**10), "max_position_embeddings must be between"),
        (lambda d: d.update(initializer_range=-0.1), "initializer_range must not be negative"),
        (lambda d: d["visual_config"]["visual_model"].update(num_hidden_layers=0), "vision num_hidden_layers must be"),
        (lambda d: d["visual_config"]["visual_model"].update(num_attention_heads=0), "vision num_attention_heads"),
        (lambda d: d["visual_config"]["visual_model"].update(patch_size=0), "vision patch_size must be positive"),
        (lambda d: d["visual_config"]["visual_model"].update(image_size=10**6), "vision image_size must be between"),
        (lambda d: d["visual_config"]["visual_model"].update(attention_dropout=2.0), "attention_dropout must be"),
        (lambda d: d["visual_config"]["visual_abstractor"].update(num_hidden_layers=10**9),
         "abstractor num_hidden_layers must be between"),
        (lambda d: d["visual_config"]["visual_abstractor"].update(num_attention_heads=0),
         "abstractor num_attention_heads must be positive"),
        (lambda d: d["visual_config"]["visual_abstractor"].update(num_learnable_queries=10**9),
         "num_learnable_queries must be between"),
        (lambda d: d.update(rope_scaling={"type": "linear", "factor": "2"}), "rope_scaling"),
        (lambda d: d.update(visual_config=[1]), "visual_config must be an object, got list"),
        (lambda d: d["visual_config"].update(visual_abstractor="x"),
         "visual_config.visual_abstractor must be an object, got str"),
    ],
)
def test_wrong_types_and_absurd_sizes_are_one_line_config_errors(edit, message):
    """Before the model is built: a float layer count or a string size would fail as a TypeError deep inside
    construction, a million layers would take minutes to lay out."""
    data = official_tiny_dict()
    edit(data)
    with pytest.raises(ConfigError, match=message) as caught:
        Owl2Config.from_dict(data)
    assert "\n" not in str(caught.value)


def test_the_released_configs_are_within_the_bounds():
    assert Owl2Config().num_hidden_layers == 32  # the 7B defaults validate
    Owl2Config.from_dict({**official_tiny_dict(), "vocab_size": 128256, "hidden_size": 16384,
                          "intermediate_size": 53248, "num_hidden_layers": 126, "num_attention_heads": 128,
                          "num_key_value_heads": 8, "max_position_embeddings": 131072, "rope_theta": 500000})


def test_config_file_errors_name_the_file(tmp_path):
    data = official_tiny_dict()
    data["num_hidden_layers"] = 4.5
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'config.json'))}: num_hidden_layers must"):
        Owl2Config.from_json(tmp_path)
    (tmp_path / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError, match="nested too deeply"):
        Owl2Config.from_json(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ConfigError, match=r"config\.json: not a regular file"):
        Owl2Config.from_json(tmp_path)


def test_from_dict_survives_values_nested_too_deeply_to_copy():
    """Unknown keys are deep-copied; one nested thousands deep (built in Python, no JSON limit) is a ConfigError."""
    value: list = []
    for _ in range(5000):
        value = [value]
    with pytest.raises(ConfigError, match="nested too deeply"):
        Owl2Config.from_dict({**official_tiny_dict(), "my_key": value})
    with pytest.raises(ConfigError, match="the config must be an object"):
        Owl2Config.from_dict([1, 2])  # type: ignore[arg-type]
