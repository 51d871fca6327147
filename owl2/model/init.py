"""Random initialisation for training from scratch (the released checkpoint needs none).

Linear and embedding weights and the learned tokens/positions are drawn from N(0, initializer_range), biases are
zero and norm gains one, as in LLaMA and CLIP. The image branch of the MAM (``multiway.1``) starts as a copy of the
text branch, as the paper initialises it from the language model.
"""

from __future__ import annotations

import torch
from torch import nn

from owl2.model.modeling import Owl2ForCausalLM

_LEARNED_TOKENS = ("cls_token", "position_embedding", "query_embeds", "vit_eos")


@torch.no_grad()
def init_weights(model: Owl2ForCausalLM, seed: int = 0) -> Owl2ForCausalLM:
    """Initialise every parameter of ``model`` in place, deterministically from ``seed``; returns ``model``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    config = model.config
    std_of = {"model.vision_model.": config.vision.initializer_range,
              "model.visual_abstractor.": config.abstractor.initializer_range}

    def normal_(param: torch.Tensor, std: float) -> None:
        param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * std)

    for name, module in model.named_modules():
        std = next((s for prefix, s in std_of.items() if name.startswith(prefix)), config.initializer_range)
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            normal_(module.weight, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter) and module.weight.ndim == 1:
            module.weight.fill_(1.0)  # RMSNorm gains
        for token in _LEARNED_TOKENS:
            param = module._parameters.get(token)
            if param is not None:
                normal_(param, std)
    copy_text_branch_to_image_branch(model)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


@torch.no_grad()
def copy_text_branch_to_image_branch(model: nn.Module) -> nn.Module:
    """Set every MAM image branch (``multiway.1``) to a copy of its text branch (``multiway.0``): the paper's
    initialisation of the MAM from a pre-trained language model. A model without the MAM is left as it is."""
    for name, module in model.named_modules():
        if name.endswith(".multiway") and len(module) == 2:
            module[1].load_state_dict(module[0].state_dict())
    return model

