"""Stage V of owl2-tiny: the vision encoder and the abstractor pre-trained on dense labels of the shapes world.

The paper starts from a pre-trained CLIP ViT-L/14. owl2-tiny has no pre-trained encoder to start from, and a ViT
trained from scratch through the language-model loss alone had not grounded a single object after 1000 stage-2
steps (``docs/experiments.md``). So stage V trains one directly: each of the abstractor's ``Q`` learned queries is
given one cell of a ``sqrt(Q) x sqrt(Q)`` grid over the image and predicts what is centred in that cell (whether an
object is, and its shape, colour, size and offset within the cell); the mean of the queries predicts the background
colour and texture. The labels come from the scene descriptions, which the generator keeps for every training
image. The prediction heads are thrown away afterwards: only ``model.vision_model``, ``query_embeds`` and the
abstractor layers keep what they learned, and ``visual_fc`` (the projection into the language model) is left to
stages 1 and 2, like the language model itself.

Stage V reads the same training scenes as stages 1 and 2 (the ``train`` stream, indices ``0..scenes-1``) and probes
on the next ``probe_scenes`` of that stream, which no stage trains on.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from owl2.constants import IGNORE_INDEX
from owl2.utils import atomic_write_text

__all__ = ["VisionPretrainConfig", "grid_targets", "pretrain_vision", "scene_tensors"]

PROBE_FILE = "probe.json"


@dataclass
class VisionPretrainConfig:
    """Settings of stage V (``vision.toml`` of the tiny recipe, ``owl2/experiments/recipes/tiny/``: top-level keys,
    ``[train]`` and ``[optim]``)."""

    seed: int = 0
    scenes: int = 16000
    """Training scenes: indices ``0..scenes-1`` of the ``train`` stream (those of the stage-1/2 data)."""
    probe_scenes: int = 500
    steps: int = 3000
    batch_size: int = 64
    bf16: bool = True
    lr: float = 2e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0
    log_every: int = 50
    loss_weights: dict[str, float] = field(default_factory=lambda: {"objects": 1.0, "offset": 5.0, "scene": 0.2})

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], overrides: Sequence[str] = (),
                  **settings: Any) -> VisionPretrainConfig:
        """The settings of the TOML file ``path``, read as the trainer reads a recipe (``base`` chain, ``overrides``
        such as ``train.steps=100``: :func:`owl2.training.config.read_recipe_file`), then ``settings`` by name
        (``steps=100``; a None leaves the file's value)."""
        from owl2.training.config import read_recipe_file

        data = read_recipe_file(path, overrides)
        # Unlike a training recipe, stage V's settings are one flat list: the sections only group them in the file.
        flat: dict[str, Any] = {k: v for k, v in data.items() if not isinstance(v, dict)}
        for section in ("train", "optim"):
            flat.update(data.get(section, {}))
        if "loss_weights" in data:
            flat["loss_weights"] = dict(data["loss_weights"])
        flat.update({k: v for k, v in settings.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(f"{path}: unknown stage-V settings {', '.join(unknown)}")
        return cls(**flat)


def grid_targets(scene: Any, grid: int) -> dict[str, torch.Tensor]:
    """The dense labels of one scene on a ``grid`` x ``grid`` partition of the image (cells in row-major order).

    ``objects`` [grid², 3]: shape, colour and size index of the object centred in each cell (``-100`` where none;
    when two centres share a cell, which happens in about 1 % of scenes, the first object is kept), ``present``
    [grid²] (0/1), ``offset`` [grid², 2]: that object's centre within its cell (``0..1``, x then y), ``scene`` [2]:
    background and texture index.
    """
    from owl2.experiments.shapes import BACKGROUNDS, COLOURS, SHAPES, SIZES, TEXTURES

    colours = list(COLOURS)
    objects = torch.full((grid * grid, 3), IGNORE_INDEX, dtype=torch.long)
    offset = torch.zeros(grid * grid, 2)
    present = torch.zeros(grid * grid)
    for obj in scene.objects:
        column, row = min(int(obj.x * grid), grid - 1), min(int(obj.y * grid), grid - 1)
        cell = row * grid + column
        if present[cell]:
            continue
        objects[cell] = torch.tensor([SHAPES.index(obj.shape), colours.index(obj.colour), SIZES.index(obj.size)])
        offset[cell] = torch.tensor([obj.x * grid - column, obj.y * grid - row])
        present[cell] = 1.0
    background = torch.tensor([list(BACKGROUNDS).index(scene.background), TEXTURES.index(scene.texture)])
    return {"objects": objects, "present": present, "offset": offset, "scene": background}


def scene_tensors(indices: range, *, seed: int, grid: int, processor: Any, size: int) -> dict[str, torch.Tensor]:
    """Pixels (bf16, preprocessed as in training) and :func:`grid_targets` of ``train``-stream scenes ``indices``."""
    from owl2.experiments.shapes import render_scene, training_scene

    pixels, targets = [], []
    for index in indices:
        scene = training_scene(seed, index)
        pixels.append(processor.preprocess(render_scene(scene, size)).to(torch.bfloat16))
        targets.append(grid_targets(scene, grid))
    batch = {key: torch.stack([t[key] for t in targets]) for key in targets[0]}
    return {"pixels": torch.stack(pixels), **batch}


class _Heads(nn.Module):
    """Linear read-outs of the abstractor's query states, discarded after stage V."""

    SPLITS = (("present", 1), ("shape", 5), ("colour", 8), ("size", 2), ("offset", 2))

    def __init__(self, width: int) -> None:
        super().__init__()
        self.cells = nn.Linear(width, sum(n for _, n in self.SPLITS))
        self.scene = nn.Linear(width, 6)  # 3 backgrounds, 3 textures

    def forward(self, queries: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``queries`` [N, grid², D] -> per-cell logits by name, scene logits [N, 6]."""
        parts = torch.split(self.cells(queries), [n for _, n in self.SPLITS], dim=-1)
        return {name: part for (name, _), part in zip(self.SPLITS, parts, strict=True)}, self.scene(queries.mean(1))


def _losses(cells: dict[str, torch.Tensor], scene: torch.Tensor, batch: dict[str, torch.Tensor],
            weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    present = batch["present"]
    objects = F.binary_cross_entropy_with_logits(cells["present"][..., 0], present) + sum(
        F.cross_entropy(cells[name].flatten(0, 1), batch["objects"][..., k].flatten())
        for k, name in enumerate(("shape", "colour", "size")))
    offset = ((cells["offset"].sigmoid() - batch["offset"]) ** 2 * present[..., None]).sum() / present.sum().clamp(
        min=1)
    whole = F.cross_entropy(scene[:, :3], batch["scene"][:, 0]) + F.cross_entropy(scene[:, 3:], batch["scene"][:, 1])
    parts = {"objects": objects, "offset": offset, "scene": whole}
    total = sum(weights[name] * value for name, value in parts.items())
    return total, {name: float(value.detach()) for name, value in parts.items()}


@torch.no_grad()
def _probe(encode: Any, heads: _Heads, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """Held-out accuracy of the read-outs: presence per cell, shape/colour/size where an object is, background."""
    cells, scene = heads(encode(data["pixels"].float()))
    present = data["present"].bool()
    report = {"presence": ((cells["present"][..., 0] > 0) == present).float().mean().item()}
    for k, name in enumerate(("shape", "colour", "size")):
        report[name] = (cells[name].argmax(-1) == data["objects"][..., k])[present].float().mean().item()
    report["background"] = (scene[:, :3].argmax(-1) == data["scene"][:, 0]).float().mean().item()
    error = (cells["offset"].sigmoid() - data["offset"]).abs().mean(-1)
    report["offset_error"] = error[present].mean().item()
    return {k: round(v, 4) for k, v in report.items()}


def pretrain_vision(model: nn.Module, config: VisionPretrainConfig, output_dir: str | os.PathLike[str], *,
                    image_size: int, processor: Any, show_progress: bool = True) -> dict[str, float]:
    """Train ``model``'s vision encoder, abstractor queries and abstractor layers in place (module docstring).

    Writes ``metrics.jsonl``, ``loss.png`` and ``probe.json`` (the held-out read-out accuracies, also returned) to
    ``output_dir``.
    """
    from owl2.training.metrics import MetricsLogger, plot_loss_curve, read_metrics
    from owl2.training.optim import VISION_SIDE, OptimConfig, build_scheduler, group_parameters

    core = model.model
    abstractor = core.visual_abstractor
    queries = abstractor.config.num_learnable_queries
    grid = math.isqrt(queries)
    if grid * grid != queries:
        raise ValueError(f"stage V needs a square number of abstractor queries (one per grid cell), got {queries}")
    torch.manual_seed(config.seed)
    heads = _Heads(abstractor.config.hidden_size)
    named = [(n, p) for n, p in model.named_parameters() if n.startswith(VISION_SIDE)]
    named += [(f"heads.{n}", p) for n, p in heads.named_parameters()]
    params = [p for _, p in named]
    # The trainer's parameter groups (no weight decay for biases, norms and learned tokens) and schedule (warm-up,
    # then cosine to min_lr), with one learning rate for everything: the layer-wise decay protects what a
    # pre-trained ViT's early layers know, and stage V's ViT starts from scratch. Stage V's AdamW differs from
    # the trainer's build_optimizer in two ways that change its results, so the owl2-tiny build's vision side would
    # no longer be reproducible from its seed: eps stays AdamW's default 1e-8 (not the paper's 1e-6), and the
    # update is the plain per-parameter loop, which rounds differently from the fused kernel.
    optim = OptimConfig(lr=config.lr, min_lr=config.min_lr, abstractor_lr=None, vit_layer_decay=1.0,
                        weight_decay=config.weight_decay, eps=1e-8, warmup_steps=config.warmup_steps,
                        total_steps=config.steps)
    optimizer = torch.optim.AdamW(group_parameters(named, optim, core.config.vision.num_hidden_layers), lr=optim.lr,
                                  betas=optim.betas, eps=optim.eps, fused=False)
    schedule = build_scheduler(optimizer, optim)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> the abstractor's query states [N, Q, D] (before ``visual_fc``)."""
        return abstractor.query_states(core.vision_model(pixels)).float()

    data = scene_tensors(range(config.scenes), seed=config.seed, grid=grid, processor=processor, size=image_size)
    held_out = scene_tensors(range(config.scenes, config.scenes + config.probe_scenes), seed=config.seed, grid=grid,
                             processor=processor, size=image_size)
    output_dir = Path(output_dir)
    logger = MetricsLogger(output_dir, tensorboard=False)
    generator = torch.Generator().manual_seed(config.seed)
    for _, param in named:
        param.requires_grad_(True)
    model.train()
    bar = _progress_bar(config.steps, show_progress)
    logged = time.perf_counter()
    for step in range(config.steps):
        index = torch.randint(0, config.scenes, (config.batch_size,), generator=generator)
        batch = {key: value[index] for key, value in data.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            states = encode(batch["pixels"].float())
        cells, scene = heads(states)
        loss, parts = _losses(cells, scene, batch, config.loss_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            now = time.perf_counter()
            logger.log({"step": step + 1, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"], **parts,
                        "step_seconds": now - logged})  # the seconds since the last record, so they sum to the run
            logged = now
            bar.set_postfix(loss=f"{loss.item():.3f}")
        schedule.step()  # after logging: the record shows the rate this step trained with
        bar.update(1)
    bar.close()
    logger.close()
    model.eval()
    report = _probe(encode, heads, held_out)
    plot_loss_curve(read_metrics(output_dir), output_dir / "loss.png", title="owl2-tiny stage V")
    atomic_write_text(output_dir / PROBE_FILE, json.dumps(report, indent=2) + "\n")
    return report


class _PlainProgress:
    """Stage V's progress without tqdm (an optional dependency, the ``progress`` extra): a line on stderr each time
    the loss is logged, rather than nothing for the quarter of an hour the stage takes."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.n, self.enabled = total, 0, enabled

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix(self, **values: str) -> None:
        if self.enabled:
            shown = ", ".join(f"{k} {v}" for k, v in values.items())
            print(f"owl2 stage V: step {self.n + 1}/{self.total}, {shown}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar over the steps when tqdm is installed, else :class:`_PlainProgress`."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(total, enabled)
    return tqdm(total=total, desc="owl2 stage V", unit="step", disable=not enabled)
