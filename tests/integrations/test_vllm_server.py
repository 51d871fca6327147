"""vLLM's OpenAI-compatible server (the CPU build, in its own virtual environment) serving an mPLUG-Owl2 checkpoint,
driven by the ``openai`` client: a chat with an image answers with owl2's greedy tokens, streamed or not; a JSON
schema in ``response_format`` gives JSON that parses and validates; the Q-Align rating read from the level words'
log-probabilities at the last prompt position equals owl2's ``rate``.

The checkpoint is the random official-layout one of ``test_vllm.py`` (head size 32, which vLLM's CPU attention needs;
the Q-Align fixture's is 16), given the keys Q-Align's training writes into ``config.json`` (``image_aspect_ratio:
"pad"`` among them, so non-square images are letterboxed by both owl2 and the server). The server runs once for the
module under ``.venv-vllm/bin/python`` with owl2's ``mplug_owl2`` chat template (BOS written in front: vLLM adds
no special tokens to a rendered chat); the test is skipped when that environment does not exist.
"""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import owl2
from owl2.constants import OFFICIAL_IMAGE_TOKEN
from owl2.integrations.transformers.processing import chat_template
from owl2.rating import LEVELS, RatingScale, rating_row
from tests.integrations.test_vllm import VLLM_PYTHON, answer_ids, write_checkpoint, write_image

openai = pytest.importorskip("openai")

MODEL_NAME = "owl2-random"
# owl2.integrations.vllm.model.PLACEHOLDER_TOKEN_ID (<unk>), the id of every image position; that module imports
# vLLM, which this environment does not have
PLACEHOLDER_TOKEN_ID = 0
MAX_NEW_TOKENS = 8
START_DEADLINE_S = 600.0
QUESTION = "Describe the image in detail: the colours, the shapes, where each one is."
RATING_QUESTION = "How would you rate the quality of this image?\n"
RATING_ANSWER = "The quality of the image is"  # with the question: Q-Align's "eval" prompt (owl2's prompt="eval")
QALIGN_CONFIG = {"image_aspect_ratio": "pad", "image_grid_pinpoints": None, "tune_visual_abstractor": True,
                 "freeze_vision_model": False, "visual_abstractor_lr": None}
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "round": {"type": "boolean"},
    },
    "required": ["colour", "count", "round"],
    "additionalProperties": False,
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no .venv-vllm (scripts/vllm_venv.sh builds it)"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(checkpoint: Path, template: Path, port: int) -> list[str]:
    """The server's command line: fp32, eager, a short context, owl2's chat template with OpenAI-style content
    parts (the template places each image part itself), JSON without free whitespace (a random model would
    otherwise spend its budget on whitespace)."""
    return [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(checkpoint), "--served-model-name", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4", "--enforce-eager", "--seed", "0",
        "--limit-mm-per-prompt", json.dumps({"image": 1}),
        "--chat-template", str(template), "--chat-template-content-format", "openai",
        "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
    ]


def wait_until_healthy(process: subprocess.Popen[bytes], url: str, log: Path, deadline_s: float) -> None:
    """Poll ``/health`` until it answers 200; fail with the server's log when it exits or the deadline passes."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if process.poll() is not None:
            pytest.fail(f"the vLLM server exited with {process.returncode}:\n{log.read_text()[-6000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"the vLLM server was not healthy after {deadline_s:.0f} s:\n{log.read_text()[-6000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server (it shuts its engine process down), SIGKILL to its process group if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_part(path: Path) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url(path)}}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The checkpoint, an image, owl2's pipeline on them, and a client of the vLLM server serving the checkpoint."""
    tmp = tmp_path_factory.mktemp("vllm-server")
    checkpoint = write_checkpoint(tmp / "checkpoint")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, **QALIGN_CONFIG}, indent=2))
    template = tmp / "mplug_owl2.jinja"
    # vLLM tokenizes a rendered chat without adding BOS (its templates write it); owl2's prompts start with it
    template.write_text(chat_template("mplug_owl2", bos=True))
    image = write_image(tmp / "wide.png", 0, (80, 60))  # not square: the "pad" policy letterboxes it

    port = free_port()
    log = tmp / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("wb") as out:
        process = subprocess.Popen(server_command(checkpoint, template, port), env=env, cwd=tmp, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # owl2 loads while the server starts
        pipe = owl2.load(checkpoint, dtype=torch.float32, device="cpu", show_progress=False)
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(process, url, log, START_DEADLINE_S)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=300, max_retries=0)
        yield {"client": client, "pipe": pipe, "image": image, "log": log}
    finally:
        stop(process)


def chat_messages(image: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The same conversation for owl2 (an image part holding the path) and for the server (a data URL)."""
    owl2_messages = [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                  {"type": "text", "text": QUESTION}]}]
    server_messages = [{"role": "user", "content": [image_part(image), {"type": "text", "text": QUESTION}]}]
    return owl2_messages, server_messages


@pytest.fixture(scope="module")
def chat(served: dict[str, Any]) -> dict[str, Any]:
    """owl2's greedy answer to the chat, and the server's, whole and streamed."""
    owl2_messages, server_messages = chat_messages(served["image"])
    pipe = served["pipe"]
    expected = pipe.generate([owl2_messages], max_new_tokens=MAX_NEW_TOKENS)[0]
    request = {"model": MODEL_NAME, "messages": server_messages, "max_tokens": MAX_NEW_TOKENS, "temperature": 0}
    whole = served["client"].chat.completions.create(**request, extra_body={"return_token_ids": True})
    chunks = list(served["client"].chat.completions.create(**request, stream=True))
    return {"expected": expected, "prompt_ids": pipe.request(owl2_messages).prompt_ids, "whole": whole,
            "chunks": chunks, "tokens_per_image": pipe.model.config.tokens_per_image,
            "eos": pipe.tokenizer.eos_token_id}


def expand(ids: list[int], tokens_per_image: int) -> list[int]:
    """owl2's prompt ids (one -200 per image) as the server holds them: each image's placeholder positions."""
    out: list[int] = []
    for token in ids:
        out.extend([PLACEHOLDER_TOKEN_ID] * tokens_per_image if token == OFFICIAL_IMAGE_TOKEN else [token])
    return out


def test_the_chat_template_renders_owl2s_prompt(chat: dict[str, Any]) -> None:
    assert chat["whole"].prompt_token_ids == expand(chat["prompt_ids"], chat["tokens_per_image"])


def test_a_chat_with_an_image_gives_owl2s_greedy_answer(chat: dict[str, Any]) -> None:
    choice, expected = chat["whole"].choices[0], chat["expected"]
    assert len(expected.token_ids) == MAX_NEW_TOKENS
    assert answer_ids({"tokens": choice.token_ids, "finish_reason": choice.finish_reason}, chat["eos"]) == \
        expected.token_ids
    # vLLM keeps the word-start space of the answer's first SentencePiece piece; owl2 decodes the answer alone
    assert choice.message.content.strip() == expected.text
    assert choice.finish_reason == "length"


def test_a_streamed_chat_concatenates_to_the_same_answer(chat: dict[str, Any]) -> None:
    deltas = [c.choices[0].delta.content or "" for c in chat["chunks"] if c.choices]
    assert len([d for d in deltas if d]) > 1  # really streamed, not one chunk
    assert "".join(deltas) == chat["whole"].choices[0].message.content
    assert "".join(deltas).strip() == chat["expected"].text


def validate(value: Any, schema: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(value, schema)


def test_a_json_schema_response_format_gives_valid_json(served: dict[str, Any]) -> None:
    _, messages = chat_messages(served["image"])
    response = served["client"].chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA, "strict": True}})
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    value = json.loads(choice.message.content)
    validate(value, SCHEMA)
    assert set(value) == {"colour", "count", "round"}


def test_without_a_schema_the_same_request_is_not_json(served: dict[str, Any], chat: dict[str, Any]) -> None:
    """The schema, not the model, makes the answer JSON: the random model's free answer does not parse."""
    with pytest.raises(json.JSONDecodeError):
        json.loads(chat["whole"].choices[0].message.content)


@pytest.fixture(scope="module")
def rating(served: dict[str, Any]) -> dict[str, Any]:
    """owl2's Q-Align rating of the image (the "eval" prompt) and the five level words' log-probabilities the
    server reports for the first generated position, i.e. the distribution at the prompt's last position.

    Prompt logprobs cannot give it: they score each prompt token given the tokens before it, so they end one
    position short of the next-token distribution after the prompt. ``logprob_token_ids`` asks for exactly the level
    words at the generated position, whatever their rank (``top_logprobs`` alone is capped by ``--max-logprobs``,
    20 by default, and the top 20 need not hold the level words)."""
    pipe, image = served["pipe"], served["image"]
    expected = pipe.rate([image], prompt="eval")[0]
    level_ids = RatingScale(pipe.tokenizer).token_ids[0].tolist()
    messages = [{"role": "user", "content": [{"type": "text", "text": RATING_QUESTION}, image_part(image)]},
                {"role": "assistant", "content": RATING_ANSWER}]
    # The template leaves a final assistant message open (add_generation_prompt), so the prompt ends with
    # "... The quality of the image is" and the next position is where a level word would come.
    response = served["client"].chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=1, temperature=0, logprobs=True,
        top_logprobs=len(level_ids),
        extra_body={"logprob_token_ids": level_ids, "return_tokens_as_token_ids": True, "return_token_ids": True})
    choice = response.choices[0]
    (position,) = choice.logprobs.content
    reported = {int(entry.token.removeprefix("token_id:")): entry.logprob for entry in position.top_logprobs}
    row = rating_row(pipe.tokenizer, pipe.image_processor, image, prompt="eval", policy=pipe.policy)
    return {"expected": expected, "level_ids": level_ids, "reported": reported, "response": response,
            "prompt_ids": expand(row.prompt_ids, pipe.model.config.tokens_per_image)}


def test_the_rating_prompt_is_owl2s(rating: dict[str, Any]) -> None:
    assert rating["response"].prompt_token_ids == rating["prompt_ids"]


def test_the_level_words_logprobs_give_owl2s_rating(rating: dict[str, Any]) -> None:
    expected, level_ids = rating["expected"], rating["level_ids"]
    assert expected.levels == LEVELS
    assert set(level_ids) <= set(rating["reported"])
    logprobs = torch.tensor([rating["reported"][i] for i in level_ids], dtype=torch.float64)
    probs = logprobs.softmax(-1)
    score = float(probs @ torch.tensor(expected.weights, dtype=torch.float64))
    # the level words' distribution is spread enough that a wrong logit would show in the probabilities
    assert sorted(expected.probs)[-2] > 0.01 and max(expected.probs) < 0.99
    # log-probabilities are the logits less one log-sum-exp, so their differences are the logits' differences;
    # fp32 logits of size ~20 carry about 2e-6 of rounding (measured: 1.9e-6 on the differences, 2.6e-7 on the
    # probabilities, 6.8e-7 on the score)
    logits = torch.tensor(expected.logits, dtype=torch.float64)
    torch.testing.assert_close(logprobs - logprobs[0], logits - logits[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(probs, torch.tensor(expected.probs, dtype=torch.float64), rtol=0, atol=2e-6)
    assert math.isclose(score, expected.score, rel_tol=0, abs_tol=1e-5)
