"""The training loop behind ``owl2 train``: one process, DDP, FSDP2 or DeepSpeed, all from one recipe.

Per optimizer step each rank takes ``grad_accum`` micro-batches. The loss is the summed token cross-entropy divided by
the number of target tokens of the *global* step (all micro-batches of all ranks), so 1 process with batch 4 and 2
processes with batch 2 compute the same loss and the same update. Text-only batches skip the vision tower. In stage 1
(and with LoRA on the image branch only) text-only samples reach no trainable parameter and are left out.

With ``[loss] soft_label_weight`` > 0 the samples that carry a soft label (DeQA-Score, :mod:`owl2.training.losses`)
add a KL loss at their level word, averaged over the soft-labelled samples of the global step, and their level word
leaves the cross-entropy; the step's loss is ``ce_weight * CE + soft_label_weight * KL``. Batches without soft labels
train exactly as before (with ``ce_weight`` 1, the default).

A run smaller than its recipe adapts and says so in one warning line: with fewer samples than one global batch the
batch shrinks to the data (:func:`fit_batch_to_data`), and a warm-up at least as long as the run is cut to
:data:`FALLBACK_WARMUP_RATIO` of it (:func:`fit_warmup`); ``recipe.toml`` records the values used. The logged
``epoch`` is the fraction of passes over the data so far. With neither ``model.path`` nor ``model.init_config`` the
run starts from the embedded owl2-tiny.

Outputs under ``output_dir``: ``recipe.toml``, ``metrics.jsonl`` (loss, lr, grad norm, tokens/s per logged step),
``tensorboard/`` (when installed), ``loss.png``, ``checkpoints/step-*/`` (resumable, see
:mod:`owl2.training.checkpointing`) and the result: ``final/`` (a safetensors checkpoint that ``owl2.load`` reads,
with the tokenizer and image processor) or, with LoRA, ``adapter/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from owl2.checkpoint.io import (
    check_processing_files,
    copy_processing_files,
    load_model,
    resolve_checkpoint,
    save_state_dict,
)
from owl2.data import IGNORE_INDEX, ModalityLengthGroupedSampler, SupervisedDataset, collate
from owl2.model.config import Owl2Config
from owl2.model.init import init_weights
from owl2.model.modeling import Owl2ForCausalLM
from owl2.processing.image import PREPROCESSOR_CONFIG_NAME, ImageProcessor, load_image_processor
from owl2.processing.tokenizer import load_tokenizer
from owl2.training.checkpointing import (
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
)
from owl2.training.config import TrainConfig
from owl2.training.distributed import DistEnv, all_reduce_sum, barrier, init_distributed, make_strategy, unwrap
from owl2.training.losses import SOFT_LABEL_KEYS, mask_level_words, soft_label_kl
from owl2.training.metrics import MetricsLogger, plot_loss_curve, read_metrics
from owl2.training.optim import build_optimizer, build_scheduler, core_model, lr_multiplier, set_trainable
from owl2.utils import atomic_write_text

logger = logging.getLogger("owl2.training")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    """Loss of every step this process logged (including the steps before a resume)."""
    final_dir: Path | None = None
    adapter_dir: Path | None = None
    plot: Path | None = None


# ------------------------------------------------------------------------------------------------------ building
def build_model(config: TrainConfig, env: DistEnv) -> Owl2ForCausalLM:
    """The starting model in float32 on this rank's device, in train mode."""
    if config.model.path is not None:
        model = load_model(config.model.path, dtype=torch.float32, device=env.device, show_progress=env.is_main)
    else:
        model = init_weights(Owl2ForCausalLM(Owl2Config.from_json(config.model.init_config)), seed=config.seed)
        model.reset_buffers()
        model = model.to(env.device)
    return model.train()


def build_image_processor(config: TrainConfig, model_config: Owl2Config) -> ImageProcessor:
    source = config.model.image_processor or config.model.path
    if source is not None:
        directory = resolve_checkpoint(source) if config.model.path == source else Path(source)
        processor = load_image_processor(directory)
    else:
        size = model_config.vision.image_size
        processor = ImageProcessor(size=size, crop_size=size)
    if processor.output_size != (model_config.vision.image_size,) * 2:
        raise ValueError(f"the image processor gives {processor.output_size} images but the model takes "
                         f"{model_config.vision.image_size} px; set model.image_processor")
    return processor


def _apply_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    from owl2.training.lora import LoraSettings, apply_lora

    settings = LoraSettings(**{k: v for k, v in dataclasses.asdict(config.lora).items() if k != "enabled"})
    return apply_lora(model, settings)


def _needs_images(config: TrainConfig) -> bool:
    """Whether text-only samples reach no trainable parameter (so they are left out)."""
    if config.lora.enabled:  # the image-branch preset: adapters and abstractor only see image positions
        return config.lora.preset == "image" and config.lora.target_pattern is None
    return config.stage == "stage1"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


FALLBACK_WARMUP_RATIO = 0.03
"""Warm-up as a fraction of the run when ``optim.warmup_steps`` would not fit in it (the official scripts'
``warmup_ratio``, and the value transformers users pass most)."""


def fit_batch_to_data(num_samples: int, batch_size: int, grad_accum: int, world_size: int,
                      micro_batches: Callable[[int], int]) -> tuple[int, int, str | None]:
    """``(batch_size, grad_accum, note)`` such that one optimizer step takes at most one pass over the data.

    A global batch (``batch_size * world_size * grad_accum``) larger than the data would put the same samples
    several times into one step: the batch shrinks to the data instead. Each process's micro-batch shrinks first to
    its share of the samples, then ``grad_accum`` to the micro-batches of one epoch (``micro_batches(batch_size)``,
    which counts the batches that never mix text-only and image samples). ``note`` says what changed (None when
    nothing did).
    """
    if batch_size * world_size * grad_accum <= num_samples:
        return batch_size, grad_accum, None
    new_batch = min(batch_size, -(-num_samples // world_size))
    new_accum = min(grad_accum, micro_batches(new_batch))
    changes = [f"train.{key}={new}" for key, old, new in (("batch_size", batch_size, new_batch),
                                                          ("grad_accum", grad_accum, new_accum)) if new != old]
    if not changes:
        return batch_size, grad_accum, None
    processes = f"{world_size} process{'es' if world_size > 1 else ''}"
    return new_batch, new_accum, (
        f"the data has {num_samples} sample(s), fewer than one global batch of "
        f"{batch_size * world_size * grad_accum} (batch_size {batch_size} x {processes} x grad_accum {grad_accum}); "
        f"using {', '.join(changes)}, so that one step takes at most one pass over the data")


def fit_warmup(warmup_steps: int, total_steps: int) -> tuple[int, str | None]:
    """``(warmup_steps, note)``: a warm-up that does not fit in the run is cut to :data:`FALLBACK_WARMUP_RATIO` of it.

    With ``warmup_steps >= total_steps`` the learning rate never gets past the warm-up ramp (the LoRA recipe's 250
    steps on a 1-step run trained at ``lr / 250``), which is never what a short run wants."""
    if warmup_steps < total_steps or warmup_steps == 0:
        return warmup_steps, None
    capped = round(FALLBACK_WARMUP_RATIO * total_steps)
    return capped, (f"optim.warmup_steps={warmup_steps} is not shorter than the run's {total_steps} step(s), so the "
                    f"learning rate would never leave the warm-up; using optim.warmup_steps={capped} "
                    f"({FALLBACK_WARMUP_RATIO:.0%} of the steps, the official warmup_ratio)")


# ------------------------------------------------------------------------------------------------------- the data
class MicroBatches:
    """This rank's micro-batches from a data position on, epoch after epoch (the order depends on the seed only)."""

    def __init__(self, dataset: SupervisedDataset, sampler: ModalityLengthGroupedSampler, keep: list[int],
                 collate_fn: Any, num_workers: int, seed: int) -> None:
        self.dataset, self.sampler, self.keep = dataset, sampler, keep
        self.collate_fn, self.num_workers, self.seed = collate_fn, num_workers, seed

    def __len__(self) -> int:
        return len(self.sampler)

    def iterate(self, epoch: int, batch: int) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        """Yields ``(epoch, batch index after this one, micro-batch)`` forever, starting at ``(epoch, batch)``."""
        while True:
            self.sampler.set_epoch(epoch)
            batches = [[self.keep[i] for i in b] for b in self.sampler][batch:]
            # A private generator: worker seeding must not draw from the global RNG that a resume restores.
            loader = DataLoader(self.dataset, batch_sampler=batches, collate_fn=self.collate_fn,
                                num_workers=self.num_workers,
                                generator=torch.Generator().manual_seed(self.seed + epoch))
            for micro in loader:
                batch += 1
                yield epoch, batch, micro
            epoch, batch = epoch + 1, 0


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------------ the loop
class Trainer:
    """Holds a run's pieces; :meth:`run` trains to the end (see the module docstring).

    Building one runs the setup steps below in order; each says what it sets up and what it needs from the steps
    before it. The order is part of the behaviour: the steps that draw random numbers (the model's initial weights,
    the LoRA adapters) run after the seeding, in the same order on every rank, so every run of a recipe starts
    from the same weights."""

    def __init__(self, config: TrainConfig, *, resume: str | bool | None = None) -> None:
        self._setup_run(config)
        self._setup_processing()
        model = self._setup_model()
        batch_size, grad_accum, note = self._setup_data()
        self._setup_schedule(batch_size, grad_accum, note)
        self._setup_optimizer(model)
        self._setup_resume(resume)

    @property
    def model(self) -> nn.Module:
        """The model the forward runs on (a DDP wrapper or a DeepSpeed engine around it, where the strategy has
        one; :func:`~owl2.training.distributed.unwrap` gives the model itself)."""
        return self.strategy.model

    # ---------------------------------------------------------------------------------------------------- setup
    def _setup_run(self, config: TrainConfig) -> None:
        """The recipe (``config``, with the default model filled in), this process's place in the launch (``env``),
        the data-parallel ``strategy``, the ``output_dir``, and the seeded random-number generators.

        Needs nothing; refuses a LoRA recipe without peft here, before the model loads (minutes for 7B)."""
        config = config.with_default_model()
        if config.lora.enabled:
            from owl2.training.lora import _require_peft

            _require_peft()
        self.config = config
        self.env = init_distributed(config.train.device)
        self.strategy = make_strategy(config.train.distributed, self.env)
        self.output_dir = Path(config.output_dir)
        _seed_everything(config.seed)

    def _setup_processing(self) -> None:
        """The ``tokenizer`` and the directory it came from (``tokenizer_dir``, copied next to the final weights).

        Needs the recipe (:meth:`_setup_run`). A tokenizer directory that cannot be copied is refused now, not at
        the end of the run."""
        self.tokenizer_dir = resolve_checkpoint(self.config.model.tokenizer or self.config.model.path)
        check_processing_files(self.tokenizer_dir)
        self.tokenizer = load_tokenizer(self.tokenizer_dir)

    def _setup_model(self) -> nn.Module:
        """The starting model, returned unwrapped on this rank's device with the stage's trainable parameters (and
        the LoRA adapters and gradient checkpointing the recipe asks for); also ``model_config`` and the
        ``image_processor`` that matches the model's image size.

        Needs the recipe, the device and the seeded generators (:meth:`_setup_run`): random-init weights and LoRA
        adapters draw from them."""
        config = self.config
        model = build_model(config, self.env)
        self.model_config = model.config
        self.image_processor = build_image_processor(config, model.config)
        set_trainable(model, config.stage)
        if config.lora.enabled:
            model = _apply_lora(model, config)
        if config.train.gradient_checkpointing:
            core_model(model).set_gradient_checkpointing(True)
        return model

    def _setup_data(self) -> tuple[int, int, str | None]:
        """The ``dataset``, whether the soft-label loss is on (``soft_labels``) and this rank's micro-batches
        (``data``); returns ``(batch_size, grad_accum, note)`` fitted to the data (:func:`fit_batch_to_data`).

        Needs the tokenizer (:meth:`_setup_processing`), and the model's config and image processor
        (:meth:`_setup_model`). Text-only samples are left out where they would train no parameter."""
        config, env = self.config, self.env
        self.dataset = SupervisedDataset(
            config.data.path, self.tokenizer, image_root=config.data.image_root, template=config.data.template,
            max_length=config.data.max_length, tokens_per_image=self.model_config.tokens_per_image,
            image_processor=self.image_processor, image_policy=config.data.image_policy,
            levels=config.loss.levels, level_prefix=config.loss.level_prefix,
        )
        self.soft_labels = config.loss.soft_label_weight > 0
        if self.soft_labels and self.dataset.num_soft_labels == 0 and env.is_main:
            logger.warning("loss.soft_label_weight is set but no record of %s has a soft_label", config.data.path)
        keep = list(range(len(self.dataset)))
        if _needs_images(config):
            dropped = len(keep) - sum(self.dataset.is_multimodal)
            keep = [i for i in keep if self.dataset.is_multimodal[i]]
            if dropped and env.is_main:
                logger.warning("%s: left out %d text-only sample(s); they train no parameter of this recipe",
                               config.stage, dropped)
        if not keep:
            raise ValueError(f"{config.data.path}: no usable training sample")

        def make_sampler(batch_size: int) -> ModalityLengthGroupedSampler:
            return ModalityLengthGroupedSampler(
                [self.dataset.lengths[i] for i in keep], [self.dataset.is_multimodal[i] for i in keep],
                batch_size, world_size=env.world_size, rank=env.rank, seed=config.seed,
            )

        batch_size, grad_accum, note = fit_batch_to_data(len(keep), config.train.batch_size, config.train.grad_accum,
                                                         env.world_size, lambda b: len(make_sampler(b)))

        def collate_fn(samples: list[dict]) -> dict[str, torch.Tensor]:
            return collate(samples, pad_token_id=self.tokenizer.pad_token_id, config=self.model_config)

        self.data = MicroBatches(self.dataset, make_sampler(batch_size), keep, collate_fn, config.data.num_workers,
                                 config.seed)
        return batch_size, grad_accum, note

    def _setup_schedule(self, batch_size: int, grad_accum: int, note: str | None) -> None:
        """The run's length (``total_steps``), its warm-up (:func:`fit_warmup`), the recipe as it actually runs
        (``config``, with the fitted batch layout and warm-up) and the optimizer settings (``optim_config``).

        Needs the micro-batches (:meth:`_setup_data`) and what that step fitted to the data; logs one warning line
        for everything adapted (``note``)."""
        config = self.config
        self.total_steps = config.train.max_steps or max(1, math.ceil(config.train.epochs * len(self.data)
                                                                      / grad_accum))
        warmup = config.optim.warmup_steps
        if config.train.warmup_ratio is not None:
            warmup = round(config.train.warmup_ratio * self.total_steps)
        else:
            warmup, warmup_note = fit_warmup(warmup, self.total_steps)
            note = f"{note}; {warmup_note}" if note and warmup_note else note or warmup_note
        if note and self.env.is_main:
            logger.warning("owl2 train: %s", note)
        # The recipe written beside the run (and saved in checkpoints) records what actually runs, so a rerun of it
        # repeats this run without adapting again.
        self.config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, batch_size=batch_size, grad_accum=grad_accum),
            optim=dataclasses.replace(config.optim, warmup_steps=warmup))
        self.optim_config = dataclasses.replace(self.config.optim, total_steps=self.total_steps)

    def _setup_optimizer(self, model: nn.Module) -> None:
        """The model as the strategy runs it (``model``: wrapped for DDP, sharded for FSDP2, an engine for
        DeepSpeed), the ``optimizer`` and the learning-rate ``scheduler``.

        Needs the built model (:meth:`_setup_model`), and the recipe as it runs and ``optim_config``
        (:meth:`_setup_schedule`): DeepSpeed takes its batch layout from the recipe."""
        wrapped = self.strategy.wrap(model, self.config)
        optimizer = build_optimizer(unwrap(wrapped), self.optim_config)
        scheduler = build_scheduler(optimizer, self.optim_config)
        self.optimizer, self.scheduler = self.strategy.attach_optimizer(optimizer, scheduler, self.config)

    def _setup_resume(self, resume: str | bool | None) -> None:
        """The trainer ``state`` (step, data position, tokens) and ``resumed_from``: the checkpoint ``resume``
        names (True: the latest under ``output_dir``) restores the weights, optimizer, schedule and random state;
        without one the run starts at step 0.

        Needs everything before it: a checkpoint loads into the wrapped model, the optimizer and the scheduler
        (:meth:`_setup_optimizer`)."""
        self.state = TrainerState()
        checkpoint = self._resume_point(resume)
        if checkpoint is not None:
            self.state = load_checkpoint(checkpoint, self.strategy, self.optimizer, self.scheduler)
            if self.env.is_main:
                logger.info("resumed from %s (step %d)", checkpoint, self.state.step)
        self.resumed_from = checkpoint

    def _resume_point(self, resume: str | bool | None) -> Path | None:
        if not resume:
            return None
        if resume is True:
            found = latest_checkpoint(self.output_dir)
            if found is None and self.env.is_main:
                logger.warning("no checkpoint under %s; starting from step 0", self.output_dir)
            return found
        return Path(resume)

    # ---------------------------------------------------------------------------------------------------- steps
    def _micro_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Summed cross-entropy over the target tokens and, for a batch with soft labels, the summed KL."""
        labels = batch.pop("labels")
        soft = {key: batch.pop(key) for key in SOFT_LABEL_KEYS if key in batch}
        with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.config.train.bf16):
            logits = self.model(**batch).logits
        ce = Owl2ForCausalLM.loss(logits, labels, batch["attention_mask"].bool(), None, reduction="sum")
        if not soft:
            return ce, None
        return ce, soft_label_kl(logits, soft["soft_labels"], soft["level_ids"], soft["level_positions"])

    def _prepare_soft_labels(self, batch: dict[str, torch.Tensor]) -> int:
        """Takes each soft-labelled level word out of the cross-entropy (or, with the loss off, drops the soft
        labels); returns the number of soft-labelled samples in ``batch``."""
        if "level_positions" not in batch:
            return 0
        if not self.soft_labels:
            for key in SOFT_LABEL_KEYS:
                batch.pop(key)
            return 0
        batch["labels"] = mask_level_words(batch["labels"], batch["level_positions"])
        return int((batch["level_positions"] >= 0).sum())

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; returns the step's global metrics."""
        env = self.env
        local_soft = sum(self._prepare_soft_labels(b) for b in micro_batches)
        local_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
        local_tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
        counts = all_reduce_sum(torch.tensor([local_targets, local_tokens, local_soft], dtype=torch.float64), env)
        targets, tokens, softs = max(1.0, float(counts[0])), float(counts[1]), max(1.0, float(counts[2]))
        ce_weight, kl_weight = self.config.loss.ce_weight, self.config.loss.soft_label_weight
        ce_sum = torch.zeros((), dtype=torch.float64)
        kl_sum = torch.zeros((), dtype=torch.float64)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            batch = _to_device(batch, env.device)
            with self.strategy.no_sync(last):
                ce, kl = self._micro_loss(batch)
                if not ce.requires_grad:
                    raise RuntimeError("this batch reaches no trainable parameter; check the stage and LoRA targets")
                # Each term is averaged over its own global count (target tokens; soft-labelled samples).
                loss = ce * (ce_weight / targets)
                if kl is not None:
                    loss = loss + kl * (kl_weight / softs)
                    kl_sum += kl.detach().double().cpu()
                # Every strategy averages gradients over ranks: scale by world_size to get the global mean.
                self.strategy.backward(loss * env.world_size, last)
            ce_sum += ce.detach().double().cpu()
        ce_value = float(all_reduce_sum(ce_sum, env)) / targets
        result = {"loss": ce_weight * ce_value, "targets": targets, "tokens": tokens}
        if self.soft_labels:
            kl_value = float(all_reduce_sum(kl_sum, env)) / softs
            result.update(loss=ce_weight * ce_value + kl_weight * kl_value, ce=ce_value, soft_label_kl=kl_value,
                          soft_labels=float(counts[2]))
        result["grad_norm"] = self.strategy.clip_and_step(self.optimizer, self.scheduler, self.optim_config.grad_clip,
                                                          result["loss"], self._diverged)
        return result

    def _diverged(self, loss: float, norm: float) -> None:
        last = latest_checkpoint(self.output_dir)
        hint = f"resume from {last} with a lower optim.lr" if last else "lower optim.lr or check the data"
        raise TrainingDiverged(f"training diverged at step {self.state.step + 1}: loss {loss}, gradient norm {norm} "
                               f"(lr {self.current_lr():.3g}); {hint}")

    def epochs_done(self) -> float:
        """Passes over the data so far, fractional (1.0 after exactly one epoch), as the logs report it.

        ``state.epoch`` alone is the 0-based index of the epoch the last micro-batch came from: logged as is, a
        1-epoch run whose step is larger than the data reported epoch 5."""
        return round(self.state.epoch + self.state.batch / len(self.data), 4)

    def current_lr(self) -> float:
        """The learning rate of this step for ``optim.lr`` (groups with decay or their own rate scale it)."""
        return self.optim_config.lr * lr_multiplier(self.state.step, self.optim_config)

    # ------------------------------------------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        config, env, state = self.config, self.env, self.state
        metrics = None
        if env.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_checkpoints(self.output_dir)
            atomic_write_text(self.output_dir / "recipe.toml", config.to_toml())
            metrics = MetricsLogger(self.output_dir, resume_step=state.step if self.resumed_from else None,
                                    tensorboard=config.train.tensorboard)
        bar = _progress_bar(self.total_steps, state.step, enabled=env.is_main and config.train.progress)
        stream = self.data.iterate(state.epoch, state.batch)
        try:
            while state.step < self.total_steps:
                started = time.perf_counter()
                micro = []
                for _ in range(config.train.grad_accum):
                    state.epoch, state.batch, batch = next(stream)
                    micro.append(batch)
                lr = self.current_lr()
                result = self.train_step(micro)
                state.step += 1
                state.tokens += int(result["targets"])
                seconds = time.perf_counter() - started
                record = {"step": state.step, "epoch": self.epochs_done(), "loss": result["loss"], "lr": lr,
                          "grad_norm": result["grad_norm"], "tokens_per_s": result["tokens"] / seconds,
                          "step_seconds": seconds}
                record.update({k: result[k] for k in ("ce", "soft_label_kl") if k in result})
                if metrics is not None and (state.step % config.train.log_every == 0
                                            or state.step == self.total_steps):
                    metrics.log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{lr:.2e}",
                                    tok_s=f"{record['tokens_per_s']:.0f}")
                every = config.train.save_every
                if (every and state.step % every == 0) or state.step == self.total_steps:
                    save_checkpoint(self.output_dir, self.strategy, self.optimizer, self.scheduler, state,
                                    config.to_dict(), config.train.keep_last)
        finally:
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
        return self._finish()

    def _finish(self) -> TrainResult:
        env = self.env
        result = TrainResult(self.output_dir, self.state.step)
        if self.config.lora.enabled:
            from owl2.training.lora import save_adapter

            if env.is_main:
                result.adapter_dir = self.output_dir / "adapter"
                save_adapter(unwrap(self.model), result.adapter_dir)
        else:
            state = self.strategy.model_state()
            if env.is_main:
                result.final_dir = self.output_dir / "final"
                save_state_dict(state, self.model_config, result.final_dir, dtype=self.config.train.save_dtype)
                self._copy_processing_files(result.final_dir)
        if env.is_main:
            records = read_metrics(self.output_dir)
            result.losses = [r["loss"] for r in records]
            if self.config.train.plot and plot_loss_curve(records, self.output_dir / "loss.png",
                                                          title=f"owl2 {self.config.stage}"):
                result.plot = self.output_dir / "loss.png"
        barrier(env)
        return result

    def _copy_processing_files(self, directory: Path) -> None:
        """Tokenizer and image processor next to the weights, so ``owl2.load(directory)`` works."""
        copy_processing_files(self.tokenizer_dir, directory)
        atomic_write_text(directory / PREPROCESSOR_CONFIG_NAME,
                          json.dumps(self.image_processor.to_dict(), indent=2) + "\n")


class _PlainProgress:
    """A line per step on stderr, for machines without tqdm."""

    def __init__(self, total: int, initial: int) -> None:
        self.total, self.n, self.postfix = total, initial, ""

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix(self, **values: str) -> None:
        fields = ", ".join(f"{k}={v}" for k, v in values.items())
        print(f"training: step {self.n}/{self.total}, {fields}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(total, initial)
    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True, file=sys.stderr)


def train(config: TrainConfig, *, resume: str | bool | None = None) -> TrainResult:
    """Run the recipe ``config`` to the end (``resume``: True for the latest checkpoint, or a checkpoint path)."""
    return Trainer(config, resume=resume).run()


__all__ = ["FALLBACK_WARMUP_RATIO", "TrainResult", "Trainer", "TrainingDiverged", "build_model",
           "fit_batch_to_data", "fit_warmup", "train"]
