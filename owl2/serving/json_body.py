"""Strict JSON request bodies: :func:`parse_json_body` refuses what JSON leaves open or Python lets through, with a
one-line reason naming the field, and :func:`is_json` judges the Content-Type."""

import json
import math
import re
from typing import Any

from owl2.serving.errors import clip

PARSE_IN_THREAD_BYTES = 1 << 20
"""JSON bodies of more bytes are parsed in the thread pool, so that other requests are not held up meanwhile."""

_MAX_DIGITS = 1000
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class InvalidJSON(ValueError):
    """The body is not a JSON object this server accepts; the message says why in one line."""


class _Duplicate(dict):  # type: ignore[type-arg]
    """An object in which ``key`` appeared twice: kept as a marker until its path is known."""

    key: str = ""


class _LongNumber:
    """An integer of more digits than anyone means: kept as a marker until its path is known."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


class _Markers:
    """The hooks of one ``json.loads``: they replace what JSON does not allow by markers and note that they did,
    so that :func:`_find_problem` is only run for such a body, and can name the field."""

    def __init__(self) -> None:
        self.seen = False

    def pairs(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        value = dict(pairs)
        if len(value) == len(pairs):
            return value
        self.seen = True
        marked = _Duplicate(value)
        keys: set[str] = set()
        for key, _ in pairs:
            if key in keys:
                marked.key = key
                break
            keys.add(key)
        return marked

    def constant(self, name: str) -> float:
        self.seen = True
        return float(name.replace("Infinity", "inf"))

    def real(self, text: str) -> float:
        value = float(text)
        self.seen = self.seen or not math.isfinite(value)
        return value

    def integer(self, text: str) -> int | _LongNumber:
        if len(text) > _MAX_DIGITS:  # Python refuses over 4300 digits, with a message about its own limit
            self.seen = True
            return _LongNumber(len(text))
        return int(text)


def _find_problem(value: Any) -> str | None:
    """The first thing in a parsed body that this server's JSON does not allow, as ``"path: what"``."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        where = path or "body"
        if isinstance(item, _Duplicate):
            return f"{where}: the key {item.key[:40]!r} appears twice in one object"
        if isinstance(item, _LongNumber):
            return f"{where}: a number of {item.digits:,} digits is out of range"
        if isinstance(item, float) and not math.isfinite(item):
            return f"{where}: input should be a finite number, got {item} (not a JSON number)"
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return (f"{where}: the string holds a lone UTF-16 surrogate (\\u{ord(item[exc.start]):04x}), "
                        "which is not a character")
        elif isinstance(item, dict):
            for key, member in reversed(item.items()):
                name = clip(key)  # the client's key: the path names it briefly
                stack.append((f"{path}.{name}" if path else name, member))
                stack.append((f"{where} (a key)", key))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", member) for i, member in reversed(list(enumerate(item))))
    return None


def parse_json_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or :class:`InvalidJSON` with a one-line reason naming the field.

    Stricter than ``json.loads`` where JSON leaves a choice or Python is lenient: the body must be UTF-8 (not
    UTF-16, no byte-order mark), its top level an object, no key may appear twice in one object (parsers disagree
    on which one wins), ``NaN``/``Infinity`` and numbers out of range (``1e999``, integers of over 1000 digits) are
    refused, strings may not hold lone UTF-16 surrogates (``"\\ud800"``), and nesting deeper than Python's
    recursion limit is an error, not a crash."""
    if not body.strip():
        raise InvalidJSON("the body is empty; send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJSON(f"the body is not UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start})") from None
    markers = _Markers()
    try:
        value = json.loads(text, object_pairs_hook=markers.pairs, parse_constant=markers.constant,
                           parse_float=markers.real, parse_int=markers.integer)
    except json.JSONDecodeError as exc:
        raise InvalidJSON(f"the body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise InvalidJSON("the body is not valid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        raise InvalidJSON(f"the body must be a JSON object, got {kind}")
    # only escapes make surrogates, and only the hooks make markers: the usual body is not walked
    if (markers.seen or _SURROGATE_ESCAPE.search(text)) and (problem := _find_problem(value)):
        raise InvalidJSON(problem)
    return value


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))
