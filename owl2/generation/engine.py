"""The generation engine: batched decoding, streaming and answer scoring on an :class:`Owl2ForCausalLM`.

Requests carry official-form prompt ids (one -200 per image, as the tokenizer's ``encode_prompt`` gives them) and
their preprocessed images. A batch is left-padded, each image expanded to its 65 positions, and decoded with the
model's KV cache; every row keeps its own sampling settings, stop conditions and text stream, so a row's greedy
output is the same whether it runs alone or in a batch. Visual tokens are cached by image content, so an image
seen before in the session is not encoded again.

Prefix caching (on by default, ``prefix_cache=False`` turns it off): when a batch ends, each row's prompt and the
answer tokens fed back to the model are kept with their keys and values in a :class:`PrefixCache` (LRU within a
byte budget, keyed by the token ids and each image's content). A later prompt that starts the same way (a chat's
next turn, another question about the same image) has its longest cached prefix copied into its cache row and
only the rest prefilled, at the positions that follow the prefix, so its outputs are those of a full prefill up to
float rounding (greedy tokens in float32 are the same). The scoring calls (``next_token_logits``,
``loglikelihoods``) always run the whole prompt.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from owl2.constants import OFFICIAL_IMAGE_TOKEN
from owl2.generation.decoding import RowDecoder, StepEvent, decode_rows, forward_step, prefill
from owl2.generation.prefix_cache import PrefixCache, PrefixKey
from owl2.generation.sampling import SamplingParams
from owl2.model.cache import KVCache
from owl2.model.inputs import expand_official_ids
from owl2.model.modeling import Owl2ForCausalLM


@dataclass
class GenerationRequest:
    """``prompt_ids``: official-form ids (one -200 per image); ``images``: [n, 3, S, S] preprocessed, in order."""

    prompt_ids: Sequence[int]
    images: torch.Tensor | None = None
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int  # positions the prompt occupies, images counted as tokens_per_image each


@dataclass
class Started:
    """A batch after its prefill (:meth:`GenerationEngine.start`): the ``cache`` of its rows, the ``logits`` [B, V]
    float32 of each row's first token, each row's :class:`PrefixKey` (None without a prefix cache) and the
    positions ``reused`` from the prefix cache."""

    cache: KVCache
    logits: torch.Tensor
    keys: list[PrefixKey | None]
    reused: list[int]


class ImageEmbeddingCache:
    """Visual tokens [tokens_per_image, D] keyed by the content of the preprocessed image (LRU, ``capacity``).

    Unseen images are encoded ``encode_batch_size`` at a time: a larger vision batch gains nothing on a CPU and
    loses cache locality (a batch of 32 ratings of ``benchmarks/rate.py``: 2.9 images/s encoding all 32 at once,
    4.1 in steps of 8)."""

    def __init__(self, capacity: int = 64, encode_batch_size: int = 8) -> None:
        self.capacity = capacity
        self.encode_batch_size = encode_batch_size
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(pixels: torch.Tensor) -> str:
        data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return hashlib.sha256(data).hexdigest() + str(tuple(pixels.shape))

    def encode(self, model: Owl2ForCausalLM, pixel_values: torch.Tensor,
               keys: Sequence[str] | None = None) -> torch.Tensor:
        """``pixel_values`` [N, 3, S, S] -> visual tokens [N, tokens_per_image, D], encoding only unseen images.
        ``keys``: the images' :meth:`key`, when the caller has them already."""
        keys = [self.key(p) for p in pixel_values] if keys is None else list(keys)
        missing = [i for i, k in enumerate(keys) if k not in self._entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            with torch.inference_mode():
                fresh = torch.cat([model.model.encode_images(chunk.to(model.device, model.dtype))
                                   for chunk in pixel_values[missing].split(self.encode_batch_size)])
            for i, embeds in zip(missing, fresh, strict=True):
                self._entries[keys[i]] = embeds
        out = []
        for k in keys:
            self._entries.move_to_end(k)
            out.append(self._entries[k])
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return torch.stack(out)

    def __len__(self) -> int:
        return len(self._entries)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Official-form rows -> ids and mask [B, max_len], padded on the left."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, length - len(row):] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, length - len(row):] = 1
    return ids, mask


class GenerationEngine:
    """Batched generation, streaming and scoring for one model.

    ``decode`` turns generated ids into text (``tokenizer.decode``); ``eos_token_id`` ends a row unless a request
    names its own ``stop_token_ids``. ``context_length`` bounds prompt plus output (default: the config's
    ``max_position_embeddings``): longer prompts are rejected, outputs are cut to fit. ``prefix_cache``: the
    :class:`PrefixCache` generation reuses prompt prefixes from (True: one of the default budget, False: none).
    """

    def __init__(
        self,
        model: Owl2ForCausalLM,
        decode: Callable[[list[int]], str],
        *,
        eos_token_id: int | Sequence[int] | None,
        pad_token_id: int = 0,
        image_cache: ImageEmbeddingCache | None = None,
        context_length: int | None = None,
        max_batch_size: int = 16,
        prefix_cache: PrefixCache | bool = True,
    ) -> None:
        self.model = model
        self.decode = decode
        self.eos_ids = () if eos_token_id is None else (
            (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
        self.pad_token_id = pad_token_id
        self.image_cache = image_cache if image_cache is not None else ImageEmbeddingCache()
        self.context_length = context_length or model.config.max_position_embeddings
        self.max_batch_size = max_batch_size
        self.prefix_cache: PrefixCache | None = (
            prefix_cache if isinstance(prefix_cache, PrefixCache) else PrefixCache() if prefix_cache else None)

    # ----------------------------------------------------------------------------------------------------- inputs
    @staticmethod
    def check_images(rows: Sequence[Sequence[int]], images: Sequence[torch.Tensor | None]) -> None:
        for i, (row, imgs) in enumerate(zip(rows, images, strict=True)):
            placeholders = sum(1 for t in row if t == OFFICIAL_IMAGE_TOKEN)
            given = 0 if imgs is None else int(imgs.shape[0])
            if placeholders != given:
                raise ValueError(f"prompt {i} has {placeholders} image placeholder(s) but {given} image(s)")

    def prepare(self, rows: Sequence[Sequence[int]], images: Sequence[torch.Tensor | None]) -> dict[str, torch.Tensor]:
        self.check_images(rows, images)
        ids, mask = left_pad(rows, self.pad_token_id)
        given = [imgs for imgs in images if imgs is not None and imgs.shape[0] > 0]
        embeds = self.image_cache.encode(self.model, torch.cat(given)) if given else None
        batch = expand_official_ids(ids, mask, config=self.model.config, pad_token_id=self.pad_token_id)
        device = self.model.device
        batch = {k: v.to(device) for k, v in batch.items()}
        if embeds is not None:
            batch["image_embeds"] = embeds
        return batch

    def check_context(self, prompt_lengths: torch.Tensor) -> None:
        longest = int(prompt_lengths.max())
        if longest >= self.context_length:
            raise ValueError(
                f"the prompt takes {longest} positions (each image counts {self.model.config.tokens_per_image}), "
                f"which leaves no room in the context of {self.context_length}"
            )

    # ---------------------------------------------------------------------------------------------------- prefill
    def start(self, requests: Sequence[GenerationRequest], *, room: int = 0,
              prefix_cache: PrefixCache | None = None) -> Started:
        """Prefill ``requests`` as one batch into a new cache with ``room`` free positions after the prompts.

        Without ``prefix_cache`` this is one left-padded prefill of the whole prompts. With it, each row's longest
        cached prefix (h positions) is copied into the row's cache, right-aligned to the longest hit H of the batch
        (columns H - h .. H, the columns before are padding), and only the rest of each prompt is prefilled after
        it, left-padded: its RoPE positions continue from h, it attends to the copied positions, and its image
        positions go through the image branch as usual. Only the images of the prefilled parts are passed to the
        model."""
        model = self.model
        rows = [r.prompt_ids for r in requests]
        images = [r.images for r in requests]
        if prefix_cache is None:
            batch = self.prepare(rows, images)
            self.check_context(batch["attention_mask"].sum(1))
            cache = model.new_cache(batch["input_ids"].shape[0], batch["input_ids"].shape[1] + room)
            return Started(cache, prefill(model, batch, cache), [None] * len(requests), [0] * len(requests))
        self.check_images(rows, images)
        config = model.config
        expanded = [expand_official_ids(torch.tensor([list(row)], dtype=torch.long), config=config,
                                        pad_token_id=self.pad_token_id)["input_ids"][0] for row in rows]
        self.check_context(torch.tensor([len(ids) for ids in expanded]))
        image_keys = [[] if imgs is None else [ImageEmbeddingCache.key(p) for p in imgs] for imgs in images]
        keys = [PrefixKey.build(ids, k, image_token_index=config.image_token_index,
                                tokens_per_image=config.tokens_per_image) for ids, k in zip(expanded, image_keys,
                                                                                          strict=True)]
        hits = [prefix_cache.lookup(key) for key in keys]
        reused = [0 if hit is None else hit.length for hit in hits]
        given = [imgs for imgs in images if imgs is not None and imgs.shape[0] > 0]
        embeds = None
        if given:
            # every image goes through the image cache, as without prefix caching, which keeps its counts and its
            # LRU order meaningful; an image inside a reused prefix is found there (encoded again only if that
            # cache dropped it) and is not passed to the model
            everything = self.image_cache.encode(model, torch.cat(given), [k for row in image_keys for k in row])
            per_row = everything.split([len(k) for k in image_keys])
            # the images that start inside a row's reused prefix lie wholly inside it (a hit never cuts an image)
            kept = [e[sum(1 for s in key.starts if s < h):] for e, key, h in zip(per_row, keys, reused, strict=True)]
            embeds = torch.cat(kept) if any(e.shape[0] for e in kept) else None
        ids, mask = left_pad([ids[h:].tolist() for ids, h in zip(expanded, reused, strict=True)], self.pad_token_id)
        held = max(reused)
        cache = model.new_cache(len(requests), held + ids.shape[1] + room)
        if held:
            cache.reset(length=held)
            for i, hit in enumerate(hits):
                if hit is not None:
                    cache.keys[:, i, :, held - hit.length:held] = hit.keys
                    cache.values[:, i, :, held - hit.length:held] = hit.values
                    cache.valid[i, held - hit.length:held] = True
                    cache.next_position[i] = hit.length
        batch = {"input_ids": ids.to(model.device), "attention_mask": mask.to(model.device)}
        if embeds is not None:
            batch["image_embeds"] = embeds
        return Started(cache, prefill(model, batch, cache), keys, reused)

    @staticmethod
    def remember(prefix_cache: PrefixCache, key: PrefixKey, cache: KVCache, row: int, fed: Sequence[int]) -> None:
        """Keep row ``row`` of ``cache`` in ``prefix_cache``: the prompt ``key`` and then the ``fed`` tokens decoded
        after it (each one fed back to the model, so its keys and values are in the cache). The row's positions
        are its first ``len(key) + len(fed)`` valid columns (padding and copied prefixes leave gaps)."""
        n = len(key) + len(fed)
        columns = cache.valid[row, :cache.length].nonzero().squeeze(1)[:n]
        if columns.numel() != n:
            raise ValueError(f"row {row} holds {columns.numel()} positions, not the {n} of its prompt and answer")
        keys = cache.keys[:, row].index_select(2, columns)
        values = cache.values[:, row].index_select(2, columns)
        prefix_cache.insert(key.extend(fed), keys, values)

    # ------------------------------------------------------------------------------------------------- generation
    def iterate(self, requests: Sequence[GenerationRequest]) -> Iterator[list[StepEvent]]:
        """Decode ``requests`` as one batch, yielding the text deltas of every step."""
        if not requests:
            return
        if len(requests) > self.max_batch_size:
            raise ValueError(f"at most {self.max_batch_size} requests per batch, got {len(requests)}")
        model, device = self.model, self.model.device
        self.check_images([r.prompt_ids for r in requests], [r.images for r in requests])
        prompt_lengths = [self.prompt_tokens(r) for r in requests]
        self.check_context(torch.tensor(prompt_lengths))
        caps = [min(r.params.max_new_tokens, self.context_length - n)
                for r, n in zip(requests, prompt_lengths, strict=True)]
        rows = [RowDecoder(r, self.decode, self.eos_ids, cap, device) for r, cap in zip(requests, caps, strict=True)]

        with torch.inference_mode():
            started = self.start(requests, room=max(caps), prefix_cache=self.prefix_cache)
            cache, logits = started.cache, started.logits
            fed: list[list[int]] = [[] for _ in requests]  # each row's answer tokens whose keys are in the cache
            try:
                for _ in range(max(caps)):
                    results = decode_rows(rows, logits)
                    error = next((r for r in results if isinstance(r, Exception)), None)
                    if error is not None:
                        raise error
                    events = [r for r in results if isinstance(r, StepEvent)]
                    yield events
                    if all(decoder.finished for decoder in rows):
                        break
                    going = [not d.finished and isinstance(r, StepEvent) and r.token_id is not None
                             for r, d in zip(results, rows, strict=True)]
                    feed = [r.token_id if go else self.pad_token_id
                            for r, go in zip(results, going, strict=True)]
                    logits = forward_step(model, torch.tensor(feed, device=device), cache)
                    for i, go in enumerate(going):
                        if go:
                            fed[i].append(feed[i])
            finally:  # also when the caller stops early: what was fed so far is in the cache
                if self.prefix_cache is not None:
                    for i, key in enumerate(started.keys):
                        if key is not None:
                            self.remember(self.prefix_cache, key, cache, i, fed[i])

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run every request to completion (in batches of ``max_batch_size``)."""
        results: list[GenerationResult] = []
        for start in range(0, len(requests), self.max_batch_size):
            chunk = list(requests[start:start + self.max_batch_size])
            texts = [""] * len(chunk)
            reasons = ["length"] * len(chunk)
            tokens: list[list[int]] = [[] for _ in chunk]
            for events in self.iterate(chunk):
                for event in events:
                    texts[event.row] += event.delta
                    if event.token_id is not None:
                        tokens[event.row].append(event.token_id)
                    if event.finish_reason:
                        reasons[event.row] = event.finish_reason
            for i, request in enumerate(chunk):
                results.append(GenerationResult(texts[i], tokens[i], reasons[i], self.prompt_tokens(request)))
        return results

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Text deltas of one request as they are decoded; they concatenate to the full answer."""
        for events in self.iterate([request]):
            for event in events:
                if event.delta:
                    yield event.delta

    def prompt_tokens(self, request: GenerationRequest) -> int:
        per_image = self.model.config.tokens_per_image
        return sum(per_image if t == OFFICIAL_IMAGE_TOKEN else 1 for t in request.prompt_ids)

    # ---------------------------------------------------------------------------------------------------- scoring
    def next_token_logits(self, rows: Sequence[Sequence[int]], images: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Float32 logits [B, V] that follow each official-form prompt in ``rows`` (one batched prefill, no decode).

        Rows are left-padded together, so each row's logits equal those of the row alone."""
        batch = self.prepare(rows, images)
        self.check_context(batch["attention_mask"].sum(1))
        with torch.inference_mode():
            return prefill(self.model, batch, None)

    def loglikelihoods(
        self,
        prompt_ids: Sequence[int],
        images: torch.Tensor | None,
        continuations: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """Summed log-probability [C] of each continuation (token ids) after the prompt, in float32."""
        if not continuations or any(len(c) == 0 for c in continuations):
            raise ValueError("every continuation needs at least one token")
        out = []
        for start in range(0, len(continuations), self.max_batch_size):
            chunk = continuations[start:start + self.max_batch_size]
            rows = [list(prompt_ids) + list(c) for c in chunk]
            batch = self.prepare(rows, [images] * len(rows))
            self.check_context(batch["attention_mask"].sum(1))
            keep = max(len(c) for c in chunk) + 1
            with torch.inference_mode():
                logits = self.model(**batch, logits_to_keep=keep).logits.float()
            logprobs = logits[:, :-1].log_softmax(-1)
            for i, cont in enumerate(chunk):
                target = torch.tensor(cont, device=logprobs.device)
                picked = logprobs[i, -len(cont):].gather(-1, target[:, None])
                out.append(picked.sum())
        return torch.stack(out).cpu()
