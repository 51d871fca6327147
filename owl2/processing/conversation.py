"""Chat templates: OpenAI-style message lists rendered into the official mPLUG-Owl2 prompt strings.

The official code builds prompts with ``Conversation.get_prompt()`` (``mplug_owl2/conversation.py``). Two of its
templates are reproduced, character for character:

============== ============ ======================================================================================
name           style        rendering (the last turn left open for the answer)
============== ============ ======================================================================================
``mplug_owl2`` TWO_NO_SYS   ``USER: {u1} ASSISTANT: {a1}</s>USER: {u2} ASSISTANT:``. The default; what the CLI,
                            README, demo and evaluation scripts use. It has a system text but never emits it.
``vicuna_v1``  TWO          ``{system} USER: {u1} ASSISTANT: {a1}</s>USER: {u2} ASSISTANT:`` (alias ``v1``).
============== ============ ======================================================================================

There is no space after the final ``ASSISTANT:``. (The evaluation scripts append one: ``render_conversation(...) +
" "`` reproduces their prompts.) Message text is used as given, never stripped.

Messages (:func:`render_conversation`): ``[{"role": "system" | "user" | "assistant", "content": ...}]`` where
``content`` is a string or a list of parts:

* ``{"type": "text", "text": str}``;
* ``{"type": "image_url", "image_url": {"url": str}}`` (or ``"image_url": str``);
* ``{"type": "image", "image": <anything>}`` (a path, URL, bytes, PIL image...; the keys ``"url"`` or ``"path"``
  are accepted instead of ``"image"``).

Each image part becomes the placeholder ``<|image|>`` where it stands, and the parts are concatenated with nothing in
between, so ``[image, text]`` renders as ``<|image|>text`` (the official CLI's form: image first, no newline) and
``[image, image, text]`` as ``<|image|><|image|>text``. :func:`extract_images` returns the image payloads in the same
order. Images may only appear in user messages.

Placeholders typed as text: by default a literal ``<|image|>`` in a message is an error, because the tokenizer would
turn it into an image slot with no image behind it. To use prompts whose text already carries the placeholders (e.g.
``"<|image|>What is this?"``), pass the images separately: ``render_conversation(messages, images=[img])``; then the
messages must contain no image parts and the number of placeholders must equal ``len(images)``.

A question string with its images (what ``pipe.chat(question, images)`` and ``owl2 ask`` take) becomes content parts
with :func:`prompt_parts`: each ``<|image|>`` written in the text marks where the next image goes (the official and
LLaVA-style prompt form, e.g. ``"<|image|>\nWhat is this?"``); with no placeholder the images go before the text;
any other count is a ``ValueError``.

Structure rules (each violation is a ``ValueError`` naming the message):

* at least one message; roles ``system``, ``user``, ``assistant`` only;
* an optional ``system`` message, first only. ``mplug_owl2`` ignores it (the official template has no system slot);
  ``vicuna_v1`` renders it in place of its default system text;
* then user and assistant alternate, starting with user. Two user messages in a row are rejected rather than merged
  (merging would invent a separator the caller did not choose; put the parts into one message instead);
* a user message must not be empty; an assistant message may be empty (or ``None``) only as the last message, where
  it stands for the open answer slot, as in the official ``append_message(role, None)``.

The end of the prompt (``add_generation_prompt``):

* last message from the user: ``True`` appends the open ``ASSISTANT:`` (the usual case); ``False`` closes the user
  turn as ``get_prompt`` does (``USER: {u} ``);
* last message from the assistant: ``True`` leaves that answer open (``... ASSISTANT: {a}`` without ``</s>``), so
  generation continues it; ``False`` closes it with ``</s>`` (a complete conversation, e.g. for training or scoring).

Task prompts live here too, so that every string a model is asked is written once. The instructions:
:data:`VQA_INSTRUCTION`, :data:`MULTIPLE_CHOICE_INSTRUCTION` (the official U+2019 apostrophe) and
:data:`MULTIPLE_CHOICE_INSTRUCTION_ASCII` (LLaVA-1.5's ASCII one, which the shapes world uses), and
:data:`CAPTION_INSTRUCTION`. The layouts: :func:`vqa_prompt` and :func:`multiple_choice_prompt` (a question with its
instruction, and with lettered options: :func:`options_block`), :func:`image_first` (placeholders before the text, as
in the first turn of a training record), :func:`evaluation_prompt` (the official evaluation scripts' raw
``USER: <|image|>... ASSISTANT: ``) and :func:`mmlu_prompt` (the usual few-shot MMLU text). None of them strips or
otherwise edits the text it is given: the callers decide what the model sees.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from owl2.constants import DEFAULT_TEMPLATE, IMAGE_PLACEHOLDER

__all__ = [
    "CAPTION_INSTRUCTION",
    "DEFAULT_TEMPLATE",
    "IMAGE_PLACEHOLDER",
    "MULTIPLE_CHOICE_INSTRUCTION",
    "MULTIPLE_CHOICE_INSTRUCTION_ASCII",
    "OPTION_LETTERS",
    "TEMPLATES",
    "VQA_INSTRUCTION",
    "Conversation",
    "ConversationTemplate",
    "SeparatorStyle",
    "check_image_placeholders",
    "evaluation_prompt",
    "extract_images",
    "get_template",
    "image_first",
    "mmlu_prompt",
    "multiple_choice_prompt",
    "options_block",
    "prompt_parts",
    "render_conversation",
    "vqa_prompt",
]

VQA_INSTRUCTION = "Answer the question using a single word or phrase."
"""The short-answer instruction of the official data format and evaluation scripts."""

MULTIPLE_CHOICE_INSTRUCTION = "Answer with the option\u2019s letter from the given choices directly."
"""The multiple-choice instruction, with the typographic apostrophe U+2019 as in the official code."""

MULTIPLE_CHOICE_INSTRUCTION_ASCII = "Answer with the option's letter from the given choices directly."
"""The same instruction as LLaVA-1.5 writes it, with an ASCII apostrophe. The shapes world's multiple-choice questions
end with it and owl2-tiny was trained on them; the two spellings tokenise differently, so neither replaces the other."""

CAPTION_INSTRUCTION = "Provide a one-sentence caption for the provided image."
"""The captioning prompt of the official ``evaluate_caption.py`` (also the shapes world's caption question)."""

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
"""The letters of lettered options, in order (:func:`options_block`)."""


class SeparatorStyle(enum.Enum):
    """How turns are joined (the official ``SeparatorStyle`` members that the supported templates use)."""

    TWO = "two"  # system + sep, then "ROLE: text" + sep / sep2 alternately
    TWO_NO_SYS = "two_no_sys"  # the same without the system text


@dataclass(frozen=True)
class ConversationTemplate:
    """A template's constants, named as in the official ``Conversation``."""

    name: str
    system: str
    roles: tuple[str, str]  # (user, assistant) as written in the prompt
    sep_style: SeparatorStyle
    sep: str  # after a user turn (and after the system text)
    sep2: str  # after an assistant turn

    @property
    def emits_system(self) -> bool:
        """Whether the system text appears in the prompt."""
        return self.sep_style is SeparatorStyle.TWO


MPLUG_OWL2 = ConversationTemplate(
    name="mplug_owl2",
    system="A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles=("USER", "ASSISTANT"),
    sep_style=SeparatorStyle.TWO_NO_SYS,
    sep=" ",
    sep2="</s>",
)

VICUNA_V1 = ConversationTemplate(
    name="vicuna_v1",
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"),
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

TEMPLATES: dict[str, ConversationTemplate] = {"mplug_owl2": MPLUG_OWL2, "vicuna_v1": VICUNA_V1, "v1": VICUNA_V1}
"""Templates by name (the official ``conv_templates`` keys for these two)."""


def get_template(name: str | ConversationTemplate) -> ConversationTemplate:
    """The template called ``name`` (a template object is returned as is)."""
    if isinstance(name, ConversationTemplate):
        return name
    try:
        return TEMPLATES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown conversation template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None


@dataclass
class Conversation:
    """A conversation in the official form: ``(role, text)`` turns, ``text=None`` (or ``""``) for an open turn.

    :meth:`get_prompt` is the official ``get_prompt`` for the TWO and TWO_NO_SYS styles. It trusts the turns
    (roles are expected to alternate user/assistant); :func:`render_conversation` validates messages first.
    """

    template: ConversationTemplate = MPLUG_OWL2
    system: str | None = None  # None: the template's system text
    messages: list[tuple[str, str | None]] = field(default_factory=list)

    def append_message(self, role: str, text: str | None) -> None:
        """Add a turn; ``role`` is ``"user"``/``"assistant"`` or the template's own role name (``"USER"``)."""
        user, assistant = self.template.roles
        names = {"user": user, "assistant": assistant, user: user, assistant: assistant}
        if role not in names:
            raise ValueError(f"unknown role {role!r} for template {self.template.name!r}")
        self.messages.append((names[role], text))

    def get_prompt(self) -> str:
        """The prompt string, exactly as the official ``Conversation.get_prompt`` renders it."""
        template = self.template
        seps = (template.sep, template.sep2)
        system = template.system if self.system is None else self.system
        out = system + template.sep if template.emits_system else ""
        for i, (role, text) in enumerate(self.messages):
            out += f"{role}: {text}{seps[i % 2]}" if text else f"{role}:"
        return out

    def copy(self) -> Conversation:
        """An independent copy (the turn list is copied), as the official code copies a template per chat."""
        return Conversation(self.template, self.system, list(self.messages))


# ---------------------------------------------------------------------------------------------------------- messages
@dataclass
class _Message:
    role: str
    text: str
    images: list[Any]


def _image_payload(part: Mapping[str, Any], where: str) -> Any:
    kind = part["type"]
    if kind == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, Mapping) else value
        if not isinstance(url, str) or not url:
            raise ValueError(f"{where}: an 'image_url' part needs {{'image_url': {{'url': str}}}}, got {value!r}")
        return url
    for key in ("image", "url", "path"):
        if part.get(key) is not None:
            return part[key]
    raise ValueError(f"{where}: an 'image' part needs the image under 'image' (or 'url' / 'path')")


def _parse_message(message: Any, index: int) -> _Message:
    where = f"message {index}"
    if not isinstance(message, Mapping):
        raise ValueError(f"{where}: expected a dict with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role not in ("system", "user", "assistant"):
        raise ValueError(f"{where}: unknown role {role!r}; expected 'system', 'user' or 'assistant'")
    where = f"message {index} ({role})"
    if "content" not in message:
        raise ValueError(f"{where}: no 'content'")
    content = message["content"]
    if content is None:
        if role != "assistant":
            raise ValueError(f"{where}: content is None")
        return _Message(role, "", [])
    if isinstance(content, str):
        return _Message(role, content, [])
    if not isinstance(content, Sequence):
        raise ValueError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    text: list[str] = []
    images: list[Any] = []
    for k, part in enumerate(content):
        part_where = f"{where}, part {k}"
        if not isinstance(part, Mapping) or "type" not in part:
            raise ValueError(f"{part_where}: expected a dict with a 'type', got {part!r}")
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{part_where}: a 'text' part needs a string under 'text'")
            text.append(part["text"])
        elif kind in ("image", "image_url"):
            images.append(_image_payload(part, part_where))
            text.append(IMAGE_PLACEHOLDER)
        else:
            raise ValueError(
                f"{part_where}: unknown content part type {kind!r}; expected 'text', 'image_url' or 'image'"
            )
    return _Message(role, "".join(text), images)


def _parse_messages(messages: Sequence[Mapping[str, Any]]) -> list[_Message]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: give at least one user message")
    return [_parse_message(message, i) for i, message in enumerate(messages)]


def extract_images(messages: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The image payloads of ``messages`` in order of appearance: the URL string of an ``image_url`` part, the
    object of an ``image`` part. These are the images behind the ``<|image|>`` placeholders of
    :func:`render_conversation`, in the same order."""
    return [image for message in _parse_messages(messages) for image in message.images]


def check_image_placeholders(prompt: str, num_images: int) -> None:
    """Raise ``ValueError`` unless ``prompt`` has exactly ``num_images`` ``<|image|>`` placeholders.

    For prompts built by hand (the official model worker does the same check).
    """
    found = prompt.count(IMAGE_PLACEHOLDER)
    if found != num_images:
        raise ValueError(
            f"the prompt has {found} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s) were given; "
            f"each image needs exactly one {IMAGE_PLACEHOLDER} where it goes"
        )


def prompt_parts(text: str, images: Sequence[Any]) -> list[dict[str, Any]]:
    """The content parts of one user message: ``text`` with ``images`` (rules in the module docstring).

    ``prompt_parts("<|image|>\nWhat is it?", [img])`` -> ``[image, "\nWhat is it?"]``, the image where the
    placeholder was, not a second one before it; ``prompt_parts("What is it?", [img])`` -> ``[image, "What is it?"]``.
    """
    found = text.count(IMAGE_PLACEHOLDER)
    image_parts = [{"type": "image", "image": image} for image in images]
    if found == 0:
        return [*image_parts, {"type": "text", "text": text}]
    if found != len(image_parts):
        raise ValueError(
            f"the prompt has {found} {IMAGE_PLACEHOLDER} placeholder(s) but {len(image_parts)} image(s) were given; "
            f"write one {IMAGE_PLACEHOLDER} per image where it goes, or none to put the images before the text"
        )
    parts: list[dict[str, Any]] = []
    for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            parts.append(image_parts[k - 1])
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def render_conversation(
    messages: Sequence[Mapping[str, Any]],
    template: str | ConversationTemplate = DEFAULT_TEMPLATE,
    add_generation_prompt: bool = True,
    *,
    images: Sequence[Any] | None = None,
) -> str:
    """The prompt string for ``messages`` (rules in the module docstring).

    ``images``: only for messages whose text already contains ``<|image|>`` placeholders; their number must match.
    Otherwise images are given as content parts, and typed placeholders are an error.
    """
    conv_template = get_template(template)
    parsed = _parse_messages(messages)

    system: str | None = None
    if parsed[0].role == "system":
        if parsed[0].images or IMAGE_PLACEHOLDER in parsed[0].text:
            raise ValueError("message 0 (system): a system message cannot contain images")
        system, parsed = parsed[0].text, parsed[1:]
    start = 0 if system is None else 1
    if not parsed:
        raise ValueError("messages hold only a system message: give at least one user message")

    typed = 0
    for offset, message in enumerate(parsed):
        index = start + offset
        where = f"message {index} ({message.role})"
        if message.role == "system":
            raise ValueError(f"{where}: a system message may only come first")
        expected = "user" if offset % 2 == 0 else "assistant"
        if message.role != expected:
            if offset == 0:
                raise ValueError(f"{where}: the conversation must start with a user message")
            raise ValueError(
                f"{where}: user and assistant messages must alternate, but this follows another {message.role} "
                "message; merge consecutive messages of one role into one (content parts are concatenated)"
            )
        if message.role == "assistant":
            if message.images or IMAGE_PLACEHOLDER in message.text:
                raise ValueError(f"{where}: images can only be given in user messages")
            if not message.text and offset != len(parsed) - 1:
                raise ValueError(f"{where}: empty; only the last message may be an empty (open) assistant turn")
            continue
        if not message.text:
            raise ValueError(f"{where}: empty message")
        placeholders = message.text.count(IMAGE_PLACEHOLDER)
        typed += placeholders - len(message.images)
        if images is None and placeholders > len(message.images):
            raise ValueError(
                f"{where}: the text contains {IMAGE_PLACEHOLDER!r}, which marks where an image goes, but no image "
                "was given for it; pass images as content parts ({'type': 'image', 'image': ...}), or pass "
                "images=[...] to render_conversation for placeholders written in the text"
            )
        if images is not None and message.images:
            raise ValueError(
                f"{where}: has image parts while images=... was also given; use one form or the other"
            )
    if images is not None and typed != len(images):
        raise ValueError(
            f"the messages contain {typed} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s) were "
            "given; each image needs exactly one placeholder"
        )

    conversation = Conversation(conv_template, system)
    for message in parsed:
        conversation.append_message(message.role, message.text or None)
    last = parsed[-1]
    if last.role == "user":
        if add_generation_prompt:
            conversation.append_message("assistant", None)
        return conversation.get_prompt()
    if last.text and add_generation_prompt:
        # Leave the final answer open so that generation continues it.
        conversation.messages.pop()
        return conversation.get_prompt() + f"{conv_template.roles[1]}: {last.text}"
    return conversation.get_prompt()


# ---------------------------------------------------------------------------------------------------------- tasks
def vqa_prompt(question: str, separator: str = "\n") -> str:
    """``question`` + the short-answer instruction: ``"{q}\\nAnswer the question using a single word or phrase."``.

    ``separator="\\n"`` is the README data format (also ``evaluate_mme.py`` and the shapes world); ``evaluate_vqa.py``
    uses ``" "``.
    """
    return f"{question}{separator}{VQA_INSTRUCTION}"


def options_block(options: Sequence[str] | Mapping[str, str]) -> str:
    """``"A. first\\nB. second..."``, one line per option (the MMBench layout); ``""`` for no options.

    ``options``: a list (lettered from :data:`OPTION_LETTERS`) or a mapping letter -> text (kept in its order).
    """
    if isinstance(options, Mapping):
        items = [(str(letter), str(text)) for letter, text in options.items()]
    elif isinstance(options, str) or not isinstance(options, Sequence):
        raise ValueError("options must be a list of strings or a mapping letter -> text")
    else:
        if len(options) > len(OPTION_LETTERS):
            raise ValueError(f"at most {len(OPTION_LETTERS)} lettered options, got {len(options)}")
        items = [(OPTION_LETTERS[k], str(text)) for k, text in enumerate(options)]
    return "\n".join(f"{letter}. {text}" for letter, text in items)


def multiple_choice_prompt(
    question: str,
    options: Sequence[str] | Mapping[str, str],
    *,
    hint: str | None = None,
    instruction: str = MULTIPLE_CHOICE_INSTRUCTION,
) -> str:
    """The official multiple-choice text: ``"{hint}\\n{question}\\nA. ..\\nB. ..\\n"`` followed by ``instruction``,
    by default :data:`MULTIPLE_CHOICE_INSTRUCTION` (with the typographic apostrophe U+2019).

    ``options``: as :func:`options_block` takes them. ``hint``: prefixed on its own line when given
    (``evaluate_mmbench.py`` passes the dataset hint, or ``"N/A"`` when there is none). ``instruction``:
    :data:`MULTIPLE_CHOICE_INSTRUCTION_ASCII` for the shapes world's questions.
    """
    block = options_block(options)
    if not block:
        raise ValueError("multiple_choice_prompt needs at least one option")
    lines = ([] if hint is None else [hint]) + [question, block]
    return "\n".join([*lines, instruction])


def image_first(text: str, num_images: int = 1, separator: str = "\n") -> str:
    """``num_images`` image placeholders, ``separator``, then ``text``: ``"<|image|>\\n{text}"``, the first human turn
    of a training record in the README data format (and of the shapes world's sets); ``text`` alone without images."""
    return f"{IMAGE_PLACEHOLDER * num_images}{separator}{text}" if num_images else text


def evaluation_prompt(text: str, num_images: int = 1) -> str:
    """``"USER: <|image|>{text} ASSISTANT: "``: a whole prompt as the official evaluation scripts (``evaluate/*.py``)
    write it, the placeholders right before the text and a space after the final ``ASSISTANT:``.

    That is :func:`render_conversation` of one user message plus the trailing space (which changes how the first
    answer word tokenises), built directly because the scripts check nothing: a benchmark question is used as it is.
    """
    user, assistant = MPLUG_OWL2.roles
    return f"{user}: {image_first(text, num_images, separator='')}{MPLUG_OWL2.sep}{assistant}: "


def mmlu_prompt(subject: str, question: str, options: Sequence[str],
                shots: Sequence[tuple[str, Sequence[str], str]] = ()) -> str:
    """The usual few-shot MMLU text (no template): ``"The following are multiple choice questions (with answers) about
    {subject}.\\n\\n"``, each shot ``(question, options, answer letter)`` as ``"{q}\\nA. ..\\nAnswer: {letter}\\n\\n"``,
    then ``"{question}\\nA. ..\\nAnswer:"``, after which the letters are scored as continuations (``" A"`` ...)."""

    def block(text: str, choices: Sequence[str]) -> str:
        return f"{text}\n{options_block(choices)}\nAnswer:"

    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    examples = "".join(f"{block(q, choices)} {answer}\n\n" for q, choices, answer in shots)
    return head + examples + block(question, options)
