"""The official ``openai`` client against a real ``owl2 serve`` process: chat, images, streaming, n, logprobs."""

from __future__ import annotations

import openai
import pytest

from tests.serving.conftest import data_url, expected_answer, scene


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def image_message(colour: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(scene(colour))}},
                                         {"type": "text", "text": question}]}]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_with_an_image_equals_the_pipeline(client, tiny_pipeline):
    messages = image_message("red", "What is in the picture?")
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected_answer(tiny_pipeline, messages, 12)
    assert reply.choices[0].finish_reason in ("stop", "length")
    request = tiny_pipeline.request([{"role": "user", "content": [
        {"type": "image", "image": scene("red")}, {"type": "text", "text": "What is in the picture?"}]}])
    text_tokens = sum(1 for t in request.prompt_ids if t >= 0)
    per_image = tiny_pipeline.model.config.tokens_per_image
    assert reply.usage.prompt_tokens == text_tokens + per_image  # each image counts its visual tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_concatenates_to_the_full_answer(client, tiny_pipeline):
    messages = image_message("blue", "Describe it.")
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_answer(tiny_pipeline, messages, 10)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_multi_turn_text_and_stop(client, tiny_pipeline):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Name a colour."}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert full.choices[0].message.content == expected_answer(tiny_pipeline, messages, 16)
    words = full.choices[0].message.content.split()
    if len(words) > 2:  # stop at the third word: the answer is cut before it
        cut = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                             stop=[words[2]])
        assert cut.choices[0].finish_reason == "stop"
        assert words[2] not in cut.choices[0].message.content


def test_n_choices_seed_and_logprobs(client):
    messages = image_message("green", "What colour?")
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=1.0, n=3,
                                           seed=11, logprobs=True, top_logprobs=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=1.0, n=3,
                                           seed=11, logprobs=True, top_logprobs=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]
    for choice in reply.choices:
        entries = choice.logprobs.content
        assert entries and len(entries) <= 6
        for entry in entries:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
            best = entry.top_logprobs[0].logprob
            assert all(t.logprob <= best + 1e-6 for t in entry.top_logprobs)
            assert entry.logprob <= best + 1e-6


def test_errors_come_back_as_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="images"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(scene())}} for _ in range(5)]}])
