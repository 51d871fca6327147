"""How the packages depend on each other: the public API and the command line do not import the experiments, the
decoder is plain ``nn.Linear`` with faster kernels swapped in at load, and a model says what it is through its types
rather than through attributes set on it from outside."""

from __future__ import annotations

import subprocess
import sys

import pytest
from torch import nn

import owl2
from owl2.model.quantize import quantization, quantize_language_model
from tests.conftest import OFFICIAL_TINY


def _imported_after(code: str, modules: list[str]) -> dict[str, bool]:
    """Which of ``modules`` a fresh interpreter has imported after running ``code``."""
    probe = f"import sys\n{code}\nprint([m in sys.modules for m in {modules!r}])"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return dict(zip(modules, eval(result.stdout.strip().splitlines()[-1]), strict=True))


HEAVY = ["owl2.experiments", "owl2.experiments.tiny", "owl2.experiments.shapes"]


def test_building_the_command_line_imports_no_experiment():
    code = "from owl2.cli.main import build_parser\nbuild_parser()"
    assert _imported_after(code, HEAVY) == dict.fromkeys(HEAVY, False)


def test_help_of_a_command_imports_no_experiment():
    code = ("import contextlib, io\nfrom owl2.cli.main import build_parser\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    build_parser().parse_args(['convert', '--help'])")
    assert _imported_after(code, HEAVY) == dict.fromkeys(HEAVY, False)


def test_experiment_options_are_there_when_the_command_is_parsed(capsys):
    from owl2.cli.main import build_parser
    from owl2.experiments.tiny import TinyBuild

    args = build_parser().parse_args(["experiment", "build-tiny"])
    assert (args.answer_style, args.object_pieces) == (TinyBuild.answer_style, TinyBuild.object_pieces)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["experiment", "--help"])
    assert "--answer-style" in capsys.readouterr().out


def test_the_api_finds_the_embedded_model_without_the_experiments():
    code = "import owl2.api\nowl2.api.default_model_dir()"
    assert _imported_after(code, HEAVY) == dict.fromkeys(HEAVY, False)
    from owl2.assets import default_model_dir
    from owl2.experiments.tiny import default_model_dir as recipe_dir

    assert owl2.default_model() == default_model_dir() == recipe_dir()


def test_decoder_is_written_with_plain_linear_layers():
    model = owl2.Owl2ForCausalLM(owl2.Owl2Config.from_json(OFFICIAL_TINY))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is nn.Linear for m in linears)


def test_quantization_is_read_from_the_layer_types():
    model = owl2.load_model(OFFICIAL_TINY, show_progress=False)
    assert quantization(model) is None
    assert quantization(quantize_language_model(model, "int8")) == "int8"
    assert not hasattr(model, "quantization")


@pytest.mark.parametrize("settings", [
    {"preset": "text", "r": 2, "alpha": 4, "dropout": 0.0, "train_abstractor": False},
    {"target_pattern": r"model\.layers\.1\.mlp\.down_proj", "r": 2},
    {"r": 2, "quantize_base": "int8"},
], ids=["preset", "pattern", "int8"])
def test_adapter_settings_are_read_back_from_the_adapted_model(tmp_path, settings):
    pytest.importorskip("peft")
    from owl2.training.lora import LoraSettings, apply_lora, load_adapter, read_settings, save_adapter

    wanted = LoraSettings(**settings)
    model = apply_lora(owl2.load_model(OFFICIAL_TINY, show_progress=False), wanted)
    assert not hasattr(model, "owl2_lora_settings")
    assert read_settings(save_adapter(model, tmp_path / "a")) == wanted
    loaded = load_adapter(owl2.load_model(OFFICIAL_TINY, show_progress=False), tmp_path / "a")
    assert read_settings(save_adapter(loaded, tmp_path / "b")) == wanted
    plain = load_adapter(owl2.load_model(OFFICIAL_TINY, show_progress=False), tmp_path / "a", quantize_base=False)
    assert read_settings(save_adapter(plain, tmp_path / "c")).quantize_base is None


def test_save_adapter_rejects_a_model_without_an_adapter(tmp_path):
    pytest.importorskip("peft")
    from owl2.training.lora import save_adapter

    with pytest.raises(ValueError, match="save_adapter expects the model returned by apply_lora or load_adapter"):
        save_adapter(owl2.load_model(OFFICIAL_TINY, show_progress=False), tmp_path / "a")
