"""Reading training records into one normalised form (:class:`Record`), reporting bad ones instead of crashing.

Two input formats are accepted, as a JSON file holding a list of objects or a JSONL file (one object per line;
blank lines ignored); the format is chosen per record:

* LLaVA style: ``{"id", "image": str | [str] (optional), "conversations": [{"from": "human" | "gpt", "value": str}]}``
  with ``<|image|>`` placeholders in the human turns. ``"user"``/``"assistant"`` are accepted as aliases of
  ``"human"``/``"gpt"``, and a ``"system"`` turn is allowed first.
* messages style: ``{"id", "messages": [OpenAI-style messages], "images": [...] (optional)}``. A message's content is
  a string (placeholders typed as ``<|image|>``, images from the top-level ``"images"``) or a list of parts
  (``{"type": "text", "text"}``, ``{"type": "image" | "image_url", ...}`` which stand where they are, as in
  :func:`owl2.processing.render_conversation`). A bare ``{"type": "image"}`` part (the Hugging Face / TRL
  convention) stands for the next entry of the top-level ``"images"`` list, or for entry ``"index"`` when the part
  has one; every listed image must then be placed by exactly one part. Parts that carry their own image cannot be
  mixed with a top-level ``"images"`` list.

Either format may carry a ``"soft_label"`` (``"level_probs"``, DeQA-Score's name for it, is read too): a list of
non-negative numbers, one per rating level, best first (:mod:`owl2.data.quality`). The dataset trains it at the level
word of the last answer when the recipe turns the soft-label loss on (``[loss] soft_label_weight``).

Placeholder rule (official ``preprocess_multimodal``: training data is ``"<|image|>\\n" + text``): when a record has
images but *no* ``<|image|>`` anywhere, one ``"<|image|>\\n"`` per image is prepended to the first user turn. When it
has placeholders, they stay where they are (the official LLaVA-derived code moves a placeholder to the front of its
turn; owl2 supports images anywhere, so the data's own positions are kept) and their number must equal the number of
images. Placeholders in assistant turns are an error.

Image paths: a relative path is resolved against ``image_root`` (default: the data file's directory); absolute paths
and ``data:`` URLs are used as they are; ``http(s)://`` URLs are rejected (the loader does not fetch). With
``check_files=True`` (the default) a missing image file makes the record bad here, up front, so a run never meets it.

A bad record raises :class:`BadRecord` from :func:`parse_record`; :func:`read_records` catches it, warns once
(a :class:`SkippedRecordWarning`) with the record's id and reason, and returns the skipped ``(id, reason)`` pairs next
to the good records.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owl2.constants import IMAGE_PLACEHOLDER

__all__ = ["BadRecord", "Record", "SkippedRecordWarning", "iter_raw_records", "parse_record", "read_records",
           "report_skip"]

_USER_ROLES = {"human": "user", "user": "user"}
_ASSISTANT_ROLES = {"gpt": "assistant", "assistant": "assistant"}


class BadRecord(ValueError):
    """A record that cannot be trained on; the message says why (the caller adds the id)."""


class SkippedRecordWarning(UserWarning):
    """A record was left out of the data (:func:`report_skip`); its own class so callers can filter or reformat it."""


@dataclass
class Record:
    """One conversation, normalised: alternating user/assistant ``turns`` (user first, assistant last), the text
    holding one ``<|image|>`` per entry of ``images`` (resolved paths or other image sources, in order)."""

    id: str
    turns: list[tuple[str, str]]
    images: list[Any] = field(default_factory=list)
    system: str | None = None
    soft_label: list[float] | None = None
    """A distribution over rating levels (best first) for the level word of the last answer, or None."""

    @property
    def num_images(self) -> int:
        return len(self.images)


# ---------------------------------------------------------------------------------------------------------- reading
def iter_raw_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """``(position, object)`` for each record of a JSON list file or a JSONL file.

    A JSONL line that is not valid JSON is yielded as a :class:`BadRecord` instance (so the caller reports it with its
    line number) instead of aborting the whole file. A ``.json`` file that is not a list raises ``ValueError``.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would block the read, a device never end it
        raise ValueError(f"{path}: not a regular file (a data set is a JSON or JSONL file)")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix != ".jsonl" and stripped.startswith("["):
        data = json.loads(text)
        if not isinstance(data, list):  # pragma: no cover - guarded by the '[' check
            raise ValueError(f"{path}: expected a JSON list of records")
        yield from enumerate(data)
        return
    if path.suffix == ".json" and not stripped.startswith("["):
        raise ValueError(f"{path}: a .json data file must hold a list of records (use .jsonl for one per line)")
    for number, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, BadRecord(f"line {number + 1}: not valid JSON ({exc})")


def _record_id(raw: Any, position: int) -> str:
    if isinstance(raw, Mapping) and raw.get("id") is not None:
        return str(raw["id"])
    return f"#{position}"


def read_records(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    *,
    check_files: bool = True,
) -> tuple[list[Record], list[tuple[str, str]]]:
    """All records of ``path``: ``(good records, [(id, reason) of each skipped record])``.

    Each skipped record is also reported once with :func:`warnings.warn` (:func:`report_skip`). A record without
    ``"id"`` is named ``"#<position>"`` (list index, or 0-based line number for JSONL).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    good: list[Record] = []
    skipped: list[tuple[str, str]] = []
    for position, raw in iter_raw_records(path):
        record_id = _record_id(raw, position)
        try:
            if isinstance(raw, BadRecord):
                raise raw
            good.append(parse_record(raw, root, record_id=record_id, check_files=check_files))
        except BadRecord as exc:
            report_skip(skipped, record_id, str(exc))
    return good, skipped


def report_skip(skipped: list[tuple[str, str]], record_id: str, reason: str) -> None:
    """Append ``(record_id, reason)`` to ``skipped`` and report it as a :class:`SkippedRecordWarning`.

    Only a warning, not also a log record: with logging unconfigured, Python prints both to stderr, so every skip
    used to appear twice. Warnings can be caught and filtered; ``owl2 train`` prints them as one line each.
    """
    skipped.append((record_id, reason))
    warnings.warn(f"skipping record {record_id!r}: {reason}", SkippedRecordWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------------------- parsing
def parse_record(
    raw: Any,
    image_root: str | os.PathLike[str] = ".",
    *,
    record_id: str | None = None,
    check_files: bool = True,
) -> Record:
    """One raw record (either format) -> :class:`Record`; raises :class:`BadRecord` saying what is wrong."""
    if not isinstance(raw, Mapping):
        raise BadRecord(f"expected a JSON object, got {type(raw).__name__}")
    record_id = record_id if record_id is not None else _record_id(raw, 0)
    if "conversations" in raw:
        system, turns, images = _parse_llava(raw)
    elif "messages" in raw:
        system, turns, images = _parse_messages(raw)
    else:
        raise BadRecord("no 'conversations' (LLaVA format) or 'messages' list")
    turns = _check_structure(turns)
    turns = _apply_placeholder_rule(turns, len(images))
    resolved = [_resolve_image(image, Path(image_root), check_files) for image in images]
    return Record(record_id, turns, resolved, system, _soft_label(raw))


def _soft_label(raw: Mapping[str, Any]) -> list[float] | None:
    value = raw.get("soft_label", raw.get("level_probs"))
    if value is None:
        return None
    if (not isinstance(value, list) or not value
            or not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in value)):
        raise BadRecord(f"'soft_label' must be a non-empty list of numbers, got {value!r:.80}")
    probs = [float(p) for p in value]
    if not all(math.isfinite(p) and p >= 0 for p in probs) or sum(probs) <= 0:
        raise BadRecord(f"'soft_label' must hold finite non-negative numbers with a positive sum, got {probs}")
    return probs


def _parse_llava(raw: Mapping[str, Any]) -> tuple[str | None, list[tuple[str, str]], list[Any]]:
    conversations = raw["conversations"]
    if not isinstance(conversations, list):
        raise BadRecord("'conversations' must be a list")
    image = raw.get("image")
    if image is None:
        images: list[Any] = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(i, str) for i in image):
        images = list(image)
    else:
        raise BadRecord(f"'image' must be a string or a list of strings, got {image!r:.80}")
    system: str | None = None
    turns: list[tuple[str, str]] = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise BadRecord(f"turn {k}: expected {{'from': ..., 'value': str}}")
        role = turn.get("from")
        if role == "system" and k == 0:
            system = turn["value"]
            continue
        if role in _USER_ROLES:
            turns.append(("user", turn["value"]))
        elif role in _ASSISTANT_ROLES:
            turns.append(("assistant", turn["value"]))
        else:
            raise BadRecord(f"turn {k}: unknown role {role!r} (expected 'human' or 'gpt')")
    return system, turns, images


@dataclass(frozen=True)
class _ListedImage:
    """A bare image part: it stands for an entry of the record's top-level ``"images"`` list (``index`` when the
    part names one, else the next entry in order)."""

    index: int | None


def _parse_messages(raw: Mapping[str, Any]) -> tuple[str | None, list[tuple[str, str]], list[Any]]:
    messages = raw["messages"]
    if not isinstance(messages, list):
        raise BadRecord("'messages' must be a list")
    top_images = raw.get("images") or []
    if isinstance(top_images, str):
        top_images = [top_images]
    if not isinstance(top_images, list):
        raise BadRecord("'images' must be a list")
    system: str | None = None
    turns: list[tuple[str, str]] = []
    part_images: list[Any] = []
    for k, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadRecord(f"message {k}: expected an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        text = _message_text(content, part_images, k)
        if role == "system" and k == 0:
            system = text
        elif role in ("user", "assistant"):
            turns.append((role, text))
        else:
            raise BadRecord(f"message {k}: unknown role {role!r} (expected 'user' or 'assistant')")
    listed = [image for image in part_images if isinstance(image, _ListedImage)]
    if listed:
        return system, turns, _place_listed_images(part_images, top_images)
    if part_images and top_images:
        raise BadRecord("images given both as content parts and as a top-level 'images' list")
    return system, turns, part_images or list(top_images)


def _place_listed_images(part_images: list[Any], top_images: list[Any]) -> list[Any]:
    """The images of a record whose image parts are bare (``{"type": "image"}``), in the order the parts stand."""
    if len(part_images) != sum(isinstance(image, _ListedImage) for image in part_images):
        raise BadRecord("some image parts carry an image and others are bare; use one style per record")
    if not top_images:
        raise BadRecord("an image part without an image, and no top-level 'images' list for it to take from")
    placed: list[Any] = []
    for order, part in enumerate(part_images):
        index = order if part.index is None else part.index
        if not 0 <= index < len(top_images):
            raise BadRecord(f"an image part refers to image {index}, but 'images' has {len(top_images)}")
        placed.append(top_images[index])
    # Every listed image must be placed exactly once, else a placeholder count would silently not match the data.
    used = sorted(order if part.index is None else part.index for order, part in enumerate(part_images))
    if used != list(range(len(top_images))):
        raise BadRecord(f"{len(part_images)} image part(s) do not place each of the {len(top_images)} "
                        "top-level 'images' exactly once")
    return placed


def _message_text(content: Any, images: list[Any], index: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRecord(f"message {index}: content must be a string or a list of parts")
    pieces: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind in ("image", "image_url"):
            value = part.get("image_url") if kind == "image_url" else None
            value = value.get("url") if isinstance(value, Mapping) else value
            for key in ("image", "url", "path"):
                if value is None:
                    value = part.get(key)
            if value is None and kind == "image":
                # Hugging Face datasets (llava-instruct-mix) may give the listed image's position as "index".
                position = part.get("index")
                if position is not None and (not isinstance(position, int) or isinstance(position, bool)):
                    raise BadRecord(f"message {index}: an image part's 'index' must be an integer, got {position!r}")
                value = _ListedImage(position)
            if value is None:
                raise BadRecord(f"message {index}: an image part without an image")
            images.append(value)
            pieces.append(IMAGE_PLACEHOLDER)
        else:
            raise BadRecord(f"message {index}: unsupported content part {part!r:.80}")
    return "".join(pieces)


def _check_structure(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if not turns:
        raise BadRecord("empty conversation")
    for k, (role, text) in enumerate(turns):
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise BadRecord(f"turn {k}: expected a {expected} turn, got {role} (turns must alternate, user first)")
        if not text.strip():
            raise BadRecord(f"turn {k} ({role}): empty text")
        if role == "assistant" and IMAGE_PLACEHOLDER in text:
            raise BadRecord(f"turn {k}: {IMAGE_PLACEHOLDER} in an assistant turn")
    if turns[-1][0] != "assistant":
        raise BadRecord("the conversation ends with a user turn: nothing to learn from its last question")
    return turns


def _apply_placeholder_rule(turns: list[tuple[str, str]], num_images: int) -> list[tuple[str, str]]:
    found = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if found == 0 and num_images > 0:
        role, text = turns[0]
        return [(role, (IMAGE_PLACEHOLDER + "\n") * num_images + text), *turns[1:]]
    if found != num_images:
        raise BadRecord(f"{found} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s)")
    return turns


def _resolve_image(image: Any, root: Path, check_files: bool) -> Any:
    if not isinstance(image, (str, os.PathLike)):
        return image  # bytes, PIL images, arrays from a programmatic source: the loader checks them
    text = os.fspath(image)
    if text.startswith("data:"):
        return text
    if text.startswith(("http://", "https://")):
        raise BadRecord(f"remote image URL {text[:100]!r}: download images first")
    if not text:
        raise BadRecord("empty image path")
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = root / path
    if check_files and not path.is_file():
        raise BadRecord(f"image file not found: {path}")
    return path

