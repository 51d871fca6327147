"""vLLM's engine (the CPU build, in its own virtual environment) on an mPLUG-Owl2 checkpoint gives owl2's greedy
tokens: text only, one image, two images, as token prompts (owl2's ids, one -200 per image) and as text prompts
(``<|image|>`` markers), all in one batch with prefills cut into chunks; a repeated image prompt comes from the prefix
cache with the same tokens, the same text with another image does not; owl2-tiny answers the README's questions
as owl2 does.

The checkpoint is random, in the official layout (pickled shards, one per decoder layer, with the ``inv_freq``
buffers the official code saves), with LLaMA-2's tokenizer and a head size of 32 (vLLM's CPU attention takes no
smaller); the image branch of the MAM differs from the text branch, so routing a position through the wrong branch
changes the tokens. vLLM runs in a subprocess under ``.venv-vllm/bin/python`` (``scripts/vllm_venv.sh`` builds it);
the test is skipped when that environment does not exist.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import owl2
from owl2.assets import default_model_dir
from owl2.constants import IMAGE_PLACEHOLDER
from owl2.model.config import Owl2Config
from owl2.model.init import init_weights
from owl2.model.modeling import Owl2ForCausalLM
from owl2.processing.conversation import render_conversation
from tests.checkpoint.test_io import write_official_layout

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
MAX_NEW_TOKENS = 8

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no .venv-vllm (scripts/vllm_venv.sh builds it)"),
]

# Run by .venv-vllm/bin/python: greedy tokens of every prompt in one batch. The guard is needed because the CPU
# backend spawns its worker, which imports the main module again.
VLLM_SCRIPT = """
import json
import sys

if __name__ == "__main__":
    from PIL import Image
    from vllm import LLM, SamplingParams

    job = json.loads(open(sys.argv[1]).read())
    llm = LLM(model=job["model"], dtype="float32", max_model_len=512, max_num_seqs=8, seed=0,
              limit_mm_per_prompt={"image": 2}, enforce_eager=True, **job["engine"])

    def prompt(case):
        out = {"prompt_token_ids": case["ids"]} if "ids" in case else {"prompt": case["text"]}
        if case["images"]:
            out["multi_modal_data"] = {"image": [Image.open(p).convert("RGB") for p in case["images"]]}
        return out

    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"])
    result = {}
    for batch, cases in job["batches"].items():
        outputs = llm.generate([prompt(c) for c in cases], params, use_tqdm=False)
        result[batch] = [{"tokens": list(o.outputs[0].token_ids), "text": o.outputs[0].text,
                          "finish_reason": o.outputs[0].finish_reason, "cached": o.num_cached_tokens or 0}
                         for o in outputs]
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
"""


STRETCHED = {
    "lm_head.weight": 20.0,  # peaked logits: greedy choices far from ties
    # At N(0, 0.02) every image gives nearly the same visual tokens (the abstractor's queries average the ViT tokens
    # evenly, and that average is small next to the queries themselves); larger patch, attention and output weights
    # make them differ clearly from image to image.
    "model.vision_model.embeddings.patch_embed.weight": 10.0,
    "crossattention.attention.query.weight": 10.0,
    "crossattention.attention.key.weight": 10.0,
    "crossattention.attention.value.weight": 10.0,
    "crossattention.output.out_proj.weight": 10.0,
}


def write_checkpoint(directory: Path) -> Path:
    """A random official-layout checkpoint: LLaMA-2's vocabulary, 2 query heads of 32 sharing one K/V head,
    56-pixel images, 9 visual tokens per image."""
    data = json.loads((FIXTURES / "official-tiny" / "config.json").read_text())
    data.update(vocab_size=32000, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                torch_dtype="float32")
    config = Owl2Config.from_dict(data)
    model = init_weights(Owl2ForCausalLM(config), seed=0)
    generator = torch.Generator().manual_seed(1)
    state = {}
    for key, tensor in model.state_dict().items():
        if ".multiway.1." in key:  # an image branch of its own, not the text branch's copy
            noise = torch.randn(tensor.shape, generator=generator) * (0.3 if tensor.ndim == 1 else 0.05)
            tensor = tensor + noise
        elif scale := next((x for suffix, x in STRETCHED.items() if key.endswith(suffix)), None):
            tensor = tensor * scale
        state[key] = tensor.contiguous()
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim))
    for i in range(config.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq

    write_official_layout(directory, state, torch.float32, json.dumps(config.to_dict(), indent=2))
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(FIXTURES / "llama2-tokenizer" / name, directory / name)
    size = config.vision.image_size
    preprocessor = json.loads((FIXTURES / "qalign" / "checkpoint" / "preprocessor_config.json").read_text())
    preprocessor.update(crop_size=size, size=size)
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return directory


def write_image(path: Path, seed: int, size: tuple[int, int]) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def run_vllm(tmp: Path, model: Path, batches: dict[str, list[dict[str, Any]]], max_new_tokens: int,
             **engine: Any) -> dict[str, list[dict[str, Any]]]:
    """Each batch's outputs (tokens, text, finish reason, cached prompt tokens) from one vLLM engine, run by the
    vLLM environment's Python in a subprocess (one engine at a time: each takes about 3 GB)."""
    job, out, script = tmp / "job.json", tmp / "out.json", tmp / "run_vllm.py"
    job.write_text(json.dumps({"model": str(model), "batches": batches, "max_new_tokens": max_new_tokens,
                               "engine": engine}))
    script.write_text(VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([str(VLLM_PYTHON), str(script), str(job), str(out)], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(out.read_text())


def answer_ids(output: dict[str, Any], eos_token_id: int) -> list[int]:
    """vLLM's generated ids without the end-of-sequence id it keeps when it stops there (owl2 leaves it out)."""
    tokens = output["tokens"]
    return tokens[:-1] if output["finish_reason"] == "stop" and tokens[-1:] == [eos_token_id] else tokens


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """owl2's greedy tokens for every case, and vLLM's: first all cases in one batch, each as ids and as text; then,
    with the first batch in the prefix cache, the one-image prompt again and the same text with the other image."""
    tmp = tmp_path_factory.mktemp("vllm")
    checkpoint = write_checkpoint(tmp / "checkpoint")
    first, second = write_image(tmp / "a.png", 0, (80, 60)), write_image(tmp / "b.png", 1, (48, 70))
    describe = f"{IMAGE_PLACEHOLDER}Describe the image in detail: the colours, the shapes, where each one is."
    cases = {
        "text_only": ("Write one word.", []),
        "one_image": (describe, [first]),
        "two_images": (f"Compare {IMAGE_PLACEHOLDER} with {IMAGE_PLACEHOLDER} in one line.", [first, second]),
        "other_image": (describe, [second]),
    }
    pipe = owl2.load(checkpoint, dtype=torch.float32, device="cpu", show_progress=False)
    expected, prompts = {}, {}
    for name, (prompt, images) in cases.items():
        expected[name] = pipe.generate([prompt], [images], max_new_tokens=MAX_NEW_TOKENS)[0].token_ids
        paths = [str(p) for p in images]
        prompts[name] = {
            "ids": {"ids": pipe.request(prompt, images).prompt_ids, "images": paths},
            "text": {"text": render_conversation(pipe.messages(prompt, images), template=pipe.template),
                     "images": paths},
        }
    mixed = ["text_only", "one_image", "two_images"]
    batches = {"mixed": [prompts[name][form] for name in mixed for form in ("ids", "text")],
               "cached": [prompts["one_image"]["ids"], prompts["other_image"]["ids"]]}

    # block_size: the smallest the CPU attention takes (prefix caching reuses whole blocks only);
    # max_num_batched_tokens: prefills cut into chunks, some of them through an image, beside other rows' decodes
    got = run_vllm(tmp, checkpoint, batches, MAX_NEW_TOKENS, block_size=32, max_num_batched_tokens=32,
                   enable_prefix_caching=True)
    return {"expected": expected,
            "ids": {name: got["mixed"][2 * i]["tokens"] for i, name in enumerate(mixed)},
            "text": {name: got["mixed"][2 * i + 1]["tokens"] for i, name in enumerate(mixed)},
            "cached": {"one_image": got["cached"][0], "other_image": got["cached"][1]},
            "prompt_length": len(prompts["one_image"]["ids"]["ids"]) - 1 + pipe.model.config.tokens_per_image}


@pytest.mark.parametrize("name", ["text_only", "one_image", "two_images"])
def test_token_prompts_give_owl2s_greedy_tokens(parity: dict[str, Any], name: str) -> None:
    assert len(parity["expected"][name]) == MAX_NEW_TOKENS
    assert parity["ids"][name] == parity["expected"][name]


@pytest.mark.parametrize("name", ["text_only", "one_image", "two_images"])
def test_text_prompts_give_owl2s_greedy_tokens(parity: dict[str, Any], name: str) -> None:
    assert parity["text"][name] == parity["expected"][name]


def test_the_answers_depend_on_the_images(parity: dict[str, Any]) -> None:
    """Every case has its own answer, so equal tokens are not an artefact of a model that ignores its input."""
    answers = {tuple(tokens) for tokens in parity["expected"].values()}
    assert len(answers) == len(parity["expected"])


def test_a_repeated_image_prompt_is_served_from_the_prefix_cache(parity: dict[str, Any]) -> None:
    again = parity["cached"]["one_image"]
    assert again["tokens"] == parity["expected"]["one_image"]
    # every whole block of the prompt but the last position's, which is always computed
    assert again["cached"] == (parity["prompt_length"] - 1) // 32 * 32 > 0


def test_the_same_text_with_another_image_misses_the_cached_image(parity: dict[str, Any]) -> None:
    """The image is part of the cache key: only the blocks before the image could be reused (none here, as the
    image starts within the first block), and the answer is the other image's."""
    other = parity["cached"]["other_image"]
    assert other["tokens"] == parity["expected"]["other_image"]
    assert other["cached"] == 0


README_QUESTIONS = ["How many circles are there?", "Is there a green cross?", "What colour is the small circle?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """owl2-tiny (the embedded model) on the README's scene: owl2's answers and vLLM's, as ids and as text."""
    tmp = tmp_path_factory.mktemp("vllm-tiny")
    pipe = owl2.load(dtype=torch.float32, device="cpu", show_progress=False)
    scene = ROOT / "examples" / "scene.png"
    expected = [pipe.generate([q], [[scene]], max_new_tokens=16)[0] for q in README_QUESTIONS]
    prompts = []
    for question in README_QUESTIONS:
        prompts.append({"ids": pipe.request(question, [scene]).prompt_ids, "images": [str(scene)]})
        prompts.append({"text": render_conversation(pipe.messages(question, [scene]), template=pipe.template),
                        "images": [str(scene)]})
    got = run_vllm(tmp, pipe.source, {"readme": prompts}, 16)["readme"]
    return {"expected": expected, "got": got, "eos": pipe.tokenizer.eos_token_id}


@pytest.mark.parametrize("index", range(len(README_QUESTIONS)))
def test_owl2_tiny_answers_the_readme_questions_as_owl2_does(tiny: dict[str, Any], index: int) -> None:
    expected = tiny["expected"][index]
    for output in tiny["got"][2 * index: 2 * index + 2]:  # the prompt as ids, then as text
        assert answer_ids(output, tiny["eos"]) == expected.token_ids
        # vLLM keeps the word-start space of the answer's first SentencePiece piece; owl2 decodes the answer alone
        assert output["text"].strip() == expected.text


REGISTRATION_SCRIPT = """
import json
import sys
from importlib.metadata import entry_points

from vllm import ModelRegistry

(plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.value.startswith("owl2.")]
register = plugin.load()
register()
register()
from transformers import AutoConfig

config = AutoConfig.from_pretrained(sys.argv[1])
print(json.dumps({
    "archs": sorted(a for a in ModelRegistry.get_supported_archs() if "Owl2" in a),
    "model_imported": "owl2.integrations.vllm.model" in sys.modules,
    "config": type(config).__name__,
    "tokens_per_image": config.tokens_per_image,
}))
"""


def test_the_entry_point_registers_the_architecture_lazily_and_again_harmlessly(tmp_path: Path) -> None:
    script = tmp_path / "register.py"
    script.write_text(REGISTRATION_SCRIPT)
    done = subprocess.run([str(VLLM_PYTHON), str(script), str(default_model_dir())], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"archs": ["MPLUGOwl2LlamaForCausalLM"], "model_imported": False,
                      "config": "MPLUGOwl2Config", "tokens_per_image": 17}
