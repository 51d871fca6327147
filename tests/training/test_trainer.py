"""The training loop end to end on a tiny random-init model: both stages, freezing, resume after SIGKILL,
2-process DDP and FSDP2 against 1 process, divergence, outputs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import owl2
from owl2.cli.main import main as cli
from owl2.training.checkpointing import checkpoint_dirs
from owl2.training.config import RecipeError, load_recipe
from owl2.training.metrics import read_metrics
from owl2.training.trainer import Trainer, train
from tests.training.conftest import write_dataset, write_recipe

REPO = Path(__file__).parents[2]


def run_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_two_stages_end_to_end(tmp_path, tiny_world):
    """Stage 1 from random init, then stage 2 from its result: the loss falls, the result loads and answers."""
    model_dir, data = tiny_world
    stage1 = write_recipe(tmp_path / "s1", model_dir, data, top={"stage": "stage1"}, train={"max_steps": 12})
    first = train(load_recipe(stage1))
    assert first.steps == 12 and len(first.losses) == 12
    assert sum(first.losses[-3:]) / 3 < sum(first.losses[:3]) / 3

    stage2 = write_recipe(tmp_path / "s2", model_dir, data, train={"max_steps": 16},
                          model={"path": str(first.final_dir), "init_config": None, "tokenizer": None})
    result = train(load_recipe(stage2))
    assert result.losses[-1] < result.losses[0] - 1.0

    pipe = owl2.load(result.final_dir, dtype="fp32", show_progress=False)
    answer = pipe.chat("What colour is the picture?", [data.parent / "images" / "0.png"], max_new_tokens=3)
    assert isinstance(answer, str)
    assert (result.output_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_metrics(result.output_dir)
    assert [r["step"] for r in records] == list(range(1, 17))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in records)


def test_stage1_changes_exactly_the_stage1_parameters(tmp_path, tiny_world):
    model_dir, data = tiny_world
    recipe = write_recipe(tmp_path, model_dir, data, top={"stage": "stage1"}, train={"max_steps": 2})
    trainer = Trainer(load_recipe(recipe))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.run()
    after = final_weights(trainer.output_dir)
    changed = {n for n, p in before.items() if not torch.equal(p, after[n])}
    expected = {n for n in before if n.startswith(("model.vision_model.", "model.visual_abstractor."))
                or ".multiway.1." in n}
    # The last layer's image-position outputs feed no text target (nothing attends to them afterwards), so the
    # image gain of its post-attention norm gets an exactly zero gradient.
    last = trainer.model_config.num_hidden_layers - 1
    assert changed == expected - {f"model.layers.{last}.post_attention_layernorm.multiway.1.weight"}
    # Stage 1 leaves out the text-only samples: they reach no stage-1 parameter.
    assert all(trainer.dataset.is_multimodal[i] for i in trainer.data.keep)


def test_gradient_checkpointing_and_accumulation_do_not_change_the_loss(tmp_path, tiny_world):
    model_dir, data = tiny_world
    recipe = write_recipe(tmp_path, model_dir, data, train={"max_steps": 3})
    plain = train(load_recipe(recipe, [f"output_dir={json.dumps(str(tmp_path / 'a'))}"]))
    ckpt = train(load_recipe(recipe, [f"output_dir={json.dumps(str(tmp_path / 'b'))}",
                                      "train.gradient_checkpointing=true"]))
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-5)


def test_bf16_autocast_trains(tmp_path, tiny_world):
    model_dir, data = tiny_world
    recipe = write_recipe(tmp_path, model_dir, data, train={"max_steps": 8, "bf16": True, "save_dtype": "bf16"})
    result = train(load_recipe(recipe))
    assert result.losses[-1] < result.losses[0]
    assert next(iter(final_weights(result.output_dir).values())).dtype == torch.bfloat16


def test_resume_after_sigkill_gives_the_same_loss_curve(tmp_path, tiny_world):
    model_dir, data = tiny_world
    steps, kill_after = 30, 6
    recipe = write_recipe(tmp_path, model_dir, data,
                          train={"max_steps": steps, "save_every": 3, "keep_last": 2, "grad_accum": 1})

    def command(run_dir: Path, *extra: str) -> list[str]:
        # Every run in a subprocess with the same thread count, so the arithmetic is identical.
        return [sys.executable, "-m", "owl2", "train", str(recipe), f"output_dir={json.dumps(str(run_dir))}", *extra]

    subprocess.run(command(tmp_path / "reference"), env=run_env(), check=True, capture_output=True, timeout=300)
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(command(run_dir), env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = run_dir / "checkpoints" / f"step-{kill_after:07d}"
    deadline = time.monotonic() + 120
    while not target.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read().decode()}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = checkpoint_dirs(run_dir)
    assert done and int(done[-1].name.split("-")[1]) < steps and len(done) <= 2  # keep_last

    subprocess.run(command(run_dir, "--resume"), env=run_env(), check=True, capture_output=True, timeout=300)
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, steps + 1))
    assert losses(run_dir) == losses(tmp_path / "reference")
    ref, got = final_weights(tmp_path / "reference"), final_weights(run_dir)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
def test_two_processes_match_one_process(tmp_path, tiny_world, strategy):
    """torchrun with 2 CPU processes (gloo), batch 2 each, equals 1 process with batch 4 (same global batch); and a
    2-process run resumed from its step-2 checkpoint repeats steps 3 and 4 exactly."""
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    model_dir, data = tiny_world
    # Stage 1 has no text-only batch: DeepSpeed moves parameters without a gradient by Adam's momentum (a zero
    # gradient), where torch's AdamW leaves them alone, so only runs in which every parameter gets a gradient match.
    recipe = write_recipe(tmp_path, model_dir, data, top={"stage": "stage2" if strategy == "ddp" else "stage1"},
                          train={"max_steps": 4, "grad_accum": 1, "save_every": 2, "keep_last": 3})
    single = train(load_recipe(recipe, ["train.batch_size=4", f"output_dir={json.dumps(str(tmp_path / 'one'))}"]))

    def torchrun(run_dir: Path, *extra: str) -> None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "owl2", "train", str(recipe), f"output_dir={json.dumps(str(run_dir))}",
                   f"train.distributed={json.dumps(strategy)}", *extra]
        done = subprocess.run(command, env=run_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    two = tmp_path / "two"
    torchrun(two)
    assert losses(two) == pytest.approx(single.losses, rel=1e-5)
    a, b = final_weights(tmp_path / "one"), final_weights(two)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    step2 = checkpoint_dirs(two)[0]
    assert step2.name == "step-0000002" and {"rng-rank0.pt", "rng-rank1.pt", "trainable.safetensors"} <= {
        p.name for p in step2.iterdir()}

    resumed = tmp_path / "resumed"
    torchrun(resumed, "--resume", str(step2))
    assert [r["step"] for r in read_metrics(resumed)] == [3, 4]
    assert losses(resumed) == pytest.approx(losses(two)[2:], rel=1e-6)


def test_tensorboard_events_and_plain_progress(tmp_path, tiny_world, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    model_dir, data = tiny_world
    recipe = write_recipe(tmp_path, model_dir, data, train={"max_steps": 2, "tensorboard": True, "progress": True})
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as on a machine without tqdm: one line per step
    train(load_recipe(recipe))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("training: step")]
    assert len(lines) == 2 and lines[-1].startswith("training: step 2/2, loss=")


def test_divergence_stops_with_a_clear_message(tmp_path, tiny_world, capsys):
    model_dir, data = tiny_world
    recipe = write_recipe(tmp_path, model_dir, data, train={"max_steps": 10},
                          optim={"lr": 1e12, "warmup_steps": 0, "grad_clip": 0.0})
    assert cli(["train", str(recipe)]) == 3
    assert "training diverged at step" in capsys.readouterr().err


def test_recipes_and_overrides(tmp_path, tiny_world):
    model_dir, data = tiny_world
    stage1 = load_recipe("stage1", [f"model.path={json.dumps(str(model_dir))}", f"data.path={data}"])
    assert stage1.stage == "stage1" and stage1.optim.lr == 1e-4 and stage1.optim.betas == (0.9, 0.98)
    assert stage1.optim.eps == 1e-6 and stage1.optim.grad_clip == 1.0 and stage1.train.gradient_checkpointing
    lora = load_recipe("lora", [f"model.path={model_dir}", f"data.path={data}", "lora.r=8", "optim.lr=5e-5"])
    assert lora.lora.enabled and lora.lora.r == 8 and lora.optim.lr == 5e-5 and lora.optim.abstractor_lr == 2e-5
    with pytest.raises(RecipeError, match=re.escape("unknown key optim.learning_rate")):
        load_recipe("stage2", [f"model.path={model_dir}", f"data.path={data}", "optim.learning_rate=1"])
    with pytest.raises(RecipeError, match=re.escape("train.batch_size must be int")):
        load_recipe("stage2", [f"model.path={model_dir}", f"data.path={data}", "train.batch_size=two"])
    with pytest.raises(RecipeError, match=re.escape("data.path is required")):
        load_recipe("stage2", [f"model.path={model_dir}"])
    with pytest.raises(RecipeError, match=re.escape("packaged recipe name: lora, qalign, stage1, stage2")):
        load_recipe("stage3")
    # A run records the recipe it used, and that file loads back to the same settings.
    recorded = tmp_path / "recorded.toml"
    recorded.write_text(stage1.to_toml())
    assert load_recipe(recorded) == stage1


def test_bad_records_do_not_stop_a_run(tmp_path, tiny_world):
    model_dir, _ = tiny_world
    data = write_dataset(tmp_path / "data", multimodal=4, text_only=2)
    records = json.loads(data.read_text())
    records.append({"id": "missing-image", "image": "nope.png", "conversations": records[0]["conversations"]})
    records.append({"id": "two-placeholders", "image": records[0]["image"], "conversations": [
        {"from": "human", "value": "<|image|><|image|> Which?"}, {"from": "gpt", "value": "red"}]})
    data.write_text(json.dumps(records))
    recipe = write_recipe(tmp_path, model_dir, data, train={"max_steps": 2})
    with pytest.warns(UserWarning):
        trainer = Trainer(load_recipe(recipe))
    assert {rid for rid, _ in trainer.dataset.skipped} == {"missing-image", "two-placeholders"}
    assert trainer.run().steps == 2


@pytest.mark.parametrize("quantize_base", [None, "int8"], ids=["lora", "qlora-int8"])
def test_lora_recipe_trains_resumes_and_merges(tmp_path, tiny_world, quantize_base):
    model_dir, data = tiny_world
    base = write_recipe(tmp_path / "base", model_dir, data, train={"max_steps": 1})
    base_model = train(load_recipe(base)).final_dir  # a checkpoint to adapt
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.05, "quantize_base": quantize_base}
    recipe = write_recipe(tmp_path, model_dir, data, train={"max_steps": 10, "save_every": 5},
                          model={"path": str(base_model), "init_config": None, "tokenizer": None}, lora=lora,
                          optim={"lr": 2e-2})
    full = train(load_recipe(recipe))
    assert full.adapter_dir is not None and (full.adapter_dir / "adapter_model.safetensors").is_file()
    assert sum(full.losses[-3:]) < sum(full.losses[:3])

    resumed_dir = tmp_path / "resumed"
    checkpoint = checkpoint_dirs(full.output_dir)[0]
    assert checkpoint.name == "step-0000005"
    resumed = train(load_recipe(recipe, [f"output_dir={json.dumps(str(resumed_dir))}"]), resume=str(checkpoint))
    assert resumed.losses == full.losses[5:]

    merged = tmp_path / "merged"
    assert cli(["merge", str(base_model), str(full.adapter_dir), str(merged), "--quiet"]) == 0
    from owl2.training.lora import load_adapter

    # Merging folds the adapter into the float weights (for QLoRA too), so compare with float base + adapter.
    reference = load_adapter(owl2.load_model(base_model, show_progress=False), full.adapter_dir, quantize_base=False)
    model = owl2.load_model(merged, show_progress=False)
    trainer = Trainer(load_recipe(recipe))
    batch = trainer.data.collate_fn([trainer.dataset[i] for i in range(len(trainer.dataset))])
    with torch.no_grad():
        expected, got = reference(**batch), model(**batch)
        before = owl2.load_model(base_model, show_progress=False)(**batch).loss
    assert torch.allclose(expected.logits, got.logits, atol=1e-5)
    assert float(got.loss) < float(before) - 0.1  # the adapter lowered the loss on its training data


def test_a_tokenizer_file_linked_from_outside_is_refused_before_the_first_step(tmp_path, tiny_world, capsys):
    # final/ gets a copy of the tokenizer files: a link to a private file would publish it, so the run refuses at
    # the start, not after the last step
    model_dir, data = tiny_world
    linked = tmp_path / "model"
    linked.mkdir()
    for source in model_dir.iterdir():
        (linked / source.name).write_bytes(source.read_bytes())
    secret = tmp_path / "private" / "settings.json"
    secret.parent.mkdir()
    secret.write_text("{}")
    (linked / "special_tokens_map.json").unlink()
    (linked / "special_tokens_map.json").symlink_to(secret)
    recipe = write_recipe(tmp_path, linked, data, model={"tokenizer": str(linked)})
    assert cli(["train", str(recipe)]) == 2
    assert "special_tokens_map.json resolves to" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()
