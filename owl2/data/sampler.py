"""Length-grouped batches that never mix text-only and multimodal samples (LLaVA's ``group_by_modality_length``).

Per epoch, with a generator seeded by ``seed + epoch`` (the same on every rank):

1. the indices are split into multimodal and text-only groups, and each group is shuffled;
2. each group is cut into mega-batches of ``batch_size * world_size`` indices, each sorted by length (longest
   first), so the samples of one step have similar lengths and little padding;
3. the full mega-batches of both groups are shuffled together; the two incomplete ones (if any) come last, each on its
   own. LLaVA merges those two into one mixed mega-batch; here a batch is never mixed;
4. each mega-batch is split into ``world_size`` consecutive batches of ``batch_size``; rank ``r`` takes the r-th.

The sampler yields *batches* (lists of indices): use it as ``DataLoader(dataset, batch_sampler=sampler)``. That is
what makes "no mixed batch" hold also for the last, smaller batches. With ``world_size == 1`` every index appears
exactly once per epoch. With more ranks, an incomplete mega-batch is padded by repeating its own indices to a multiple
of ``world_size`` so every rank gets the same number of batches (a few samples are then seen twice, as with
``DistributedSampler``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["ModalityLengthGroupedSampler"]


class ModalityLengthGroupedSampler(Sampler[list[int]]):
    """Batch sampler over ``len(lengths)`` samples (rules in the module docstring).

    ``lengths``: expanded length per sample (``SupervisedDataset.lengths``); ``is_multimodal``: whether each sample has
    an image (``SupervisedDataset.is_multimodal``). ``batch_size`` is per rank. Call :meth:`set_epoch` before each
    epoch for a new order; the order is a function of ``(seed, epoch)`` only.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        is_multimodal: Sequence[bool],
        batch_size: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        if len(lengths) != len(is_multimodal):
            raise ValueError(f"{len(lengths)} lengths but {len(is_multimodal)} modality flags")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, world_size >= 1, 0 <= rank < world_size; got "
                             f"{batch_size}, {world_size}, {rank}")
        self.lengths = [int(n) for n in lengths]
        self.is_multimodal = [bool(m) for m in is_multimodal]
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0

    @classmethod
    def from_dataset(cls, dataset: object, batch_size: int, **kwargs: int) -> ModalityLengthGroupedSampler:
        """For a dataset with ``lengths`` and ``is_multimodal`` (a :class:`~owl2.data.SupervisedDataset`)."""
        return cls(dataset.lengths, dataset.is_multimodal, batch_size, **kwargs)  # type: ignore[attr-defined]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` gives (as ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def megabatches(self) -> list[list[int]]:
        """This epoch's mega-batches (identical on every rank), padded for ``world_size > 1``."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        megabatch = self.batch_size * self.world_size
        full: list[list[int]] = []
        tails: list[list[int]] = []
        for modality in (True, False):
            group = [i for i, m in enumerate(self.is_multimodal) if m == modality]
            order = [group[k] for k in torch.randperm(len(group), generator=generator).tolist()]
            for start in range(0, len(order), megabatch):
                chunk = sorted(order[start:start + megabatch], key=lambda i: -self.lengths[i])
                (full if len(chunk) == megabatch else tails).append(chunk)
        shuffled = [full[k] for k in torch.randperm(len(full), generator=generator).tolist()]
        return shuffled + [self._pad(tail) for tail in tails]

    def _pad(self, chunk: list[int]) -> list[int]:
        """Repeat ``chunk``'s own indices until its size is a multiple of ``world_size``."""
        padded = list(chunk)
        while len(padded) % self.world_size:
            padded.append(chunk[(len(padded) - len(chunk)) % len(chunk)])
        return padded

    def __iter__(self) -> Iterator[list[int]]:
        for chunk in self.megabatches():
            per_rank = len(chunk) // self.world_size
            yield chunk[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __len__(self) -> int:
        megabatch = self.batch_size * self.world_size
        multimodal = sum(self.is_multimodal)
        return -(-multimodal // megabatch) + -(-(len(self.lengths) - multimodal) // megabatch)
