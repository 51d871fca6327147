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

Soft labels (DeQA-Score, :mod:`owl2.data.quality`): a record with a ``soft_label`` has it attached to the level word
of its answer, the token right after the last ``level_prefix`` (``"The quality of the image is"``) among the answer
tokens, which must be the first piece of one of ``levels``. :func:`collate` then adds ``soft_labels``,
``level_positions`` and ``level_ids`` to the batch (:mod:`owl2.training.losses` reads them).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from owl2.constants import DEFAULT_TEMPLATE, IGNORE_INDEX, OFFICIAL_IMAGE_TOKEN
from owl2.data.masking import TokenizedConversation, tokenize_conversation, truncate
from owl2.data.records import BadRecord, Record, read_records, report_skip
from owl2.model.config import Owl2Config
from owl2.model.inputs import expand_official_ids
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

    ``levels`` and ``level_prefix``: where a record's ``soft_label`` applies (module docstring; default Q-Align's
    five words and ``"The quality of the image is"``); its length must be the number of levels.

    ``__getitem__`` gives a dict: ``id``, ``input_ids`` (official form, ``-200`` per image), ``labels``, ``images``
    (the image sources), ``num_images``, ``length`` (expanded) and ``pixel_values`` (``[n, 3, S, S]`` or ``None``);
    a sample with a soft label also has ``soft_label`` (floats, best level first), ``level_position`` (index of the
    level word in ``input_ids``) and ``level_ids`` (each level's token id).
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
        levels: Sequence[str] | None = None,
        level_prefix: str | None = None,
    ) -> None:
        # Imported here so that `python -m owl2.data.quality` does not find its module already imported by the
        # package's __init__.
        from owl2.data.quality import LEVELS, QUALITY_PREFIX

        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.tokens_per_image = tokens_per_image
        self.image_processor = image_processor if image_processor is not None else ImageProcessor()
        self.image_policy = image_policy
        self.levels = tuple(levels if levels is not None else LEVELS)
        self.level_prefix = level_prefix if level_prefix is not None else QUALITY_PREFIX
        self._level_ids: list[int] | None = None
        self._prefix_ids: list[int] | None = None
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
        self._soft: list[tuple[list[float], int] | None] = []
        lengths: list[int] = []
        for record in parsed:
            try:
                sample = tokenize_conversation(
                    tokenizer, record.turns, template, system=record.system, verify=verify_tokenization
                )
                sample = truncate(sample, max_length, tokens_per_image)
                soft = None if record.soft_label is None else (record.soft_label, self._level_position(sample))
                if soft is not None and len(soft[0]) != len(self.levels):
                    raise BadRecord(f"a soft label of {len(soft[0])} values for {len(self.levels)} levels")
            except BadRecord as exc:
                report_skip(self.skipped, record.id, str(exc))
                continue
            self._ids.append(record.id)
            self._images.append(list(record.images))
            self._tokens.append(np.asarray(sample.input_ids, dtype=np.int32))
            self._targets.append(np.asarray(sample.labels, dtype=np.int32) != IGNORE_INDEX)
            self._soft.append(soft)
            lengths.append(sample.expanded_length(tokens_per_image))
        self.lengths: list[int] = lengths
        """Expanded length of each sample (what the model sees), for the length-grouped sampler."""
        self.is_multimodal: list[bool] = [bool(images) for images in self._images]
        """Whether each sample has at least one image, for the modality-grouped sampler."""

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def level_ids(self) -> list[int]:
        """The token id of each level word (:func:`~owl2.data.quality.level_token_ids`), best first."""
        if self._level_ids is None:
            from owl2.data.quality import level_token_ids

            self._level_ids = level_token_ids(self.tokenizer, self.levels)
        return self._level_ids

    @property
    def num_soft_labels(self) -> int:
        """How many samples carry a soft label."""
        return sum(soft is not None for soft in self._soft)

    def _level_position(self, sample: TokenizedConversation) -> int:
        """Index of the level word in ``sample.input_ids``: the answer token right after the last occurrence of the
        level prefix among the answer tokens (DeQA-Score finds it the same way, by the prefix)."""
        if self._prefix_ids is None:
            self._prefix_ids = self.tokenizer.encode(self.level_prefix, add_bos=False)
        prefix = self._prefix_ids
        ids, labels = sample.input_ids, sample.labels
        for start in range(len(ids) - len(prefix) - 1, -1, -1):
            end = start + len(prefix)
            if ids[start:end] == prefix and all(label != IGNORE_INDEX for label in labels[start:end + 1]):
                if ids[end] not in self.level_ids:
                    raise BadRecord(f"the word after {self.level_prefix!r} is not one of the levels {self.levels}")
                return end
        raise BadRecord(f"a soft label, but no answer holds {self.level_prefix!r} and a level word after it")

    @property
    def ids(self) -> list[str]:
        """The record id of each (kept) sample, in dataset order."""
        return list(self._ids)

    def tokenized(self, index: int) -> dict[str, Any]:
        """Sample ``index`` without its pixels (nothing is loaded)."""
        ids = self._tokens[index].tolist()
        labels = np.where(self._targets[index], self._tokens[index], IGNORE_INDEX).tolist()
        sample = {
            "id": self._ids[index],
            "input_ids": ids,
            "labels": labels,
            "images": list(self._images[index]),
            "num_images": len(self._images[index]),
            "length": self.lengths[index],
        }
        soft = self._soft[index]
        if soft is not None:
            sample.update(soft_label=list(soft[0]), level_position=soft[1], level_ids=list(self.level_ids))
        return sample

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
    config: Owl2Config,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Samples of :class:`SupervisedDataset` -> model inputs, right-padded.

    Returns ``input_ids``/``attention_mask``/``labels`` ``[B, T]`` in owl2's expanded form (each image id becomes the
    model's ``tokens_per_image`` image positions, labelled ``-100``; padding labelled ``-100``) and, when the batch has
    at least one image, ``pixel_values`` ``[sum of n, 3, S, S]`` in sample order. When a sample has a soft label,
    also ``soft_labels`` ``[B, L]`` (float32), ``level_ids`` ``[B, L]`` and ``level_positions`` ``[B]``: the level
    word's index in the expanded sequence, -1 in rows without a soft label (whose other two rows are zeros).
    ``config``: the model's :class:`~owl2.model.config.Owl2Config` (``model.config``), whose layout the batch
    takes. ``pad_token_id``: use ``tokenizer.pad_token_id``.
    """
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
    if any(s.get("soft_label") is not None for s in samples):
        batch.update(_soft_label_rows(samples, batch["input_ids"], config))
    for sample, row_mask in zip(samples, batch["attention_mask"], strict=True):
        if int(row_mask.sum()) != sample["length"]:
            raise ValueError(
                f"sample {sample['id']!r}: expanded length {int(row_mask.sum())} differs from the dataset's "
                f"{sample['length']}; the dataset's tokens_per_image does not match the model config"
            )
    return batch



def _soft_label_rows(samples: Sequence[dict[str, Any]], input_ids: torch.Tensor,
                     config: Owl2Config) -> dict[str, torch.Tensor]:
    per_image = config.tokens_per_image
    width = max(len(s["soft_label"]) for s in samples if s.get("soft_label") is not None)
    soft = torch.zeros(len(samples), width, dtype=torch.float32)
    level_ids = torch.zeros(len(samples), width, dtype=torch.long)
    positions = torch.full((len(samples),), -1, dtype=torch.long)
    for row, sample in enumerate(samples):
        if sample.get("soft_label") is None:
            continue
        official = sample["level_position"]
        images_before = sum(1 for token in sample["input_ids"][:official] if token == OFFICIAL_IMAGE_TOKEN)
        # Every image before the level word stands for tokens_per_image positions after expansion.
        positions[row] = official + (per_image - 1) * images_before
        soft[row] = torch.tensor(sample["soft_label"], dtype=torch.float32)
        level_ids[row] = torch.tensor(sample["level_ids"], dtype=torch.long)
        if int(input_ids[row, positions[row]]) not in sample["level_ids"]:
            raise ValueError(f"sample {sample['id']!r}: the expanded level position holds no level word")
    return {"soft_labels": soft, "level_ids": level_ids, "level_positions": positions}
