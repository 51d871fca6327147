"""The generation engine on the official tiny model: parity, batching, stopping, streaming, caching, scoring."""

from __future__ import annotations

import pytest
import sentencepiece as spm
import torch

from owl2.generation import GenerationEngine, GenerationRequest, ImageEmbeddingCache, SamplingParams
from tests.conftest import FIXTURES, official, random_official_ids

SP = spm.SentencePieceProcessor(model_file=str(FIXTURES / "llama2-tokenizer" / "tokenizer.model"))


def make_engine(model, **kwargs) -> GenerationEngine:
    return GenerationEngine(model, SP.decode, eos_token_id=kwargs.pop("eos_token_id", None), **kwargs)


def greedy(n: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, **kwargs)


def image_request(oracle, **kwargs) -> GenerationRequest:
    return GenerationRequest(oracle["input_ids_image"][0].tolist(), oracle["image"], greedy(8, **kwargs))


def test_greedy_generation_matches_the_official_tokens(tiny_fp32, oracle):
    result = make_engine(tiny_fp32).generate([image_request(oracle)])[0]
    assert result.token_ids == oracle["generate_new_tokens"][0].tolist()
    assert result.text == SP.decode(result.token_ids)
    assert result.finish_reason == "length"
    assert result.prompt_tokens == 14 - 1 + 9


def mixed_requests(model, n_new: int = 6) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(11)
    size = model.config.vision.image_size
    requests = []
    for n_text, n_images in ((10, 0), (5, 1), (3, 2), (8, 1)):
        ids = random_official_ids(g, n_text, n_images, model.config.vocab_size).tolist()
        images = torch.randn(n_images, 3, size, size, generator=g) if n_images else None
        requests.append(GenerationRequest(ids, images, greedy(n_new)))
    return requests


def test_batched_rows_equal_rows_alone(tiny_fp32):
    engine = make_engine(tiny_fp32)
    requests = mixed_requests(tiny_fp32)
    batched = engine.generate(requests)
    for request, result in zip(requests, batched, strict=True):
        alone = engine.generate([request])[0]
        assert result.token_ids == alone.token_ids
        assert result.text == alone.text


def test_rows_stop_independently_on_eos(tiny_fp32, oracle):
    expected = oracle["generate_new_tokens"][0].tolist()
    engine = make_engine(tiny_fp32, eos_token_id=expected[3])
    requests = [image_request(oracle), *mixed_requests(tiny_fp32)[:2]]
    results = engine.generate(requests)
    assert results[0].token_ids == expected[:3] and results[0].finish_reason == "stop"
    for request, result in zip(requests[1:], results[1:], strict=True):
        assert result.token_ids == make_engine(tiny_fp32, eos_token_id=expected[3]).generate([request])[0].token_ids
    # a request's own stop ids replace the engine's EOS
    own = engine.generate([image_request(oracle, stop_token_ids=[expected[1]])])[0]
    assert own.token_ids == expected[:1]


def test_min_new_tokens_masks_the_stop_ids(tiny_fp32, oracle):
    expected = oracle["generate_new_tokens"][0].tolist()
    engine = make_engine(tiny_fp32, eos_token_id=expected[0])
    assert engine.generate([image_request(oracle)])[0].token_ids == []
    held = engine.generate([image_request(oracle, min_new_tokens=3)])[0]
    # The first 3 steps may not pick the EOS id: the first token is the best other id, and the row goes on.
    logits = tiny_fp32(**official(oracle["input_ids_image"], pixel_values=oracle["image"])).logits[0, -1]
    logits[expected[0]] = float("-inf")
    assert held.token_ids[0] == int(logits.argmax()) and len(held.token_ids) >= 3
    assert expected[0] not in held.token_ids[:3]
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=2, min_new_tokens=3)


def test_stop_string_ends_a_row(tiny_fp32, oracle):
    engine = make_engine(tiny_fp32)
    full = engine.generate([image_request(oracle)])[0]
    stop = full.text[len(full.text) // 2:][:2]
    assert stop.strip()
    cut = engine.generate([image_request(oracle, stop=[stop])])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]


def test_stream_deltas_concatenate_to_the_generated_text(tiny_fp32):
    engine = make_engine(tiny_fp32)
    for request in mixed_requests(tiny_fp32, n_new=12):
        deltas = list(engine.stream(request))
        # (the random tiny model may emit invalid UTF-8, so U+FFFD can be part of the final text itself)
        assert "".join(deltas) == engine.generate([request])[0].text


def test_sampling_with_a_seed_is_reproducible_and_batch_independent(tiny_fp32):
    engine = make_engine(tiny_fp32)
    base = mixed_requests(tiny_fp32)
    params = SamplingParams(max_new_tokens=6, temperature=1.5, top_p=0.9, top_k=50, repetition_penalty=1.2, seed=3)
    sampled = [GenerationRequest(r.prompt_ids, r.images, params) for r in base]
    first = engine.generate(sampled)
    assert [r.token_ids for r in first] == [r.token_ids for r in engine.generate(sampled)]
    assert first[1].token_ids == engine.generate([sampled[1]])[0].token_ids
    greedy_ids = [r.token_ids for r in engine.generate(base)]
    assert [r.token_ids for r in first] != greedy_ids


def test_images_are_encoded_once_per_session(tiny_fp32, oracle):
    cache = ImageEmbeddingCache(capacity=8)
    engine = make_engine(tiny_fp32, image_cache=cache)
    calls = []
    handle = tiny_fp32.model.vision_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        engine.generate([image_request(oracle)])
        engine.generate([image_request(oracle), image_request(oracle)])
        list(engine.stream(image_request(oracle)))
    finally:
        handle.remove()
    assert len(calls) == 1 and cache.misses == 1 and cache.hits == 3


def test_image_cache_is_bounded(tiny_fp32):
    cache = ImageEmbeddingCache(capacity=2)
    images = torch.randn(3, 3, 56, 56)
    cache.encode(tiny_fp32, images)
    assert len(cache) == 2


@torch.no_grad()
def test_loglikelihoods_equal_a_full_forward(tiny_fp32, oracle):
    engine = make_engine(tiny_fp32, max_batch_size=2)
    prompt = oracle["input_ids_image"][0].tolist()
    continuations = [[17, 40], [201], [9, 9, 9]]
    scores = engine.loglikelihoods(prompt, oracle["image"], continuations)
    for score, cont in zip(scores, continuations, strict=True):
        batch = official(torch.tensor([prompt + cont]), pixel_values=oracle["image"])
        logprobs = tiny_fp32(**batch).logits[0].float().log_softmax(-1)
        n = len(cont)
        expected = sum(logprobs[-n - 1 + k, t] for k, t in enumerate(cont))
        assert score.item() == pytest.approx(expected.item(), abs=1e-4)


def test_context_length_and_image_count_errors(tiny_fp32, oracle):
    engine = make_engine(tiny_fp32, context_length=20)
    with pytest.raises(ValueError, match=r"takes 22 positions .* context of 20"):
        engine.generate([image_request(oracle)])
    short = make_engine(tiny_fp32, context_length=25).generate([image_request(oracle)])[0]
    assert len(short.token_ids) == 3 and short.finish_reason == "length"  # cut to fit the context
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\) but 0 image"):
        engine.generate([GenerationRequest(oracle["input_ids_image"][0].tolist(), None, greedy(2))])
