"""What trains in each stage, and the optimizer the paper describes.

Stage 1 (pre-training) trains the vision encoder, the visual abstractor and the image branch of the MAM
(``multiway.1`` of the two RMSNorms and the K/V projections) with the rest of the LLM frozen. Stage 2 (joint
instruction tuning) trains everything.

The optimizer is AdamW with the paper's betas (0.9, 0.98) and eps 1e-6, a separate learning rate for the
abstractor, and layer-wise learning-rate decay for the ViT (the paper calls it crucial): ViT block ``i`` of ``L``
gets ``lr * decay**(L - i)``, the embeddings ``lr * decay**(L + 1)`` and the final LayerNorm ``lr``. The official
code lacks both (its abstractor learning-rate groups match no parameter name). Biases, norm gains and learned
tokens/positions get no weight decay. The schedule is a linear warm-up followed by a cosine decay to ``min_lr``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

STAGES = ("language", "stage1", "stage2")

_IMAGE_BRANCH = re.compile(r"^model\.layers\.\d+\.(input_layernorm|post_attention_layernorm|self_attn\.[kv]_proj)"
                           r"\.multiway\.1\.")
_VISUAL = ("model.vision_model.", "model.visual_abstractor.")
VISION_SIDE = ("model.vision_model.", "model.visual_abstractor.encoder.", "model.visual_abstractor.query_embeds")
"""The parameters the ``language`` stage freezes: the ViT and the abstractor's queries and layers."""
_VIT_BLOCK = re.compile(r"^model\.vision_model\.encoder\.layers\.(\d+)\.")
_NO_DECAY_NAMES = re.compile(r"(cls_token|position_embedding|query_embeds|vit_eos)$")
_WRAPPER_PREFIX = re.compile(r"^(base_model\.model\.)")  # peft's prefix in front of the official names


def official_name(name: str) -> str:
    """A parameter name with wrapper prefixes removed (``base_model.model.model.x`` -> ``model.x``)."""
    return _WRAPPER_PREFIX.sub("", name)


def is_trainable_in(stage: str, name: str) -> bool:
    """Whether parameter ``name`` (official key) trains in ``stage``.

    ``stage1``: the vision encoder, the abstractor and the MAM's image branch (the paper's pre-training stage).
    ``stage2``: everything (instruction tuning). ``language``: everything but the vision encoder and the abstractor's
    queries and layers, i.e. the language model (both MAM branches) and the projection into it (``visual_fc``,
    ``vit_eos``); it pre-trains a language model from scratch next to a vision side that is already trained.
    """
    if stage == "stage2":
        return True
    if stage == "language":
        return not name.startswith(VISION_SIDE)
    if stage == "stage1":
        return name.startswith(_VISUAL) or bool(_IMAGE_BRANCH.match(name))
    raise ValueError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}")


def set_trainable(model: nn.Module, stage: str) -> list[str]:
    """Freeze and unfreeze ``model``'s parameters for ``stage``; returns the names of the trainable ones."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable_in(stage, name))
        if param.requires_grad:
            trainable.append(name)
    return trainable


@dataclass
class OptimConfig:
    """Optimizer and schedule settings; defaults are the paper's stage-2 values."""

    lr: float = 2e-5
    min_lr: float = 1e-7
    abstractor_lr: float | None = None  # None: same as lr
    vit_layer_decay: float = 0.9  # 1.0 disables layer-wise decay
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 250
    total_steps: int = 4800
    grad_clip: float = 1.0


def lr_scale(name: str, num_vit_layers: int, decay: float) -> float:
    """Layer-wise decay factor of a ViT parameter (1.0 for everything else)."""
    if not name.startswith("model.vision_model.") or decay == 1.0:
        return 1.0
    block = _VIT_BLOCK.match(name)
    if block:
        depth = int(block.group(1)) + 1
    elif name.startswith("model.vision_model.embeddings."):
        depth = 0
    else:  # post_layernorm
        depth = num_vit_layers + 1
    return decay ** (num_vit_layers + 1 - depth)


def exempt_from_decay(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay skips a parameter: biases, norm weights, and the learned tokens and positions."""
    return param.ndim < 2 or bool(_NO_DECAY_NAMES.search(name))


def param_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    """Trainable parameters grouped by (learning rate, weight decay); each group records its ``lr_scale`` so the
    schedule can scale it."""
    num_vit_layers = core_model(model).config.vision.num_hidden_layers
    return group_parameters(((n, p) for n, p in model.named_parameters() if p.requires_grad), config, num_vit_layers)


def group_parameters(named: Iterable[tuple[str, nn.Parameter]], config: OptimConfig,
                     num_vit_layers: int) -> list[dict]:
    """``named`` parameters grouped by (learning rate, weight decay) as :func:`param_groups` groups a model's
    trainable ones; ``num_vit_layers`` is the ViT's depth for the layer-wise decay. Each group has ``params``,
    ``names``, ``lr``, ``weight_decay`` and ``base_lr``, in the order of its first parameter."""
    groups: dict[tuple[float, float], dict] = {}
    for full_name, param in named:
        name = official_name(full_name)
        base = config.abstractor_lr if name.startswith("model.visual_abstractor.") and config.abstractor_lr else (
            config.lr)
        lr = base * lr_scale(name, num_vit_layers, config.vit_layer_decay)
        decay = 0.0 if exempt_from_decay(name, param) else config.weight_decay
        group = groups.setdefault((lr, decay), {"params": [], "names": [], "lr": lr, "weight_decay": decay,
                                                "base_lr": lr})
        group["params"].append(param)
        group["names"].append(full_name)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return list(groups.values())


def core_model(model: nn.Module):  # -> Owl2ForCausalLM (imported lazily: modeling imports nothing from here)
    """The :class:`~owl2.model.modeling.Owl2ForCausalLM` inside ``model`` (itself, or under DDP/peft wrappers)."""
    from owl2.model.modeling import Owl2ForCausalLM

    for module in model.modules():
        if isinstance(module, Owl2ForCausalLM):
            return module
    raise TypeError(f"{type(model).__name__} holds no Owl2ForCausalLM")


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused kernel where it applies (3x faster than the loop on the CPU)."""
    groups = param_groups(model, config)
    params = [p for g in groups for p in g["params"]]
    fused = all(type(p).__name__ != "DTensor" and p.device.type in ("cpu", "cuda") and p.dtype in (
        torch.float32, torch.bfloat16, torch.float16) for p in params)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused)


def lr_multiplier(step: int, config: OptimConfig) -> float:
    """Linear warm-up to 1, then cosine from 1 to ``min_lr / lr`` at ``total_steps``."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    floor = config.min_lr / config.lr
    span = max(1, config.total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config))
