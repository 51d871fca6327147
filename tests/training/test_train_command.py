"""What a new user meets with ``owl2 train``: the embedded model as the default, a run on fewer samples than one
batch, Ctrl-C, and LoRA without peft."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import owl2
from owl2.cli.main import main as cli
from owl2.training.checkpointing import checkpoint_step, latest_checkpoint
from owl2.training.config import RecipeError, load_recipe
from owl2.training.metrics import read_metrics
from owl2.training.trainer import fit_batch_to_data, fit_warmup
from tests.training.conftest import write_recipe

REPO = Path(__file__).parents[2]
QUIET = ["train.progress=false", "train.tensorboard=false", "train.plot=false"]
# Python ignores SIGINT in a child whose parent ignored it (a background job of a plain shell); the real default,
# KeyboardInterrupt, is put back so that the test sends what a terminal's Ctrl-C sends.
CLI_SCRIPT = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "from owl2.cli.main import main; sys.exit(main(sys.argv[1:]))")


def run_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def write_scene_chat(directory: Path) -> Path:
    """Three questions about one scene and a text-only one, in the Hugging Face messages layout (bare image parts
    and a top-level ``images`` list): fewer samples than one batch of any shipped recipe. A fifth, bad record is
    skipped."""
    directory.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 6, 26, 26), fill=(230, 220, 40))
    draw.ellipse((36, 30, 56, 50), fill=(30, 200, 60))
    image.save(directory / "scene.png")

    def ask(question: str, answer: str) -> dict:
        return {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                             {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                "images": ["scene.png"]}

    records = [ask("How many circles are there?", "circles yellow green 2"),
               ask("Is there a green cross?", "cross no"),
               ask("What colour is the small circle?", "small circle green"),
               {"messages": [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}]},
               {"id": "no-images", "messages": [{"role": "user", "content": [{"type": "image"}]}]}]
    path = directory / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_lora_on_four_samples_starts_from_owl2_tiny_and_fits_the_batch_and_warmup(tmp_path, caplog, capsys):
    """The README's `owl2 train lora data.path=...` on 4 samples: no model given means owl2-tiny; the recipe's global
    batch of 32 and 250 warm-up steps shrink to the data (one step at the full learning rate, not lr/250), with one
    line saying so; the logged epoch is 1.0. The skipped record is reported in one line."""
    pytest.importorskip("peft")
    data = write_scene_chat(tmp_path / "data")
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="owl2.training"):
        assert cli(["train", "lora", f"data.path={data}", f"output_dir={json.dumps(str(run))}", *QUIET]) == 0
    skips = [line for line in capsys.readouterr().err.splitlines() if "no-images" in line]
    assert skips == ["owl2 train: warning: skipping record 'no-images': an image part without an image, and no "
                     "top-level 'images' list for it to take from"]

    notes = [r.getMessage() for r in caplog.records if r.name == "owl2.training"]
    assert len(notes) == 1 and "\n" not in notes[0]
    assert "4 sample(s), fewer than one global batch of 32" in notes[0]
    assert "train.grad_accum=3" in notes[0] and "optim.warmup_steps=0" in notes[0]

    used = load_recipe(run / "recipe.toml")  # the recorded recipe says what ran
    assert used.model.path == str(owl2.default_model())
    # 3 image samples in batches of 2 and 1, the text sample alone: 3 micro-batches make one pass over the data.
    assert (used.train.batch_size, used.train.grad_accum, used.optim.warmup_steps) == (2, 3, 0)
    [record] = read_metrics(run)
    assert record["step"] == 1 and record["epoch"] == 1.0
    assert record["lr"] == pytest.approx(used.optim.lr)
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_fitting_the_batch_and_the_warmup_to_a_small_run():
    # Accumulation shrinks to the micro-batches of one epoch; the per-process batch already fits.
    batch, accum, note = fit_batch_to_data(4, 2, 16, 1, micro_batches=lambda b: 3)
    assert (batch, accum) == (2, 3) and "train.grad_accum=3" in note and "batch_size=" not in note.split("using")[1]
    # A micro-batch larger than the data shrinks to it (per process: each takes its share).
    assert fit_batch_to_data(3, 8, 1, 1, micro_batches=lambda b: 1)[:2] == (3, 1)
    assert fit_batch_to_data(4, 4, 2, 2, micro_batches=lambda b: {2: 1}[b])[:2] == (2, 1)

    def never(batch_size: int) -> int:
        raise AssertionError("a batch that fits is not recounted")

    assert fit_batch_to_data(32, 2, 16, 1, micro_batches=never) == (2, 16, None)

    assert fit_warmup(250, 1000) == (250, None)
    assert fit_warmup(0, 1) == (0, None)
    capped, note = fit_warmup(250, 1)
    assert capped == 0 and "optim.warmup_steps=250" in note and "\n" not in note
    assert fit_warmup(500, 200)[0] == 6  # 3 % of the run, the official warmup_ratio


def test_logged_epoch_is_the_fraction_of_passes(tmp_path, tiny_world):
    """18 samples in batches of 2 that never mix modalities: 6 + 3 = 9 micro-batches per pass; 2 per step."""
    model_dir, data = tiny_world
    recipe = write_recipe(tmp_path, model_dir, data, train={"max_steps": 6})
    assert cli(["train", str(recipe), *QUIET]) == 0
    assert [r["epoch"] for r in read_metrics(tmp_path / "run")] == [round(2 * s / 9, 4) for s in range(1, 7)]


def test_recipe_model_defaults(tmp_path, tiny_world):
    model_dir, data = tiny_world
    assert load_recipe("stage2", [f"data.path={data}"]).model.path == str(owl2.default_model())
    assert "default_model" in owl2.__all__ and (owl2.default_model() / "config.json").is_file()
    with pytest.raises(RecipeError, match=r"give exactly one of model\.path"):
        load_recipe("stage2", [f"data.path={data}", f"model.path={model_dir}",
                               f"model.init_config={model_dir / 'config.json'}"])
    with pytest.raises(RecipeError, match="warmup_ratio"):
        load_recipe("stage2", [f"data.path={data}", "train.warmup_ratio=3.0"])


def _interrupt(command: list[str], ready: Path | None, tmp_path: Path) -> subprocess.CompletedProcess:
    """Start ``owl2 train``, wait until ``ready`` exists (or until a metrics line is written), press Ctrl-C."""
    process = subprocess.Popen([sys.executable, "-c", CLI_SCRIPT, *command], env=run_env(), cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while process.poll() is None and time.monotonic() < deadline:
        if (ready is not None and ready.exists()) or (ready is None and metrics.is_file() and metrics.stat().st_size):
            break
        time.sleep(0.01)
    assert process.poll() is None, f"the run ended before Ctrl-C: {process.communicate()[1]}"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def test_ctrl_c_says_what_was_saved_and_how_to_continue(tmp_path, tiny_world):
    model_dir, data = tiny_world
    recipe = write_recipe(tmp_path, model_dir, data, train={"max_steps": 100000, "save_every": 2})
    command = ["train", str(recipe), f"output_dir={json.dumps(str(tmp_path / 'run'))}", *QUIET]
    done = _interrupt(command, tmp_path / "run" / "checkpoints" / "step-0000002", tmp_path)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()  # one line, no traceback
    last = latest_checkpoint(tmp_path / "run")
    assert line.startswith(f"owl2 train: interrupted; the last checkpoint is {last} (step {checkpoint_step(last)})")
    suggested = line.split("continue from it with: ")[1]
    assert shlex.split(suggested) == ["owl2", *command, "--resume"]

    # The suggested command continues from that checkpoint (here told to stop two steps later).
    step = checkpoint_step(last)
    argv = [*shlex.split(suggested)[1:-1], f"train.max_steps={step + 2}", "--resume"]
    subprocess.run([sys.executable, "-c", CLI_SCRIPT, *argv], env=run_env(), cwd=tmp_path, check=True,
                   capture_output=True, timeout=300)
    steps = [r["step"] for r in read_metrics(tmp_path / "run")]
    assert steps[-2:] == [step + 1, step + 2] and checkpoint_step(latest_checkpoint(tmp_path / "run")) == step + 2


def test_ctrl_c_before_any_checkpoint(tmp_path, tiny_world):
    model_dir, data = tiny_world
    recipe = write_recipe(tmp_path, model_dir, data, train={"max_steps": 100000})
    command = ["train", str(recipe), *QUIET]
    done = _interrupt(command, None, tmp_path)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line == ("owl2 train: interrupted before the first checkpoint, so nothing was saved (train.save_every is 0, "
                    "so only the end saves; set train.save_every=N to save every N steps); start again with: "
                    f"{shlex.join(['owl2', *command])}")
    assert latest_checkpoint(tmp_path / "run") is None


def test_lora_without_peft_is_a_one_line_error(tmp_path, tiny_world):
    """peft made unimportable, as on a machine without the train extra: exit 2 and the extra to install."""
    model_dir, data = tiny_world
    recipe = write_recipe(tmp_path, model_dir, data, lora={"enabled": True})
    script = "import sys; sys.modules['peft'] = None; " + CLI_SCRIPT
    done = subprocess.run([sys.executable, "-c", script, "train", str(recipe), *QUIET], env=run_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        'owl2 train: error: LoRA needs peft, which is not installed: pip install "owl2[train]"']
    assert not (tmp_path / "run").exists()  # it stopped before loading the model or writing anything
