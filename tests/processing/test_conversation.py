"""Chat templates: the official prompt strings for every recorded prompt (and their ids through the tokenizer),
hand-checked renderings, image placeholders and payloads, task suffixes and every rejected message list."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from owl2.processing.conversation import (
    CAPTION_INSTRUCTION,
    IMAGE_PLACEHOLDER,
    MULTIPLE_CHOICE_INSTRUCTION,
    MULTIPLE_CHOICE_INSTRUCTION_ASCII,
    TEMPLATES,
    VQA_INSTRUCTION,
    Conversation,
    check_image_placeholders,
    evaluation_prompt,
    extract_images,
    get_template,
    image_first,
    mmlu_prompt,
    multiple_choice_prompt,
    options_block,
    prompt_parts,
    render_conversation,
    vqa_prompt,
)
from owl2.processing.tokenizer import Owl2Tokenizer, load_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PROMPTS: dict[str, dict[str, Any]] = {
    case["name"]: case for case in json.loads((FIXTURES / "prompts" / "prompts_visible.json").read_text("utf-8"))
}
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def image(name: str = "img.png") -> dict[str, Any]:
    return {"type": "image", "image": name}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def user(*parts: Any) -> dict[str, Any]:
    """A user message: one string or list stays as it is, anything else becomes a list of parts."""
    if len(parts) == 1 and isinstance(parts[0], (str, list)):
        return {"role": "user", "content": parts[0]}
    return {"role": "user", "content": [text(p) if isinstance(p, str) else p for p in parts]}


def assistant(content: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


# Messages (with image parts) that render to each recorded prompt. The evaluation scripts' prompts ("raw" in the
# fixture) are the template's rendering plus one trailing space; ``image_at_start`` is not a template rendering.
HAND_BUILT: dict[str, tuple[list[dict[str, Any]], str]] = {
    "single_image": ([user(image(), "Describe the image.")], ""),
    "multi_turn_image_first": (
        [user(image(), "What animal is in the picture?"), assistant("It is a cat sitting on a windowsill."),
         user("What color is its fur?")],
        "",
    ),
    "text_only": ([user("Write a haiku about autumn leaves.")], ""),
    "two_images_adjacent": ([user(image("a"), image("b"), "What changed between these two photos?")], ""),
    "vqa_suffix": ([user(image(), vqa_prompt("What is the man holding?"))], ""),
    "multiple_choice_suffix": (
        [user(image(), multiple_choice_prompt("Which season is shown?", ["Spring", "Summer", "Autumn", "Winter"]))],
        "",
    ),
    "unicode_emoji": ([user(image(), "Is this café open? 😀👍 Ça va, naïve façade!")], ""),
    "cjk": ([user(image(), "请描述这张图片。")], ""),
    "leading_trailing_spaces": ([user(image(), "   What is this?   ")], ""),
    "newlines": ([user(image(), "First line.\n\nSecond line.\n")], ""),
    "image_in_middle": ([user("Here is a photo: ", image(), " What do you see?")], ""),
    "web_demo_tuple": ([user(image(), "Describe this scene.")], ""),
    "eval_vqa_trailing_space": (
        [user({"type": "image_url", "image_url": {"url": "bus.jpg"}},
              vqa_prompt("What color is the bus?", separator=" "))],
        " ",
    ),
    "eval_mmbench": (
        [user(image(), multiple_choice_prompt("What is the main object?", ["a chair", "a table", "a lamp"],
                                              hint="N/A"))],
        " ",
    ),
}


@pytest.fixture(scope="module", ids=lambda p: f"{p[0]}-legacy_{p[1]}",
                params=[(b, legacy) for b in ("sentencepiece", "tokenizers") for legacy in (True, False)])
def tokenizer(request: pytest.FixtureRequest) -> Owl2Tokenizer:
    backend, legacy = request.param
    return load_tokenizer(FIXTURES / "llama2-tokenizer", backend=backend, legacy=legacy)


# -------------------------------------------------------------------------------------------------- fixture prompts
def test_every_template_prompt_has_hand_built_messages() -> None:
    templated = {name for name, case in PROMPTS.items() if case["template"] == "mplug_owl2"}
    raw = {name for name, case in PROMPTS.items() if case["template"] == "raw"}
    assert templated | (raw - {"image_at_start"}) == set(HAND_BUILT)


@pytest.mark.parametrize("name", sorted(HAND_BUILT))
def test_hand_built_messages_render_and_tokenise_to_the_recorded_prompt(name: str, tokenizer: Owl2Tokenizer) -> None:
    case = PROMPTS[name]
    messages, suffix = HAND_BUILT[name]
    prompt = render_conversation(messages) + suffix
    assert prompt == case["prompt"]
    expected = case["input_ids"] if tokenizer.legacy else case["input_ids_legacy_false"]
    assert tokenizer.encode_prompt(prompt) == expected
    images = extract_images(messages)
    assert len(images) == prompt.count(IMAGE_PLACEHOLDER) == expected.count(-200)


@pytest.mark.parametrize("name", [n for n, c in PROMPTS.items() if c["template"] == "mplug_owl2"])
def test_fixture_messages_render_with_typed_placeholders(name: str) -> None:
    """The fixture's own message lists: text carrying ``<|image|>``, images passed separately."""
    case = PROMPTS[name]
    messages: list[dict[str, Any]] = []
    n_images = 0
    for message in case["messages"]:
        if message["text"] is None:  # the open answer slot: what add_generation_prompt adds
            assert message is case["messages"][-1] and message["role"] == "assistant"
            continue
        content = message["text"]
        if message.get("as_tuple"):  # the web demo moves the image to the front of the stripped text
            content = IMAGE_PLACEHOLDER + content.replace(IMAGE_PLACEHOLDER, "").strip()
        messages.append({"role": message["role"], "content": content})
        n_images += message["n_images"]
    assert render_conversation(messages, images=[object()] * n_images) == case["prompt"]


# -------------------------------------------------------------------------------------------------- renderings
def test_single_turn() -> None:
    assert render_conversation([user("Hi")]) == "USER: Hi ASSISTANT:"
    assert render_conversation([user("Hi")], "vicuna_v1") == f"{VICUNA_SYSTEM} USER: Hi ASSISTANT:"


def test_multi_turn() -> None:
    messages = [user("a"), assistant("b"), user("c"), assistant("d"), user("e")]
    assert render_conversation(messages) == "USER: a ASSISTANT: b</s>USER: c ASSISTANT: d</s>USER: e ASSISTANT:"
    assert render_conversation(messages, template="v1") == (
        f"{VICUNA_SYSTEM} USER: a ASSISTANT: b</s>USER: c ASSISTANT: d</s>USER: e ASSISTANT:")


def test_system_text() -> None:
    messages = [{"role": "system", "content": "Be brief."}, user("Hi")]
    assert render_conversation(messages) == "USER: Hi ASSISTANT:"  # mplug_owl2 has no system slot
    assert render_conversation(messages, "vicuna_v1") == "Be brief. USER: Hi ASSISTANT:"
    as_parts = [{"role": "system", "content": [text("Be "), text("brief.")]}, user("Hi")]
    assert render_conversation(as_parts, "vicuna_v1") == "Be brief. USER: Hi ASSISTANT:"


def test_zero_one_two_images() -> None:
    assert render_conversation([user([text("Hi")])]) == "USER: Hi ASSISTANT:"
    assert render_conversation([user(image(), "Hi")]) == "USER: <|image|>Hi ASSISTANT:"
    assert render_conversation([user("Look: ", image())]) == "USER: Look: <|image|> ASSISTANT:"
    assert render_conversation([user(image())]) == "USER: <|image|> ASSISTANT:"
    two = [user(image("a"), "Compare with", image("b"))]
    assert render_conversation(two) == "USER: <|image|>Compare with<|image|> ASSISTANT:"
    assert extract_images(two) == ["a", "b"]


def test_images_across_turns_and_payload_kinds() -> None:
    pil_like = object()
    messages = [
        user({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "First?"),
        assistant("One."),
        user({"type": "image", "image": pil_like}, {"type": "image_url", "image_url": "https://x/y.jpg"}, "And?"),
    ]
    assert render_conversation(messages) == (
        "USER: <|image|>First? ASSISTANT: One.</s>USER: <|image|><|image|>And? ASSISTANT:")
    assert extract_images(messages) == ["data:image/png;base64,AAAA", pil_like, "https://x/y.jpg"]
    assert extract_images([user({"type": "image", "path": "p.png"}), user({"type": "image", "url": "u"})]) == [
        "p.png", "u"]
    assert extract_images([user("no images")]) == []


def test_typed_placeholders_with_separate_images() -> None:
    messages = [user("<|image|>What is it?"), assistant("A dog."), user("And <|image|>?")]
    assert render_conversation(messages, images=["a", "b"]) == (
        "USER: <|image|>What is it? ASSISTANT: A dog.</s>USER: And <|image|>? ASSISTANT:")
    assert render_conversation([user("No image")], images=[]) == "USER: No image ASSISTANT:"


def test_end_of_prompt() -> None:
    done = [user("a"), assistant("b")]
    assert render_conversation(done, add_generation_prompt=False) == "USER: a ASSISTANT: b</s>"
    assert render_conversation(done) == "USER: a ASSISTANT: b"  # the answer is left open, to be continued
    assert render_conversation([user("a")], add_generation_prompt=False) == "USER: a "
    for open_slot in ("", None, []):
        assert render_conversation([user("a"), assistant(open_slot)]) == "USER: a ASSISTANT:"
        assert render_conversation([user("a"), assistant(open_slot)], add_generation_prompt=False) == (
            "USER: a ASSISTANT:")
    assert render_conversation([user("a"), assistant([text("b")])], "vicuna_v1", False) == (
        f"{VICUNA_SYSTEM} USER: a ASSISTANT: b</s>")


def test_text_is_not_stripped() -> None:
    assert render_conversation([user("  a \n"), assistant(" b "), user("c")]) == (
        "USER:   a \n ASSISTANT:  b </s>USER: c ASSISTANT:")


def test_conversation_object_is_the_official_get_prompt() -> None:
    conv = Conversation()
    conv.append_message("USER", "<|image|>Hi")
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == "USER: <|image|>Hi ASSISTANT:"
    copy = conv.copy()
    copy.messages[-1] = ("ASSISTANT", "Hello.")
    copy.append_message("user", "Bye")
    assert copy.get_prompt() == "USER: <|image|>Hi ASSISTANT: Hello.</s>USER: Bye "
    assert conv.get_prompt() == "USER: <|image|>Hi ASSISTANT:"
    vicuna = Conversation(get_template("vicuna_v1"), system="S")
    vicuna.append_message("user", "q")
    assert vicuna.get_prompt() == "S USER: q "
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        conv.append_message("tool", "x")


def test_templates() -> None:
    assert get_template("v1") is get_template("vicuna_v1") is TEMPLATES["vicuna_v1"]
    owl = get_template("mplug_owl2")
    assert (owl.roles, owl.sep, owl.sep2, owl.emits_system) == (("USER", "ASSISTANT"), " ", "</s>", False)
    assert get_template(owl) is owl
    assert render_conversation([user("Hi")], template=owl) == "USER: Hi ASSISTANT:"
    with pytest.raises(ValueError, match="unknown conversation template 'llama2'; known: mplug_owl2, v1, vicuna_v1"):
        render_conversation([user("Hi")], template="llama2")


# -------------------------------------------------------------------------------------------------- task suffixes
def test_task_suffixes() -> None:
    assert VQA_INSTRUCTION == "Answer the question using a single word or phrase."
    assert MULTIPLE_CHOICE_INSTRUCTION == "Answer with the option\u2019s letter from the given choices directly."
    assert vqa_prompt("Q?") == "Q?\nAnswer the question using a single word or phrase."
    assert vqa_prompt("Q?", separator=" ") == "Q? Answer the question using a single word or phrase."
    assert multiple_choice_prompt("Q?", ["x", "y"]) == f"Q?\nA. x\nB. y\n{MULTIPLE_CHOICE_INSTRUCTION}"
    assert multiple_choice_prompt("Q?", {"B": "y", "D": "z"}, hint="H") == (
        f"H\nQ?\nB. y\nD. z\n{MULTIPLE_CHOICE_INSTRUCTION}")
    with pytest.raises(ValueError, match="at least one option"):
        multiple_choice_prompt("Q?", [])
    with pytest.raises(ValueError, match="at most 26"):
        multiple_choice_prompt("Q?", ["o"] * 27)
    with pytest.raises(ValueError, match="options must be"):
        multiple_choice_prompt("Q?", "AB")


def test_instructions_byte_for_byte() -> None:
    # The official scripts' apostrophe is U+2019; LLaVA-1.5's (and owl2-tiny's training data's) is ASCII. They are
    # different tokens, so each must stay exactly as it is.
    tail = b"s letter from the given choices directly."
    assert MULTIPLE_CHOICE_INSTRUCTION.encode() == b"Answer with the option\xe2\x80\x99" + tail
    assert MULTIPLE_CHOICE_INSTRUCTION_ASCII.encode() == b"Answer with the option'" + tail
    tokenizer = load_tokenizer(FIXTURES / "llama2-tokenizer")
    assert tokenizer.encode(MULTIPLE_CHOICE_INSTRUCTION) != tokenizer.encode(MULTIPLE_CHOICE_INSTRUCTION_ASCII)
    assert CAPTION_INSTRUCTION == "Provide a one-sentence caption for the provided image."
    assert multiple_choice_prompt("Q?", ["x", "y"], instruction=MULTIPLE_CHOICE_INSTRUCTION_ASCII) == (
        "Q?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly.")


def test_options_block() -> None:
    assert options_block(["a chair", " a table "]) == "A. a chair\nB.  a table "  # text as given
    assert options_block({"C": "x", "A": "y"}) == "C. x\nA. y"
    assert options_block([]) == ""
    assert options_block(["o"] * 26).endswith("\nZ. o")
    with pytest.raises(ValueError, match="at most 26"):
        options_block(["o"] * 27)
    with pytest.raises(ValueError, match="options must be"):
        options_block("AB")


def test_image_first_and_the_evaluation_layout() -> None:
    assert image_first("What?") == "<|image|>\nWhat?"
    assert image_first("What?", 2, separator="") == "<|image|><|image|>What?"
    assert image_first("What?", 0) == "What?"
    assert evaluation_prompt("Hi") == "USER: <|image|>Hi ASSISTANT: "
    assert evaluation_prompt("Hi", 0) == "USER: Hi ASSISTANT: "
    assert evaluation_prompt(" x\n", 2) == "USER: <|image|><|image|> x\n ASSISTANT: "
    # The evaluation scripts' prompts: the template's rendering of one user message plus a trailing space.
    vqa = vqa_prompt("What color is the bus?", separator=" ")
    assert evaluation_prompt(vqa) == PROMPTS["eval_vqa_trailing_space"]["prompt"]
    assert evaluation_prompt(vqa) == render_conversation([user(image(), vqa)]) + " "
    mmbench = multiple_choice_prompt("What is the main object?", ["a chair", "a table", "a lamp"], hint="N/A")
    assert evaluation_prompt(mmbench) == PROMPTS["eval_mmbench"]["prompt"]


def test_mmlu_prompt() -> None:
    head = "The following are multiple choice questions (with answers) about high school physics.\n\n"
    assert mmlu_prompt("high school physics", "Q?", ["a", "b"]) == head + "Q?\nA. a\nB. b\nAnswer:"
    shots = [("S1?", ["c", "d"], "B"), ("S2?", ["e", "f", "g"], "A")]
    assert mmlu_prompt("high school physics", "Q?", ["a", "b"], shots) == (
        head + "S1?\nA. c\nB. d\nAnswer: B\n\nS2?\nA. e\nB. f\nC. g\nAnswer: A\n\nQ?\nA. a\nB. b\nAnswer:")


def test_check_image_placeholders() -> None:
    check_image_placeholders("USER: <|image|>x ASSISTANT:", 1)
    with pytest.raises(ValueError, match=r"the prompt has 1 <\|image\|> placeholder\(s\) but 2 image\(s\)"):
        check_image_placeholders("USER: <|image|>x ASSISTANT:", 2)


# -------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "messages is empty"),
        ("USER: hi", "messages must be a list of dicts"),
        (["hi"], "message 0: expected a dict with 'role' and 'content'"),
        ([{"role": "tool", "content": "x"}], "message 0: unknown role 'tool'; expected 'system', 'user' or 'assist"),
        ([{"content": "x"}], "message 0: unknown role None"),
        ([{"role": "user"}], r"message 0 \(user\): no 'content'"),
        ([{"role": "user", "content": None}], r"message 0 \(user\): content is None"),
        ([{"role": "user", "content": 5}], "content must be a string or a list of parts"),
        ([{"role": "system", "content": "S"}], "only a system message"),
        ([user("a"), {"role": "system", "content": "S"}], r"message 1 \(system\): a system message may only come"),
        ([{"role": "system", "content": "S"}, {"role": "system", "content": "T"}, user("a")],
         r"message 1 \(system\): a system message may only come first"),
        ([user("a"), user("b")], r"message 1 \(user\): user and assistant messages must alternate.*merge"),
        ([user("a"), assistant("b"), assistant("c")], r"message 2 \(assistant\): user and assistant .* alternate"),
        ([assistant("a"), user("b")], r"message 0 \(assistant\): the conversation must start with a user message"),
        ([user(text("a"), {"type": "audio", "audio": b""})],
         r"message 0 \(user\), part 1: unknown content part type 'audio'; expected 'text', 'image_url' or 'image'"),
        ([user([text("a"), "plain string"])], r"message 0 \(user\), part 1: expected a dict with a 'type'"),
        ([user({"type": "text", "text": 3})], "a 'text' part needs a string"),
        ([user({"type": "image"})], r"part 0: an 'image' part needs the image under 'image'"),
        ([user({"type": "image_url", "image_url": {"uri": "x"}})], r"an 'image_url' part needs"),
        ([user("")], r"message 0 \(user\): empty message"),
        ([user([])], r"message 0 \(user\): empty message"),
        ([user("a"), assistant(""), user("b")], r"message 1 \(assistant\): empty; only the last message"),
        ([user("a"), assistant([image()])], r"message 1 \(assistant\): images can only be given in user messages"),
        ([user("a"), assistant("<|image|>")], r"images can only be given in user messages"),
        ([{"role": "system", "content": [image()]}, user("a")], "a system message cannot contain images"),
    ],
)
def test_rejected_messages(messages: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_conversation(messages)


def test_typed_placeholder_without_image_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"message 0 \(user\): the text contains '<\|image\|>'.*no image was given"):
        render_conversation([user("<|image|>What is this?")])
    with pytest.raises(ValueError, match="no image was given"):  # an image part does not cover a typed placeholder
        render_conversation([user(image(), "and <|image|>")])
    with pytest.raises(ValueError, match="no image was given"):
        render_conversation([user("a"), assistant("b"), user("<|image|>")])


def test_separate_images_must_match_the_placeholders() -> None:
    with pytest.raises(ValueError, match=r"contain 1 <\|image\|> placeholder\(s\) but 2 image\(s\)"):
        render_conversation([user("<|image|>x")], images=["a", "b"])
    with pytest.raises(ValueError, match=r"contain 0 <\|image\|> placeholder\(s\) but 1 image\(s\)"):
        render_conversation([user("x")], images=["a"])
    with pytest.raises(ValueError, match=r"has image parts while images=\.\.\. was also given"):
        render_conversation([user(image(), "x")], images=["a"])


def test_extract_images_validates_parts() -> None:
    with pytest.raises(ValueError, match="unknown content part type 'video'"):
        extract_images([user({"type": "video", "video": "v.mp4"})])
    with pytest.raises(ValueError, match="messages is empty"):
        extract_images([])


def test_prompt_parts_put_images_where_typed_placeholders_are() -> None:
    """A question written in the official form keeps its layout: the typed <|image|> is the image's place, not a
    second placeholder in front of it."""
    def rendered(text: str, images: list[Any]) -> str:
        return render_conversation([{"role": "user", "content": prompt_parts(text, images)}])

    assert rendered("<|image|>\nWhat is it?", ["a"]) == "USER: <|image|>\nWhat is it? ASSISTANT:"
    assert rendered("Compare <|image|> with <|image|>.", ["a", "b"]) == (
        "USER: Compare <|image|> with <|image|>. ASSISTANT:")
    assert extract_images([{"role": "user", "content": prompt_parts("Compare <|image|> with <|image|>.", ["a", "b"])}]
                          ) == ["a", "b"]  # in the order of the placeholders
    assert rendered("What is it?", ["a", "b"]) == "USER: <|image|><|image|>What is it? ASSISTANT:"  # none: first
    assert rendered("What is it?", []) == "USER: What is it? ASSISTANT:"
    assert prompt_parts("<|image|>", ["a"]) == [{"type": "image", "image": "a"}]


@pytest.mark.parametrize(("text", "images", "found", "given"), [
    ("<|image|>What?", [], 1, 0), ("<|image|><|image|>What?", ["a"], 2, 1), ("<|image|>What?", ["a", "b"], 1, 2)])
def test_prompt_parts_count_mismatch_is_clear(text: str, images: list[Any], found: int, given: int) -> None:
    with pytest.raises(ValueError, match=rf"the prompt has {found} <\|image\|> placeholder\(s\) but {given} image\(s\) "
                                         r"were given; write one <\|image\|> per image where it goes, or none"):
        prompt_parts(text, images)
