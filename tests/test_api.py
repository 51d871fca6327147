"""The Python API (owl2.load -> pipeline) and the ask/chat CLI, on the official tiny model with the real tokenizer."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import owl2
from owl2.api import load
from owl2.checkpoint import resolve_checkpoint
from owl2.cli.main import main as cli
from tests.conftest import FIXTURES, OFFICIAL_TINY, randomize_


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny architecture with LLaMA-2's 32000-token vocabulary (random weights), the real tokenizer and an
    image processor sized for its 56 px ViT."""
    directory = tmp_path_factory.mktemp("tiny-pipeline")
    config = owl2.Owl2Config.from_json(OFFICIAL_TINY)
    config.vocab_size = 32000
    owl2.save_model(randomize_(owl2.Owl2ForCausalLM(config), seed=1), directory)
    for f in (FIXTURES / "llama2-tokenizer").iterdir():
        shutil.copy(f, directory / f.name)
    config = json.loads((FIXTURES / "preproc" / "preprocessor_config.json").read_text())
    config.update(size=56, crop_size=56)
    (directory / "preprocessor_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return load(checkpoint, dtype="fp32", show_progress=False)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "scene.png"
    rng = torch.Generator().manual_seed(0)
    pixels = (torch.rand(70, 90, 3, generator=rng) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


def test_chat_runs_the_official_prompt_path(pipe, image_file):
    request = pipe.request("What is this?", [image_file], max_new_tokens=5)
    rendered_ids = pipe.tokenizer.encode_prompt("USER: <|image|>What is this? ASSISTANT:")
    assert list(request.prompt_ids) == rendered_ids
    assert request.images.shape == (1, 3, 56, 56)
    answer = pipe.chat("What is this?", [image_file], max_new_tokens=5)
    assert answer == pipe.engine.generate([request])[0].text


def test_messages_and_plain_prompts_agree(pipe, image_file):
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image_file)},
                                             {"type": "text", "text": "What is this?"}]}]
    assert pipe.chat(messages, max_new_tokens=4) == pipe.chat("What is this?", [image_file], max_new_tokens=4)


def test_batched_generate_equals_single_calls(pipe, image_file):
    prompts = ["Describe it.", "Hello there, how are you today?", "Compare them."]
    images = [[image_file], [], [image_file, image_file]]
    results = pipe.generate(prompts, images, max_new_tokens=5)
    for prompt, imgs, result in zip(prompts, images, results, strict=True):
        assert result.text == pipe.chat(prompt, imgs, max_new_tokens=5)


def test_stream_concatenates_to_chat(pipe, image_file):
    deltas = list(pipe.stream("Describe it.", [image_file], max_new_tokens=8))
    assert "".join(deltas) == pipe.chat("Describe it.", [image_file], max_new_tokens=8)


def test_score_gives_probabilities_that_sum_to_one(pipe, image_file):
    probs = pipe.score(image_file, "Is there a cat?", ["yes", "no", "maybe"])
    assert len(probs) == 3 and sum(probs) == pytest.approx(1.0, abs=1e-6)
    assert all(p > 0 for p in probs)
    request = pipe.request("Is there a cat?", [image_file])
    loglik = pipe.engine.loglikelihoods(request.prompt_ids, request.images,
                                        [pipe.continuation_ids(request.prompt_ids, c) for c in ["yes", "no", "maybe"]])
    assert probs == pytest.approx(loglik.softmax(0).tolist())
    # the continuation is tokenised as it would follow "ASSISTANT:" in one piece of text
    full = pipe.tokenizer.encode_prompt("USER: <|image|>Is there a cat? ASSISTANT: yes")
    assert full[-len(pipe.continuation_ids(request.prompt_ids, "yes")):] == pipe.continuation_ids(
        request.prompt_ids, "yes")


def test_errors_are_clear(pipe, tmp_path):
    with pytest.raises(owl2.CheckpointError, match="no checkpoint directory"):
        load(tmp_path / "nowhere")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"bad\.png"):
        pipe.chat("Describe it.", [bad])
    with pytest.raises(ValueError, match="context"):
        pipe.chat("word " * 300, max_new_tokens=2)


def test_cli_ask_one_prompt_and_jsonl(checkpoint, image_file, tmp_path, capsys, pipe):
    assert cli(["ask", "--model", str(checkpoint), "--dtype", "fp32", "--image", str(image_file),
                "--prompt", "What is this?", "--max-new-tokens", "5", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["answer"] == pipe.chat("What is this?", [image_file], max_new_tokens=5)
    assert record["prompt_tokens"] == len(pipe.request("What is this?", [image_file]).prompt_ids) - 1 + 9
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": 1, "prompt": "What is this?", "image": str(image_file)}) + "\n"
                    + json.dumps({"id": 2, "prompt": "Say hi."}) + "\n")
    assert cli(["ask", "--model", str(checkpoint), "--dtype", "fp32", "--jsonl", str(jobs),
                "--max-new-tokens", "5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in lines] == [1, 2] and lines[0]["answer"] == record["answer"]
    assert cli(["ask", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "no checkpoint directory" in capsys.readouterr().err


def test_cli_chat_repl(checkpoint, image_file, monkeypatch, capsys, pipe):
    script = f"/image {image_file}\nWhat is this?\n/image /no/such.png\n/reset\nSay hi.\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert cli(["chat", "--model", str(checkpoint), "--dtype", "fp32", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    first = pipe.chat("What is this?", [image_file], max_new_tokens=5)
    assert f"ASSISTANT: {first}\n" in captured.out
    assert "cannot use that image" in captured.err
    assert "(conversation and images cleared)" in captured.err


# ---------------------------------------------------------------------------------------------------------------------
# Habits brought from mPLUG-Owl2 and LLaVA, and what a new user meets on the command line.
REPO = Path(__file__).parents[1]
EXAMPLE = REPO / "examples" / "scene.png"
# Python ignores SIGINT in a child whose parent ignored it (a background job of a plain shell); the real default,
# KeyboardInterrupt, is put back so that the tests send what a terminal's Ctrl-C sends.
CLI_SCRIPT = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "from owl2.cli.main import main; sys.exit(main(sys.argv[1:]))")


def run_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def owl2_cli(*argv: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    """``owl2 ARGV`` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-c", CLI_SCRIPT, *argv], cwd=cwd, env=run_env(**env), capture_output=True,
                          text=True, timeout=300)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The single stderr line of a run that failed with exit code 2 (no traceback)."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("loading ")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_a_single_image_is_one_image_not_its_characters(pipe, image_file):
    expected = pipe.chat("What is this?", [image_file], max_new_tokens=5)
    for single in (str(image_file), image_file, Image.open(image_file)):
        assert pipe.chat("What is this?", single, max_new_tokens=5) == expected
        assert "".join(pipe.stream("What is this?", single, max_new_tokens=5)) == expected
    # generate: one image per row, or one image for every prompt; a lone prompt string is a batch of one
    rows = pipe.generate(["What is this?", "Describe it."], [str(image_file), [image_file]], max_new_tokens=5)
    assert [r.text for r in rows] == [expected, pipe.chat("Describe it.", [image_file], max_new_tokens=5)]
    assert [r.text for r in pipe.generate(["What is this?"] * 2, str(image_file), max_new_tokens=5)] == [expected] * 2
    assert [r.text for r in pipe.generate("What is this?", str(image_file), max_new_tokens=5)] == [expected]
    assert pipe.score(str(image_file), "Is there a cat?", ["yes", "no"]) == pipe.score([image_file], "Is there a cat?",
                                                                                        ["yes", "no"])
    with pytest.raises(ValueError, match="choices must be a list of answers"):
        pipe.score(image_file, "Is there a cat?", "yes")


def test_a_typed_image_placeholder_is_the_image_s_place(pipe, image_file):
    plain = pipe.request("What is this?", [image_file])
    typed = pipe.request("<|image|>What is this?", [image_file])
    assert list(typed.prompt_ids) == list(plain.prompt_ids)  # one image slot, not two
    inside = pipe.request("Look at <|image|> and say what it is.", str(image_file))
    assert list(inside.prompt_ids) == pipe.tokenizer.encode_prompt(
        "USER: Look at <|image|> and say what it is. ASSISTANT:")
    assert pipe.chat("<|image|>What is this?", [image_file], max_new_tokens=5) == pipe.chat(
        "What is this?", [image_file], max_new_tokens=5)
    with pytest.raises(ValueError, match=r"2 <\|image\|> placeholder\(s\) but 1 image\(s\)"):
        pipe.chat("<|image|> or <|image|>?", [image_file])


def test_max_tokens_is_max_new_tokens(pipe, image_file):
    [result] = pipe.generate(["Describe it."], [[image_file]], max_tokens=3)
    assert len(result.token_ids) == 3
    assert pipe.chat("Describe it.", image_file, max_tokens=3) == pipe.chat("Describe it.", image_file,
                                                                            max_new_tokens=3)
    assert "".join(pipe.stream("Describe it.", image_file, max_tokens=3, max_new_tokens=3)) == result.text
    with pytest.raises(ValueError, match="max_tokens=3 and max_new_tokens=4 disagree"):
        pipe.chat("Describe it.", image_file, max_tokens=3, max_new_tokens=4)


def test_example_scene_is_the_readme_s_picture():
    from owl2.api import example_scene

    drawn = example_scene()
    assert drawn.size == (64, 64)
    assert drawn.tobytes() == Image.open(EXAMPLE).convert("RGB").tobytes()


def test_unavailable_device_is_one_line(checkpoint):
    """This torch has no CUDA or MPS build: --device cuda / mps say so instead of torch's AssertionError."""
    if torch.version.cuda is not None or torch.backends.mps.is_built():
        pytest.skip("needs a CPU-only torch")
    with pytest.raises(ValueError, match=r"device 'cuda' is not available: this torch \(.*\) is a CPU-only build"):
        load(checkpoint, device="cuda", show_progress=False)
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        load(checkpoint, device="gpu", show_progress=False)
    line = one_line_error(owl2_cli("ask", "--model", str(checkpoint), "--device", "cuda", "--prompt", "Hi"))
    assert line.startswith("owl2 ask: error: device 'cuda' is not available:") and "CPU-only" in line
    line = one_line_error(owl2_cli("ask", "--device", "mps", "--prompt", "Hi"))
    assert line.startswith("owl2 ask: error: device 'mps' is not available:")


def test_missing_local_model_paths_say_so(tmp_path, monkeypatch):
    """A path that does not exist is reported as such, never as a failed hub download; text shaped like owner/name
    is looked up on the hub only when no folder called owner is here (offline here: HF_HUB_OFFLINE)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "models").mkdir()
    for text in ("models/owl2-7b", "./x", "/abs/x", "~/x", "x"):
        with pytest.raises(owl2.CheckpointError) as caught:
            resolve_checkpoint(text)
        assert str(caught.value) == f"no checkpoint directory at {text!r}: the path does not exist"
    (tmp_path / "models").rmdir()
    with pytest.raises(owl2.CheckpointError, match=r"^no checkpoint directory at 'models/owl2-7b': the path does not "
                                                   r"exist, and HF_HUB_OFFLINE is set"):
        resolve_checkpoint("models/owl2-7b")
    (tmp_path / "models").mkdir()
    line = one_line_error(owl2_cli("ask", "--model", "models/owl2-7b", "--prompt", "Hi", cwd=tmp_path))
    assert line == "owl2 ask: error: no checkpoint directory at 'models/owl2-7b': the path does not exist"


def test_version():
    from importlib.metadata import version

    done = owl2_cli("--version")
    assert done.returncode == 0 and done.stdout == f"owl2 {version('owl2')}\n"


def test_embedded_model_says_what_it_knows_on_stderr_only(capsys):
    from owl2.api import EMBEDDED_MODEL_NOTICE, EMBEDDED_NO_IMAGE_HINT

    assert cli(["ask", "--image", str(EXAMPLE), "--prompt", "How many circles are there?", "--json"]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)  # stdout is the JSON object alone
    assert record["answer"].endswith("2")
    assert captured.err.count(EMBEDDED_MODEL_NOTICE) == 1 and EMBEDDED_NO_IMAGE_HINT not in captured.err
    assert "--model" in EMBEDDED_MODEL_NOTICE and "64 px" in EMBEDDED_MODEL_NOTICE
    assert "MAGAer13/mplug-owl2-llama2-7b" in EMBEDDED_MODEL_NOTICE
    assert cli(["ask", "--prompt", "What is in the picture?"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count(EMBEDDED_MODEL_NOTICE) == 1 and captured.err.count(EMBEDDED_NO_IMAGE_HINT) == 1
    assert EMBEDDED_MODEL_NOTICE not in captured.out and len(captured.out.splitlines()) == 1


def test_no_notice_for_another_model(checkpoint, image_file, capsys):
    from owl2.api import EMBEDDED_MODEL_NOTICE

    assert cli(["ask", "--model", str(checkpoint), "--dtype", "fp32", "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    assert EMBEDDED_MODEL_NOTICE not in capsys.readouterr().err
    assert not load(checkpoint, dtype="fp32", show_progress=False).is_embedded
    assert owl2.load(owl2.default_model(), show_progress=False).is_embedded  # the same model by its path


def test_jsonl_images_are_found_next_to_the_file(checkpoint, image_file, tmp_path, monkeypatch, capsys, pipe):
    folder = tmp_path / "questions"
    folder.mkdir()
    shutil.copy(image_file, folder / "here.png")
    url = "data:image/png;base64," + base64.b64encode(image_file.read_bytes()).decode()
    lines = [{"id": "relative", "prompt": "What is this?", "image": "here.png"},
             {"id": "absolute", "prompt": "What is this?", "images": [str(image_file)]},
             {"id": "url", "prompt": "What is this?", "image": url},
             {"id": "placeholder", "prompt": "<|image|>What is this?", "image": "here.png"}]
    (folder / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.chdir(tmp_path)  # not the JSONL's folder
    assert cli(["ask", "--model", str(checkpoint), "--dtype", "fp32", "--jsonl", "questions/jobs.jsonl",
                "--max-new-tokens", "5"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = pipe.chat("What is this?", [image_file], max_new_tokens=5)
    assert [r["id"] for r in out] == ["relative", "absolute", "url", "placeholder"]
    assert all(r["answer"] == expected for r in out)
    assert out[0]["image"] == "here.png"  # echoed as written


def test_ask_with_a_typed_placeholder(checkpoint, image_file, capsys, pipe):
    assert cli(["ask", "--model", str(checkpoint), "--dtype", "fp32", "--image", str(image_file),
                "--prompt", "<|image|>What is this?", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == pipe.chat("What is this?", [image_file], max_new_tokens=5).strip()
    assert cli(["ask", "--model", str(checkpoint), "--prompt", "<|image|>What is this?"]) == 2
    assert "the prompt has 1 <|image|> placeholder(s) but 0 image(s)" in capsys.readouterr().err


def test_demo_keeps_the_user_s_scene_png_and_honours_image(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scene.png").write_bytes(b"mine")
    assert cli(["demo", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "scene.png").read_bytes() == b"mine" and list(tmp_path.iterdir()) == [tmp_path / "scene.png"]
    drawn = Path(out.split(" into ", 1)[1].splitlines()[0])
    assert drawn.name.startswith("owl2-demo-3-") and Image.open(drawn).size == (64, 64)
    drawn.unlink()

    from owl2.api import EMBEDDED_EXAMPLE_QUESTIONS

    assert cli(["demo", "--image", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert f"Q: {EMBEDDED_EXAMPLE_QUESTIONS[0]}\nA: " in out and "not marked" in out
    answers = [line[3:] for line in out.splitlines() if line.startswith("A: ")]
    assert answers[0].endswith("2")  # "How many circles are there?" about the README's scene
    assert cli(["demo", "--image", str(EXAMPLE), "--output", "x.png"]) == 2
    assert "with --image it draws none" in capsys.readouterr().err


def _wait_for(process: subprocess.Popen, text: str, seen: list[str], timeout: float = 120) -> None:
    """Read the process's stdout character by character until ``text`` appears (the REPL's prompt does not end its
    line, so line reads would wait forever)."""
    deadline = time.monotonic() + timeout
    while not "".join(seen).endswith(text):
        assert time.monotonic() < deadline and process.poll() is None, ("".join(seen), process.stderr.read())
        char = process.stdout.read(1)
        if char:
            seen.append(char)


@pytest.fixture(scope="module")
def long_context_checkpoint(checkpoint, tmp_path_factory) -> Path:
    """The test checkpoint with a 4096-position context, so that an answer takes long enough to interrupt."""
    directory = tmp_path_factory.mktemp("long")
    for f in checkpoint.iterdir():
        shutil.copy(f, directory / f.name)
    config = json.loads((directory / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("when", ["at the prompt", "mid-answer"])
def test_ctrl_c_in_chat_is_one_line(long_context_checkpoint, when):
    process = subprocess.Popen([sys.executable, "-c", CLI_SCRIPT, "chat", "--model", str(long_context_checkpoint),
                                "--dtype", "fp32", "--max-new-tokens", "4000"], cwd=REPO, env=run_env(),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        _wait_for(process, "USER: ", seen)
        if when == "mid-answer":
            process.stdin.write("Tell me a long story.\n")
            process.stdin.flush()
            _wait_for(process, "ASSISTANT: ", seen)
            while len(seen) < len("USER: ASSISTANT: ") + 3:  # a few characters of the answer: it is decoding
                seen.append(process.stdout.read(1))
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 2, err
    assert err.splitlines()[-1] == "owl2 chat: interrupted" and "Traceback" not in err
    if when == "mid-answer":  # stopped within the answer, not at the prompt after it
        assert "".join(seen).count("USER: ") == 1 and "USER: " not in out


def test_ctrl_c_in_eval_says_what_is_saved_and_resumes(tmp_path):
    from owl2.experiments.shapes import write_eval_set

    write_eval_set(tmp_path / "data", scenes=8, seed=0, size=64)
    command = ["eval", "--task", "shapes", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
               "--batch-size", "1", "--limit", "40", "--quiet"]
    predictions = tmp_path / "out" / "shapes.predictions.jsonl"
    process = subprocess.Popen([sys.executable, "-c", CLI_SCRIPT, *command], cwd=tmp_path, env=run_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (predictions.is_file() and predictions.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline and process.poll() is None, process.communicate()
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 2 and out == ""
    [line] = err.splitlines()  # --quiet: no load bar, no "loading" line; one line, no traceback
    saved = len(predictions.read_text().splitlines())
    assert line == (f"owl2 eval: interrupted; {saved} of 40 predictions are saved in {predictions}; run the same "
                    "command again (same --output) to resume from them")
    assert 2 <= saved < 40
    done = owl2_cli(*command, cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == ""
    assert f"({40 - saved} new predictions)" in done.stdout


def test_quiet_and_quantize(checkpoint, capsys, pipe):
    from owl2.cli import QUANTIZE_CHOICES
    from owl2.model.quantize import MODES

    assert QUANTIZE_CHOICES == MODES  # the parser's copy (it must not import torch) follows the real list
    assert cli(["ask", "--model", str(checkpoint), "--dtype", "fp32", "--prompt", "Hi", "--max-new-tokens", "3"]) == 0
    assert "loading" in capsys.readouterr().err
    assert cli(["ask", "--model", str(checkpoint), "--dtype", "fp32", "--prompt", "Hi", "--max-new-tokens", "3",
                "--quiet", "--quantize", "int8"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.strip()  # no loading line, no bar
    quantized = load(checkpoint, dtype="fp32", quantize="int8", show_progress=False)
    assert captured.out.strip() == quantized.chat("Hi", max_new_tokens=3).strip()
    assert type(quantized.model.lm_head) is not type(pipe.model.lm_head)  # the linear layers were replaced
