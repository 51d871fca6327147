"""Conversion from the official input convention (one ``-200`` id per image) to owl2's expanded form.

The official code marks each image with a single negative id and splices the visual tokens in inside the model.
owl2 instead reserves ``tokens_per_image`` positions per image holding ``image_token_index`` (outside the text
vocabulary), so the sequence length, the attention mask, positions and the KV cache all describe what the decoder
really sees.
"""

from __future__ import annotations

import torch

from owl2.constants import IGNORE_INDEX, OFFICIAL_IMAGE_TOKEN
from owl2.model.config import Owl2Config

__all__ = ["OFFICIAL_IMAGE_TOKEN", "expand_official_ids", "prepare_official_inputs"]


def prepare_official_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    *,
    config: Owl2Config,
    labels: torch.Tensor | None = None,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Official-style ``input_ids`` [B, T] (one -200 per image) -> model inputs with every image expanded.

    Returns ``input_ids``/``attention_mask`` [B, T'] (and ``labels`` with -100 at image positions when given) plus
    ``pixel_values`` unchanged. Rows that grow by different amounts are padded on the side the batch is already
    padded on (left when any row starts with padding, else right). ``config`` is the model's config
    (``model.config``); it gives the layout: ``tokens_per_image`` positions holding ``image_token_index`` per image.
    """
    num_images = 0 if pixel_values is None else int(pixel_values.shape[0])
    batch = expand_official_ids(
        input_ids, attention_mask, labels=labels, config=config, pad_token_id=pad_token_id, num_images=num_images
    )
    if pixel_values is not None:
        batch["pixel_values"] = pixel_values
    return batch


def expand_official_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    config: Owl2Config,
    labels: torch.Tensor | None = None,
    pad_token_id: int = 0,
    num_images: int | None = None,
) -> dict[str, torch.Tensor]:
    """The id/mask/label part of :func:`prepare_official_inputs`; ``num_images``, when given, must equal the number
    of placeholders."""
    if not isinstance(config, Owl2Config):
        raise TypeError(f"config must be the model's Owl2Config (model.config), got {type(config).__name__}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {list(input_ids.shape)}")
    per_image, image_id = config.tokens_per_image, config.image_token_index
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {list(attention_mask.shape)} differs from input_ids {list(input_ids.shape)}"
        )
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {list(labels.shape)} differs from input_ids {list(input_ids.shape)}")
    bad = (input_ids < 0) & (input_ids != OFFICIAL_IMAGE_TOKEN)
    if bool(bad.any()):
        raise ValueError(f"input_ids hold negative ids other than {OFFICIAL_IMAGE_TOKEN}: {input_ids[bad].unique()}")
    num_placeholders = int((input_ids == OFFICIAL_IMAGE_TOKEN).sum())
    if num_images is not None and num_placeholders != num_images:
        raise ValueError(f"input_ids hold {num_placeholders} image placeholder(s) but {num_images} image(s) were given")

    left_padded = bool((attention_mask[:, 0] == 0).any())
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    for i in range(input_ids.shape[0]):
        is_image = input_ids[i] == OFFICIAL_IMAGE_TOKEN
        repeats = torch.where(is_image, per_image, 1)
        ids = torch.repeat_interleave(input_ids[i].masked_fill(is_image, image_id), repeats)
        mask = torch.repeat_interleave(attention_mask[i], repeats)
        row_labels = None
        if labels is not None:
            row_labels = torch.repeat_interleave(labels[i].masked_fill(is_image, IGNORE_INDEX), repeats)
        rows.append((ids, mask, row_labels))

    length = max(len(r[0]) for r in rows)

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        fill = x.new_full((length - len(x),), value)
        return torch.cat([fill, x] if left_padded else [x, fill])

    batch = {
        "input_ids": torch.stack([pad(r[0], pad_token_id) for r in rows]),
        "attention_mask": torch.stack([pad(r[1], 0) for r in rows]),
    }
    if labels is not None:
        batch["labels"] = torch.stack([pad(r[2], IGNORE_INDEX) for r in rows])
    return batch
