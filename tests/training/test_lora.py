"""LoRA / QLoRA through peft on the tiny official checkpoint: targets, what trains, save/load, merge, the CLI."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import owl2
from owl2.model.quantize import WeightOnlyInt8Linear
from tests.conftest import OFFICIAL_TINY, official

peft = pytest.importorskip("peft")

from owl2.training.lora import (  # noqa: E402 (after the importorskip)
    LORA_PRESETS,
    LoraSettings,
    apply_lora,
    load_adapter,
    merge_adapter,
    read_settings,
    save_adapter,
    target_module_names,
)

PEFT_PREFIX = "base_model.model."
LAYERS = ("model.layers.0.", "model.layers.1.")
TEXT = {p + s for p in LAYERS for s in (
    "self_attn.q_proj", "self_attn.k_proj.multiway.0", "self_attn.v_proj.multiway.0", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
IMAGE = {p + s for p in LAYERS for s in ("self_attn.k_proj.multiway.1", "self_attn.v_proj.multiway.1")}
EXPECTED = {"text": TEXT, "image": IMAGE, "both": TEXT | IMAGE}


def base() -> owl2.Owl2ForCausalLM:
    return owl2.load_model(OFFICIAL_TINY, show_progress=False)


def batches(oracle) -> list[dict]:
    image = official(oracle["input_ids_image"], pixel_values=oracle["image"], labels=oracle["input_ids_image"])
    text = official(oracle["input_ids_text"], labels=oracle["input_ids_text"])
    return [image, text]


def total_loss(model, oracle) -> torch.Tensor:
    return sum(model(**b).loss for b in batches(oracle))


def train(model, oracle, steps: int = 3, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on the image and the text batch (dropout on); returns the loss before each step."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = total_loss(model, oracle)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def eval_logits(model, oracle) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**official(oracle["input_ids_image"], pixel_values=oracle["image"])).logits


def lora_layers(model) -> set[str]:
    return {n.removeprefix(PEFT_PREFIX) for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def trained_model(oracle, **settings) -> torch.nn.Module:
    torch.manual_seed(0)
    model = apply_lora(base(), LoraSettings(r=4, alpha=8, **settings))
    train(model, oracle, steps=2)
    return model.eval()


@pytest.mark.parametrize("preset", ["text", "image", "both"])
def test_presets_select_exactly_the_intended_modules(preset):
    model = base()
    assert set(target_module_names(model, LORA_PRESETS[preset])) == EXPECTED[preset]
    adapted = apply_lora(model, LoraSettings(preset=preset, r=4))
    assert lora_layers(adapted) == EXPECTED[preset]
    assert not any("lm_head" in n or "vision_model" in n for n in lora_layers(adapted))


def test_custom_pattern_and_bad_settings():
    model = base()
    adapted = apply_lora(model, LoraSettings(target_pattern=r"model\.layers\.1\.mlp\.down_proj", r=2))
    assert lora_layers(adapted) == {"model.layers.1.mlp.down_proj"}
    with pytest.raises(ValueError, match="not linear"):
        target_module_names(base(), r"model\.layers\.0\.self_attn\.k_proj")  # the two-branch container
    with pytest.raises(ValueError, match="matches no module"):
        apply_lora(base(), LoraSettings(target_pattern="nothing"))
    with pytest.raises(ValueError, match="unknown LoRA preset"):
        apply_lora(base(), LoraSettings(preset="vision"))
    with pytest.raises(ValueError, match="already adapted"):
        apply_lora(adapted, LoraSettings())


@pytest.mark.parametrize("train_abstractor", [True, False])
def test_only_lora_and_abstractor_require_grad(train_abstractor):
    model = apply_lora(base(), LoraSettings(r=4, train_abstractor=train_abstractor))
    trainable = {n.removeprefix(PEFT_PREFIX) for n, p in model.named_parameters() if p.requires_grad}
    lora = {f"{m}.lora_{ab}.default.weight" for m in EXPECTED["both"] for ab in "AB"}
    abstractor = {f"model.visual_abstractor.modules_to_save.default.{n}"
                  for n, _ in base().model.visual_abstractor.named_parameters()}
    assert trainable == (lora | abstractor if train_abstractor else lora)
    assert not model.training  # load_model gives eval mode; apply_lora keeps it, peft's new modules included
    assert not any(m.training for m in model.modules())
    assert isinstance(model.config, owl2.Owl2Config)


def test_training_moves_only_the_adapter_and_lowers_the_loss(oracle):
    torch.manual_seed(0)
    model = apply_lora(base(), LoraSettings(r=4, alpha=8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train(model, oracle)
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # Every B and the abstractor move; A gets no gradient on step one (B starts at 0) but moves afterwards.
    assert changed == trainable
    # The frozen weights are exactly those of the checkpoint (the original abstractor included).
    reference = base().state_dict()
    for name, tensor in model.get_base_model().state_dict().items():
        if ".lora_" in name or ".modules_to_save." in name:
            continue
        key = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        assert torch.equal(tensor, reference[key]), name


def test_save_then_load_adapter_reproduces_logits(oracle, tmp_path):
    model = trained_model(oracle)
    expected = eval_logits(model, oracle)
    assert (expected - eval_logits(base(), oracle)).abs().max() > 1e-3  # the adapter does change the output
    directory = save_adapter(model, tmp_path / "adapter")
    assert {p.name for p in directory.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                      "owl2_lora.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left
    assert read_settings(directory) == LoraSettings(r=4, alpha=8)
    loaded = load_adapter(base(), directory)
    assert torch.equal(eval_logits(loaded, oracle), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    # Saving again replaces the adapter as a whole.
    train(model, oracle, steps=1)
    save_adapter(model, directory)
    assert torch.equal(eval_logits(load_adapter(base(), directory), oracle), eval_logits(model, oracle))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_merge_gives_a_plain_checkpoint_with_the_same_logits(oracle, tmp_path):
    base_dir = tmp_path / "base"
    shutil.copytree(OFFICIAL_TINY, base_dir, ignore=shutil.ignore_patterns("oracle_*"))
    (base_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
    model = trained_model(oracle)
    adapter = save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    files = merge_adapter(base_dir, adapter, out, show_progress=False)
    assert files == [out / "model.safetensors"]
    assert (out / "tokenizer_config.json").read_text() == (base_dir / "tokenizer_config.json").read_text()
    merged = owl2.load_model(out, show_progress=False)
    assert type(merged) is owl2.Owl2ForCausalLM
    assert set(merged.state_dict()) == set(base().state_dict())
    assert (eval_logits(merged, oracle) - eval_logits(model, oracle)).abs().max() <= 1e-5


def test_merge_register_adds_the_subcommand(oracle, tmp_path, capsys):
    from owl2.cli.merge import register

    adapter = save_adapter(trained_model(oracle), tmp_path / "adapter")
    parser = argparse.ArgumentParser(prog="owl2")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["merge", str(OFFICIAL_TINY), str(adapter), str(tmp_path / "out"), "--dtype", "bf16",
                              "--quiet"])
    assert args.handler(args) == 0
    assert "wrote 1 weight file(s)" in capsys.readouterr().out
    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    owl2.load_model(tmp_path / "out", show_progress=False)
    with pytest.raises(SystemExit):
        parser.parse_args(["merge", "a", "b", "c", "--dtype", "int4"])


def test_cli_merge(oracle, tmp_path, capsys):
    from owl2.cli.main import main

    adapter = save_adapter(trained_model(oracle), tmp_path / "adapter")
    assert main(["merge", str(OFFICIAL_TINY), str(adapter), str(tmp_path / "out"), "--quiet"]) == 0
    assert "merged" in capsys.readouterr().out
    owl2.load_model(tmp_path / "out", show_progress=False)
    assert main(["merge", str(OFFICIAL_TINY), str(tmp_path / "missing"), str(tmp_path / "x"), "--quiet"]) == 2


def test_qlora_int8_base_is_frozen_and_still_trains(oracle, tmp_path):
    torch.manual_seed(0)
    model = apply_lora(base(), LoraSettings(r=4, alpha=8, quantize_base="int8"))
    inner = model.get_base_model()
    int8 = {n for n, m in inner.named_modules() if isinstance(m, WeightOnlyInt8Linear)}
    assert len(int8) == 2 * 9 + 1  # every LLM linear (both MAM branches) and lm_head
    assert all(inner.get_submodule(n).qweight.dtype == torch.int8 for n in int8)
    assert lora_layers(model) == EXPECTED["both"]
    assert not any(isinstance(m, torch.nn.Linear) and "vision" not in n and "abstractor" not in n
                   and ".lora_" not in n for n, m in inner.named_modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    qweights = {n: b.clone() for n, b in inner.named_buffers() if n.endswith("qweight")}
    losses = train(model, oracle, steps=3)
    assert losses[-1] < losses[0]
    assert all(torch.equal(b, qweights[n]) for n, b in inner.named_buffers() if n.endswith("qweight"))
    # The adapter records the int8 base: loading re-quantises the fresh base and reproduces the output exactly.
    model.eval()
    directory = save_adapter(model, tmp_path / "qlora")
    assert read_settings(directory).quantize_base == "int8"
    assert torch.equal(eval_logits(load_adapter(base(), directory), oracle), eval_logits(model, oracle))
    with pytest.raises(ValueError, match="int8 base"):
        model.merge_and_unload()
    # ... and it merges into the float base (the int8 rounding is then gone, so only close).
    merge_adapter(OFFICIAL_TINY, directory, tmp_path / "merged", show_progress=False)
    merged = owl2.load_model(tmp_path / "merged", show_progress=False)
    assert torch.allclose(eval_logits(merged, oracle), eval_logits(model, oracle), atol=0.1)


def test_qlora_bf16_backward_runs(oracle):
    # torch._weight_int8pack_mm (the bf16 CPU kernel) has no backward; the int8 linears dequantise instead.
    model = apply_lora(owl2.load_model(OFFICIAL_TINY, dtype=torch.bfloat16, show_progress=False),
                       LoraSettings(r=4, quantize_base="int8"))
    model.train()
    total_loss(model, oracle).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
