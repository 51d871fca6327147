"""Checkpoints saved quantised (``owl2 convert --quantize int8|int4``): what the files hold, that they load back
into the model that quantising at load time gives, and the refusals (int8-dynamic, another mode, a corrupt entry)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import owl2
from owl2.checkpoint.convert import convert_checkpoint
from owl2.checkpoint.io import QUANTIZATION_KEY, RECOMPUTED_KEYS, CheckpointError
from owl2.cli.main import build_parser
from owl2.cli.main import main as cli
from owl2.model.quantize import (
    WeightOnlyInt4Linear,
    WeightOnlyInt8Linear,
    language_linear_names,
    quantization,
)
from tests.conftest import OFFICIAL_TINY, official

pytestmark = pytest.mark.usefixtures("one_thread")

# (mode, group size) as convert takes them; None: int8 has no groups
MODES = [("int4", 32), ("int4", 64), ("int8", None)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def convert_args(source: Path, destination: Path, mode: str, group_size: int | None, dtype: str | None) -> list[str]:
    args = ["convert", str(source), str(destination), "--quiet", "--quantize", mode]
    args += [] if group_size is None else ["--group-size", str(group_size)]
    return args + ([] if dtype is None else ["--dtype", dtype])


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return out


def batches(oracle) -> list[dict[str, torch.Tensor]]:
    return [official(oracle["input_ids_image"], pixel_values=oracle["image"]),
            official(oracle["input_ids_text"]),
            official(oracle["input_ids_batch"], pixel_values=oracle["images_batch"])]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[tuple[str, int | None, str], Path]:
    """The official-tiny fixture converted by the command line for every mode and dtype."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for mode, group_size in MODES:
        for dtype in DTYPES:
            destination = root / f"{mode}-{group_size}-{dtype}"
            assert cli(convert_args(OFFICIAL_TINY, destination, mode, group_size, dtype)) == 0
            out[mode, group_size, dtype] = destination
    return out


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("mode", "group_size"), MODES)
@torch.no_grad()
def test_a_converted_checkpoint_computes_what_quantising_at_load_time_computes(converted, oracle, tiny_fp32, mode,
                                                                               group_size, dtype):
    destination = converted[mode, group_size, dtype]
    settings = json.loads((destination / "config.json").read_text())[QUANTIZATION_KEY]
    assert settings == ({"mode": "int8"} if mode == "int8" else {"mode": "int4", "group_size": group_size})
    loaded = owl2.load_model(destination, dtype=DTYPES[dtype], show_progress=False)
    reference = owl2.load_model(OFFICIAL_TINY, dtype=DTYPES[dtype], show_progress=False, quantize=mode,
                                group_size=group_size)
    assert quantization(loaded) == mode
    kind = WeightOnlyInt4Linear if mode == "int4" else WeightOnlyInt8Linear
    layers = [loaded.get_submodule(name) for name in language_linear_names(tiny_fp32)]
    assert len(layers) == 9 * loaded.config.num_hidden_layers + 1 and all(type(m) is kind for m in layers)
    if mode == "int4":
        assert {m.group_size for m in layers} == {group_size}
    for batch in batches(oracle):
        assert torch.equal(loaded(**batch).logits, reference(**batch).logits)
    image = batches(oracle)[0]
    assert torch.equal(loaded.generate(**image, max_new_tokens=6), reference.generate(**image, max_new_tokens=6))


@pytest.mark.parametrize(("mode", "group_size"), MODES)
def test_the_python_api_writes_the_files_the_command_line_writes(converted, tmp_path, mode, group_size):
    report = convert_checkpoint(OFFICIAL_TINY, tmp_path / "api", dtype="bf16", quantize=mode, group_size=group_size,
                                show_progress=False)
    assert report.verified
    assert report.quantization == json.loads((tmp_path / "api" / "config.json").read_text())[QUANTIZATION_KEY]
    by_cli = converted[mode, group_size, "bf16"]
    assert [f.name for f in report.files] == ["model.safetensors"]
    assert (tmp_path / "api" / "model.safetensors").read_bytes() == (by_cli / "model.safetensors").read_bytes()
    assert (tmp_path / "api" / "config.json").read_text() == (by_cli / "config.json").read_text()


def test_int4_files_hold_packed_nibbles_and_the_rest_unchanged(converted, tiny_fp32):
    stored = tensors(converted["int4", 64, "bf16"])
    source = {k: v for k, v in tensors(OFFICIAL_TINY).items() if not RECOMPUTED_KEYS.search(k)}
    names = language_linear_names(tiny_fp32)
    weight_bits = packed_bits = 0
    for name in names:
        out_features, in_features = source[f"{name}.weight"].shape
        assert f"{name}.weight" not in stored
        qweight, scales = stored[f"{name}.qweight"], stored[f"{name}.scales_and_zeros"]
        padded = -(-out_features // 64) * 64
        assert qweight.dtype == torch.uint8 and qweight.shape == (padded // 64, in_features, 32)
        assert scales.dtype == torch.bfloat16 and scales.shape == (in_features // 64, padded, 2)
        weight_bits += 16 * out_features * in_features
        packed_bits += 8 * (qweight.numel() + 2 * scales.numel())
        if padded == out_features:  # no padding rows: 4 bits a weight plus a bf16 scale and zero per 64
            assert 8 * (qweight.numel() + 2 * scales.numel()) / (out_features * in_features) == 4.5
    # the LM head's 320 outputs are padded to 384 for the kernel's blocks of 64 rows
    assert 4.5 <= 16 * packed_bits / weight_bits < 5.0
    # everything else (vision tower, abstractor, embeddings, norms) is the source cast to bf16
    floats = {k for k in source if k.rpartition(".")[0] not in names}
    assert floats and floats == {k for k in stored if not k.endswith((".qweight", ".scales_and_zeros"))}
    assert any(k.startswith("model.vision_model.") for k in floats)
    assert any(k.startswith("model.visual_abstractor.") for k in floats)
    assert "model.embed_tokens.weight" in floats and "model.norm.weight" in floats
    for key in floats:
        assert torch.equal(stored[key], source[key].to(torch.bfloat16)), key


def test_int8_files_hold_int8_weights_with_float32_scales(converted, tiny_fp32):
    stored = tensors(converted["int8", None, "bf16"])
    source = tensors(OFFICIAL_TINY)
    for name in language_linear_names(tiny_fp32):
        weight = source[f"{name}.weight"]
        assert stored[f"{name}.qweight"].dtype == torch.int8 and stored[f"{name}.qweight"].shape == weight.shape
        assert stored[f"{name}.scale"].dtype == torch.float32 and stored[f"{name}.scale"].shape == weight.shape[:1]
        # round to nearest of the bf16 weight: within half a step of each channel's scale
        error = stored[f"{name}.qweight"].float() * stored[f"{name}.scale"][:, None] - weight.bfloat16().float()
        assert (error.abs() <= stored[f"{name}.scale"][:, None] / 2 + 1e-6).all()


def test_verification_catches_a_changed_quantised_layer(converted, tmp_path):
    from safetensors.torch import save_file

    from owl2.checkpoint.convert import verify_conversion

    destination = tmp_path / "changed"
    shutil.copytree(converted["int4", 64, "fp32"], destination)
    stored = tensors(destination)
    stored["model.layers.1.mlp.up_proj.qweight"][0, 0, 0] ^= 1
    save_file(stored, destination / "model.safetensors")
    settings = json.loads((destination / "config.json").read_text())[QUANTIZATION_KEY]
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.qweight differs from the source "
                                              "weight quantised again"):
        verify_conversion(OFFICIAL_TINY, [destination / "model.safetensors"], torch.float32, show_progress=False,
                          quantization=settings)
    # the same files pass before the change
    verify_conversion(OFFICIAL_TINY, [converted["int4", 64, "fp32"] / "model.safetensors"], torch.float32,
                      show_progress=False, quantization=settings)


@pytest.mark.parametrize(("args", "message"), [
    (["--quantize", "int8-dynamic"], "int8-dynamic cannot be saved (fbgemm's packed weights have no file format)"),
    (["--quantize", "int4", "--group-size", "48"], "int4 group size 48 is not supported"),
    (["--quantize", "int4", "--group-size", "128"], "layer of 64 inputs"),
    (["--quantize", "int8", "--group-size", "64"], "int8 is quantised per output channel and takes no group size"),
    (["--group-size", "64"], "a group size applies to int4 quantisation only"),
])
def test_convert_refuses_what_it_cannot_save_in_one_line(tmp_path, capsys, args, message):
    assert cli(["convert", str(OFFICIAL_TINY), str(tmp_path / "out"), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("owl2 convert: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_quantised_checkpoint_is_not_converted_again(converted, tmp_path, capsys):
    assert cli(["convert", str(converted["int8", None, "fp32"]), str(tmp_path / "again"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is already quantised (int8)" in err, err


def test_loading_with_another_mode_is_one_line(converted, capsys):
    int4 = converted["int4", 64, "fp32"]
    with pytest.raises(CheckpointError, match=r"holds int4 weights; load it with quantize=None or quantize='int4'"):
        owl2.load_model(int4, show_progress=False, quantize="int8")
    assert quantization(owl2.load_model(int4, show_progress=False, quantize="int4")) == "int4"
    status = cli(["ask", "--model", str(int4), "--prompt", "hi", "--quantize", "int8", "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("owl2 ask: error: ") and err.count("\n") == 1, err
    assert "holds int4 weights" in err


@pytest.mark.parametrize(("entry", "message"), [
    ("int4", "owl2_quantization must be an object whose mode is one of int8, int4"),
    ({"mode": "int5"}, "owl2_quantization must be an object whose mode is one of int8, int4"),
    ({"mode": "int8-dynamic"}, "owl2_quantization must be an object whose mode is one of int8, int4"),
    ({"mode": "int4", "group_size": 48}, "needs a group_size among 32, 64, 128, 256; got 48"),
    ({"mode": "int4", "group_size": 64.0}, "needs a group_size among 32, 64, 128, 256; got 64.0"),
    ({"mode": "int4"}, "needs a group_size among 32, 64, 128, 256; got None"),
    ({"mode": "int4", "group_size": 32}, "lm_head.scales_and_zeros: checkpoint shape [1, 320, 2] differs"),
    ({"mode": "int8"}, "lm_head.qweight: checkpoint shape [5, 64, 32] differs"),
    (None, "missing key(s): lm_head.weight"),
])
def test_a_corrupt_quantisation_entry_is_one_checkpoint_error_line(converted, tmp_path, entry, message):
    directory = tmp_path / "corrupt"
    shutil.copytree(converted["int4", 64, "fp32"], directory)
    config = json.loads((directory / "config.json").read_text())
    if entry is None:
        del config[QUANTIZATION_KEY]
    else:
        config[QUANTIZATION_KEY] = entry
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as caught:
        owl2.load_model(directory, show_progress=False)
    assert "\n" not in str(caught.value) and message in str(caught.value), caught.value


@pytest.fixture(scope="module")
def tiny_int4(tmp_path_factory) -> Path:
    """The embedded owl2-tiny (bf16, with its tokenizer) converted to int4 at group size 32."""
    destination = tmp_path_factory.mktemp("tiny") / "owl2-tiny-int4"
    assert cli(convert_args(owl2.default_model(), destination, "int4", 32, None)) == 0
    return destination


def test_a_converted_owl2_tiny_answers_as_the_model_quantised_at_load_time(tiny_int4, tmp_path, capsys):
    source = owl2.default_model()
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"):
        assert (tiny_int4 / name).read_bytes() == (source / name).read_bytes()
    scene = tmp_path / "scene.png"
    owl2.api.example_scene().save(scene)
    prompt = "How many circles are there?\nAnswer the question using a single word or phrase."
    assert cli(["ask", "--model", str(tiny_int4), "--prompt", prompt, "--image", str(scene), "--quiet",
                "--device", "cpu", "--max-new-tokens", "8"]) == 0
    answer = capsys.readouterr().out.strip()
    pipe = owl2.load(tiny_int4, device="cpu", show_progress=False)
    assert quantization(pipe.model) == "int4" and pipe.model.dtype == torch.bfloat16
    assert answer and answer == pipe.chat(prompt, scene, max_new_tokens=8)
    # the embedded model quantised as it loads (owl2.load takes no group size, load_model does)
    by_load = owl2.load_model(source, dtype=torch.bfloat16, show_progress=False, quantize="int4", group_size=32)
    assert answer == owl2.api.Pipeline(by_load, pipe.tokenizer, pipe.image_processor).chat(prompt, scene,
                                                                                          max_new_tokens=8)


def assert_saved_again(source: Path, model: owl2.Owl2ForCausalLM, directory: Path) -> None:
    owl2.save_model(model, directory)
    again, stored = tensors(directory), tensors(source)
    assert again.keys() == stored.keys()
    for key, tensor in stored.items():
        assert again[key].dtype == tensor.dtype and torch.equal(again[key], tensor), key
    settings = json.loads((directory / "config.json").read_text())[QUANTIZATION_KEY]
    assert settings == json.loads((source / "config.json").read_text())[QUANTIZATION_KEY]


@pytest.mark.parametrize(("mode", "group_size"), MODES)
def test_load_then_save_gives_the_checkpoint_back(converted, tmp_path, mode, group_size):
    """int8's per-channel scales stay float32 in a bf16 model, so they save as they were stored."""
    source = converted[mode, group_size, "bf16"]
    assert_saved_again(source, owl2.load_model(source, dtype="bf16", show_progress=False), tmp_path / "again")


def test_a_saved_checkpoint_is_not_loaded_at_another_group_size(converted):
    with pytest.raises(CheckpointError, match="group size 64; it cannot be loaded at group size 32"):
        owl2.load_model(converted["int4", 64, "fp32"], show_progress=False, quantize="int4", group_size=32)


def test_a_pipeline_saves_the_checkpoint_it_loaded(tiny_int4, tmp_path):
    pipe = owl2.load(tiny_int4, device="cpu", show_progress=False)
    assert_saved_again(tiny_int4, pipe.model, tmp_path / "again")


@pytest.mark.parametrize("command", [["ask", "--prompt", "hi"], ["chat"], ["serve"], ["eval", "--task", "shapes"],
                                     ["rate", "scene.png"]])
def test_every_model_command_takes_quantize_int4(command):
    args = build_parser().parse_args([*command, "--quantize", "int4"])
    assert args.quantize == "int4"


def test_rate_quantises_the_model_it_loads(tmp_path):
    scene = tmp_path / "scene.png"
    owl2.api.example_scene().save(scene)
    ratings = {}
    for quantize in (None, "int4"):
        output = tmp_path / f"ratings-{quantize}.jsonl"
        extra = [] if quantize is None else ["--quantize", quantize]
        assert cli(["rate", str(scene), "--output", str(output), "--quiet", "--device", "cpu", *extra]) == 0
        (record,) = [json.loads(line) for line in output.read_text().splitlines()]
        ratings[quantize] = record
    assert ratings[None]["model"] == "owl2-tiny" and ratings["int4"]["model"] == "owl2-tiny (int4)"
    pipe = owl2.load(None, device="cpu", show_progress=False, quantize="int4")
    assert ratings["int4"]["score"] == pipe.rate([scene])[0].score
    assert ratings["int4"]["score"] != ratings[None]["score"]
