"""Prefix caching: the cache's lookups, budget and counters, and the engine's greedy outputs and first-token logits
with reused prefixes equal to those of full prefills (a randomised official tiny model, float32)."""

from __future__ import annotations

import pytest
import sentencepiece as spm
import torch

import owl2
from owl2.generation import GenerationEngine, GenerationRequest, SamplingParams
from owl2.generation.prefix_cache import PrefixCache, PrefixKey
from tests.conftest import FIXTURES, OFFICIAL_TINY, randomize_

SP = spm.SentencePieceProcessor(model_file=str(FIXTURES / "llama2-tokenizer" / "tokenizer.model"))
IMAGE_ID, PER_IMAGE = 32000, 4
SYSTEM = [1, *range(40, 60)]  # a system prompt of 21 ids: more than one block of the default 16 positions


# ------------------------------------------------------------------------------------------------ the cache alone
def text_key(ids: list[int]) -> PrefixKey:
    return PrefixKey.build(ids, [], image_token_index=IMAGE_ID, tokens_per_image=PER_IMAGE)


def kv(n: int, fill: float = 0.0, layers: int = 2, heads: int = 1, dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys whose value at position p is ``fill + p`` (so a hit's slice shows where it came from), and values."""
    keys = (fill + torch.arange(n, dtype=torch.float32))[None, None, :, None].expand(layers, heads, n, dim).clone()
    return keys, -keys


def image_key(before: list[int], images: list[str], after: list[int]) -> PrefixKey:
    ids = before + [IMAGE_ID] * PER_IMAGE * len(images) + after
    return PrefixKey.build(ids, images, image_token_index=IMAGE_ID, tokens_per_image=PER_IMAGE)


def test_longest_prefix_wins_and_the_last_position_is_left():
    cache = PrefixCache(1 << 20, block_size=1)
    cache.insert(text_key([1, 2, 3]), *kv(3, 100))
    cache.insert(text_key([1, 2, 9, 9, 9]), *kv(5, 200))
    hit = cache.lookup(text_key([1, 2, 9, 9, 5, 6]))
    assert hit.length == 4 and hit.keys[0, 0, :, 0].tolist() == [200, 201, 202, 203]
    torch.testing.assert_close(hit.values, -hit.keys)
    # a prompt equal to an entry still leaves its last position to prefill (its logits give the first token)
    assert cache.lookup(text_key([1, 2, 3])).length == 2
    assert cache.lookup(text_key([7, 1, 2])) is None
    assert cache.lookup(text_key([1])) is None  # one position: nothing may be reused
    assert (cache.stats.hits, cache.stats.misses, cache.stats.reused_tokens) == (2, 2, 6)


def test_images_match_by_content_and_a_hit_never_cuts_an_image():
    cache = PrefixCache(1 << 20, block_size=1)
    cache.insert(image_key([1, 5], ["red"], [6, 7, 8]), *kv(9))
    assert cache.lookup(image_key([1, 5], ["red"], [6, 7, 9])).length == 8
    assert cache.lookup(image_key([1, 5], ["blue"], [6, 7, 8])).length == 2  # same ids, another image: up to it
    # ending at the image's last position would leave part of it to prefill: the hit goes back to its start
    assert cache.lookup(image_key([1, 5], ["red"], [])).length == 2
    assert cache.lookup(image_key([1, 5], ["red"], [6])).length == 6


def test_an_image_tag_collision_is_caught_by_the_content_keys():
    cache = PrefixCache(1 << 20, block_size=1)
    red = image_key([1, 5], ["red"], [6, 7])
    cache.insert(red, *kv(len(red)))
    forged = PrefixKey(red.codes.clone(), ("blue",), red.starts)  # the codes of red, the content of another image
    assert cache.lookup(forged).length == 2


def test_lru_eviction_within_the_budget():
    one = 2 * kv(4)[0].numel() * 4  # bytes of an entry of 4 positions (keys and values, float32)
    cache = PrefixCache(3 * one, block_size=1)
    for first in (10, 20, 30):
        cache.insert(text_key([first, 1, 2, 3]), *kv(4, first))
    assert cache.lookup(text_key([10, 1, 2, 3, 4])).length == 4  # 10 becomes the most recently used
    cache.insert(text_key([40, 1, 2, 3]), *kv(4, 40))  # over the budget: 20, the least recently used, goes
    assert cache.stats.evictions == 1 and cache.stats.entries == 3 and cache.stats.bytes == 3 * one
    assert cache.lookup(text_key([20, 1, 2, 3, 4])) is None
    assert cache.lookup(text_key([30, 1, 2, 3, 4])).length == 4
    cache.insert(text_key([50, 1, 2, 3]), *kv(4, 50))  # now 10 is the oldest
    assert cache.lookup(text_key([10, 1, 2, 3, 4])) is None and len(cache) == 3
    assert not cache.insert(text_key(list(range(16))), *kv(16))  # larger than the whole budget: not kept
    assert cache.stats.bytes == 3 * one


def test_an_entry_that_a_longer_one_extends_is_dropped():
    cache = PrefixCache(1 << 20, block_size=1)
    cache.insert(text_key([1, 2, 3]), *kv(3))
    cache.insert(text_key([1, 2, 3, 4, 5]), *kv(5))  # the next turn: the previous one is of no more use
    assert len(cache) == 1 and cache.stats.bytes == 2 * kv(5)[0].numel() * 4
    cache.insert(text_key([1, 2, 3]), *kv(3))  # already held by the longer entry
    assert len(cache) == 1 and cache.stats.evictions == 0
    with pytest.raises(ValueError, match="must be"):
        cache.insert(text_key([1, 2]), *kv(3))


def test_entries_are_found_through_their_blocks():
    cache = PrefixCache(1 << 24, block_size=4)
    system = [1, 5, 6, 7, 8, 9, 10, 11]  # two whole blocks every entry shares
    for k in range(50):
        cache.insert(text_key([*system, 100 + k, 7, 8, 9, 200 + k]), *kv(13, 1000 * k))
    hit = cache.lookup(text_key([*system, 137, 7, 8, 9, 5, 5]))
    assert hit.length == 12 and hit.keys[0, 0, -1, 0].item() == 37011  # entry 37, positions 0 .. 11
    assert cache.lookup(text_key([*system, 137, 7, 5, 5])).length == 10  # inside a block, past the last whole one
    assert cache.lookup(text_key([1, 5, 6, 2, 2, 2])) is None  # less than one block shared: not worth a copy
    cache.insert(text_key([50, 51, 52, 53, 54, 55]), *kv(6))
    cache.insert(text_key([50, 51, 52, 53, 54, 55, 56, 57, 58, 59]), *kv(10))  # extends the one before
    assert len(cache) == 51 and cache.lookup(text_key([50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60])).length == 10


# ---------------------------------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def model() -> owl2.Owl2ForCausalLM:
    """The official tiny model with distinct random weights: a wrong position, branch or image shows."""
    return randomize_(owl2.load_model(OFFICIAL_TINY, dtype=torch.float32, show_progress=False), seed=5)


def engine(model, prefix_cache: PrefixCache | bool) -> GenerationEngine:
    return GenerationEngine(model, SP.decode, eos_token_id=None, prefix_cache=prefix_cache)


def images(model, n: int, seed: int) -> torch.Tensor:
    size = model.config.vision.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def greedy(ids: list[int], pixels: torch.Tensor | None, n: int = 8) -> GenerationRequest:
    return GenerationRequest(ids, pixels, SamplingParams(max_new_tokens=n))


def first_logits(engine: GenerationEngine, requests: list[GenerationRequest]) -> torch.Tensor:
    with torch.inference_mode():
        return engine.start(requests, prefix_cache=engine.prefix_cache).logits


def test_a_three_turn_chat_about_one_image(model):
    cached, plain = engine(model, PrefixCache(1 << 24)), engine(model, False)
    picture = images(model, 1, 0)
    prompt = [*SYSTEM, 31, -200, 172, 38, 45, 299, 13]
    reused = []
    for _turn in range(3):
        request = greedy(prompt, picture)
        before = cached.prefix_cache.stats.reused_tokens
        torch.testing.assert_close(first_logits(cached, [request]), first_logits(plain, [request]),
                                   rtol=1e-5, atol=1e-5)
        reused.append(cached.prefix_cache.stats.reused_tokens - before)
        answer = cached.generate([request])[0]
        assert answer.token_ids == plain.generate([request])[0].token_ids
        prompt = prompt + answer.token_ids + [2, 148, 100, 291, 128]  # the next user turn follows the answer
    per_image = model.config.tokens_per_image
    first_length = len(SYSTEM) + 7 - 1 + per_image  # the first prompt: its ids and an image
    assert reused[0] == 0
    # turn 2 reuses turn 1's prompt and all but the last answer token (never fed back, so never cached)
    assert reused[1] == first_length + 8 - 1
    assert reused[2] > reused[1]
    assert cached.prefix_cache.stats.hits >= 4 and len(cached.prefix_cache) == 1  # each turn replaced the last


def test_requests_sharing_an_image_and_a_prompt_start_in_one_batch_and_across_batches(model):
    cached, plain = engine(model, PrefixCache(1 << 24)), engine(model, False)
    picture = images(model, 1, 1)
    start = [*SYSTEM, 31, -200, 172, 38]
    first = [greedy([*start, 45, 299], picture), greedy([*start, 63, 203, 292, 92], picture),
             greedy([1, 91, 38, 126], None)]
    second = [greedy([*start, 63, 203, 292, 92, 184], picture),  # the longest hit: a whole earlier prompt
              greedy([*start, 155], picture),  # the image and the start only
              greedy([1, 213, 109], None),  # no hit
              greedy([*start, 45, 299, 13, 5], picture)]
    for batch in (first, second):
        got = [r.token_ids for r in cached.generate(batch)]
        assert got == [r.token_ids for r in plain.generate(batch)]
        assert got == [plain.generate([r])[0].token_ids for r in batch]  # each row as it is alone
    torch.testing.assert_close(first_logits(cached, second), first_logits(plain, second), rtol=1e-5, atol=1e-5)
    stats = cached.prefix_cache.stats
    assert stats.hits >= 3 and stats.reused_tokens > 0


def test_another_image_with_the_same_ids_misses_from_the_image_on(model):
    cached, plain = engine(model, PrefixCache(1 << 24)), engine(model, False)
    ids = [*SYSTEM, 31, -200, 172, 38, 45]
    red, blue = images(model, 2, 2)
    cached.generate([greedy(ids, red[None])])
    before = cached.prefix_cache.stats.reused_tokens
    request = greedy(ids, blue[None])
    logits = first_logits(cached, [request])
    assert cached.prefix_cache.stats.reused_tokens - before == len(SYSTEM) + 1  # up to the image, which differs
    torch.testing.assert_close(logits, first_logits(plain, [request]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, first_logits(plain, [greedy(ids, red[None])]), atol=1e-3)
    assert cached.generate([request])[0].token_ids == plain.generate([request])[0].token_ids


def test_the_default_engine_caches_and_an_engine_can_go_without(model):
    assert isinstance(engine(model, True).prefix_cache, PrefixCache)
    assert engine(model, False).prefix_cache is None
