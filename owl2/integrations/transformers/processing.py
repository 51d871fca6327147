"""mPLUG-Owl2's processing as transformers classes: a tokenizer, an image processor and a processor.

Each class delegates to owl2's own processing, so transformers users get the official ids and pixels:

* :class:`MPLUGOwl2Tokenizer` (a slow ``PreTrainedTokenizer``) wraps :class:`~owl2.processing.tokenizer.Owl2Tokenizer`
  (SentencePiece on ``tokenizer.model``, or ``tokenizers`` on ``tokenizer.json``). transformers 5's own
  ``LlamaTokenizer`` gives other ids on some texts, which is why the official ``tokenizer_config.json`` (which names
  ``LlamaTokenizer``) is not followed. ``<|image|>`` is a special token whose id is the model's image id
  (``Owl2Config.image_token_index``, by default ``vocab_size``); ``tokenizer(text)`` gives the official
  ``tokenizer_image_token`` ids with that id, one per image, in place of ``-200``.
* :class:`MPLUGOwl2ImageProcessor` wraps :class:`~owl2.processing.image.ImageProcessor`; ``image_aspect_ratio`` is
  the checkpoint's option: ``"pad"`` letterboxes, ``"resize"`` stretches to a square (owl2's default, the official
  README's), any other value (the official ``"square"``) leaves the image to the CLIP resize and centre crop.
* :class:`MPLUGOwl2Processor` puts them together: ``processor(text=..., images=...)`` expands each ``<|image|>`` to
  ``tokens_per_image`` positions of ``image_token_id`` (owl2's layout, :mod:`owl2.model.inputs`), and its chat
  template renders a conversation exactly as :func:`~owl2.processing.conversation.render_conversation` does.

``from_pretrained`` reads the official files as the released checkpoint has them (``tokenizer.model``,
``tokenizer_config.json``, ``special_tokens_map.json``, ``preprocessor_config.json``, ``config.json``) and what
``save_pretrained`` writes. :func:`register_processing` registers the three classes with ``AutoTokenizer``,
``AutoImageProcessor`` and ``AutoProcessor`` for ``model_type: "mplug_owl2"``. ``AutoProcessor`` gives these classes
for every such folder. ``AutoTokenizer`` follows the ``tokenizer_class`` a ``tokenizer_config.json`` names, so on the
official files it gives transformers' ``LlamaTokenizer``; on a folder this module saved it gives
:class:`MPLUGOwl2Tokenizer` (as ``MPLUGOwl2Tokenizer.from_pretrained`` does on any folder). Likewise
``AutoImageProcessor`` follows a ``feature_extractor_type`` (Q-Align's files name ``CLIPFeatureExtractor``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, BatchFeature, PreTrainedTokenizer
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import AddedToken

from owl2.constants import IMAGE_PLACEHOLDER, OFFICIAL_IMAGE_TOKEN
from owl2.model.config import Owl2Config
from owl2.processing.conversation import ConversationTemplate, get_template
from owl2.processing.image import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_PIXELS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PREPROCESSOR_CONFIG_NAME,
    ImageProcessor,
)
from owl2.processing.tokenizer import (
    SPECIAL_TOKENS_MAP_NAME,
    TOKENIZER_CONFIG_NAME,
    TOKENIZER_JSON_NAME,
    TOKENIZER_MODEL_NAME,
    Owl2Tokenizer,
    load_tokenizer,
)
from owl2.utils import read_json_object

__all__ = [
    "CHAT_TEMPLATE",
    "aspect_ratio_policy",
    "MODEL_TYPE",
    "MPLUGOwl2ImageProcessor",
    "MPLUGOwl2Processor",
    "MPLUGOwl2Tokenizer",
    "chat_template",
    "register_processing",
]

MODEL_TYPE: str = Owl2Config.model_type  # "mplug_owl2"
CONFIG_NAME = "config.json"
PROCESSOR_CONFIG_NAME = "processor_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"

# The checkpoint files from_pretrained may read; a hub id is resolved to a local snapshot holding them.
_CHECKPOINT_FILES = (
    TOKENIZER_MODEL_NAME, TOKENIZER_JSON_NAME, TOKENIZER_CONFIG_NAME, SPECIAL_TOKENS_MAP_NAME,
    PREPROCESSOR_CONFIG_NAME, PROCESSOR_CONFIG_NAME, CONFIG_NAME, CHAT_TEMPLATE_FILE, LEGACY_CHAT_TEMPLATE_FILE,
)  # fmt: skip
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


# ---------------------------------------------------------------------------------------------------------- files
def _checkpoint_dir(path: str | os.PathLike[str], kwargs: Mapping[str, Any]) -> Path:
    """The local directory of ``path``: the directory itself, or the hub snapshot holding its processing files."""
    local = Path(path)
    subfolder = kwargs.get("subfolder") or ""
    if local.is_dir():
        return local / subfolder if subfolder else local
    if local.exists() or local.is_absolute() or str(path).count("/") > 1 or str(path).startswith((".", "~")):
        raise FileNotFoundError(f"no checkpoint directory at {str(path)!r}")
    from transformers.utils import cached_file

    hub = {key: kwargs[key] for key in _HUB_KWARGS if kwargs.get(key) is not None}
    found = None
    for name in _CHECKPOINT_FILES:
        resolved = cached_file(str(path), name, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False, **hub)
        if resolved is not None and found is None:
            found = Path(resolved).parent
    if found is None:
        raise OSError(f"no mPLUG-Owl2 processing files found for {str(path)!r} (looked for {TOKENIZER_MODEL_NAME}, "
                      f"{TOKENIZER_JSON_NAME}, {PREPROCESSOR_CONFIG_NAME}, {CONFIG_NAME})")
    return found


def _json_or_empty(path: Path) -> dict[str, Any]:
    return read_json_object(path) if path.is_file() else {}


def _model_config(directory: Path) -> Owl2Config | None:
    """The checkpoint's model config (``config.json``), which gives the image layout, if there is one."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        return None
    return Owl2Config.from_dict(read_json_object(path))


# ------------------------------------------------------------------------------------------------------- chat template
def chat_template(template: str | ConversationTemplate = MODEL_TYPE, *, bos: bool = False) -> str:
    """The Jinja chat template that renders messages as :func:`~owl2.processing.conversation.render_conversation`
    does with ``template`` (``"mplug_owl2"`` or ``"vicuna_v1"``), character for character, with its checks.

    Content is a string or a list of ``{"type": "text", "text": ...}`` and ``{"type": "image", ...}`` (or
    ``"image_url"``) parts; each image part becomes ``<|image|>`` where it stands. ``add_generation_prompt`` is
    render_conversation's: after a user message it opens the answer (``ASSISTANT:``), after an assistant message it
    leaves that answer open (no ``</s>``). transformers drops keys whose value is None, so an assistant message
    without content is the open answer slot, as ``content: None`` is for render_conversation.

    ``bos``: start the text with the tokenizer's ``bos_token``, for servers that tokenize a rendered chat without
    adding special tokens (vLLM's OpenAI server); the processor adds BOS itself when it tokenizes.
    """
    conv = get_template(template)
    user, assistant = conv.roles

    def lit(text: str) -> str:
        return json.dumps(text, ensure_ascii=False)

    def fail(message: str) -> str:
        return "{{ raise_exception(" + lit(message) + ") }}"

    system_line = "{{- ns.system ~ " + lit(conv.sep) + " -}}" if conv.emits_system else ""
    # One statement per line, each trimming the whitespace around it, so the layout never reaches the output.
    lines = [
        "{%- set image_token = " + lit(IMAGE_PLACEHOLDER) + " -%}",
        "{%- set agp = add_generation_prompt is defined and add_generation_prompt -%}",
        "{%- if messages | length == 0 -%}" + fail("messages is empty: give at least one user message")
        + "{%- endif -%}",
        "{%- set ns = namespace(start=0, system=" + lit(conv.system) + ", text='', images=0) -%}",
        "{%- if messages[0]['role'] == 'system' -%}",
        "{%- set ns.start = 1 -%}",
        "{%- set content = messages[0]['content'] if 'content' in messages[0] else none -%}",
        "{%- if content is string -%}{%- set ns.system = content -%}",
        "{%- elif content is none -%}" + fail("message 0 (system): content is None"),
        "{%- else -%}{%- set ns.system = '' -%}",
        "{%- for part in content -%}",
        "{%- if part['type'] == 'text' -%}{%- set ns.system = ns.system ~ part['text'] -%}",
        "{%- else -%}" + fail("message 0 (system): a system message cannot contain images") + "{%- endif -%}",
        "{%- endfor -%}",
        "{%- endif -%}",
        "{%- if image_token in ns.system -%}" + fail("message 0 (system): a system message cannot contain images")
        + "{%- endif -%}",
        "{%- endif -%}",
        "{%- if messages | length == ns.start -%}"
        + fail("messages hold only a system message: give at least one user message") + "{%- endif -%}",
        system_line,
        "{%- for message in messages[ns.start:] -%}",
        "{%- set role = message['role'] -%}",
        "{%- if role not in ['system', 'user', 'assistant'] -%}"
        + fail("unknown role; expected 'system', 'user' or 'assistant'") + "{%- endif -%}",
        "{%- if role == 'system' -%}" + fail("a system message may only come first") + "{%- endif -%}",
        "{%- if role != (['user', 'assistant'][loop.index0 % 2]) -%}",
        "{%- if loop.first -%}" + fail("the conversation must start with a user message"),
        "{%- else -%}" + fail("user and assistant messages must alternate; merge consecutive messages of one role "
                               "into one") + "{%- endif -%}",
        "{%- endif -%}",
        "{%- set ns.text = '' -%}{%- set ns.images = 0 -%}",
        "{%- set content = message['content'] if 'content' in message else none -%}",
        "{%- if content is none -%}",
        "{%- if role != 'assistant' -%}" + fail("a user message has no content") + "{%- endif -%}",
        "{%- elif content is string -%}{%- set ns.text = content -%}",
        "{%- else -%}",
        "{%- for part in content -%}",
        "{%- if part['type'] == 'text' -%}",
        "{%- if part['text'] is not string -%}" + fail("a 'text' part needs a string under 'text'")
        + "{%- endif -%}",
        "{%- set ns.text = ns.text ~ part['text'] -%}",
        "{%- elif part['type'] in ['image', 'image_url'] -%}",
        "{%- set ns.text = ns.text ~ image_token -%}{%- set ns.images = ns.images + 1 -%}",
        "{%- else -%}" + fail("unknown content part type; expected 'text', 'image_url' or 'image'")
        + "{%- endif -%}",
        "{%- endfor -%}",
        "{%- endif -%}",
        "{%- if role == 'user' -%}",
        "{%- if not ns.text -%}" + fail("empty user message") + "{%- endif -%}",
        "{%- if ns.text.count(image_token) > ns.images -%}"
        + fail("a message's text contains '<|image|>', which marks where an image goes, but no image was given "
               "for it; pass images as content parts ({'type': 'image', ...})") + "{%- endif -%}",
        "{{- " + lit(user + ": ") + " ~ ns.text ~ " + lit(conv.sep) + " -}}",
        "{%- if loop.last and agp -%}{{- " + lit(assistant + ":") + " -}}{%- endif -%}",
        "{%- else -%}",
        "{%- if ns.images > 0 or image_token in ns.text -%}" + fail("images can only be given in user messages")
        + "{%- endif -%}",
        "{%- if ns.text -%}",
        "{%- if loop.last and agp -%}{{- " + lit(assistant + ": ") + " ~ ns.text -}}",
        "{%- else -%}{{- " + lit(assistant + ": ") + " ~ ns.text ~ " + lit(conv.sep2) + " -}}{%- endif -%}",
        "{%- elif loop.last -%}{{- " + lit(assistant + ":") + " -}}",
        "{%- else -%}" + fail("empty assistant message; only the last message may be an empty (open) assistant turn")
        + "{%- endif -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    if bos:
        lines.insert(0, "{{- bos_token -}}")
    return "\n".join(line for line in lines if line)


CHAT_TEMPLATE = chat_template(MODEL_TYPE)
"""The ``mplug_owl2`` conversation as a Jinja chat template (:func:`chat_template`)."""


# ---------------------------------------------------------------------------------------------------------- tokenizer
class MPLUGOwl2Tokenizer(PreTrainedTokenizer):
    """The LLaMA-2 tokenizer with the official mPLUG-Owl2 ids, as a transformers slow tokenizer.

    Every text goes through :class:`~owl2.processing.tokenizer.Owl2Tokenizer`, so ids, pieces and decoded text are
    the official ones (transformers 4.31's slow ``LlamaTokenizer`` with ``tokenizer_image_token``) whatever the
    installed transformers does. ``tokenizer(text)["input_ids"]`` is ``encode_prompt(text)`` with each ``-200``
    replaced by :attr:`image_token_id`: a prompt that starts with ``<|image|>`` has no leading BOS, and each text
    chunk after an image is encoded on its own, as the official code does. ``add_special_tokens=False`` leaves out
    BOS (and EOS when the config adds one) everywhere.

    ``padding_side`` defaults to ``"left"``, which batched generation needs; the pad token is the configured one,
    else ``<unk>`` (id 0), as the official trainer sets it.
    """

    vocab_files_names: ClassVar[dict[str, str]] = {"vocab_file": TOKENIZER_MODEL_NAME,
                                                   "tokenizer_file": TOKENIZER_JSON_NAME}
    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike[str] | None = None,
        tokenizer_file: str | os.PathLike[str] | None = None,
        *,
        owl2_tokenizer: Owl2Tokenizer | None = None,
        image_token: str = IMAGE_PLACEHOLDER,
        image_token_id: int | None = None,
        legacy: bool | None = None,
        padding_side: str = "left",
        **kwargs: Any,
    ) -> None:
        if owl2_tokenizer is None:
            source = vocab_file if vocab_file is not None and Path(vocab_file).is_file() else tokenizer_file
            if source is None:
                raise ValueError("MPLUGOwl2Tokenizer needs vocab_file (tokenizer.model), tokenizer_file "
                                 "(tokenizer.json) or owl2_tokenizer")
            owl2_tokenizer = load_tokenizer(source, legacy=legacy)
        if image_token != IMAGE_PLACEHOLDER:
            raise ValueError(f"mPLUG-Owl2 prompts mark images with {IMAGE_PLACEHOLDER!r}, got {image_token!r}")
        self._owl2 = owl2_tokenizer
        self._image_token_id = owl2_tokenizer.vocab_size if image_token_id is None else int(image_token_id)
        self._pieces = owl2_tokenizer.token_pieces(range(owl2_tokenizer.vocab_size))
        self._piece_ids = {piece: i for i, piece in enumerate(self._pieces)}
        source_dir = Path(owl2_tokenizer.source).parent if owl2_tokenizer.source else None
        self._source_dir = source_dir
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "legacy", "add_bos_token", "add_eos_token",
                    "additional_special_tokens", "extra_special_tokens", "added_tokens_decoder", "sp_model_kwargs",
                    "clean_up_tokenization_spaces"):
            kwargs.pop(key, None)  # the Owl2Tokenizer is the one authority on these
        piece = owl2_tokenizer.token_pieces
        super().__init__(
            bos_token=piece([owl2_tokenizer.bos_token_id])[0],
            eos_token=piece([owl2_tokenizer.eos_token_id])[0],
            unk_token=piece([owl2_tokenizer.unk_token_id])[0],
            pad_token=piece([owl2_tokenizer.pad_token_id])[0],
            added_tokens_decoder={self._image_token_id: AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)},
            clean_up_tokenization_spaces=owl2_tokenizer.clean_up_tokenization_spaces,
            padding_side=padding_side,
            **kwargs,
        )

    # ------------------------------------------------------------------------------------------------ loading, saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], *args: Any,
                        **kwargs: Any) -> MPLUGOwl2Tokenizer:
        """The tokenizer of a checkpoint directory (or hub id): ``tokenizer.model`` (SentencePiece) when present,
        else ``tokenizer.json``, with ``tokenizer_config.json`` and ``special_tokens_map.json`` read as owl2 reads
        them. The image id comes from ``image_token_id`` (a keyword, else ``tokenizer_config.json``, else the model's
        ``config.json``, else the vocabulary size). ``legacy`` overrides the config's flag."""
        directory = _checkpoint_dir(pretrained_model_name_or_path, kwargs)
        config = _json_or_empty(directory / TOKENIZER_CONFIG_NAME)
        image_token_id = kwargs.pop("image_token_id", None)
        if image_token_id is None:
            image_token_id = config.get("image_token_id")
        if image_token_id is None:
            model_config = _model_config(directory)
            image_token_id = None if model_config is None else model_config.image_token_index
        owl2_tokenizer = load_tokenizer(directory, legacy=kwargs.pop("legacy", None))
        init: dict[str, Any] = {}
        for key in ("padding_side", "truncation_side", "model_max_length"):
            if key in kwargs:
                init[key] = kwargs.pop(key)
            elif config.get(key) is not None:
                init[key] = config[key]
        return cls(owl2_tokenizer=owl2_tokenizer, image_token_id=image_token_id,
                   name_or_path=str(pretrained_model_name_or_path), **init)

    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> tuple[str, ...]:
        """Write the tokenizer files: ``tokenizer.model`` and ``tokenizer.json`` (those the source had) copied as
        they are, ``special_tokens_map.json`` as the source had it, and the source's ``tokenizer_config.json`` with
        this class, the image token and the effective ``legacy``, ``padding_side`` and ``model_max_length``."""
        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained(push_to_hub=True) is not supported here; call push_to_hub() instead")
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = list(self.save_vocabulary(str(directory)))
        source = self._source_dir
        config = _json_or_empty(source / TOKENIZER_CONFIG_NAME) if source is not None else {}
        config.pop("auto_map", None)  # remote code would replace this class on reload
        config.update({
            "tokenizer_class": type(self).__name__,
            "legacy": self._owl2.legacy,
            "add_bos_token": self._owl2.add_bos_token,
            "add_eos_token": self._owl2.add_eos_token,
            "image_token": IMAGE_PLACEHOLDER,
            "image_token_id": self._image_token_id,
            "padding_side": self.padding_side,
            "model_max_length": self.model_max_length,
        })
        processor_class = getattr(self, "_processor_class", None)
        if processor_class is not None:
            config["processor_class"] = processor_class
        path = directory / TOKENIZER_CONFIG_NAME
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(str(path))
        if source is not None and (source / SPECIAL_TOKENS_MAP_NAME).is_file():
            target = directory / SPECIAL_TOKENS_MAP_NAME
            if not target.exists() or not target.samefile(source / SPECIAL_TOKENS_MAP_NAME):
                shutil.copyfile(source / SPECIAL_TOKENS_MAP_NAME, target)
            written.append(str(target))
        return tuple(written)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Copy ``tokenizer.model`` and ``tokenizer.json`` (whichever the source directory has)."""
        if self._source_dir is None:
            raise ValueError("this tokenizer was built from an in-memory Owl2Tokenizer: there is no file to save")
        written = []
        for name in (TOKENIZER_MODEL_NAME, TOKENIZER_JSON_NAME):
            source = self._source_dir / name
            if not source.is_file():
                continue
            target = Path(save_directory) / (f"{filename_prefix}-{name}" if filename_prefix else name)
            if not target.exists() or not target.samefile(source):
                shutil.copyfile(source, target)
            written.append(str(target))
        return tuple(written)

    # ------------------------------------------------------------------------------------------------ vocabulary
    @property
    def owl2_tokenizer(self) -> Owl2Tokenizer:
        """The :class:`~owl2.processing.tokenizer.Owl2Tokenizer` that does the work."""
        return self._owl2

    @property
    def vocab_size(self) -> int:
        """Pieces of the SentencePiece vocabulary (32000 for LLaMA-2); the image id is outside it by default."""
        return self._owl2.vocab_size

    @property
    def image_token(self) -> str:
        """``<|image|>``, where an image goes in a prompt."""
        return IMAGE_PLACEHOLDER

    @property
    def image_token_id(self) -> int:
        """The model's image id (``Owl2Config.image_token_index``), which ``<|image|>`` encodes to."""
        return self._image_token_id

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._piece_ids)
        vocab[IMAGE_PLACEHOLDER] = self._image_token_id
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        if token == IMAGE_PLACEHOLDER:
            return self._image_token_id
        return self._piece_ids.get(token, self._owl2.unk_token_id)

    def _convert_id_to_token(self, index: int) -> str:
        # owl2 names -200 and ids past the vocabulary <|image|>; a configured image id inside it is checked first
        return IMAGE_PLACEHOLDER if index == self._image_token_id else self._owl2.token_pieces([index])[0]

    # ------------------------------------------------------------------------------------------------ encoding
    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        """The pieces of ``text`` as the official code segments a prompt: split on ``<|image|>``, each chunk
        through the slow LLaMA tokenizer on its own (special tokens split out, ``legacy`` honoured). No BOS."""
        pieces: list[str] = []
        for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k:
                pieces.append(IMAGE_PLACEHOLDER)
            if chunk:
                pieces.extend(self._owl2.tokenize(chunk))
        return pieces

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.tokenize(text)

    def _official_layout(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """``tokenizer_image_token``'s BOS/EOS rule on piece ids with image ids: (ids, special-token mask).

        Each chunk between images gets BOS (and EOS) as ``tokenizer(chunk)`` would; when the first chunk starts with
        BOS, that one BOS is kept and every chunk's first id is dropped, so only the prompt's start has it.
        """
        chunks: list[list[int]] = [[]]
        for i in ids:
            if i == self._image_token_id:
                chunks.append([])
            else:
                chunks[-1].append(i)
        bos = [self._owl2.bos_token_id] if self._owl2.add_bos_token else []
        eos = [self._owl2.eos_token_id] if self._owl2.add_eos_token else []
        framed = [(bos + chunk + eos, [1] * len(bos) + [0] * len(chunk) + [1] * len(eos)) if chunk else ([], [])
                  for chunk in chunks]
        offset = 1 if framed[0][0] and bos else 0
        out_ids: list[int] = framed[0][0][:1] if offset else []
        out_mask: list[int] = [1] if offset else []
        for k, (chunk_ids, chunk_mask) in enumerate(framed):
            if k:
                out_ids.append(self._image_token_id)
                out_mask.append(0)
            out_ids.extend(chunk_ids[offset:])
            out_mask.extend(chunk_mask[offset:])
        return out_ids, out_mask

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        ids = self._official_layout(token_ids_0)[0]
        return ids if token_ids_1 is None else ids + self._official_layout(token_ids_1)[0]

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            special = set(self._owl2.special_token_ids)
            return [1 if i in special else 0 for i in token_ids_0 + (token_ids_1 or [])]
        mask = self._official_layout(token_ids_0)[1]
        return mask if token_ids_1 is None else mask + self._official_layout(token_ids_1)[1]

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return (1 + int(pair)) * (int(self._owl2.add_bos_token) + int(self._owl2.add_eos_token))

    def official_ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The official ``tokenizer_image_token`` ids of ``text``: one ``-200`` per ``<|image|>``.

        ``add_special_tokens=False`` gives the same without any BOS or EOS."""
        if add_special_tokens:
            return self._owl2.encode_prompt(text)
        unk = self._owl2.unk_token_id
        return [OFFICIAL_IMAGE_TOKEN if piece == IMAGE_PLACEHOLDER else self._piece_ids.get(piece, unk)
                for piece in self.tokenize(text)]

    # ------------------------------------------------------------------------------------------------ decoding
    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        ids = [self._convert_token_to_id(t) for t in tokens]
        return self._owl2.decode(ids, skip_special_tokens=False)

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False,
                clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> str:
        """owl2's decoding (the slow 4.31 tokenizer's): image ids (``-200`` and ids at or above the vocabulary
        size) are left out; with ``skip_special_tokens`` so are BOS, EOS, UNK and PAD."""
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        ids = [i for i in ids if i != self._image_token_id]
        text = self._owl2.decode(ids, skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces and not self._owl2.clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text


# ---------------------------------------------------------------------------------------------------------- images
_IMAGE_FIELDS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                 "do_normalize", "image_mean", "image_std")


def aspect_ratio_policy(image_aspect_ratio: str | None) -> str:
    """owl2's policy for a checkpoint's ``image_aspect_ratio``: ``"pad"`` -> ``pad``, ``"resize"`` (or owl2's
    ``"stretch"``) and None -> ``stretch``, any other value -> ``crop`` (as the official ``process_images``)."""
    if image_aspect_ratio is None:
        return "stretch"
    if not isinstance(image_aspect_ratio, str):
        raise ValueError(f"image_aspect_ratio must be a string, got {image_aspect_ratio!r}")
    return {"pad": "pad", "resize": "stretch", "stretch": "stretch"}.get(image_aspect_ratio, "crop")


def _flatten_images(images: Any) -> list[Any]:
    """Images in order: one image, a list of them, a list per sample (nested lists are flattened), or a batch
    array / tensor [N, H, W, C] or [N, C, H, W]."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)) or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4):
        return [image for item in images for image in _flatten_images(item)]
    return [images]


def _as_source(image: Any) -> Any:
    """An image as owl2's loader takes it: tensors become arrays, channels-first arrays channels-last, and URLs or
    bare base64 strings are fetched and decoded by transformers (owl2 reads only local files and data URLs)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[0] in (1, 3, 4) \
            and image.shape[-1] not in (1, 3, 4):
        image = np.ascontiguousarray(image.transpose(1, 2, 0))
    if isinstance(image, str) and not image.startswith("data:") and not os.path.exists(image):
        from transformers.image_utils import load_image as hf_load_image

        return hf_load_image(image)
    return image


class MPLUGOwl2ImageProcessor(BaseImageProcessor):
    """owl2's :class:`~owl2.processing.image.ImageProcessor` (the official pixels, bit for bit) as a transformers
    image processor.

    The fields are those of ``preprocessor_config.json`` (the released checkpoint's by default) plus
    ``image_aspect_ratio`` (``"pad"``, ``"resize"`` or another value for the plain CLIP crop, see the module
    docstring), and owl2's bounds ``max_pixels`` and ``max_aspect_ratio``. ``processor(images)`` gives
    ``pixel_values`` float32 [N, 3, H, W] (448 x 448 for the release), images of every sample in order.
    """

    model_input_names: ClassVar[list[str]] = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        size: int | Mapping[str, int] = 448,
        resample: int = 3,
        do_center_crop: bool = True,
        crop_size: int | Mapping[str, int] = 448,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        image_aspect_ratio: str | None = "resize",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
        **kwargs: Any,
    ) -> None:
        # Other keys (feature_extractor_type, do_convert_rgb, transformers' bookkeeping) do not change the pixels
        # owl2 computes, so they are accepted and dropped.
        super().__init__()
        self._owl2 = ImageProcessor(
            do_resize=do_resize, size=size, resample=int(resample), do_center_crop=do_center_crop,
            crop_size=crop_size, do_rescale=do_rescale, rescale_factor=rescale_factor, do_normalize=do_normalize,
            image_mean=image_mean, image_std=image_std, default_policy=aspect_ratio_policy(image_aspect_ratio),
            max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio,
        )
        self._image_aspect_ratio = image_aspect_ratio
        # the fields as written, so that the saved file keeps the official form (sizes as ints where they were)
        self._fields = {"do_resize": do_resize, "size": size, "resample": int(resample),
                        "do_center_crop": do_center_crop, "crop_size": crop_size, "do_rescale": do_rescale,
                        "rescale_factor": rescale_factor, "do_normalize": do_normalize,
                        "image_mean": list(image_mean), "image_std": list(image_std)}

    @property
    def owl2_image_processor(self) -> ImageProcessor:
        """The :class:`~owl2.processing.image.ImageProcessor` that does the work."""
        return self._owl2

    @property
    def image_aspect_ratio(self) -> str | None:
        """The checkpoint's ``image_aspect_ratio``: ``"pad"``, ``"resize"`` or another value (the plain CLIP crop).
        Setting it changes the policy of later calls."""
        return self._image_aspect_ratio

    @image_aspect_ratio.setter
    def image_aspect_ratio(self, value: str | None) -> None:
        self._owl2.default_policy = aspect_ratio_policy(value)
        self._image_aspect_ratio = value

    @property
    def policy(self) -> str:
        """owl2's name for :attr:`image_aspect_ratio`'s policy: ``"pad"``, ``"stretch"`` or ``"crop"``."""
        return self._owl2.default_policy

    @property
    def max_pixels(self) -> int | None:
        """owl2's bound on the pixels one image may grow to (not a checkpoint setting)."""
        return self._owl2.max_pixels

    @property
    def max_aspect_ratio(self) -> float | None:
        """owl2's bound on an image's long side over its short side (not a checkpoint setting)."""
        return self._owl2.max_aspect_ratio

    def to_dict(self) -> dict[str, Any]:
        out = {key: (dict(v) if isinstance(v, Mapping) else v) for key, v in self._fields.items()}
        out.update({"image_aspect_ratio": self.image_aspect_ratio, "max_pixels": self.max_pixels,
                    "max_aspect_ratio": self.max_aspect_ratio, "image_processor_type": type(self).__name__})
        return out

    def preprocess(self, images: Any, image_aspect_ratio: str | None = None, return_tensors: Any = None,
                   **kwargs: Any) -> BatchFeature:
        """``pixel_values`` [N, 3, H, W] float32 of ``images`` (one image, a list, or a list per sample).

        ``image_aspect_ratio`` overrides the configured one for this call; so do the ``preprocessor_config.json``
        fields given as keywords. Images are anything owl2 loads (PIL images, paths, bytes, arrays channels-last
        or first, tensors) or a URL, which transformers fetches."""
        overrides = {key: kwargs[key] for key in _IMAGE_FIELDS if kwargs.get(key) is not None}
        processor = self._owl2
        if overrides:
            processor = ImageProcessor(**{**self._owl2.to_dict(), **overrides},
                                       default_policy=self._owl2.default_policy, max_pixels=self.max_pixels,
                                       max_aspect_ratio=self.max_aspect_ratio)
        policy = None if image_aspect_ratio is None else aspect_ratio_policy(image_aspect_ratio)
        sources = [_as_source(image) for image in _flatten_images(images)]
        pixels = processor(sources, policy=policy)
        return BatchFeature({"pixel_values": pixels}, tensor_type=return_tensors)

    def __call__(self, images: Any = None, *args: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------------- processor
class MPLUGOwl2Processor(ProcessorMixin):
    """The mPLUG-Owl2 processor: ``processor(text=..., images=...)`` -> ``input_ids``, ``attention_mask`` and
    ``pixel_values`` in owl2's expanded layout, what the transformers model class takes.

    Each ``<|image|>`` in a text becomes ``tokens_per_image`` positions of ``image_token_id`` (by default read from
    the checkpoint's ``config.json``: the abstractor's queries plus one, and ``Owl2Config.image_token_index``); the
    images fill them in order, all samples' images together in ``pixel_values``. The text ids are the official ones
    (:meth:`MPLUGOwl2Tokenizer.official_ids`). ``apply_chat_template`` renders the ``mplug_owl2`` conversation
    (:data:`CHAT_TEMPLATE`) and, with ``tokenize=True``, runs this call on it with the images of the messages.
    """

    def __init__(
        self,
        image_processor: MPLUGOwl2ImageProcessor | None = None,
        tokenizer: MPLUGOwl2Tokenizer | None = None,
        chat_template: str | None = None,
        tokens_per_image: int = Owl2Config().tokens_per_image,
        image_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        if tokenizer is None:
            raise ValueError("MPLUGOwl2Processor needs a tokenizer (MPLUGOwl2Tokenizer)")
        if image_processor is None:
            image_processor = MPLUGOwl2ImageProcessor()
        if int(tokens_per_image) <= 0:
            raise ValueError(f"tokens_per_image must be positive, got {tokens_per_image}")
        if image_token_id is not None and int(image_token_id) != tokenizer.image_token_id:
            # decoding drops the tokenizer's image id, so the two must agree for image positions to vanish
            raise ValueError(f"image_token_id {image_token_id} differs from the tokenizer's "
                             f"{tokenizer.image_token_id}; load the tokenizer with the same image_token_id")
        self.tokens_per_image = int(tokens_per_image)
        self.image_token_id = tokenizer.image_token_id
        self.image_token = IMAGE_PLACEHOLDER
        super().__init__(image_processor, tokenizer, chat_template=CHAT_TEMPLATE if chat_template is None
                         else chat_template, **kwargs)

    # ------------------------------------------------------------------------------------------------ loading, saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], *args: Any,
                        **kwargs: Any) -> MPLUGOwl2Processor:
        """The processor of a checkpoint directory (or hub id), in the official layout or as saved by
        :meth:`save_pretrained`.

        ``tokens_per_image`` and ``image_token_id``: keywords, else ``processor_config.json``, else the model's
        ``config.json``. ``image_aspect_ratio``: a keyword, else the saved image processor's, else ``config.json``'s
        (Q-Align's checkpoints say ``"pad"``), else ``"resize"``. ``legacy`` overrides the tokenizer config's."""
        directory = _checkpoint_dir(pretrained_model_name_or_path, kwargs)
        saved = _json_or_empty(directory / PROCESSOR_CONFIG_NAME)
        model_config = _model_config(directory)
        model_json = _json_or_empty(directory / CONFIG_NAME)

        def setting(key: str, from_model: Any) -> Any:
            if kwargs.get(key) is not None:
                return kwargs[key]
            return saved[key] if saved.get(key) is not None else from_model

        tokens_per_image = setting("tokens_per_image", None if model_config is None else model_config.tokens_per_image)
        image_token_id = setting("image_token_id", None if model_config is None else model_config.image_token_index)

        image_config = saved.get("image_processor")
        if not isinstance(image_config, Mapping):
            image_config = _json_or_empty(directory / PREPROCESSOR_CONFIG_NAME)
        image_config = dict(image_config)
        if kwargs.get("image_aspect_ratio") is not None:
            image_config["image_aspect_ratio"] = kwargs["image_aspect_ratio"]
        elif "image_aspect_ratio" not in image_config:
            image_config["image_aspect_ratio"] = model_json.get("image_aspect_ratio") or "resize"
        image_processor = MPLUGOwl2ImageProcessor(**image_config)

        tokenizer_kwargs = {key: kwargs[key] for key in ("legacy", "padding_side", "model_max_length")
                            if key in kwargs}
        tokenizer = MPLUGOwl2Tokenizer.from_pretrained(directory, image_token_id=image_token_id, **tokenizer_kwargs)

        template = kwargs.get("chat_template")
        if template is None and (directory / CHAT_TEMPLATE_FILE).is_file():
            template = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        if template is None and (directory / LEGACY_CHAT_TEMPLATE_FILE).is_file():
            template = read_json_object(directory / LEGACY_CHAT_TEMPLATE_FILE).get("chat_template")
        if template is None:
            template = saved.get("chat_template")
        extra = {} if tokens_per_image is None else {"tokens_per_image": tokens_per_image}
        return cls(image_processor, tokenizer, chat_template=template, image_token_id=image_token_id, **extra)

    def save_pretrained(self, save_directory: str | os.PathLike[str], push_to_hub: bool = False,
                        **kwargs: Any) -> list[str]:
        """transformers' files (``processor_config.json``, ``chat_template.jinja``, the tokenizer's) plus
        ``preprocessor_config.json``, so that owl2 and the official code read the image settings too."""
        files = list(super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs) or [])
        path = Path(save_directory) / PREPROCESSOR_CONFIG_NAME
        path.write_text(self.image_processor.to_json_string(), encoding="utf-8")
        return [*files, str(path)]

    # ------------------------------------------------------------------------------------------------ running
    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        videos: Any = None,
        audio: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Expanded ``input_ids`` / ``attention_mask`` [B, T] and ``pixel_values`` [N, 3, H, W].

        ``text``: a prompt or a list of prompts, each ``<|image|>`` marking where the next image goes (so the
        number of placeholders must equal the number of images). ``images``: one image, a list, or a list per
        prompt. Keywords: ``add_special_tokens`` (default True: the official BOS), ``padding`` (True /
        ``"longest"`` / ``"max_length"`` / False; a batch of prompts of different lengths needs it),
        ``max_length``, ``pad_to_multiple_of``, ``padding_side`` (default the tokenizer's, ``"left"``),
        ``return_tensors`` (``"pt"``, ``"np"`` or None for lists), ``return_attention_mask``, ``image_aspect_ratio``
        and the image processor's fields. ``text_kwargs`` / ``images_kwargs`` dicts are merged in; other keywords
        (transformers passes some of its own) are ignored. Truncation is refused: it could cut an image's positions
        apart.
        """
        if videos is not None or audio is not None:
            raise ValueError("mPLUG-Owl2 takes images and text only")
        options = dict(kwargs)
        for nested in ("text_kwargs", "images_kwargs", "common_kwargs"):
            options.update(options.pop(nested, None) or {})
        if options.get("truncation"):
            raise ValueError("truncation is not supported: it could cut an image's positions apart; shorten the text")
        return_tensors = options.get("return_tensors")
        flat_images = _flatten_images(images)
        data: dict[str, Any] = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a list of strings")
            data.update(self._encode_texts(texts, len(flat_images), options))
        if flat_images:
            image_options = {key: options[key] for key in _IMAGE_FIELDS if options.get(key) is not None}
            data["pixel_values"] = self.image_processor(
                flat_images, image_aspect_ratio=options.get("image_aspect_ratio"), **image_options,
            )["pixel_values"]
        return BatchFeature(data, tensor_type=return_tensors)

    def _encode_texts(self, texts: list[str], num_images: int, options: Mapping[str, Any]) -> dict[str, list]:
        """Expanded, padded ids and masks of ``texts`` (lists of ints)."""
        add_special_tokens = options.get("add_special_tokens", True)
        rows = [self.tokenizer.official_ids(t, add_special_tokens=add_special_tokens) for t in texts]
        placeholders = sum(row.count(OFFICIAL_IMAGE_TOKEN) for row in rows)
        if placeholders != num_images:
            raise ValueError(
                f"the text has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s) were "
                f"given; write one {IMAGE_PLACEHOLDER} where each image goes (or use apply_chat_template with image "
                "parts)"
            )
        expanded = []
        for row in rows:
            ids: list[int] = []
            for i in row:
                ids.extend([self.image_token_id] * self.tokens_per_image if i == OFFICIAL_IMAGE_TOKEN else [i])
            expanded.append(ids)

        padding = options.get("padding", False)
        max_length = options.get("max_length")
        longest = max(len(ids) for ids in expanded)
        if padding in (True, "longest"):
            target = longest
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max(int(max_length), longest)
        elif padding in (False, None, "do_not_pad"):
            target = None
        else:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        multiple = options.get("pad_to_multiple_of")
        if target is not None and multiple:
            target = -(-target // int(multiple)) * int(multiple)
        if target is None and len({len(ids) for ids in expanded}) > 1 and options.get("return_tensors") is not None:
            raise ValueError("prompts of different lengths need padding=True to be returned as tensors")
        side = options.get("padding_side") or self.tokenizer.padding_side
        pad_id = self.tokenizer.pad_token_id
        input_ids, attention_mask = [], []
        for ids in expanded:
            fill = 0 if target is None else target - len(ids)
            mask = [1] * len(ids)
            if side == "left":
                input_ids.append([pad_id] * fill + ids)
                attention_mask.append([0] * fill + mask)
            else:
                input_ids.append(ids + [pad_id] * fill)
                attention_mask.append(mask + [0] * fill)
        out: dict[str, list] = {"input_ids": input_ids}
        if options.get("return_attention_mask", True):
            out["attention_mask"] = attention_mask
        return out

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """The tokenizer's ``batch_decode`` (image positions are left out)."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        """The tokenizer's ``decode`` (image positions are left out)."""
        return self.tokenizer.decode(*args, **kwargs)


# -------------------------------------------------------------------------------------------------------- registration
def register_processing(config_class: type | None = None) -> None:
    """Register the tokenizer, image processor and processor with ``AutoTokenizer``, ``AutoImageProcessor`` and
    ``AutoProcessor`` for ``config_class``: by default the config class ``AutoConfig`` has for ``"mplug_owl2"``
    (so the config must be registered first). Registering again is harmless."""
    if config_class is None:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        try:
            config_class = CONFIG_MAPPING[MODEL_TYPE]
        except KeyError:
            raise RuntimeError(f"register the {MODEL_TYPE!r} config with AutoConfig before the processing "
                               "classes") from None
    AutoTokenizer.register(config_class, slow_tokenizer_class=MPLUGOwl2Tokenizer, exist_ok=True)
    AutoImageProcessor.register(config_class, slow_image_processor_class=MPLUGOwl2ImageProcessor, exist_ok=True)
    AutoProcessor.register(config_class, MPLUGOwl2Processor, exist_ok=True)

