"""The LLaMA-2 tokenizer, id-exact with what the official mPLUG-Owl2 code feeds its model.

The official code tokenises with transformers-4.31's slow ``LlamaTokenizer`` (SentencePiece underneath) and turns a
prompt containing ``<|image|>`` placeholders into ids with ``tokenizer_image_token``. This module reproduces both
without transformers, on either backend:

* ``tokenizer.model`` through ``sentencepiece`` (preferred when present), or
* ``tokenizer.json`` through ``tokenizers`` (only its normalizer, pre-tokenizer and model are used, so the text is
  segmented exactly as SentencePiece segments it).

Both give identical pieces and ids; the special-token handling, the ``legacy`` rule and decoding are implemented
here once, in Python, on top of the backend's segmentation.

What the slow 4.31 tokenizer does to a text (``encode``):

1. The configured special tokens (``<s>``, ``</s>``, ``<unk>``, a pad token, additional special tokens) are split
   out of the text and become their ids, so a ``</s>`` typed into a prompt is the EOS id 2, not ``▁</``, ``s``,
   ``>``. Whitespace next to a special token is removed on both sides when the token is a plain string in
   ``special_tokens_map.json`` (the released LLaMA-2 layout); a token given as an ``AddedToken`` dict strips only
   per its ``lstrip``/``rstrip`` flags, and a token that only ``tokenizer_config.json`` (or nobody) names strips
   nothing (``LlamaTokenizer.__init__`` wraps it in ``AddedToken(lstrip=False, rstrip=False)``).
2. Every remaining text segment is encoded by SentencePiece on its own, so each gets the dummy-prefix ``▁``.
3. ``legacy=False`` (``tokenizer_config.json``; absent means ``True``) changes step 2 for segments that follow a
   special token: the text is first prefixed with ``▁`` (literal ``▁`` in the text become spaces) so that only the
   first segment carries the prefix, and for every later segment that does not start with a space, the leading
   ``▁`` is cut off its *first piece* after encoding (a piece that was only ``▁`` is dropped). The cut piece is
   looked up as is, so it becomes ``<unk>`` (id 0) when the vocabulary lacks it, exactly as transformers 4.31 does
   (later versions re-encode instead). Example: ``"a.</s>USER:"`` gives ``▁US`` (3148) after ``</s>`` with
   ``legacy=True`` and ``US`` (3308) with ``legacy=False``. Text that follows no special token is unaffected.
4. ``<s>`` is prepended when ``add_bos_token`` (default true), ``</s>`` appended when ``add_eos_token``.

:meth:`Owl2Tokenizer.encode_prompt` is ``tokenizer_image_token``: the prompt is split on the literal ``<|image|>``;
each non-empty chunk is encoded as above (with its own BOS), empty chunks give nothing; if the first chunk's ids
start with BOS, that BOS is kept once and the first id of *every* chunk is dropped, and one ``-200`` goes between
consecutive chunks. So a prompt that starts with ``<|image|>`` has no leading BOS, and then every chunk after an
image keeps its BOS (``"<|image|>Hi"`` -> ``[-200, 1, ...]``), as in the official code.

Decoding follows the slow tokenizer too: ``skip_special_tokens=True`` drops the special ids and decodes the rest as
SentencePiece does (the leading ``▁`` of the first piece is dropped; byte pieces are joined into UTF-8 and every
invalid byte becomes U+FFFD), while ``skip_special_tokens=False`` writes special tokens literally, with a space
before a special token that follows ordinary text (``"<s> USER: ...</s>USER: ..."``, as transformers 4.31 prints it).
The image id ``-200`` and ids at or above the vocabulary size (owl2's own image id) are ignored.
"""

from __future__ import annotations

import codecs
import importlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from owl2.constants import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from owl2.utils import read_json_object

__all__ = [
    "IMAGE_PLACEHOLDER",
    "IMAGE_TOKEN_INDEX",
    "SPECIAL_TOKENS_MAP_NAME",
    "TOKENIZER_CONFIG_NAME",
    "TOKENIZER_JSON_NAME",
    "TOKENIZER_MODEL_NAME",
    "Owl2Tokenizer",
    "SpecialToken",
    "load_tokenizer",
]

TOKENIZER_MODEL_NAME = "tokenizer.model"
TOKENIZER_JSON_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"

Backend = Literal["auto", "sentencepiece", "tokenizers"]

_SPIECE_UNDERLINE = "\u2581"
_UNK_SURFACE = " \u2047 "  # what SentencePiece prints for <unk> when asked to decode it
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_DEFAULT_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}


def _replace_per_byte(error: UnicodeError) -> tuple[str, int]:
    """Codec error handler: one U+FFFD per invalid byte, as SentencePiece decodes byte pieces."""
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return "\ufffd", error.start + 1


_BYTE_ERRORS = "owl2-sentencepiece-replace"
codecs.register_error(_BYTE_ERRORS, _replace_per_byte)


@dataclass(frozen=True)
class SpecialToken:
    """A special token's text and whether it eats the whitespace on its left/right when split out of a text."""

    content: str
    lstrip: bool = False
    rstrip: bool = False


# ---------------------------------------------------------------------------------------------------------- backends
def _require(module: str, path: Path) -> Any:
    """Import an optional backend library, or explain which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs the '{module}' package (pip install 'owl2[processing]')") from exc


class _SentencePieceBackend:
    """Segmentation and vocabulary from ``tokenizer.model``."""

    name = "sentencepiece"

    def __init__(self, path: Path) -> None:
        spm = _require("sentencepiece", path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{path}: not a SentencePiece model ({exc})") from exc
        size = self._sp.get_piece_size()
        self.pieces = [self._sp.id_to_piece(i) for i in range(size)]
        self.byte_ids = frozenset(i for i in range(size) if self._sp.is_byte(i))
        self.control_ids = frozenset(i for i in range(size) if self._sp.is_control(i))
        self.unknown_ids = frozenset(i for i in range(size) if self._sp.is_unknown(i))

    def segment(self, text: str) -> list[str]:
        """SentencePiece's pieces for ``text`` (with the dummy-prefix ``▁``); no special-token handling."""
        return self._sp.encode(text, out_type=str)


class _TokenizersBackend:
    """Segmentation and vocabulary from ``tokenizer.json``, without its added-token splitting or post-processor."""

    name = "tokenizers"

    def __init__(self, path: Path) -> None:
        tokenizers = _require("tokenizers", path)
        try:
            full = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises its own Exception subclasses for bad files
            raise ValueError(f"{path}: not a tokenizers file ({exc})") from exc
        # A tokenizer made of the model alone (plus normalisation) segments like SentencePiece: the special tokens
        # are split out here, not by the library, and no BOS template is applied.
        self._tok = tokenizers.Tokenizer(full.model)
        if full.normalizer is not None:
            self._tok.normalizer = full.normalizer
        if full.pre_tokenizer is not None:
            self._tok.pre_tokenizer = full.pre_tokenizer
        vocab = full.get_vocab(with_added_tokens=False)
        size = max(vocab.values(), default=-1) + 1
        pieces: list[str | None] = [None] * size
        for piece, index in vocab.items():
            pieces[index] = piece
        if size == 0 or any(p is None for p in pieces):
            raise ValueError(f"{path}: the model's vocabulary does not cover the ids 0..{size - 1}")
        self.pieces = [p for p in pieces if p is not None]
        byte_fallback = bool(getattr(full.model, "byte_fallback", False))
        self.byte_ids = frozenset(
            i for i, p in enumerate(self.pieces) if byte_fallback and _BYTE_PIECE.fullmatch(p)
        )
        unk = getattr(full.model, "unk_token", None)
        self.unknown_ids = frozenset(i for i, p in enumerate(self.pieces) if p == unk)
        self.control_ids = frozenset(
            i for i, added in full.get_added_tokens_decoder().items()
            if added.special and i < size and i not in self.unknown_ids
        )

    def segment(self, text: str) -> list[str]:
        """The model's pieces for ``text`` (normalised with the file's normalizer, which adds the ``▁`` prefix)."""
        return self._tok.encode(text, add_special_tokens=False).tokens


# ---------------------------------------------------------------------------------------------------------- config
def _special_token(value: Any, *, plain_strips: bool, where: str) -> SpecialToken | None:
    """A token entry of the config files: a string, an ``AddedToken`` dict, or null.

    ``plain_strips``: whether a plain string strips whitespace on both sides (true for ``special_tokens_map.json``
    and for additional special tokens, false for the four named tokens in ``tokenizer_config.json``, which the
    4.31 ``LlamaTokenizer`` wraps in a non-stripping ``AddedToken``).
    """
    if value is None:
        return None
    if isinstance(value, str):
        return SpecialToken(value, lstrip=plain_strips, rstrip=plain_strips)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return SpecialToken(value["content"], lstrip=bool(value.get("lstrip", False)),
                            rstrip=bool(value.get("rstrip", False)))
    raise ValueError(f"{where}: a special token must be a string or an object with 'content', got {value!r}")


def _bool_option(config: Mapping[str, Any], key: str, default: bool, where: Path) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {key!r} must be true or false, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------- tokenizer
class Owl2Tokenizer:
    """The LLaMA-2 tokenizer with the official mPLUG-Owl2 prompt rules (see the module docstring).

    Build one with :func:`load_tokenizer`. ``encode_prompt`` is what a rendered chat prompt goes through;
    ``encode`` is for plain text; ``decode`` and ``token_pieces`` go back.
    """

    def __init__(
        self,
        backend: _SentencePieceBackend | _TokenizersBackend,
        *,
        specials: Mapping[str, SpecialToken | None] | None = None,
        additional_special_tokens: Sequence[SpecialToken] = (),
        legacy: bool = True,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        source: str = "",
    ) -> None:
        self._backend = backend
        self._pieces: list[str] = list(backend.pieces)
        self._piece_ids = {piece: i for i, piece in enumerate(self._pieces)}
        self._byte_ids = backend.byte_ids
        self._control_ids = backend.control_ids
        self._unknown_ids = backend.unknown_ids
        self._legacy = legacy
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.source = source

        named = dict(_DEFAULT_SPECIALS) if specials is None else dict(specials)
        resolved: dict[str, SpecialToken | None] = {}
        for key in _SPECIAL_KEYS:
            token = named.get(key)
            if isinstance(token, str):
                token = SpecialToken(token)
            resolved[key] = token
        for key in ("bos_token", "eos_token", "unk_token"):
            if resolved[key] is None:
                raise ValueError(f"{source or 'tokenizer'}: no {key} is defined")
        self._named = resolved
        self._specials: dict[str, SpecialToken] = {}
        for token in [t for t in resolved.values() if t is not None] + list(additional_special_tokens):
            if token.content not in self._piece_ids:
                raise ValueError(
                    f"{source or 'tokenizer'}: special token {token.content!r} is not in the vocabulary "
                    f"({len(self._pieces)} pieces); tokens added beyond the SentencePiece vocabulary are not supported"
                )
            self._specials.setdefault(token.content, token)
        self._special_ids = frozenset(self._piece_ids[c] for c in self._specials)
        alternatives = sorted(self._specials, key=len, reverse=True)  # longest first: leftmost-longest matching
        self._special_pattern = re.compile("|".join(re.escape(c) for c in alternatives)) if alternatives else None

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def backend(self) -> str:
        """``"sentencepiece"`` or ``"tokenizers"``: which library segments the text."""
        return self._backend.name

    @property
    def legacy(self) -> bool:
        """The ``legacy`` flag of ``tokenizer_config.json`` (default true): see the module docstring."""
        return self._legacy

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the vocabulary (32000 for LLaMA-2); ids at or above it are not text."""
        return len(self._pieces)

    @property
    def bos_token_id(self) -> int:
        """Id of the beginning-of-sequence token (``<s>``, 1), which starts every prompt."""
        return self._token_id("bos_token")

    @property
    def eos_token_id(self) -> int:
        """Id of the end-of-sequence token (``</s>``, 2): ends an answer; the templates' ``sep2``."""
        return self._token_id("eos_token")

    @property
    def unk_token_id(self) -> int:
        """Id of ``<unk>`` (0), also what a piece missing from the vocabulary maps to."""
        return self._token_id("unk_token")

    @property
    def pad_token_id(self) -> int:
        """The configured pad token's id, else the unk id (0), as the official trainer sets ``pad = unk``."""
        return self._token_id("pad_token") if self._named["pad_token"] is not None else self.unk_token_id

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of every configured special token (BOS, EOS, UNK, PAD if set, additional ones)."""
        return self._special_ids

    def _token_id(self, key: str) -> int:
        token = self._named[key]
        assert token is not None
        return self._piece_ids[token.content]

    def __repr__(self) -> str:
        return (f"Owl2Tokenizer(source={self.source!r}, backend={self.backend!r}, vocab_size={self.vocab_size}, "
                f"legacy={self.legacy}, add_bos_token={self.add_bos_token})")

    # ------------------------------------------------------------------------------------------------ encoding
    def tokenize(self, text: str) -> list[str]:
        """The pieces of ``text`` (special tokens split out, ``legacy`` honoured), without BOS/EOS."""
        if not self._legacy:
            text = _SPIECE_UNDERLINE + text.replace(_SPIECE_UNDERLINE, " ")
        pieces: list[str] = []
        for segment, special in self._split_special(text):
            if not segment:
                continue
            if special:
                pieces.append(segment)
            else:
                pieces.extend(self._tokenize_segment(segment))
        return pieces

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Ids of plain ``text``: BOS (if ``add_bos``), the pieces, EOS (if ``add_eos``).

        ``<|image|>`` is not special here (it becomes ordinary pieces); use :meth:`encode_prompt` for prompts.
        """
        unk = self.unk_token_id
        ids = [self._piece_ids.get(piece, unk) for piece in self.tokenize(text)]
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def encode_prompt(self, text: str) -> list[int]:
        """Official ``tokenizer_image_token``: ids with one ``-200`` per ``<|image|>`` (see the module docstring).

        Each chunk gets BOS/EOS per the config's ``add_bos_token``/``add_eos_token``, as ``tokenizer(chunk)`` does.
        """
        chunks = [
            self.encode(chunk, add_bos=self.add_bos_token, add_eos=self.add_eos_token) if chunk else []
            for chunk in text.split(IMAGE_PLACEHOLDER)
        ]
        offset = 1 if chunks[0] and chunks[0][0] == self.bos_token_id else 0
        ids: list[int] = [chunks[0][0]] if offset else []
        for k, chunk in enumerate(chunks):
            if k:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(chunk[offset:])
        return ids

    def _split_special(self, text: str) -> list[tuple[str, bool]]:
        """``text`` cut into (segment, is_special), with the whitespace special tokens eat removed."""
        if self._special_pattern is None:
            return [(text, False)]
        parts: list[list[Any]] = []  # [segment, SpecialToken | None]
        position = 0
        for match in self._special_pattern.finditer(text):
            if match.start() > position:
                parts.append([text[position:match.start()], None])
            parts.append([match.group(), self._specials[match.group()]])
            position = match.end()
        if position < len(text):
            parts.append([text[position:], None])
        # As transformers 4.31 ``PreTrainedTokenizer.tokenize``: in order, each special token strips its neighbours.
        for i, (_, token) in enumerate(parts):
            if token is None:
                continue
            if token.rstrip and i + 1 < len(parts) and parts[i + 1][0]:
                parts[i + 1][0] = parts[i + 1][0].lstrip()
            if token.lstrip and i > 0 and parts[i - 1][0]:
                parts[i - 1][0] = parts[i - 1][0].rstrip()
        return [(segment, token is not None) for segment, token in parts]

    def _tokenize_segment(self, text: str) -> list[str]:
        """One text segment through SentencePiece, with the 4.31 ``legacy=False`` cut (module docstring, step 3)."""
        if self._legacy:
            return self._backend.segment(text)
        is_first = text.startswith(_SPIECE_UNDERLINE)
        if is_first:
            text = text[1:]
        pieces = self._backend.segment(text) if text else []
        if not is_first and not text.startswith(" ") and pieces and pieces[0].startswith(_SPIECE_UNDERLINE):
            pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
        return pieces

    # ------------------------------------------------------------------------------------------------ decoding
    def token_pieces(self, ids: Iterable[int]) -> list[str]:
        """The piece of each id (``"▁the"``, ``"<0x0A>"``, ``"</s>"``); ``-200`` and ids >= ``vocab_size`` give
        ``"<|image|>"``. For incremental detokenisation and debugging."""
        return [IMAGE_PLACEHOLDER if i is None else self._pieces[i] for i in self._checked_ids(ids, keep_images=True)]

    def token_text(self, token_id: int) -> str:
        """One token as text on its own (streamed logprobs): the SentencePiece space marker as a space, a byte
        piece as its (partial) character (U+FFFD when the byte alone is not UTF-8), any other piece as is."""
        piece = self.token_pieces([token_id])[0]
        if int(token_id) in self._byte_ids:
            return bytes([int(piece[3:5], 16)]).decode("utf-8", errors=_BYTE_ERRORS)
        return piece.replace(_SPIECE_UNDERLINE, " ")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` as the slow 4.31 tokenizer decodes it (module docstring); image ids are ignored."""
        pieces: list[str] = []
        for i in self._checked_ids(ids, keep_images=False):
            assert i is not None
            if skip_special_tokens and i in self._special_ids:
                continue
            pieces.append(self._pieces[i])
        if not pieces:
            return ""
        text = self._pieces_to_string(pieces)
        return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def _checked_ids(self, ids: Iterable[int], *, keep_images: bool) -> list[int | None]:
        """``ids`` as ints; image ids become None (or are dropped); other negative ids are an error."""
        out: list[int | None] = []
        for raw in ids:
            i = int(raw)
            if i == IMAGE_TOKEN_INDEX or i >= len(self._pieces):
                if keep_images:
                    out.append(None)
                continue
            if i < 0:
                raise ValueError(f"invalid token id {i}: ids are 0..{len(self._pieces) - 1} or {IMAGE_TOKEN_INDEX}")
            out.append(i)
        return out

    def _pieces_to_string(self, pieces: list[str]) -> str:
        """transformers 4.31 ``LlamaTokenizer.convert_tokens_to_string``: specials literal, the rest SentencePiece."""
        out = ""
        current: list[str] = []
        previous_special = False
        for i, piece in enumerate(pieces):
            if piece in self._specials:
                if not previous_special and i != 0:
                    out += " "
                out += self._sentencepiece_decode(current) + piece
                previous_special = True
                current = []
            else:
                current.append(piece)
                previous_special = False
        return out + self._sentencepiece_decode(current)

    def _sentencepiece_decode(self, pieces: list[str]) -> str:
        """SentencePiece's ``decode`` of ``pieces``, for either backend (byte pieces joined as UTF-8)."""
        out: list[str] = []
        pending = bytearray()
        at_start = True  # SentencePiece drops the "▁" of the first visible piece (the dummy prefix)
        for piece in pieces:
            index = self._piece_ids[piece]
            if index in self._byte_ids:
                pending.append(int(piece[3:5], 16))
                at_start = False
                continue
            if pending:
                out.append(pending.decode("utf-8", errors=_BYTE_ERRORS))
                pending.clear()
            if index in self._control_ids:
                continue
            if index in self._unknown_ids:
                out.append(_UNK_SURFACE)
            else:
                if at_start and piece.startswith(_SPIECE_UNDERLINE):
                    piece = piece[1:]
                out.append(piece.replace(_SPIECE_UNDERLINE, " "))
            at_start = False
        if pending:
            out.append(pending.decode("utf-8", errors=_BYTE_ERRORS))
        return "".join(out)


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (used only when the config asks for it)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


# ---------------------------------------------------------------------------------------------------------- loading
def load_tokenizer(
    path: str | os.PathLike[str],
    *,
    backend: Backend = "auto",
    legacy: bool | None = None,
) -> Owl2Tokenizer:
    """The tokenizer of a checkpoint directory (or the path of its ``tokenizer.model`` / ``tokenizer.json``).

    ``backend="auto"`` uses ``tokenizer.model`` with sentencepiece when the file is there, else ``tokenizer.json``
    with tokenizers. ``tokenizer_config.json`` and ``special_tokens_map.json`` next to it are read when present
    (special tokens, ``legacy``, ``add_bos_token``, ``add_eos_token``, ``clean_up_tokenization_spaces``); the map
    wins over the config, as in transformers. ``legacy`` overrides the config's flag. Missing files raise
    ``FileNotFoundError`` naming what was looked for; malformed ones ``ValueError``.
    """
    if backend not in ("auto", "sentencepiece", "tokenizers"):
        raise ValueError(f"backend must be 'auto', 'sentencepiece' or 'tokenizers', got {backend!r}")
    path = Path(path)
    if path.is_file():
        directory = path.parent
        if path.name.endswith(".json"):
            if backend == "sentencepiece":
                raise ValueError(f"backend 'sentencepiece' needs a tokenizer.model file, got {path}")
            model_file, kind = path, "tokenizers"
        else:
            if backend == "tokenizers":
                raise ValueError(f"backend 'tokenizers' needs a tokenizer.json file, got {path}")
            model_file, kind = path, "sentencepiece"
    elif path.is_dir():
        directory = path
        sp_file, json_file = path / TOKENIZER_MODEL_NAME, path / TOKENIZER_JSON_NAME
        if backend == "sentencepiece" or (backend == "auto" and sp_file.is_file()):
            model_file, kind = sp_file, "sentencepiece"
        elif backend == "tokenizers" or json_file.is_file():
            model_file, kind = json_file, "tokenizers"
        else:
            raise FileNotFoundError(
                f"no tokenizer in {str(path)!r}: looked for {TOKENIZER_MODEL_NAME} (SentencePiece) and "
                f"{TOKENIZER_JSON_NAME} (tokenizers)"
            )
        if not model_file.is_file():
            raise FileNotFoundError(f"backend {kind!r} needs {str(model_file)!r}, which does not exist")
    else:
        raise FileNotFoundError(
            f"no tokenizer directory or file at {str(path)!r} (expected a checkpoint directory holding "
            f"{TOKENIZER_MODEL_NAME} or {TOKENIZER_JSON_NAME})"
        )

    engine = _SentencePieceBackend(model_file) if kind == "sentencepiece" else _TokenizersBackend(model_file)

    config_path, map_path = directory / TOKENIZER_CONFIG_NAME, directory / SPECIAL_TOKENS_MAP_NAME
    config = read_json_object(config_path) if config_path.is_file() else {}
    special_map = read_json_object(map_path) if map_path.is_file() else {}

    specials: dict[str, SpecialToken | None] = {}
    for key in _SPECIAL_KEYS:
        if key in special_map:
            specials[key] = _special_token(special_map[key], plain_strips=True, where=f"{map_path}: {key}")
        elif key in config:
            specials[key] = _special_token(config[key], plain_strips=False, where=f"{config_path}: {key}")
        else:
            default = _DEFAULT_SPECIALS[key]
            specials[key] = None if default is None else SpecialToken(default)
    additional: list[SpecialToken] = []
    source_file, raw_additional = (
        (map_path, special_map["additional_special_tokens"]) if "additional_special_tokens" in special_map
        else (config_path, config.get("additional_special_tokens") or [])
    )
    if not isinstance(raw_additional, list):
        raise ValueError(f"{source_file}: 'additional_special_tokens' must be a list")
    for value in raw_additional:
        token = _special_token(value, plain_strips=True, where=f"{source_file}: additional_special_tokens")
        if token is not None:
            additional.append(token)

    return Owl2Tokenizer(
        engine,
        specials=specials,
        additional_special_tokens=additional,
        legacy=_bool_option(config, "legacy", True, config_path) if legacy is None else legacy,
        add_bos_token=_bool_option(config, "add_bos_token", True, config_path),
        add_eos_token=_bool_option(config, "add_eos_token", False, config_path),
        clean_up_tokenization_spaces=_bool_option(config, "clean_up_tokenization_spaces", False, config_path),
        source=str(model_file),
    )
