"""The transformers processing classes: official ids on every prompt fixture, official pixels under each
``image_aspect_ratio``, the chat template equal to render_conversation, the expanded layout, saving and loading
through the Auto classes, and a folder of the official files read by AutoProcessor."""

from __future__ import annotations

import base64
import hashlib
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer

from owl2.constants import IMAGE_PLACEHOLDER, OFFICIAL_IMAGE_TOKEN
from owl2.integrations.transformers.configuration import MPLUGOwl2Config
from owl2.integrations.transformers.processing import (
    CHAT_TEMPLATE,
    MPLUGOwl2ImageProcessor,
    MPLUGOwl2Processor,
    MPLUGOwl2Tokenizer,
    chat_template,
    register_processing,
)
from owl2.model.config import Owl2Config
from owl2.processing.conversation import render_conversation
from owl2.processing.image import load_image_processor
from owl2.processing.tokenizer import load_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TOKENIZER_DIR = FIXTURES / "llama2-tokenizer"
PREPROC = FIXTURES / "preproc"
QALIGN = FIXTURES / "qalign" / "checkpoint"
OFFICIAL_TINY = FIXTURES / "official-tiny"
PROMPTS: list[dict[str, Any]] = json.loads((FIXTURES / "prompts" / "prompts_visible.json").read_text("utf-8"))
PREPROC_MANIFEST: dict[str, Any] = json.loads((PREPROC / "manifest.json").read_text("utf-8"))
# image_aspect_ratio -> the name the preproc fixture gives that policy's output
ASPECT_RATIOS = {"pad": "pad", "resize": "stretch", "square": "plain"}
OWL2_POLICY = {"pad": "pad", "resize": "stretch", "square": "crop"}

AutoConfig.register("mplug_owl2", MPLUGOwl2Config, exist_ok=True)
register_processing()


# ---------------------------------------------------------------------------------------------------------- helpers
def tokenizer_folder(tmp: Path, *, backend: str, legacy: bool | None = None) -> Path:
    """The LLaMA-2 tokenizer files with only one backend's model file, optionally another ``legacy``."""
    folder = tmp / f"tok-{backend}-{legacy}"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(TOKENIZER_DIR / ("tokenizer.model" if backend == "sentencepiece" else "tokenizer.json"), folder)
    shutil.copy(TOKENIZER_DIR / "special_tokens_map.json", folder)
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    if legacy is not None:
        config["legacy"] = legacy
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def official_folder(tmp: Path, config_source: Path = OFFICIAL_TINY) -> Path:
    """Only the files the released checkpoint has for processing: config.json, preprocessor_config.json and the
    slow tokenizer's (tokenizer.model, tokenizer_config.json naming LlamaTokenizer, special_tokens_map.json)."""
    folder = tmp / "official"
    folder.mkdir()
    shutil.copy(config_source / "config.json", folder)
    shutil.copy(PREPROC / "preprocessor_config.json", folder)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TOKENIZER_DIR / name, folder)
    return folder


def expand(ids: list[int], per_image: int, image_id: int) -> list[int]:
    """Official ids -> owl2's layout, written out independently of the code under test."""
    out: list[int] = []
    for i in ids:
        out += [image_id] * per_image if i == OFFICIAL_IMAGE_TOKEN else [i]
    return out


def fixture_pixels(name: str, stored: str) -> np.ndarray:
    arrays = np.load(PREPROC / f"{name}.npz")
    aliases = dict(alias.split("=") for alias in arrays["aliases"])
    return arrays[f"pixel_values_{aliases.get(stored, stored)}"]


def gradient(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tokenizer() -> MPLUGOwl2Tokenizer:
    return MPLUGOwl2Tokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def processor(tokenizer: MPLUGOwl2Tokenizer) -> MPLUGOwl2Processor:
    return MPLUGOwl2Processor(MPLUGOwl2ImageProcessor(), tokenizer)


# ---------------------------------------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "legacy_false"])
@pytest.mark.parametrize("backend", ["sentencepiece", "tokenizers"])
def test_ids_equal_the_official_ids_on_every_prompt_fixture(tmp_path: Path, backend: str, legacy: bool) -> None:
    tok = MPLUGOwl2Tokenizer.from_pretrained(tokenizer_folder(tmp_path, backend=backend, legacy=legacy))
    assert tok.owl2_tokenizer.backend == backend and tok.owl2_tokenizer.legacy is legacy
    for case in PROMPTS:
        official = case["input_ids"] if legacy else case["input_ids_legacy_false"]
        expected = [tok.image_token_id if i == OFFICIAL_IMAGE_TOKEN else i for i in official]
        assert tok(case["prompt"])["input_ids"] == expected, case["name"]
        assert tok.encode(case["prompt"]) == expected, case["name"]
        assert tok.official_ids(case["prompt"]) == official, case["name"]


def test_pieces_decoding_and_special_tokens(tokenizer: MPLUGOwl2Tokenizer) -> None:
    assert tokenizer.image_token_id == 32000 == tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    for case in PROMPTS:
        ids = tokenizer(case["prompt"])["input_ids"]
        assert tokenizer.convert_ids_to_tokens(ids) == case["pieces"], case["name"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == case["decoded_skip_special"], case["name"]
        assert tokenizer.decode(ids) == case["decoded"], case["name"]
        without = tokenizer(case["prompt"], add_special_tokens=False)["input_ids"]
        assert without == [i for i in ids if i != tokenizer.bos_token_id], case["name"]
        mask = tokenizer(case["prompt"], return_special_tokens_mask=True)["special_tokens_mask"]
        assert mask == [int(i == tokenizer.bos_token_id) for i in ids], case["name"]


def test_batched_tokenizer_call_pads_on_the_left(tokenizer: MPLUGOwl2Tokenizer) -> None:
    prompts = [PROMPTS[0]["prompt"], PROMPTS[1]["prompt"]]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    assert batch["input_ids"].shape == (2, max(lengths))
    short = lengths.index(min(lengths))
    fill = max(lengths) - min(lengths)
    assert batch["attention_mask"][short, :fill].sum() == 0 and bool(batch["attention_mask"][short, fill:].all())
    assert batch["input_ids"][short, fill:].tolist() == tokenizer(prompts[short])["input_ids"]
    assert tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True) == [
        PROMPTS[0]["decoded_skip_special"], PROMPTS[1]["decoded_skip_special"]]


def test_streamer_and_stop_strings_work_with_the_tokenizer(tokenizer: MPLUGOwl2Tokenizer) -> None:
    """generate's TextIteratorStreamer concatenates to the whole answer; its stop strings match on our pieces."""
    from transformers import TextIteratorStreamer
    from transformers.generation.stopping_criteria import StopStringCriteria

    prompt = tokenizer(PROMPTS[0]["prompt"])["input_ids"]
    answer = tokenizer("Ça va? 😀 Yes,\nthe café's open 请. Done", add_special_tokens=False)["input_ids"] + [2]
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    streamer.put(torch.tensor([prompt]))
    for token in answer:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(streamer) == tokenizer.decode(answer, skip_special_tokens=True) == (
        "Ça va? 😀 Yes,\nthe café's open 请. Done")
    stop = StopStringCriteria(tokenizer, ["Paris."])
    assert stop(torch.tensor([tokenizer("It is Paris.", add_special_tokens=False)["input_ids"]]), None).tolist() == [
        True]
    assert stop(torch.tensor([tokenizer("It is Pari", add_special_tokens=False)["input_ids"]]), None).tolist() == [
        False]


# ---------------------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("aspect_ratio", sorted(ASPECT_RATIOS))
@pytest.mark.parametrize("name", sorted(PREPROC_MANIFEST["images"]))
def test_pixels_equal_owl2_and_the_official_fixture(name: str, aspect_ratio: str) -> None:
    image_processor = MPLUGOwl2ImageProcessor(**json.loads((PREPROC / "preprocessor_config.json").read_text()),
                                              image_aspect_ratio=aspect_ratio)
    image = Image.open(PREPROC / f"{name}.png").convert("RGB")
    pixels = image_processor(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 448, 448) and pixels.dtype == torch.float32
    owl2_pixels = load_image_processor(PREPROC).preprocess(image, OWL2_POLICY[aspect_ratio])
    assert torch.equal(pixels[0], owl2_pixels)
    stored = ASPECT_RATIOS[aspect_ratio]
    np.testing.assert_array_equal(pixels[0].numpy().astype(np.float16), fixture_pixels(name, stored))
    recorded = PREPROC_MANIFEST["images"][name]["policies"][stored]["sha256_float32"]
    assert hashlib.sha256(pixels[0].numpy().tobytes()).hexdigest() == recorded


def test_image_inputs_of_every_kind_and_per_call_aspect_ratio() -> None:
    image_processor = MPLUGOwl2ImageProcessor()  # the release's settings, "resize" by default
    image = gradient(96, 40)
    reference = load_image_processor(PREPROC).preprocess(image, "stretch")
    array = np.asarray(image)
    for source in (image, array, array.transpose(2, 0, 1).copy(), torch.from_numpy(array.transpose(2, 0, 1).copy())):
        assert torch.equal(image_processor(source, return_tensors="pt")["pixel_values"][0], reference)
    batch = image_processor(np.stack([array, array]), return_tensors="pt")["pixel_values"]
    assert batch.shape == (2, 3, 448, 448) and torch.equal(batch[1], reference)
    nested = image_processor([[image], [image, gradient(40, 96, 1)]], return_tensors="pt")["pixel_values"]
    assert nested.shape == (3, 3, 448, 448) and torch.equal(nested[1], reference)
    padded = image_processor(image, image_aspect_ratio="pad", return_tensors="pt")["pixel_values"][0]
    assert torch.equal(padded, load_image_processor(PREPROC).preprocess(image, "pad"))
    assert not torch.equal(padded, reference)


# ------------------------------------------------------------------------------------------------------- chat template
IMAGE = gradient(64, 48)
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is it?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "Before "}, {"type": "image", "image": IMAGE},
                                  {"type": "text", "text": " after"}]}],
    [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "image", "image": IMAGE},
                                  {"type": "text", "text": "What changed?"}]}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "Describe."}]},
     {"role": "assistant", "content": "A cat on a mat."},
     {"role": "user", "content": "What colour is the cat?"}],
    [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "kind."}]},
     {"role": "user", "content": [{"type": "text", "text": "Q1"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
     {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
    [{"role": "user", "content": "Finish this"}, {"role": "assistant", "content": "The answer is"}],
    [{"role": "user", "content": "Open slot"}, {"role": "assistant", "content": None}],
    [{"role": "user", "content": "Empty slot"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "  spaces  \n\nand newlines\n"}, {"role": "assistant", "content": " x "},
     {"role": "user", "content": "café 😀 请"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                  {"type": "text", "text": "Via a URL part"}]}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("template", ["mplug_owl2", "vicuna_v1"])
def test_chat_template_renders_exactly_as_render_conversation(processor: MPLUGOwl2Processor, template: str,
                                                              add_generation_prompt: bool) -> None:
    jinja = CHAT_TEMPLATE if template == "mplug_owl2" else chat_template(template)
    for messages in CONVERSATIONS:
        expected = render_conversation(messages, template, add_generation_prompt)
        rendered = processor.apply_chat_template(messages, chat_template=jinja,
                                                 add_generation_prompt=add_generation_prompt)
        assert rendered == expected, messages


def test_chat_template_with_bos_starts_with_the_tokenizer_bos(processor: MPLUGOwl2Processor) -> None:
    """For servers that tokenize the rendered text without special tokens: BOS, then the same conversation."""
    jinja = chat_template("mplug_owl2", bos=True)
    for messages in CONVERSATIONS:
        rendered = processor.apply_chat_template(messages, chat_template=jinja, add_generation_prompt=True)
        assert rendered == "<s>" + render_conversation(messages, "mplug_owl2", True), messages


@pytest.mark.parametrize("answer", ["The answer is", "The answer is ", [{"type": "text", "text": "In parts "}]])
def test_continue_final_message_leaves_the_answer_open(processor: MPLUGOwl2Processor, answer: Any) -> None:
    """What pipelines do with a chat that ends with the assistant: the answer stays open, spaces kept."""
    messages = [{"role": "user", "content": "Finish this"}, {"role": "assistant", "content": answer}]
    rendered = processor.apply_chat_template(messages, continue_final_message=True)
    text = answer if isinstance(answer, str) else answer[0]["text"]
    assert rendered == render_conversation(messages, add_generation_prompt=True) == (
        f"USER: Finish this ASSISTANT: {text}")


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "only a system message"}],
    [{"role": "assistant", "content": "starts with the assistant"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": "typed <|image|> placeholder"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "image": IMAGE}]}],
    [{"role": "system", "content": [{"type": "image", "image": IMAGE}]}, {"role": "user", "content": "a"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}],
    [{"role": "tool", "content": "x"}],
], ids=lambda m: "-".join(str(x.get("role")) for x in m))
def test_chat_template_refuses_what_render_conversation_refuses(processor: MPLUGOwl2Processor,
                                                                messages: list[dict[str, Any]]) -> None:
    with pytest.raises(ValueError):
        render_conversation(messages)
    with pytest.raises(Exception, match=r"(?i)message|image|role|content|part"):
        processor.apply_chat_template(messages, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------------------- processor
def test_processor_expands_each_image_in_owl2_layout(processor: MPLUGOwl2Processor,
                                                     tokenizer: MPLUGOwl2Tokenizer) -> None:
    owl2_tokenizer = load_tokenizer(TOKENIZER_DIR)
    owl2_images = load_image_processor(PREPROC)
    per_image = Owl2Config().tokens_per_image
    assert processor.tokens_per_image == per_image == 65 and processor.image_token_id == 32000
    for case in PROMPTS:
        count = case["prompt"].count(IMAGE_PLACEHOLDER)
        images = [gradient(50 + 7 * k, 30 + 11 * k, k) for k in range(count)]
        out = processor(text=case["prompt"], images=images or None, return_tensors="pt")
        assert out["input_ids"][0].tolist() == expand(owl2_tokenizer.encode_prompt(case["prompt"]), per_image, 32000)
        assert bool(out["attention_mask"].all())
        if images:
            assert torch.equal(out["pixel_values"], owl2_images(images, policy="stretch"))
        else:
            assert "pixel_values" not in out
        assert processor.decode(out["input_ids"][0], skip_special_tokens=True) == case["decoded_skip_special"]


def test_processor_batch_is_padded_and_rows_equal_runs_alone(processor: MPLUGOwl2Processor) -> None:
    prompts = ["USER: <|image|>What is it? ASSISTANT:", "USER: Hi there, how are you today? ASSISTANT:",
               "USER: <|image|><|image|>Compare. ASSISTANT:"]
    images = [[gradient(40, 40, 1)], [], [gradient(80, 40, 2), gradient(40, 80, 3)]]
    batch = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    alone = [processor(text=p, images=i or None, return_tensors="pt") for p, i in zip(prompts, images, strict=True)]
    length = max(a["input_ids"].shape[1] for a in alone)
    assert batch["input_ids"].shape == (3, length)
    for row, single in enumerate(alone):
        n = single["input_ids"].shape[1]
        assert batch["input_ids"][row, length - n:].tolist() == single["input_ids"][0].tolist()
        assert batch["attention_mask"][row].tolist() == [0] * (length - n) + [1] * n
        assert bool((batch["input_ids"][row, :length - n] == processor.tokenizer.pad_token_id).all())
    assert torch.equal(batch["pixel_values"], torch.cat([a["pixel_values"] for a in alone if "pixel_values" in a]))
    right = processor(text=prompts, images=images, padding="max_length", max_length=length + 3, padding_side="right")
    assert [len(r) for r in right["input_ids"]] == [length + 3] * 3
    assert right["input_ids"][1][: alone[1]["input_ids"].shape[1]] == alone[1]["input_ids"][0].tolist()


def test_processor_refuses_mismatched_images_and_truncation(processor: MPLUGOwl2Processor) -> None:
    with pytest.raises(ValueError, match="image_token_id"):
        MPLUGOwl2Processor(MPLUGOwl2ImageProcessor(), processor.tokenizer, image_token_id=32001)
    with pytest.raises(ValueError, match="placeholder"):
        processor(text="USER: no placeholder ASSISTANT:", images=[IMAGE])
    with pytest.raises(ValueError, match="placeholder"):
        processor(text="USER: <|image|><|image|> ASSISTANT:", images=[IMAGE])
    with pytest.raises(ValueError, match="truncation"):
        processor(text="USER: hi ASSISTANT:", truncation=True, max_length=3)
    with pytest.raises(ValueError, match="padding"):
        processor(text=["USER: a ASSISTANT:", "USER: a longer one ASSISTANT:"], return_tensors="pt")


def test_apply_chat_template_tokenized_equals_owl2(processor: MPLUGOwl2Processor) -> None:
    owl2_tokenizer = load_tokenizer(TOKENIZER_DIR)
    owl2_images = load_image_processor(PREPROC)
    for messages in CONVERSATIONS[:8]:
        out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt")
        prompt = render_conversation(messages)
        assert out["input_ids"][0].tolist() == expand(owl2_tokenizer.encode_prompt(prompt), 65, 32000)
        count = prompt.count(IMAGE_PLACEHOLDER)
        if count:
            assert torch.equal(out["pixel_values"], owl2_images([IMAGE] * count, policy="stretch"))
        ids_only = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert list(np.asarray(ids_only).reshape(-1)) == out["input_ids"][0].tolist()


def test_batched_chats_are_padded_and_decode_back(processor: MPLUGOwl2Processor) -> None:
    chats = [CONVERSATIONS[1], CONVERSATIONS[5], CONVERSATIONS[0]]
    out = processor.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt", processor_kwargs={"padding": True})
    owl2_tokenizer = load_tokenizer(TOKENIZER_DIR)
    rows = [expand(owl2_tokenizer.encode_prompt(render_conversation(chat)), 65, 32000) for chat in chats]
    length = max(len(row) for row in rows)
    assert out["input_ids"].tolist() == [[0] * (length - len(row)) + row for row in rows]
    assert out["attention_mask"].sum(1).tolist() == [len(row) for row in rows]
    assert out["pixel_values"].shape == (2, 3, 448, 448)
    expected = [owl2_tokenizer.decode(owl2_tokenizer.encode_prompt(render_conversation(chat))) for chat in chats]
    assert processor.batch_decode(out["input_ids"], skip_special_tokens=True) == expected
    assert processor.post_process_image_text_to_text(out["input_ids"]) == expected


def test_apply_chat_template_loads_image_paths_and_data_urls(processor: MPLUGOwl2Processor) -> None:
    path = PREPROC / "camera_wide_odd.png"
    data_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image", "path": str(path)},
                                             {"type": "image_url", "image_url": {"url": data_url}},
                                             {"type": "text", "text": "What is it?"}]}]
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    assert out["pixel_values"].shape == (2, 3, 448, 448)
    for pixels in out["pixel_values"]:
        np.testing.assert_array_equal(pixels.numpy().astype(np.float16), fixture_pixels("camera_wide_odd", "stretch"))


# ---------------------------------------------------------------------------------------------------------- loading
def test_a_folder_of_official_files_loads_with_auto_processor(tmp_path: Path) -> None:
    folder = official_folder(tmp_path)
    config = Owl2Config.from_json(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor) is MPLUGOwl2Processor
    assert type(processor.tokenizer) is MPLUGOwl2Tokenizer
    assert type(processor.image_processor) is MPLUGOwl2ImageProcessor
    assert processor.tokens_per_image == config.tokens_per_image == 9
    assert processor.image_token_id == processor.tokenizer.image_token_id == config.image_token_index
    assert processor.image_processor.image_aspect_ratio == "resize"  # no image_aspect_ratio: owl2's default
    prompt = PROMPTS[0]["prompt"]
    out = processor(text=prompt, images=[IMAGE])
    assert out["input_ids"][0] == expand(PROMPTS[0]["input_ids"], 9, config.image_token_index)
    assert processor.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True) == \
        "USER: x ASSISTANT:"


def test_the_qalign_checkpoint_loads_with_its_pad_policy() -> None:
    processor = AutoProcessor.from_pretrained(QALIGN)
    assert type(processor) is MPLUGOwl2Processor
    assert processor.tokens_per_image == 17 and processor.image_token_id == 32000
    assert processor.image_processor.image_aspect_ratio == "pad"
    image = Image.open(FIXTURES / "qalign" / "images" / "astronaut_wide.png").convert("RGB")
    out = processor(text="USER: How would you rate the quality of this image?\n<|image|> ASSISTANT:", images=image,
                    return_tensors="pt")
    assert torch.equal(out["pixel_values"][0], load_image_processor(QALIGN).preprocess(image))
    assert load_image_processor(QALIGN).default_policy == "pad"


def test_save_and_load_round_trip_through_the_auto_classes(tmp_path: Path) -> None:
    source = AutoProcessor.from_pretrained(QALIGN)
    saved = tmp_path / "saved"
    source.save_pretrained(saved)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "preprocessor_config.json", "processor_config.json", "chat_template.jinja"):
        assert (saved / name).is_file(), name
    assert (saved / "tokenizer.model").read_bytes() == (QALIGN / "tokenizer.model").read_bytes()
    assert (saved / "tokenizer.json").read_bytes() == (QALIGN / "tokenizer.json").read_bytes()
    loaded = AutoProcessor.from_pretrained(saved)  # no config.json: everything comes from the saved files
    assert type(loaded) is MPLUGOwl2Processor
    assert (loaded.tokens_per_image, loaded.image_token_id) == (17, 32000)
    assert loaded.image_processor.to_dict() == source.image_processor.to_dict()
    assert loaded.chat_template == source.chat_template == CHAT_TEMPLATE
    assert loaded.tokenizer.padding_side == source.tokenizer.padding_side == "left"
    image = gradient(70, 30, 5)
    for case in PROMPTS:
        count = case["prompt"].count(IMAGE_PLACEHOLDER)
        a = source(text=case["prompt"], images=[image] * count or None, return_tensors="pt")
        b = loaded(text=case["prompt"], images=[image] * count or None, return_tensors="pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), case["name"]
    assert type(AutoTokenizer.from_pretrained(saved)) is MPLUGOwl2Tokenizer
    assert type(AutoImageProcessor.from_pretrained(saved)) is MPLUGOwl2ImageProcessor
    assert AutoImageProcessor.from_pretrained(saved).image_aspect_ratio == "pad"
    # owl2's own loaders read the saved folder to the same tokenizer and pixels
    assert load_tokenizer(saved).encode_prompt(PROMPTS[1]["prompt"]) == PROMPTS[1]["input_ids"]
    saved_pixels = load_image_processor(saved).preprocess(image, "pad")
    assert torch.equal(saved_pixels, source.image_processor(image, return_tensors="pt")["pixel_values"][0])


def test_processor_survives_pickling(processor: MPLUGOwl2Processor) -> None:
    """Data loaders with workers and datasets.map(num_proc=...) pickle the processor."""
    copy = pickle.loads(pickle.dumps(processor))
    case = PROMPTS[3]
    images = [IMAGE] * case["prompt"].count(IMAGE_PLACEHOLDER)
    a = processor(text=case["prompt"], images=images, return_tensors="pt")
    b = copy(text=case["prompt"], images=images, return_tensors="pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_legacy_false_round_trips(tmp_path: Path) -> None:
    folder = tokenizer_folder(tmp_path, backend="sentencepiece", legacy=False)
    tok = MPLUGOwl2Tokenizer.from_pretrained(folder)
    tok.save_pretrained(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert type(again) is MPLUGOwl2Tokenizer and again.owl2_tokenizer.legacy is False
    for case in PROMPTS:
        assert again.official_ids(case["prompt"]) == case["input_ids_legacy_false"], case["name"]
