"""The wire format: OpenAI Chat Completions, owl2's rating requests (``POST /v1/rate``), and the response bodies.

Requests are validated with pydantic. Unknown fields are an error (``strict``, the default) or ignored
(``lenient``), and a field the model cannot honour with a non-default value (``presence_penalty=0.5``,
``logit_bias``, ``tools``, a JSON ``response_format``) is refused with a message, never silently dropped. Every
value that passes is one the server can act on: numbers are finite and bounded so that no sampling setting can
overflow, and text is valid Unicode (JSON can spell a lone UTF-16 surrogate, ``"\\ud800"``, which no tokenizer
takes).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from owl2.generation.sampling import MAX_LOGPROBS

SEED_MIN = -(2**63)
SEED_MAX = 2**63 - 1
"""A request's ``seed``: a signed 64-bit integer (as vLLM takes); choice i of ``n`` samples with ``seed + i``."""

_SURROGATE = re.compile("[\ud800-\udfff]")


def _where(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out or "the body"


def _children(container: dict[Any, Any] | list[Any]) -> Iterator[tuple[Any, Any]]:
    return iter(container.items()) if isinstance(container, dict) else enumerate(container)


def check_unicode(value: Any) -> Any:
    """``value`` (parsed JSON) unchanged, or ``ValueError`` naming the first string or key that holds a lone UTF-16
    surrogate: JSON can spell one (``"\\ud800"``), but it is no character, and encoding it fails (the tokenizer,
    the log, the reply). A clean body costs one pass in C; the walk that names the place goes depth first with one
    iterator per open container, so no nesting depth can exhaust the stack and no path is kept per element."""
    def check(text: str, path: list[str | int]) -> None:
        found = _SURROGATE.search(text)
        if found:
            raise ValueError(f"{_where(path)} is not valid Unicode: it holds a lone surrogate "
                             f"(U+{ord(found.group()):04X}) at character {found.start()}")

    if isinstance(value, str):
        check(value, [])
    if not isinstance(value, dict | list):
        return value
    try:  # one pass in C for the usual clean body; the walk below is there to name the place
        if not _SURROGATE.search(json.dumps(value, ensure_ascii=False)):
            return value
    except (TypeError, ValueError, RecursionError):  # not plain JSON (a Python caller's objects), or very deep
        pass
    path: list[str | int] = []  # path[i]: where the container of stack[i + 1] sits in that of stack[i]
    stack = [_children(value)]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            if stack:
                path.pop()
            continue
        key, item = entry
        if isinstance(key, str) and _SURROGATE.search(key):
            raise ValueError(f"a field name in {_where(path)} is not valid Unicode (a lone surrogate)")
        if isinstance(item, str):
            check(item, [*path, key])
        elif isinstance(item, dict | list):
            path.append(key)
            stack.append(_children(item))
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _plain_url(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value  # some clients send the URL string itself


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, Any] | None = None
    tools: list[Any] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    # vLLM's extensions, which lmms-eval and VLMEvalKit users pass through extra_body
    top_k: int | None = Field(default=None, ge=-1)
    min_tokens: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, value: Any) -> Any:
        return check_unicode(value)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by this server (use repetition_penalty)")
        for name in ("logit_bias", "tools"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by this server")
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError(f"response_format {self.response_format.type!r} is not supported; only 'text'")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; give one of them")
        if self.min_tokens and self.requested_max_tokens is not None and self.min_tokens > self.requested_max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) is over max_tokens ({self.requested_max_tokens})")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class LenientChatCompletionRequest(ChatCompletionRequest):
    """The same request, ignoring fields it does not know (``owl2 serve --lenient``)."""

    model_config = ConfigDict(extra="ignore")


# ------------------------------------------------------------------------------------------------------- rating
MAX_LEVELS = 16
"""Level words per scale (and weights); Q-Align uses 5, Q-Boost three groups of 3."""
MAX_LEVEL_GROUPS = 8
MAX_LEVEL_CHARS = 64
MAX_WEIGHT = 1e6


def _url_object(value: Any) -> Any:
    if isinstance(value, str):
        return {"url": value}
    if not isinstance(value, dict):
        raise ValueError(f'an image is a URL string or {{"url": url}}, got {type(value).__name__}')
    return value


MediaURL = Annotated[ImageURL, BeforeValidator(_url_object)]
_ITEM_FORMS = 'an item is {"image_url": url} or {"video": [url, ...]}'


class RateItem(_Strict):
    """An image, ``{"image_url": url}`` or ``{"image_url": {"url": url}}``, or a video, ``{"video": [url, ...]}``
    (its frames in order, each a URL string or ``{"url": url}``)."""

    image_url: MediaURL | None = None
    video: list[MediaURL] | None = Field(default=None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _an_object(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError(f'{_ITEM_FORMS}, got {type(value).__name__}')
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> RateItem:
        if (self.image_url is None) == (self.video is None):
            raise ValueError(f"{_ITEM_FORMS}, exactly one of them")
        return self


class RateRequest(_Strict):
    """``POST /v1/rate``: rate images and videos with a Q-Align-family scorer (see docs/serving.md)."""

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, value: Any) -> Any:
        return check_unicode(value)

    model: str | None = None
    items: list[RateItem] = Field(min_length=1)
    task: Literal["quality", "aesthetics"] = "quality"
    prompt: Literal["scorer", "eval"] = "scorer"
    levels: list[Any] | None = None
    """Level words, best first, or groups of words of equal length (averaged level by level)."""
    weights: list[Annotated[float, Field(allow_inf_nan=False, ge=-MAX_WEIGHT, le=MAX_WEIGHT)]] | None = Field(
        default=None, min_length=2, max_length=MAX_LEVELS)
    """One per level (default n .. 1); bounded so that the score's spread stays a finite number."""
    user: str | None = None

    @field_validator("levels")
    @classmethod
    def _levels(cls, value: list[Any] | None) -> list[Any] | None:
        if value is None:
            return None
        shape = (f"levels must be 2 to {MAX_LEVELS} words, best first, or up to {MAX_LEVEL_GROUPS} lists of such "
                 f"words of equal length")
        groups = [value] if all(isinstance(v, str) for v in value) else value
        if not groups or len(groups) > MAX_LEVEL_GROUPS or not all(isinstance(g, list) for g in groups):
            raise ValueError(shape)
        for group in groups:
            if not 2 <= len(group) <= MAX_LEVELS or not all(isinstance(w, str) for w in group):
                raise ValueError(shape)
            for word in group:
                if not word.strip() or len(word) > MAX_LEVEL_CHARS:
                    raise ValueError(f"level words must be non-empty and at most {MAX_LEVEL_CHARS} characters, "
                                     f"got {word[:MAX_LEVEL_CHARS + 1]!r}")
        return value


class LenientRateRequest(RateRequest):
    """The same request, ignoring top-level fields it does not know (``owl2 serve --lenient``)."""

    model_config = ConfigDict(extra="ignore")


# ----------------------------------------------------------------------------------------------------- responses
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(message: str, kind: str = "invalid_request_error", *, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_logprob(token: str, logprob: float, top: list[tuple[str, float]] | None) -> dict[str, Any]:
    """One entry of ``choices[i].logprobs.content``."""
    return {
        "token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in top or []],
    }
