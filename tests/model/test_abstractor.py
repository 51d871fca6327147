"""The visual abstractor's query states: what its forward projects into the language model's width."""

from __future__ import annotations

import torch

from owl2.model.abstractor import VisualAbstractor
from owl2.model.config import AbstractorConfig


def _abstractor() -> VisualAbstractor:
    """Two layers, 8 queries 32 wide over a 2x2 ViT grid, projected to 48; every parameter random (the learned
    queries and end token start at zero otherwise)."""
    config = AbstractorConfig(hidden_size=32, encoder_hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, num_learnable_queries=8, grid_size=2)
    abstractor = VisualAbstractor(config, language_hidden_size=48)
    with torch.no_grad():
        for param in abstractor.parameters():
            param.normal_(std=0.5)
    return abstractor.eval()


def test_query_states_are_the_forward_before_projection_and_end_token():
    torch.manual_seed(0)
    abstractor = _abstractor()
    visual = torch.randn(3, 5, 32)  # cls + 2x2 patches
    states = abstractor.query_states(visual)
    assert states.shape == (3, 8, 32)
    tokens = abstractor(visual)
    assert tokens.shape == (3, 9, 48)
    torch.testing.assert_close(tokens[:, :8], abstractor.visual_fc(states), rtol=0, atol=0)
    assert torch.equal(tokens[:, 8], abstractor.vit_eos[0].expand(3, -1))


def test_query_states_run_the_queries_through_every_layer():
    torch.manual_seed(0)
    abstractor = _abstractor()
    visual = torch.randn(2, 5, 32)
    queries = abstractor.query_embeds.expand(2, -1, -1)
    for layer in abstractor.encoder.layers:
        queries = layer(queries, visual)
    torch.testing.assert_close(abstractor.query_states(visual), queries, rtol=0, atol=0)
    # each image's queries depend on that image's ViT tokens
    assert not torch.allclose(abstractor.query_states(visual)[0], abstractor.query_states(visual)[1])
