"""The chat page at ``/`` in a real headless Chromium (Playwright) against a real ``owl2 serve`` process: upload an
image, ask, watch the answer stream in, ask again (multi-turn), reset; the answers must equal the in-process
pipeline's greedy ones, and the page must never reach beyond the server. With the embedded owl2-tiny the page says
what the model knows and offers its example scene and questions, which must work with one click."""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.serving.conftest import ServerProcess, expected_answer, png_bytes, scene, start_server

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Chromium at /usr/bin/chromium (Debian's chromium package)")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (pip install playwright)")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
TIMEOUT_MS = 60_000
PAGE_MAX_TOKENS = 40  # the test sets the page's max tokens field to this

# Every text the page puts into an assistant answer while it streams, from a MutationObserver installed by the test
# (the page itself exposes nothing). ``answer.textContent += delta`` replaces the span's text node, so each update is
# one childList record whose added node holds the text as it was then; ``batch`` counts the observer callbacks, one
# per task in which the page wrote text, so more than one batch means the deltas did not all arrive at once.
OBSERVE = """() => {
  window.__updates = [];
  window.__states = [];
  let batch = 0;
  new MutationObserver((records) => {
    batch += 1;
    for (const r of records) {
      if (r.type === "attributes" && r.target.matches("div.msg.assistant")) {
        window.__states.push(r.target.dataset.state);
      } else if (r.target.matches && r.target.matches("div.msg.assistant > span.text")) {
        const node = r.addedNodes[0];
        window.__updates.push({text: node ? node.data : "", batch: batch});
      }
    }
  }).observe(document.getElementById("log"),
             {childList: true, subtree: true, characterData: true, attributes: true, attributeFilter: ["data-state"]});
}"""

# Resolves when the n-th assistant answer is done, or when an error message appears instead.
SETTLED = """(n) => {
  return document.querySelector("#log .msg.error") !== null
    || (document.querySelectorAll("#log .msg.assistant")[n] || {dataset: {}}).dataset.state === "done";
}"""


@pytest.fixture(scope="module")
def page_server(tiny_checkpoint) -> Iterator[ServerProcess]:
    process = start_server(tiny_checkpoint)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def take_updates(page) -> list[dict]:
    """The text updates since the last call; asserts the answer went from ``streaming`` to ``done``."""
    states = page.evaluate("() => window.__states.splice(0)")
    assert states == ["streaming", "done"], f"data-state of the answer changed {states}"
    return page.evaluate("() => window.__updates.splice(0)")


def ask(page, posted: list[dict], question: str, turn: int) -> tuple[list[dict], str, list[dict]]:
    """Type ``question``, send it, wait for the answer; -> (the request bodies the page posted, answer, updates)."""
    before = len(posted)
    page.fill("#prompt", question)
    page.click("#send")
    page.wait_for_function(SETTLED, arg=turn, timeout=TIMEOUT_MS)
    errors = page.locator("#log .msg.error")
    assert errors.count() == 0, f"the page shows an error: {errors.first.text_content()!r}"
    answer = page.locator("#log .msg.assistant").nth(turn).locator("span.text").evaluate("e => e.textContent")
    sync_api.expect(page.locator("#send")).to_be_enabled()
    return posted[before:], answer, take_updates(page)


def assert_posted(bodies: list[dict], messages: list[dict]) -> None:
    """One streamed request per turn with the page's settings (max tokens set by the test, temperature 0)."""
    assert len(bodies) == 1, f"expected one POST /v1/chat/completions for the turn, saw {len(bodies)}"
    assert bodies[0]["messages"] == messages
    assert bodies[0]["stream"] is True and bodies[0]["temperature"] == 0
    assert bodies[0]["max_tokens"] == PAGE_MAX_TOKENS


def assert_streamed(updates: list[dict], answer: str) -> None:
    texts = [u["text"] for u in updates]
    assert len(texts) > 1, f"the answer appeared in {len(texts)} update(s), not streamed: {texts!r}"
    assert texts[-1] == answer
    for shorter, longer in itertools.pairwise(texts):  # it only grows, each text a prefix of the next
        assert len(longer) > len(shorter) and longer.startswith(shorter)
    assert len({u["batch"] for u in updates}) > 1, "every delta was written in one task: the stream was buffered"


def open_page(browser) -> tuple[Any, Any, list[str], list[str], list[dict]]:
    """A fresh browser context and page; -> (context, page, every URL requested, console errors, the bodies posted
    to /v1/chat/completions), the lists filled as the page runs."""
    context = browser.new_context()
    requests: list[str] = []
    context.on("request", lambda request: requests.append(request.url))
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    console_errors: list[str] = []
    page.on("console", lambda message: console_errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: console_errors.append(f"uncaught: {error}"))
    posted: list[dict] = []
    page.on("request", lambda request: posted.append(json.loads(request.post_data))
            if request.method == "POST" and urlsplit(request.url).path == "/v1/chat/completions" else None)
    return context, page, requests, console_errors, posted


def assert_self_contained(server_url: str, requests: list[str], console_errors: list[str]) -> None:
    """No script error, and no request beyond the server (no CDN)."""
    assert console_errors == []
    server = urlsplit(server_url)
    foreign = [url for url in requests if urlsplit(url).scheme not in ("data", "blob")
               and (urlsplit(url).scheme, urlsplit(url).netloc) != (server.scheme, server.netloc)]
    assert foreign == [], f"the page reached beyond the server: {foreign}"


def test_chat_page_streams_multi_turn_answers_equal_to_the_pipeline(page_server, browser, tiny_pipeline, tmp_path):
    image = png_bytes(scene("red"))
    image_path = tmp_path / "red.png"
    image_path.write_bytes(image)
    image_url = "data:image/png;base64," + base64.b64encode(image).decode()

    context, page, requests, console_errors, posted = open_page(browser)

    try:
        response = page.goto(page_server.url + "/")
        assert response is not None and response.ok
        assert page.locator("#model-name").text_content() == "tiny"
        sync_api.expect(page.locator("#examples")).to_be_hidden()  # examples only for the embedded model
        assert page.locator("#temperature").input_value() == "0"
        page.fill("#max-tokens", str(PAGE_MAX_TOKENS))  # short answers: the random model never stops by itself
        page.evaluate(OBSERVE)

        # Turn 1: an image and a question.
        page.set_input_files("#image", str(image_path))
        sync_api.expect(page.locator("#preview")).to_be_visible()  # the FileReader has read the file
        question = "What is in the picture?"
        bodies, answer1, updates = ask(page, posted, question, turn=0)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                 {"type": "text", "text": question}]}]
        turns = [bodies]
        assert len(bodies) == 1
        assert_posted(bodies, messages)  # the image went as a data URL of the file's very bytes
        assert answer1 == expected_answer(tiny_pipeline, messages, PAGE_MAX_TOKENS)
        assert answer1.strip(), "empty answer"
        assert_streamed(updates, answer1)
        user = page.locator("#log .msg.user").nth(0)
        assert user.locator("span.text").text_content() == question
        assert user.locator("img").get_attribute("src") == image_url
        sync_api.expect(page.locator("#preview")).to_be_hidden()

        # Turn 2: a follow-up without an image; the page sends the whole history.
        follow_up = "And what colour is it?"
        bodies, answer2, updates = ask(page, posted, follow_up, turn=1)
        messages = [*messages, {"role": "assistant", "content": answer1},
                    {"role": "user", "content": [{"type": "text", "text": follow_up}]}]
        turns.append(bodies)
        assert_posted(bodies, messages)
        assert answer2 == expected_answer(tiny_pipeline, messages, PAGE_MAX_TOKENS)
        assert_streamed(updates, answer2)
        assert page.locator("#log .msg").count() == 4

        # Reset: the log is empty, and the next question starts a new conversation.
        page.click("#reset")
        sync_api.expect(page.locator("#log > *")).to_have_count(0)
        assert page.locator("#log").evaluate("e => e.textContent") == ""
        sync_api.expect(page.locator("#preview")).to_be_hidden()
        assert page.locator("#image").input_value() == ""
        fresh = "Hello"
        bodies, answer3, _ = ask(page, posted, fresh, turn=0)
        messages = [{"role": "user", "content": [{"type": "text", "text": fresh}]}]
        turns.append(bodies)
        assert len(bodies) == 1
        assert_posted(bodies, messages)
        assert answer3 == expected_answer(tiny_pipeline, messages, PAGE_MAX_TOKENS)
    finally:
        context.close()

    assert_self_contained(page_server.url, requests, console_errors)
    assert any(urlsplit(url).path == "/v1/chat/completions" for url in requests)


@pytest.fixture(scope="module")
def embedded_page_server() -> Iterator[ServerProcess]:
    process = start_server(None)  # no --model: the embedded owl2-tiny
    yield process
    process.stop()


def click_example(page, posted: list[dict], question: str, turn: int) -> tuple[list[dict], str]:
    """Click the example question ``question``; -> (the request bodies the page posted, the answer)."""
    before = len(posted)
    page.get_by_role("button", name=question, exact=True).click()
    page.wait_for_function(SETTLED, arg=turn, timeout=TIMEOUT_MS)
    errors = page.locator("#log .msg.error")
    assert errors.count() == 0, f"the page shows an error: {errors.first.text_content()!r}"
    sync_api.expect(page.locator("#send")).to_be_enabled()
    answer = page.locator("#log .msg.assistant").nth(turn).locator("span.text").evaluate("e => e.textContent")
    return posted[before:], answer


def test_chat_page_of_the_embedded_model_offers_the_example_scene(embedded_page_server, browser):
    import owl2
    from owl2.api import EMBEDDED_EXAMPLE_QUESTIONS
    from owl2.serving.app import EMBEDDED_PAGE_NOTICE, EXAMPLE_SCENE_PATH

    pipeline = owl2.load(dtype="fp32", device="cpu", show_progress=False)  # what the server runs
    scene_png = httpx.get(embedded_page_server.url + EXAMPLE_SCENE_PATH, timeout=30).content
    scene_url = "data:image/png;base64," + base64.b64encode(scene_png).decode()

    context, page, requests, console_errors, posted = open_page(browser)
    try:
        assert page.goto(embedded_page_server.url + "/").ok
        assert page.locator("#model-name").text_content() == "owl2-tiny"
        sync_api.expect(page.locator("#examples")).to_be_visible()
        assert page.locator("#examples-notice").text_content() == EMBEDDED_PAGE_NOTICE
        assert page.locator("#example-questions button").all_text_contents() == list(EMBEDDED_EXAMPLE_QUESTIONS)
        page.wait_for_function("() => document.querySelector('#example-scene img').naturalWidth === 64")
        page.fill("#max-tokens", str(PAGE_MAX_TOKENS))

        # One click: the example scene goes along with the question, as a data URL of the served PNG.
        first = EMBEDDED_EXAMPLE_QUESTIONS[0]
        bodies, answer = click_example(page, posted, first, turn=0)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": scene_url}},
                                                 {"type": "text", "text": first}]}]
        assert_posted(bodies, messages)
        assert answer == expected_answer(pipeline, messages, PAGE_MAX_TOKENS)
        assert first == "How many circles are there?" and answer.strip().endswith("2")  # the README's answer
        assert page.locator("#log .msg.user img").get_attribute("src") == scene_url

        # The next example question follows up on the same picture: the scene is not attached a second time.
        second = EMBEDDED_EXAMPLE_QUESTIONS[1]
        bodies, answer2 = click_example(page, posted, second, turn=1)
        messages = [*messages, {"role": "assistant", "content": answer},
                    {"role": "user", "content": [{"type": "text", "text": second}]}]
        assert_posted(bodies, messages)
        assert answer2 == expected_answer(pipeline, messages, PAGE_MAX_TOKENS)

        # After a reset, the thumbnail attaches the scene to a question of one's own.
        page.click("#reset")
        page.click("#example-scene")
        sync_api.expect(page.locator("#preview")).to_be_visible()
        assert page.locator("#preview").get_attribute("src") == scene_url
        own = "Is there a yellow circle?"
        bodies, answer3 = ask_plain(page, posted, own)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": scene_url}},
                                                 {"type": "text", "text": own}]}]
        assert_posted(bodies, messages)
        assert answer3 == expected_answer(pipeline, messages, PAGE_MAX_TOKENS)
    finally:
        context.close()
    assert_self_contained(embedded_page_server.url, requests, console_errors)


def ask_plain(page, posted: list[dict], question: str) -> tuple[list[dict], str]:
    """Type and send ``question`` as the first turn of a fresh conversation; -> (the bodies posted, the answer)."""
    before = len(posted)
    page.fill("#prompt", question)
    page.click("#send")
    page.wait_for_function(SETTLED, arg=0, timeout=TIMEOUT_MS)
    assert page.locator("#log .msg.error").count() == 0
    sync_api.expect(page.locator("#send")).to_be_enabled()
    answer = page.locator("#log .msg.assistant").nth(0).locator("span.text").evaluate("e => e.textContent")
    return posted[before:], answer
