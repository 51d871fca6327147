"""LoRA adapters in the layout Q-Align and DeQA-Score publish (and owl2's own) through ``owl2.load(adapter=...)`` and
``owl2 merge``, on the Q-Align-format random-weight checkpoint ``tests/fixtures/qalign/checkpoint``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

import owl2
from owl2.checkpoint.io import CheckpointError
from owl2.cli.main import main
from owl2.training.lora import adapter_layout, merge_into
from tests.conftest import FIXTURES

QALIGN = FIXTURES / "qalign" / "checkpoint"
CONFIG = owl2.Owl2Config.from_json(QALIGN)
PREFIX = "base_model.model."
TARGETS = ("self_attn.q_proj", "self_attn.v_proj.multiway.1")
R, ALPHA = 8, 12  # alpha / r = 1.5: a scale of alpha (or of 1) would show
# Tensors the adapter's non_lora_trainables.bin replaces: abstractor and vision tower, as Q-Align trains them.
NON_LORA = (
    "model.visual_abstractor.query_embeds",
    "model.visual_abstractor.encoder.layers.0.crossattention.attention.query.weight",
    "model.visual_abstractor.encoder.layers.1.crossattention.output.mlp.w2.bias",
    "model.vision_model.embeddings.cls_token",
    "model.vision_model.encoder.layers.1.mlp.fc1.weight",
)


def base() -> owl2.Owl2ForCausalLM:
    return owl2.load_model(QALIGN, show_progress=False)


def targets() -> list[str]:
    return [f"model.layers.{i}.{t}" for i in range(CONFIG.num_hidden_layers) for t in TARGETS]


def write_qalign_adapter(directory: Path, **config: object) -> tuple[dict, dict]:
    """A Q-Align-layout adapter with random LoRA pairs (bf16, as trained) and changed abstractor / vision tensors
    (fp16); returns (LoRA state, non-LoRA state) with the keys as written."""
    directory.mkdir(parents=True, exist_ok=True)
    model = base()
    generator = torch.Generator().manual_seed(0)
    lora = {}
    for name in targets():
        layer = model.get_submodule(name)
        a = 0.2 * torch.randn(R, layer.in_features, generator=generator)
        b = 0.2 * torch.randn(layer.out_features, R, generator=generator)
        lora[f"{PREFIX}{name}.lora_A.weight"], lora[f"{PREFIX}{name}.lora_B.weight"] = a.bfloat16(), b.bfloat16()
    state = model.state_dict()
    non_lora = {PREFIX + k: (state[k] + torch.randn(state[k].shape, generator=generator)).half() for k in NON_LORA}
    settings = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.05,
                "target_modules": ["q_proj", "v_proj.multiway.1"], "base_model_name_or_path": "q-future/one-align",
                "bias": "none", "fan_in_fan_out": False, "inference_mode": True, **config}
    (directory / "adapter_config.json").write_text(json.dumps(settings))
    torch.save(lora, directory / "adapter_model.bin")
    torch.save(non_lora, directory / "non_lora_trainables.bin")
    return lora, non_lora


def logits(model: owl2.Owl2ForCausalLM) -> torch.Tensor:
    ids = torch.tensor([[1, 3148, 1001, 29901, 1128, 723, -200, 29871, 13, 22933, 9047, 13566, 29901, 450]])
    pixels = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(**owl2.prepare_official_inputs(ids, pixel_values=pixels, config=CONFIG)).logits


@pytest.fixture(scope="module")
def qalign_adapter(tmp_path_factory) -> tuple[Path, dict, dict]:
    directory = tmp_path_factory.mktemp("qalign") / "adapter"
    return (directory, *write_qalign_adapter(directory))


def test_load_merges_lora_and_replaces_non_lora_tensors(qalign_adapter):
    directory, lora, non_lora = qalign_adapter
    assert adapter_layout(directory) == "llava"
    pipe = owl2.load(QALIGN, dtype="fp32", device="cpu", show_progress=False, adapter=directory)
    assert type(pipe.model) is owl2.Owl2ForCausalLM
    reference = base().state_dict()
    expected = dict(reference)
    for name in targets():
        a = lora[f"{PREFIX}{name}.lora_A.weight"].float()
        b = lora[f"{PREFIX}{name}.lora_B.weight"].float()
        expected[name + ".weight"] = reference[name + ".weight"] + (ALPHA / R) * (b @ a)
    for key in NON_LORA:
        expected[key] = non_lora[PREFIX + key].float()
    got = pipe.model.state_dict()
    assert set(got) == set(expected)
    for key, tensor in got.items():
        assert torch.equal(tensor, expected[key]), key
    changed = {k for k in got if not torch.equal(got[k], reference[k])}
    assert changed == {n + ".weight" for n in targets()} | set(NON_LORA)

    # In bf16 each weight is merged in float32 and rounded once.
    bf16 = owl2.load(QALIGN, dtype="bf16", device="cpu", show_progress=False, adapter=directory).model.state_dict()
    for name in targets():
        key = name + ".weight"
        assert bf16[key].dtype == torch.bfloat16
        torch.testing.assert_close(bf16[key].float(), expected[key], rtol=1e-2, atol=1e-2)


def test_load_equals_merge_cli_output(qalign_adapter, tmp_path, capsys):
    directory = qalign_adapter[0]
    adapted = owl2.load(QALIGN, dtype="fp32", device="cpu", show_progress=False, adapter=directory).model
    assert main(["merge", str(QALIGN), str(directory), str(tmp_path / "out"), "--dtype", "fp32", "--quiet"]) == 0
    assert "wrote 1 weight file(s)" in capsys.readouterr().out
    merged = owl2.load_model(tmp_path / "out", show_progress=False)
    expected = logits(adapted)
    assert torch.equal(logits(merged), expected)
    assert (expected - logits(base())).abs().max() > 1e-2  # the adapter does change the output
    # The default output dtype is the base's recorded one (float16); tokenizer and processor files come along.
    assert main(["merge", str(QALIGN), str(directory), str(tmp_path / "fp16"), "--quiet"]) == 0
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["torch_dtype"] == "float16"
    assert {"tokenizer.model", "preprocessor_config.json"} <= {p.name for p in (tmp_path / "fp16").iterdir()}
    torch.testing.assert_close(logits(owl2.load_model(tmp_path / "fp16", show_progress=False)), expected, rtol=0,
                               atol=5e-2)


def test_adapter_saved_the_way_qalign_training_saves_it_matches_peft(tmp_path):
    # Q-Align's train.py: peft LoRA on the LLM plus a fully trained abstractor, then save_pretrained(.bin) for the
    # LoRA matrices and every other trainable parameter, peft's names kept, into non_lora_trainables.bin.
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    # No task_type: peft's CAUSAL_LM wrapper wants transformers' generation methods; the saved keys are the same.
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.05, target_modules=["q_proj", "v_proj.multiway.1"],
                             bias="none")
    model = peft.get_peft_model(base(), config)
    for name, param in model.named_parameters():
        if "visual_abstractor" in name:
            param.requires_grad_(True)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # as if trained: B is no longer 0, the abstractor has moved
                param.add_(0.05 * torch.randn_like(param))
    directory = tmp_path / "adapter"
    model.save_pretrained(str(directory), safe_serialization=False)
    non_lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert non_lora and all(n.startswith(PREFIX + "model.visual_abstractor.") for n in non_lora)
    torch.save(non_lora, directory / "non_lora_trainables.bin")
    assert {p.name for p in directory.iterdir()} == {"adapter_config.json", "adapter_model.bin",
                                                     "non_lora_trainables.bin", "README.md"}
    assert adapter_layout(directory) == "llava"
    expected = logits(model.eval())
    adapted = owl2.load(QALIGN, dtype="fp32", device="cpu", show_progress=False, adapter=directory).model
    torch.testing.assert_close(logits(adapted), expected, rtol=0, atol=1e-5)


def test_owl2_layout_still_loads_and_merges(tmp_path):
    pytest.importorskip("peft")
    from owl2.training.lora import LoraSettings, apply_lora, save_adapter

    torch.manual_seed(0)
    model = apply_lora(base(), LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:  # B starts at 0: make the adapter do something
                param.add_(0.05 * torch.randn_like(param))
    expected = logits(model.eval())
    directory = save_adapter(model, tmp_path / "adapter")
    assert adapter_layout(directory) == "owl2"
    adapted = owl2.load(QALIGN, dtype="fp32", device="cpu", show_progress=False, adapter=directory).model
    assert type(adapted) is owl2.Owl2ForCausalLM
    torch.testing.assert_close(logits(adapted), expected, rtol=0, atol=1e-5)
    assert main(["merge", str(QALIGN), str(directory), str(tmp_path / "out"), "--dtype", "fp32", "--quiet"]) == 0
    torch.testing.assert_close(logits(owl2.load_model(tmp_path / "out", show_progress=False)), expected, rtol=0,
                               atol=1e-5)


def rewrite(directory: Path, file: str, change) -> None:
    state = torch.load(directory / file, weights_only=True)
    change(state)
    torch.save(state, directory / file)


A0 = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(("file", "change", "message"), [
    ("adapter_model.bin", lambda s: s.update({A0.replace("layers.0", "layers.7"): s[A0]}),
     r"'base_model\.model\.model\.layers\.7\.self_attn\.q_proj\.lora_A\.weight' targets 'model\.layers\.7\.self_attn"
     r"\.q_proj', which is not a module of the model"),
    ("adapter_model.bin", lambda s: s.update({A0.replace("q_proj", "k_proj"): s[A0]}),
     r"targets 'model\.layers\.0\.self_attn\.k_proj', a MultiwayLinear, not a float linear layer"),
    ("adapter_model.bin", lambda s: s.update({A0: s[A0][:, :10]}),
     r"key 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' has shape \[8, 10\]"),
    ("adapter_model.bin", lambda s: s.pop(A0.replace("lora_A", "lora_B")),
     r"has no lora_B partner for 'model\.layers\.0\.self_attn\.q_proj'"),
    ("adapter_model.bin", lambda s: s.update({A0.replace("lora_A", "lora_embedding_A"): s[A0]}),
     r"lora_embedding_A.* a LoRA tensor of a kind owl2 does not merge"),
    ("non_lora_trainables.bin", lambda s: s.update({f"{PREFIX}model.visual_abstractor.bogus": torch.zeros(2)}),
     r"key 'base_model\.model\.model\.visual_abstractor\.bogus' maps to 'model\.visual_abstractor\.bogus', which is "
     r"not a tensor of the model"),
    ("non_lora_trainables.bin", lambda s: s.update({f"{PREFIX}{NON_LORA[0]}": torch.zeros(3, 3)}),
     r"'base_model\.model\.model\.visual_abstractor\.query_embeds' has shape \[3, 3\]"),
])
def test_bad_keys_raise_one_line_errors_and_leave_the_model_untouched(qalign_adapter, tmp_path, capsys, file, change,
                                                                      message):
    directory = tmp_path / "adapter"
    directory.mkdir()
    for source in qalign_adapter[0].iterdir():
        (directory / source.name).write_bytes(source.read_bytes())
    rewrite(directory, file, change)
    model = base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        merge_into(model, directory)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert main(["merge", str(QALIGN), str(directory), str(tmp_path / "out"), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("owl2 merge: error: ") and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_config_and_missing_files(qalign_adapter, tmp_path):
    source = qalign_adapter[0]

    def copy(name: str, skip: tuple[str, ...] = (), **config: object) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        for file in source.iterdir():
            if file.name not in skip:
                (directory / file.name).write_bytes(file.read_bytes())
        if config:
            settings = json.loads((directory / "adapter_config.json").read_text())
            (directory / "adapter_config.json").write_text(json.dumps({**settings, **config}))
        return directory

    with pytest.raises(CheckpointError, match="no LoRA adapter directory at"):
        owl2.load(QALIGN, dtype="fp32", show_progress=False, adapter=tmp_path / "missing")
    with pytest.raises(CheckpointError, match=re.escape("adapter_config.json is missing")):
        adapter_layout(copy("no-config", ("adapter_config.json",)))
    with pytest.raises(CheckpointError, match=re.escape("has non_lora_trainables.bin but no LoRA weights")):
        adapter_layout(copy("no-weights", ("adapter_model.bin",)))
    with pytest.raises(CheckpointError, match=r"not a LoRA adapter directory: expected adapter_model\.safetensors"):
        adapter_layout(copy("config-only", ("adapter_model.bin", "non_lora_trainables.bin")))
    with pytest.raises(CheckpointError, match=re.escape("has rank 8 but adapter_config.json says r 16")):
        merge_into(base(), copy("rank", r=16))
    with pytest.raises(CheckpointError, match="use_dora adapters are not supported"):
        merge_into(base(), copy("dora", use_dora=True))
    # peft's alpha_pattern: a per-module alpha (its key matched at the end of the module name).
    lora = qalign_adapter[1]
    merged = merge_into(base(), copy("alpha", alpha_pattern={"v_proj.multiway.1": 24})).state_dict()
    reference = base().state_dict()
    for name, scale in (("model.layers.1.self_attn.v_proj.multiway.1", 24 / R),
                        ("model.layers.1.self_attn.q_proj", ALPHA / R)):
        delta = lora[f"{PREFIX}{name}.lora_B.weight"].float() @ lora[f"{PREFIX}{name}.lora_A.weight"].float()
        assert torch.equal(merged[name + ".weight"], reference[name + ".weight"] + scale * delta), name
    # Without non_lora_trainables.bin (a peft adapter saved as .bin) only the LoRA pairs are merged.
    plain = copy("plain-peft", ("non_lora_trainables.bin",))
    assert adapter_layout(plain) == "llava"
    merged, reference = merge_into(base(), plain).state_dict(), base().state_dict()
    assert all(torch.equal(merged[k], reference[k]) for k in NON_LORA)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           reference["model.layers.0.self_attn.q_proj.weight"])


class _Payload:
    """Unpickling this would create a directory: a harmless stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("file", ["adapter_model.bin", "non_lora_trainables.bin"])
def test_pickled_code_is_never_run(qalign_adapter, tmp_path, file):
    directory = tmp_path / "adapter"
    directory.mkdir()
    for source in qalign_adapter[0].iterdir():
        (directory / source.name).write_bytes(source.read_bytes())
    marker = tmp_path / "payload-ran"
    rewrite(directory, file, lambda s: s.update({next(iter(s)): _Payload(marker)}))
    with pytest.raises(CheckpointError, match=rf"{file}: refused: the pickle asks to run code .*mkdir"):
        owl2.load(QALIGN, dtype="fp32", show_progress=False, adapter=directory)
    assert main(["merge", str(QALIGN), str(directory), str(tmp_path / "out"), "--quiet"]) == 2
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler would have run it.
    torch.load(directory / file, weights_only=False)
    assert marker.is_dir()


def test_rate_cli_takes_an_adapter(qalign_adapter, tmp_path):
    """``owl2 rate --adapter`` rates with the adapted scorer; its ratings are another model's for the resume check."""
    directory = qalign_adapter[0]
    image = FIXTURES / "qalign" / "images" / "chelsea_square.png"
    adapted = owl2.load(QALIGN, dtype="fp32", device="cpu", show_progress=False, adapter=directory)
    output = tmp_path / "ratings.jsonl"
    args = ["rate", "--model", str(QALIGN), "--dtype", "fp32", "--device", "cpu", "--quiet", "--output", str(output),
            str(image)]
    assert main([*args, "--adapter", str(directory)]) == 0
    record = json.loads(output.read_text().splitlines()[0])
    assert record["score"] == pytest.approx(adapted.rate([image])[0].score, abs=1e-6)
    assert main(args) == 0  # without the adapter: rated again, not taken from the file
    plain = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(plain) == 2 and plain[0]["score"] != pytest.approx(plain[1]["score"], abs=1e-6)
