"""Hostile chat requests against the real app (the tiny checkpoint, served in this process): every value at and past
each boundary of the parameters, malformed JSON and text that is not Unicode. Each request is sent while a
well-formed greedy request is streaming, so that it shares the running batch with it: a refused request gets a 400
that names the field, an accepted one a 200 with sane content, nothing gets a 5xx or hangs, and the well-formed
request still gets exactly its answer."""

from __future__ import annotations

import asyncio
import json
import math
import re

import httpx
import pytest
from pydantic import ValidationError

from owl2.serving.app import ServerSettings, create_app
from owl2.serving.protocol import ChatCompletionRequest, LenientChatCompletionRequest, RateRequest, check_unicode
from tests.serving.conftest import serve_in_thread

CHAT = "/v1/chat/completions"
GOOD_TOKENS = 120  # long enough that the hostile request arrives while it is still decoding
GOOD = {"messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": GOOD_TOKENS,
        "min_tokens": GOOD_TOKENS, "stream": True}


def _user(text: str = "hi", **extra: object) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}


def _raw(fragment: str, content: str = '"hi"') -> bytes:
    """A body written by hand: JSON numbers Python would not write (NaN, 1e999) and escapes (lone surrogates)."""
    return ('{"messages": [{"role": "user", "content": ' + content + '}], "max_tokens": 4'
            + (", " + fragment if fragment else "") + "}").encode()


NOT_JSON = ("not a json value", "out of range")
"""What the server's strict JSON parser says of NaN, 1e999 and integers past 64 bits, before any field is read."""
SURROGATE = "surrogate"

# (name, body, words the error message must hold, or alternatives); each must be refused with a 400
REFUSED: list[tuple[str, object, str | tuple[str, ...]]] = [
    # seed: a signed 64-bit integer
    ("seed 2**64", _user(temperature=1, seed=2**64), ("seed", *NOT_JSON)),
    ("seed 10**30", _user(temperature=1, seed=10**30), ("seed", *NOT_JSON)),
    ("seed below -2**63", _user(temperature=1, seed=-(2**63) - 1), "seed"),
    ("seed 2**63", _user(temperature=1, seed=2**63), "seed"),
    ("seed a fraction", _user(seed=1.5), "seed"),
    ("seed a word", _user(seed="lucky"), "seed"),
    # temperature: [0, 2], finite
    ("temperature NaN", _raw('"temperature": NaN'), ("temperature", *NOT_JSON)),
    ("temperature inf", _raw('"temperature": 1e999'), ("temperature", *NOT_JSON)),
    ("temperature -inf", _raw('"temperature": -1e999'), ("temperature", *NOT_JSON)),
    ("temperature tiny negative", _user(temperature=-1e-300), "temperature"),
    ("temperature just over 2", _user(temperature=2.000001), "temperature"),
    # top_p: (0, 1]
    ("top_p 0", _user(top_p=0), "top_p"),
    ("top_p underflows to 0", _raw('"top_p": 1e-999'), "top_p"),
    ("top_p negative", _user(top_p=-0.5), "top_p"),
    ("top_p just over 1", _user(top_p=1.0000001), "top_p"),
    ("top_p NaN", _raw('"top_p": NaN'), ("top_p", *NOT_JSON)),
    # top_k: -1 (off) or more
    ("top_k -2", _user(top_k=-2), "top_k"),
    ("top_k a fraction", _user(top_k=1.5), "top_k"),
    # repetition_penalty: > 0, finite
    ("repetition_penalty 0", _user(repetition_penalty=0), "repetition_penalty"),
    ("repetition_penalty negative", _user(repetition_penalty=-1), "repetition_penalty"),
    ("repetition_penalty NaN", _raw('"repetition_penalty": NaN'), ("repetition_penalty", *NOT_JSON)),
    ("repetition_penalty inf", _raw('"repetition_penalty": 1e999'), ("repetition_penalty", *NOT_JSON)),
    # presence / frequency penalties: only 0 is supported
    ("presence_penalty 0.5", _user(presence_penalty=0.5), "presence_penalty"),
    ("presence_penalty over 2", _user(presence_penalty=2.5), "presence_penalty"),
    ("presence_penalty NaN", _raw('"presence_penalty": NaN'), ("presence_penalty", *NOT_JSON)),
    ("frequency_penalty -3", _user(frequency_penalty=-3), "frequency_penalty"),
    ("frequency_penalty inf", _raw('"frequency_penalty": -1e999'), ("frequency_penalty", *NOT_JSON)),
    # logit_bias and tools are not supported: refused, never silently dropped
    ("logit_bias", _user(logit_bias={"5": 100}), "logit_bias"),
    ("logit_bias out of the vocabulary", _user(logit_bias={"999999999": -100}), "logit_bias"),
    ("logit_bias not numbers", _user(logit_bias={"x": "y"}), "logit_bias"),
    ("logit_bias a list", _user(logit_bias=[1, 2]), "logit_bias"),
    ("tools", _user(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    # token counts
    ("max_tokens 0", _user(max_tokens=0), "max_tokens"),
    ("max_tokens negative", _user(max_tokens=-1), "max_tokens"),
    ("max_tokens 10**30", _user(max_tokens=10**30), ("max_tokens", *NOT_JSON)),
    ("max_tokens a fraction", _user(max_tokens=1.5), "max_tokens"),
    ("max_tokens past the context", {**_user("word " * 300), "max_tokens": 400}, "max_tokens"),
    ("max_completion_tokens disagrees", _user(max_completion_tokens=5), "max_completion_tokens"),
    ("min_tokens negative", _user(min_tokens=-1), "min_tokens"),
    ("min_tokens over max_tokens", _user(min_tokens=5), "min_tokens"),
    ("min_tokens 10**30", _user(min_tokens=10**30), ("min_tokens", *NOT_JSON)),
    ("min_tokens past the context", {"messages": [{"role": "user", "content": "hi"}], "min_tokens": 600},
     "min_tokens is 600"),
    ("min_tokens over the server limit", {"messages": [{"role": "user", "content": "hi"}], "min_tokens": 5000},
     "min_tokens"),
    # choices
    ("n 0", _user(n=0), "n: "),
    ("n 17", _user(n=17), "n: "),
    ("n 10**30", _user(n=10**30), ("n: ", *NOT_JSON)),
    # stop sequences
    ("five stops", _user(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("empty stop", _user(stop=""), "stop"),
    ("empty stop in a list", _user(stop=["a", ""]), "stop"),
    ("stop a number", _user(stop=[1]), "stop"),
    ("stop null in a list", _user(stop=["a", None]), "stop"),
    # logprobs
    ("top_logprobs 21", _user(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("top_logprobs negative", _user(logprobs=True, top_logprobs=-1), "top_logprobs"),
    ("top_logprobs without logprobs", _user(top_logprobs=2), "top_logprobs"),
    # text that is not Unicode: JSON spells a lone surrogate with an escape
    ("lone high surrogate", _raw("", '"\\ud800"'), SURROGATE),
    ("lone low surrogate", _raw("", '"ok \\udfff"'), SURROGATE),
    ("reversed surrogate pair", _raw("", '"\\ude00\\ud83d"'), SURROGATE),
    ("surrogate in a text part", _raw("", '[{"type": "text", "text": "a\\ud800"}]'),
     SURROGATE),
    ("surrogate in a name", b'{"messages": [{"role": "user", "content": "hi", "name": "\\ud800"}]}', SURROGATE),
    ("surrogate in a stop", _raw('"stop": ["\\udc00"]'), SURROGATE),
    ("surrogate in user", _raw('"user": "\\ud800"'), SURROGATE),
    ("surrogate in model", _raw('"model": "\\ud800"'), SURROGATE),
    ("surrogate in an image url", _raw("", '[{"type": "image_url", "image_url": {"url": "data:\\ud800"}}]'),
     SURROGATE),
    ("surrogate in a field name", _raw('"\\ud800": 1'), SURROGATE),
    # malformed JSON
    ("truncated JSON", b'{"messages": [{"role": "user", "content": "hi"', "json"),
    ("NaN as the body", b"NaN", "json"),
    ("deeply nested", b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", ("nest", "json", "pars")),
    ("invalid UTF-8 bytes", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', ("utf-8", "json", "pars")),
    ("empty content list", {"messages": [{"role": "user", "content": []}]}, "empty"),
]

GREEDY = "greedy"  # an accepted request whose answer must equal the greedy one: a tiny temperature, top_k 1, ...

# (name, body, what to check): each must be accepted with a 200
ACCEPTED: list[tuple[str, object, str | None]] = [
    ("temperature 1e-300", _user(temperature=1e-300), GREEDY),
    ("temperature 1e-40", _user(temperature=1e-40), GREEDY),
    ("temperature the least float", _user(temperature=5e-324), GREEDY),
    ("temperature 1e-300 with logprobs", _user(temperature=1e-300, logprobs=True, top_logprobs=20), GREEDY),
    ("top_p 1e-300", _user(temperature=1, top_p=1e-300), GREEDY),
    ("top_k 1", _user(temperature=2, top_k=1), GREEDY),
    ("temperature 1e-300 and repetition_penalty 1e-300", _user(temperature=1e-300, repetition_penalty=1e-300),
     None),
    ("repetition_penalty 1e-300 sampled", _user(temperature=1, repetition_penalty=1e-300), None),
    ("repetition_penalty 1e300 sampled", _user(temperature=1, repetition_penalty=1e300), None),
    ("repetition_penalty 1e-300 greedy", _user(temperature=0, repetition_penalty=1e-300), None),
    ("top_k 2**62", _user(temperature=1, top_k=2**62), None),
    ("top_k -1", _user(temperature=1, top_k=-1), None),
    ("temperature 2, top_p 1", _user(temperature=2, top_p=1), None),
    ("seed 2**63 - 1 with 16 choices", _user(temperature=2, seed=2**63 - 1, n=16), None),
    ("seed -2**63", _user(temperature=1, seed=-(2**63)), None),
    ("seed 0", _user(temperature=1, seed=0), None),
    ("min_tokens equal to max_tokens", _user(min_tokens=4), None),
    ("presence and frequency penalties 0", _user(presence_penalty=0, frequency_penalty=-0.0), None),
    ("empty logit_bias", _user(logit_bias={}), None),
    ("a stop of 100,000 characters", _user(temperature=1, stop=["x" * 100_000]), None),
    ("a valid surrogate pair", _raw("", '"smile \\ud83d\\ude00"'), None),
    ("sampled with logprobs", _user(temperature=2, logprobs=True, top_logprobs=20, min_tokens=4), None),
]


@pytest.fixture(scope="module")
def greedy_answers(tiny_pipeline) -> dict[str, str]:
    """The well-formed request's answer and the hostile greedy one's, computed before the server shares the model."""
    good = tiny_pipeline.chat(GOOD["messages"], max_new_tokens=GOOD_TOKENS, min_new_tokens=GOOD_TOKENS)
    return {"good": good, GREEDY: tiny_pipeline.chat(_user()["messages"], max_new_tokens=4)}


@pytest.fixture(scope="module")
def url(tiny_pipeline, greedy_answers) -> str:
    app = create_app(tiny_pipeline, ServerSettings(model_name="tiny", default_temperature=0.0))
    with serve_in_thread(app) as base:
        yield base


async def _post(client: httpx.AsyncClient, body: object) -> httpx.Response:
    if isinstance(body, bytes):
        return await client.post(CHAT, content=body, headers={"content-type": "application/json"})
    return await client.post(CHAT, json=body)


async def _beside_a_good_stream(url: str, body: object) -> tuple[httpx.Response, str, list[str]]:
    """Send ``body`` once the good request has begun streaming; -> its response, the good request's text and the
    finish reasons (or error messages) of its stream."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client, client.stream("POST", CHAT, json=GOOD) as good:
        assert good.status_code == 200
        lines = good.aiter_lines()
        text, ends = [], []

        async def read(until_first_token: bool) -> None:
            async for line in lines:
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    ends.append(f"error: {chunk['error']['message']}")
                    return
                choice = chunk["choices"][0]
                text.append(choice["delta"].get("content") or "")
                if choice["finish_reason"]:
                    ends.append(choice["finish_reason"])
                if until_first_token and text[-1]:
                    return

        await read(until_first_token=True)
        hostile = await _post(client, body)
        await read(until_first_token=False)
    return hostile, "".join(text), ends


def _exchange(url: str, body: object) -> tuple[httpx.Response, str, list[str]]:
    # a hang fails the test instead of stalling the suite
    return asyncio.run(asyncio.wait_for(_beside_a_good_stream(url, body), timeout=60))


def _check_good(greedy_answers: dict[str, str], text: str, ends: list[str]) -> None:
    assert ends == ["length"], f"the well-formed request was harmed: {ends}"
    assert text == greedy_answers["good"]


@pytest.mark.parametrize(("name", "body", "words"), REFUSED, ids=[case[0] for case in REFUSED])
def test_refused_with_a_clear_400_while_a_good_request_runs(url, greedy_answers, name, body, words):
    response, text, ends = _exchange(url, body)
    assert response.status_code == 400, f"{name}: {response.status_code} {response.text[:300]}"
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    message = error["message"]
    assert message and "\n" not in message and len(message) < 400, message
    alternatives = (words,) if isinstance(words, str) else words
    assert any(w.lower() in message.lower() for w in alternatives), f"{name}: {message!r}"
    _check_good(greedy_answers, text, ends)


@pytest.mark.parametrize(("name", "body", "check"), ACCEPTED, ids=[case[0] for case in ACCEPTED])
def test_accepted_at_the_boundary_while_a_good_request_runs(url, greedy_answers, name, body, check):
    response, text, ends = _exchange(url, body)
    assert response.status_code == 200, f"{name}: {response.status_code} {response.text[:300]}"
    reply = response.json()
    want = body.get("n", 1) if isinstance(body, dict) else 1
    assert len(reply["choices"]) == want
    for choice in reply["choices"]:
        assert choice["finish_reason"] in ("stop", "length")
        for entry in (choice["logprobs"] or {}).get("content") or []:
            assert math.isfinite(entry["logprob"]) and entry["logprob"] <= 0
            assert all(math.isfinite(top["logprob"]) for top in entry["top_logprobs"])
    if check == GREEDY:
        assert reply["choices"][0]["message"]["content"] == greedy_answers[GREEDY]
    _check_good(greedy_answers, text, ends)


def test_the_server_is_still_idle_and_healthy_after_the_corpus(url):
    with httpx.Client(base_url=url, timeout=10) as client:
        health = client.get("/health").json()
    assert health["status"] == "ok" and health["waiting"] == 0


# (name, route, body, status, words): an error message quotes the client's input briefly, however long it is
_LONG = "k" * 100_000
_DIGITS = "9" * 999
LONG_ECHOES: list[tuple[str, str, object, int, str]] = [
    ("max_tokens of 999 digits", CHAT, _raw(f'"max_tokens": {_DIGITS}').replace(b'"max_tokens": 4, ', b""), 400,
     "max_tokens of 999 digits"),
    ("min_tokens of 999 digits", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "min_tokens": '
     + _DIGITS.encode() + b"}", 400, "min_tokens of 999 digits"),
    ("an unknown field of 100,000 characters", CHAT, {**_user(), _LONG: 1}, 400, "extra inputs"),
    ("a content part type of 100,000 characters", CHAT,
     {"messages": [{"role": "user", "content": [{"type": _LONG}]}]}, 400, "messages[0].content"),
    ("a model name of 100,000 characters", CHAT, {**_user(), "model": _LONG}, 404, "does not exist"),
    ("NaN under a key of 100,000 characters", CHAT, b'{"' + _LONG.encode() + b'": {"a": NaN}}', 400, "finite"),
    ("a rating model name of 100,000 characters", "/v1/rate", {"items": [{"image_url": "data:,"}], "model": _LONG},
     404, "does not exist"),
    ("an unknown rating field of 100,000 characters", "/v1/rate", {"items": [{"image_url": "data:,"}], _LONG: 1},
     400, "extra inputs"),
]


@pytest.mark.parametrize(("name", "route", "body", "status", "words"), LONG_ECHOES,
                         ids=[case[0] for case in LONG_ECHOES])
def test_error_messages_quote_long_input_briefly(url, name, route, body, status, words):
    """Messages quoted the client's field names, model names and numbers whole: a 100 kB name came back twice."""
    with httpx.Client(base_url=url, timeout=30) as client:
        if isinstance(body, bytes):
            response = client.post(route, content=body, headers={"content-type": "application/json"})
        else:
            response = client.post(route, json=body)
    assert response.status_code == status, f"{name}: {response.status_code} {response.text[:300]}"
    assert len(response.content) < 1000, f"{name}: {len(response.content):,} bytes: {response.text[:300]}"
    error = response.json()["error"]
    assert "\n" not in error["message"] and words.lower() in error["message"].lower(), error["message"]


# ------------------------------------------------------------------------------------------ the protocol alone
@pytest.mark.parametrize(("body", "where"), [
    ({"messages": [{"role": "user", "content": "ok \ud800"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "\udc00"]}, "stop[1]"),
])
def test_the_protocol_names_where_a_lone_surrogate_is(body, where):
    """The models refuse lone surrogates themselves, whoever parsed the JSON (a Python caller, another host)."""
    for model in (ChatCompletionRequest, LenientChatCompletionRequest):
        with pytest.raises(ValidationError, match=re.escape(f"{where} is not valid Unicode")):
            model.model_validate(body)
    with pytest.raises(ValidationError, match=r"levels\[1\] is not valid Unicode"):
        RateRequest.model_validate({"items": [{"image_url": "data:,"}], "levels": ["good", "b\ud800d"]})


def test_the_unicode_check_takes_any_depth_and_length():
    deep: list = []
    for _ in range(20_000):  # deeper than the recursion limit: the walk must not recurse
        deep = [deep]
    assert check_unicode({"a": deep, "b": list(range(100_000))})["b"][-1] == 99_999
    deep[0][0][0].append("\ud800")
    with pytest.raises(ValueError, match="not valid Unicode"):
        check_unicode({"a": deep})


def test_lenient_mode_still_refuses_known_fields_it_cannot_honour():
    body = {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 10}}
    with pytest.raises(ValidationError, match="logit_bias is not supported"):
        LenientChatCompletionRequest.model_validate(body)
    assert LenientChatCompletionRequest.model_validate({**body, "logit_bias": None, "frobnicate": 1}).n == 1
