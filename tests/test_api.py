"""The Python API (owl2.load -> pipeline) and the ask/chat CLI, on the official tiny model with the real tokenizer."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import owl2
from owl2.api import load
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
