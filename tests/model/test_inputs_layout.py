"""The expanded layout comes from the config passed in, never from whichever model was loaded last."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import owl2
from owl2.constants import IGNORE_INDEX, OFFICIAL_IMAGE_TOKEN
from tests.conftest import OFFICIAL_TINY, TINY_CONFIG


def test_layout_is_the_given_configs_whatever_was_loaded():
    ids, pixels = torch.tensor([[1, 5, OFFICIAL_IMAGE_TOKEN, 6]]), torch.zeros(1, 3, 8, 8)
    other = dataclasses.replace(TINY_CONFIG, image_token_id=TINY_CONFIG.vocab_size + 7)
    before = owl2.prepare_official_inputs(ids, pixel_values=pixels, config=other)["input_ids"]
    owl2.load_model(str(OFFICIAL_TINY), dtype=torch.float32)  # loading a model changes no one's layout
    after = owl2.prepare_official_inputs(ids, pixel_values=pixels, config=other)["input_ids"]
    assert torch.equal(before, after)
    per_image = TINY_CONFIG.tokens_per_image
    assert after.tolist() == [[1, 5, *[other.image_token_index] * per_image, 6]]

    default = owl2.Owl2Config()  # the released layout: 65 positions per image
    expanded = owl2.prepare_official_inputs(ids, pixel_values=pixels, labels=torch.tensor([[1, 5, 9, 6]]),
                                            config=default)
    assert expanded["input_ids"].shape == (1, 3 + default.tokens_per_image)
    assert (expanded["labels"][0, 2:-1] == IGNORE_INDEX).all() and expanded["labels"][0, -1] == 6


def test_the_config_is_required():
    ids = torch.tensor([[1, OFFICIAL_IMAGE_TOKEN]])
    with pytest.raises(TypeError, match="config"):
        owl2.prepare_official_inputs(ids)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"model\.config"):
        owl2.prepare_official_inputs(ids, config=None)  # type: ignore[arg-type]
