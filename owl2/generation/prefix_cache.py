"""Prefix caching: the keys and values of prompts already run, kept for the next request that starts the same way.

A chat's next turn repeats the previous prompt and answer before its new question, and requests about one image
often share the image and the start of the prompt. The keys and values of a position depend only on the positions
before it, so those of a shared prefix can be copied instead of recomputed, and only the rest of the prompt is
prefilled.

An entry holds one row's keys and values [layers, kv_heads, n, head_dim] and what its n positions held
(:class:`PrefixKey`): the token id of each text position, and for each image position the image's content key and
the position's place in the image, so two prompts with the same ids but different images never match. A lookup
finds the longest prefix a prompt shares with any entry (part of an entry counts); the hit always leaves at least
the prompt's last position to prefill (its logits give the first token) and never ends inside an image (the model
writes an image's visual tokens whole). Entries are dropped least recently used first to stay within a byte budget;
an entry that another one extends (a chat's previous turn) is dropped when the longer one arrives.

Entries are found without comparing the prompt with each of them: every entry is indexed by a chained hash of each
of its leading blocks of ``block_size`` positions, the lookup walks the prompt's blocks to the deepest one some
entry shares, and compares the prompt only with the entries indexed there (the longest shared prefix is among
them). A prompt that shares less than one block with every entry misses: so few positions are not worth a copy.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

IMAGE_SLOTS = 1 << 20
"""Codes reserved per image: an image position's code holds its place in the image below this."""


def _image_tag(content_key: str) -> int:
    """40 bits of ``content_key``: codes of different images differ except on a collision, which
    :meth:`PrefixCache.lookup` catches by comparing the keys themselves."""
    return int.from_bytes(hashlib.blake2b(content_key.encode(), digest_size=5).digest(), "big")


@dataclass(frozen=True)
class PrefixKey:
    """What a row's positions hold. ``codes`` int64 [n] (CPU): the token id at a text position; at the j-th position
    of an image, ``-(1 + tag * IMAGE_SLOTS + j)`` with ``tag`` from the image's content key. ``images``: the content
    key of each image in order; ``starts``: the position where each begins."""

    codes: torch.Tensor
    images: tuple[str, ...] = ()
    starts: tuple[int, ...] = ()

    @classmethod
    def build(cls, ids: Sequence[int] | torch.Tensor, image_keys: Sequence[str], *, image_token_index: int,
              tokens_per_image: int) -> PrefixKey:
        """``ids``: one row in the model's expanded form [n] (each image as ``tokens_per_image`` positions holding
        ``image_token_index``); ``image_keys``: each image's content key, in order."""
        codes = torch.as_tensor(ids, dtype=torch.long).to("cpu").clone()
        positions = (codes == image_token_index).nonzero().squeeze(1)
        if positions.numel() != len(image_keys) * tokens_per_image:
            raise ValueError(f"{positions.numel()} image positions for {len(image_keys)} image(s) of "
                             f"{tokens_per_image} positions each")
        starts = positions[::tokens_per_image].tolist()
        place = torch.arange(tokens_per_image, dtype=torch.long)
        for key, start in zip(image_keys, starts, strict=True):
            codes[start:start + tokens_per_image] = -(1 + _image_tag(key) * IMAGE_SLOTS + place)
        return cls(codes, tuple(image_keys), tuple(starts))

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    @cached_property
    def _code_list(self) -> list[int]:
        return self.codes.tolist()

    def block_hashes(self, block_size: int) -> list[int]:
        """Chained hashes of the leading whole blocks: element k covers positions 0 .. (k + 1) * block_size."""
        codes, out, h = self._code_list, [], 0
        for start in range(0, len(codes) - block_size + 1, block_size):
            h = hash((h, *codes[start:start + block_size]))
            out.append(h)
        return out

    def extend(self, token_ids: Sequence[int]) -> PrefixKey:
        """This key followed by text positions holding ``token_ids`` (a row's prompt, then its answer)."""
        if not token_ids:
            return self
        return PrefixKey(torch.cat([self.codes, torch.as_tensor(list(token_ids), dtype=torch.long)]),
                         self.images, self.starts)


@dataclass
class PrefixHit:
    """``length`` positions of a prompt found cached: their ``keys``/``values`` [layers, kv_heads, length,
    head_dim] (views of the entry: copy them, do not write them)."""

    length: int
    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class PrefixCacheStats:
    hits: int = 0  # lookups that reused at least one position
    misses: int = 0  # lookups that reused none
    reused_tokens: int = 0  # positions not prefilled thanks to a hit (images counted as their positions)
    bytes: int = 0  # keys and values held
    entries: int = 0
    evictions: int = 0  # entries dropped to stay within the budget


@dataclass
class _Entry:
    key: PrefixKey
    keys: torch.Tensor  # [layers, kv_heads, n, head_dim]
    values: torch.Tensor
    nbytes: int
    blocks: list[int]  # the key's block hashes, under which the entry is indexed
    used: int  # when it was last inserted or hit (the cache's clock): the latest wins a tie


class PrefixCache:
    """Keys and values of prompt prefixes, least recently used dropped first beyond ``max_bytes``; entries are
    indexed by blocks of ``block_size`` positions (a hit shares at least one block).

    Not thread-safe: one decode loop uses it (:attr:`stats` may be read from anywhere)."""

    def __init__(self, max_bytes: int = 512 * 2**20, *, block_size: int = 16) -> None:
        if max_bytes < 0 or block_size < 1:
            raise ValueError(f"max_bytes must be >= 0 and block_size >= 1, got {max_bytes} and {block_size}")
        self.max_bytes = max_bytes
        self.block_size = block_size
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._index: dict[int, set[int]] = {}  # block hash -> the entries whose leading blocks it covers
        self._ending: dict[int, set[int]] = {}  # last whole block's hash (0: none) -> the entries that end after it
        self._next_id = 0
        self._clock = 0
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _shared(entry: PrefixKey, key: PrefixKey, limit: int) -> int:
        """How many leading positions (at most ``limit``) ``entry`` and ``key`` hold alike, images compared by
        content key, not only by their 40-bit tag."""
        n = min(len(entry), len(key), limit)
        if n <= 0:
            return 0
        same = entry.codes[:n] == key.codes[:n]
        shared = n if bool(same.all()) else int((~same).int().argmax())
        for k, start in enumerate(key.starts):
            if start >= shared:
                break
            if entry.images[k] != key.images[k]:  # a tag collision: the images differ from their first position
                return start
        return shared

    def _longest(self, key: PrefixKey, limit: int, blocks: list[int]) -> tuple[int, int | None]:
        """(shared positions, entry id) of the entry sharing the longest prefix of ``key``, the most recently used
        on a tie; (0, None) when none shares a whole block."""
        deepest = None
        for h in blocks:  # an entry indexed under a block is indexed under every block before it
            if h not in self._index:
                break
            deepest = h
        best, best_id, best_used = 0, None, -1
        if deepest is None:
            return best, best_id
        for entry_id in self._index[deepest]:
            entry = self._entries[entry_id]
            shared = self._shared(entry.key, key, limit)
            if (shared, entry.used) > (best, best_used):
                best, best_id, best_used = shared, entry_id, entry.used
        return best, best_id

    def _touch(self, entry_id: int) -> None:
        self._entries.move_to_end(entry_id)
        self._clock += 1
        self._entries[entry_id].used = self._clock

    def lookup(self, key: PrefixKey, limit: int | None = None) -> PrefixHit | None:
        """The longest cached prefix of ``key``, at most ``limit`` positions (default ``len(key) - 1``: the last
        position is always left to prefill) and never ending inside an image; None (a miss) when nothing is
        shared. A hit makes its entry the most recently used."""
        limit = len(key) - 1 if limit is None else min(limit, len(key) - 1)
        best, best_id = self._longest(key, limit, key.block_hashes(self.block_size))
        if 0 < best < len(key) and int(key.codes[best]) < 0:
            best -= (-int(key.codes[best]) - 1) % IMAGE_SLOTS  # back to the start of the image it cuts
        if best_id is None or best <= 0:
            self.stats.misses += 1
            return None
        self._touch(best_id)
        entry = self._entries[best_id]
        self.stats.hits += 1
        self.stats.reused_tokens += best
        return PrefixHit(best, entry.keys[:, :, :best], entry.values[:, :, :best])

    def insert(self, key: PrefixKey, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Keep ``keys``/``values`` [layers, kv_heads, len(key), head_dim] (copied) as the prefix ``key``; False
        when they alone exceed the budget. Entries that are prefixes of ``key`` are dropped; when an entry already
        holds all of ``key`` it only becomes the most recently used."""
        n = len(key)
        if keys.ndim != 4 or keys.shape[2] != n or values.shape != keys.shape:
            raise ValueError(f"keys and values must be [layers, kv_heads, {n}, head_dim], got "
                             f"{list(keys.shape)} and {list(values.shape)}")
        nbytes = 2 * keys.numel() * keys.element_size()
        if n == 0 or nbytes > self.max_bytes:
            return False
        blocks = key.block_hashes(self.block_size)
        shared, holder = self._longest(key, n, blocks)
        if holder is not None and shared == n:
            self._touch(holder)
            return True
        for h in (0, *blocks):  # an entry that is a prefix of ``key`` ends after one of its whole blocks
            for entry_id in list(self._ending.get(h, ())):
                entry = self._entries[entry_id]
                if len(entry.key) <= n and self._shared(entry.key, key, n) == len(entry.key):
                    self._drop(entry_id)
        entry_id = self._next_id
        self._next_id += 1
        self._clock += 1
        self._entries[entry_id] = _Entry(key, keys.detach().clone(), values.detach().clone(), nbytes, blocks,
                                         self._clock)
        for h in blocks:
            self._index.setdefault(h, set()).add(entry_id)
        self._ending.setdefault(blocks[-1] if blocks else 0, set()).add(entry_id)
        self.stats.bytes += nbytes
        while self.stats.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.stats.evictions += 1
        self.stats.entries = len(self._entries)
        return True

    def _drop(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        for h in entry.blocks:
            ids = self._index[h]
            ids.discard(entry_id)
            if not ids:
                del self._index[h]
        end = entry.blocks[-1] if entry.blocks else 0
        self._ending[end].discard(entry_id)
        if not self._ending[end]:
            del self._ending[end]
        self.stats.bytes -= entry.nbytes
        self.stats.entries = len(self._entries)

    def clear(self) -> None:
        """Drop every entry (the counters other than ``bytes`` and ``entries`` keep counting)."""
        self._entries.clear()
        self._index.clear()
        self._ending.clear()
        self.stats.bytes = self.stats.entries = 0
