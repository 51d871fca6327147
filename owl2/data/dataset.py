"""The supervised training dataset (lazy images) and the collate function that builds model inputs.

:class:`SupervisedDataset` reads and tokenises every record when it is built (cheap; it also finds the bad records
and the exact lengths the sampler needs) and loads images only in ``__getitem__``. Bad records are skipped with a
warning naming their id and are listed in :attr:`SupervisedDataset.skipped` (rules in :mod:`owl2.data.records` and
:mod:`owl2.data.masking`). An image that exists but cannot be decoded is only found in ``__getitem__``; that sample is
then reported the same way and replaced by the next multimodal sample, so the batch keeps its modality and the run
goes on.

Text-only samples carry ``pixel_values=None`` and never get a dummy image (the official trainer encodes a zero image
for every text-only sample and throws the result away); :func:`collate` leaves ``pixel_values`` out of a batch
without images, so the vision tower is skipped entirely.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from owl2.data.masking import DEFAULT_TEMPLATE, IGNORE_INDEX, tokenize_conversation, truncate
from owl2.data.records import BadRecord, Record, read_records, report_skip
from owl2.processing.conversation import ConversationTemplate
from owl2.processing.image import ImageError, ImageProcessor
from owl2.processing.tokenizer import Owl2Tokenizer

__all__ = ["DEFAULT_TOKENS_PER_IMAGE", "TRAINING_IMAGE_POLICY", "SupervisedDataset", "collate"]

logger = logging.getLogger("owl2.data")

DEFAULT_TOKENS_PER_IMAGE = 65
"""Positions one image takes in the LLM sequence for the released model (64 queries + the end token)."""

TRAINING_IMAGE_POLICY = "pad"
"""The official training preprocessing (``--image_aspect_ratio pad``: letterbox with the mean colour)."""


class SupervisedDataset(Dataset):
    """Tokenised conversations with lazily loaded images.

    ``records``: a data file path (JSON list or JSONL, both formats of :mod:`owl2.data.records`) or already parsed
    :class:`Record` objects. ``image_root``: where relative image paths point (default: the data file's directory).
    ``max_length``: limit on the expanded length (``None``: no limit). ``tokens_per_image`` must match the model's
    (``config.tokens_per_image``). ``image_processor``: default the released 448 px processor; ``image_policy``
    ``"pad"`` as in official training.

    ``__getitem__`` gives a dict: ``id``, ``input_ids`` (official form, ``-200`` per image), ``labels``, ``images``
    (the image sources), ``num_images``, ``length`` (expanded) and ``pixel_values`` (``[n, 3, S, S]`` or ``None``).
    """

    def __init__(
        self,
        records: str | os.PathLike[str] | Iterable[Record],
        tokenizer: Owl2Tokenizer,
        *,
        image_root: str | os.PathLike[str] | None = None,
        template: str | ConversationTemplate = DEFAULT_TEMPLATE,
        max_length: int | None = 2048,
        tokens_per_image: int = DEFAULT_TOKENS_PER_IMAGE,
        image_processor: ImageProcessor | None = None,
        image_policy: str | None = TRAINING_IMAGE_POLICY,
        check_files: bool = True,
        verify_tokenization: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.tokens_per_image = tokens_per_image
        self.image_processor = image_processor if image_processor is not None else ImageProcessor()
        self.image_policy = image_policy
        self.skipped: list[tuple[str, str]] = []
        """``(id, reason)`` of every record skipped so far (reading, tokenising, or a broken image at load time)."""

        if isinstance(records, (str, os.PathLike)):
            parsed, self.skipped = read_records(records, image_root, check_files=check_files)
        else:
            parsed = list(records)
        self._ids: list[str] = []
        self._images: list[list[Any]] = []
        self._tokens: list[np.ndarray] = []
        self._targets: list[np.ndarray] = []
        lengths: list[int] = []
        for record in parsed:
            try:
                sample = tokenize_conversation(
                    tokenizer, record.turns, template, system=record.system, verify=verify_tokenization
                )
                sample = truncate(sample, max_length, tokens_per_image)
            except BadRecord as exc:
                report_skip(self.skipped, record.id, str(exc))
                continue
            self._ids.append(record.id)
            self._images.append(list(record.images))
            self._tokens.append(np.asarray(sample.input_ids, dtype=np.int32))
            self._targets.append(np.asarray(sample.labels, dtype=np.int32) != IGNORE_INDEX)
            lengths.append(sample.expanded_length(tokens_per_image))
        self.lengths: list[int] = lengths
        """Expanded length of each sample (what the model sees), for the length-grouped sampler."""
        self.is_multimodal: list[bool] = [bool(images) for images in self._images]
        """Whether each sample has at least one image, for the modality-grouped sampler."""

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        """The record id of each (kept) sample, in dataset order."""
        return list(self._ids)

    def tokenized(self, index: int) -> dict[str, Any]:
        """Sample ``index`` without its pixels (nothing is loaded)."""
        ids = self._tokens[index].tolist()
        labels = np.where(self._targets[index], self._tokens[index], IGNORE_INDEX).tolist()
        return {
            "id": self._ids[index],
            "input_ids": ids,
            "labels": labels,
            "images": list(self._images[index]),
            "num_images": len(self._images[index]),
            "length": self.lengths[index],
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        tried = 0
        while True:
            sample = self.tokenized(index)
            if not sample["images"]:
                sample["pixel_values"] = None
                return sample
            try:
                sample["pixel_values"] = self.image_processor(sample["images"], policy=self.image_policy)
                return sample
            except (ImageError, OSError) as exc:
                report_skip(self.skipped, sample["id"], f"cannot load its image: {exc}")
                tried += 1
                index = self._next_multimodal(index, tried)

    def _next_multimodal(self, index: int, tried: int) -> int:
        """The next multimodal sample after ``index`` (wrapping), so a replaced sample keeps its batch's modality."""
        total = sum(self.is_multimodal)
        if tried >= total:
            raise RuntimeError("no image of this dataset can be loaded")
        position = index
        while True:
            position = (position + 1) % len(self)
            if self.is_multimodal[position]:
                return position


def collate(
    samples: Sequence[dict[str, Any]],
    *,
    pad_token_id: int = 0,
    config: Any | None = None,
) -> dict[str, torch.Tensor]:
    """Samples of :class:`SupervisedDataset` -> model inputs, right-padded.

    Returns ``input_ids``/``attention_mask``/``labels`` ``[B, T]`` in owl2's expanded form (each image id becomes the
    model's ``tokens_per_image`` image positions, labelled ``-100``; padding labelled ``-100``) and, when the batch has
    at least one image, ``pixel_values`` ``[sum of n, 3, S, S]`` in sample order. ``config``: the model's
    :class:`~owl2.model.config.Owl2Config` (its layout; default the most recently loaded model's). ``pad_token_id``:
    use ``tokenizer.pad_token_id``.
    """
    from owl2.model.inputs import expand_official_ids

    if not samples:
        raise ValueError("collate needs at least one sample")
    rows = []
    for sample in samples:
        # One sample at a time: padding the official form first would also pad by the image expansion of others.
        ids = torch.tensor([sample["input_ids"]], dtype=torch.long)
        labels = torch.tensor([sample["labels"]], dtype=torch.long)
        rows.append(expand_official_ids(ids, labels=labels, config=config, pad_token_id=pad_token_id,
                                        num_images=sample["num_images"]))
    length = max(row["input_ids"].shape[1] for row in rows)

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([x[0], x.new_full((length - x.shape[1],), value)])

    batch = {
        "input_ids": torch.stack([pad(row["input_ids"], pad_token_id) for row in rows]),
        "attention_mask": torch.stack([pad(row["attention_mask"], 0) for row in rows]),
        "labels": torch.stack([pad(row["labels"], IGNORE_INDEX) for row in rows]),
    }
    pixels = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    if sum(s["num_images"] for s in samples) != sum(int(p.shape[0]) for p in pixels):
        raise ValueError("the samples' pixel_values do not match their number of images")
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    for sample, row_mask in zip(samples, batch["attention_mask"], strict=True):
        if int(row_mask.sum()) != sample["length"]:
            raise ValueError(
                f"sample {sample['id']!r}: expanded length {int(row_mask.sum())} differs from the dataset's "
                f"{sample['length']}; the dataset's tokens_per_image does not match the model config"
            )
    return batch

