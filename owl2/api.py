"""The Python API: ``pipe = owl2.load(path)``, then ``pipe.chat``, ``generate``, ``stream``, ``score``, ``rate``.

A pipeline bundles the model, its tokenizer and image processor, and a generation engine (which keeps the visual
tokens of images it has seen). Prompts are either OpenAI-style message lists or a plain question string plus
optional images; both are rendered with the ``mplug_owl2`` template.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from owl2.checkpoint.io import load_model, parse_dtype, resolve_checkpoint
from owl2.generation import GenerationEngine, GenerationRequest, GenerationResult, SamplingParams
from owl2.model.modeling import Owl2ForCausalLM

if TYPE_CHECKING:
    from owl2.rating import Rating

Messages = list[dict[str, Any]]
Prompt = str | Messages


class Pipeline:
    """Chat, batched generation, streaming and answer scoring with one model."""

    def __init__(
        self,
        model: Owl2ForCausalLM,
        tokenizer: Any,
        image_processor: Any,
        *,
        template: str = "mplug_owl2",
        policy: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.policy = policy
        self.engine = GenerationEngine(
            model,
            tokenizer.decode,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    # ------------------------------------------------------------------------------------------------ rendering
    def messages(self, prompt: Prompt, images: Sequence[Any] = ()) -> Messages:
        """A plain string becomes one user turn with its images first (as the official CLI does)."""
        if isinstance(prompt, str):
            parts: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
            return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]
        if images:
            raise ValueError("pass images inside the messages (image parts), not as a separate argument")
        return list(prompt)

    def request(self, prompt: Prompt, images: Sequence[Any] = (), **sampling: Any) -> GenerationRequest:
        from owl2.processing.conversation import extract_images, render_conversation

        messages = self.messages(prompt, images)
        text = render_conversation(messages, template=self.template)
        pixels = self.pixels(extract_images(messages))
        stop = tuple(sampling.pop("stop", ()) or ())
        params = SamplingParams(stop=(*stop, "</s>"), **sampling)
        return GenerationRequest(self.tokenizer.encode_prompt(text), pixels, params)

    def pixels(self, images: Sequence[Any]) -> torch.Tensor | None:
        if not images:
            return None
        return self.image_processor(list(images), policy=self.policy)

    # ------------------------------------------------------------------------------------------------ interface
    def chat(self, prompt: Prompt, images: Sequence[Any] = (), **sampling: Any) -> str:
        """The answer to a message list, or to a question about ``images``."""
        return self.engine.generate([self.request(prompt, images, **sampling)])[0].text

    def generate(
        self, prompts: Sequence[Prompt], images: Sequence[Sequence[Any]] | None = None, **sampling: Any
    ) -> list[GenerationResult]:
        """Batched: ``prompts[i]`` with ``images[i]``; rows are independent (greedy rows equal runs alone)."""
        images = images if images is not None else [()] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists")
        requests = [self.request(p, imgs, **dict(sampling)) for p, imgs in zip(prompts, images, strict=True)]
        return self.engine.generate(requests)

    def stream(self, prompt: Prompt, images: Sequence[Any] = (), **sampling: Any) -> Iterator[str]:
        """Text deltas as they are decoded (never splitting a character)."""
        return self.engine.stream(self.request(prompt, images, **sampling))

    def score(self, image: Any, prompt: str, choices: Sequence[str]) -> list[float]:
        """Probabilities (summing to 1) of each answer in ``choices`` given the image (or None) and question.

        Each choice is scored by the log-likelihood of its tokens after the rendered prompt; the probabilities are
        the softmax of those totals over the choices.
        """
        if not choices:
            raise ValueError("score needs at least one choice")
        request = self.request(prompt, [] if image is None else [image])
        continuations = [self.continuation_ids(request.prompt_ids, choice) for choice in choices]
        loglik = self.engine.loglikelihoods(request.prompt_ids, request.images, continuations)
        return loglik.softmax(0).tolist()

    def rate(
        self,
        items: Any,
        *,
        task: str = "quality",
        prompt: str = "scorer",
        levels: Sequence[str] | Sequence[Sequence[str]] | None = None,
        weights: Sequence[float] | None = None,
        batch_size: int = 8,
        num_frames: int | None = None,
        show_progress: bool = False,
    ) -> list[Rating]:
        """Rate images and videos as the Q-Align family of scorers does: one :class:`~owl2.rating.Rating` per item.

        ``items``: images (path, bytes, PIL image, array) and videos (a video file path, a list of frames, or an
        :class:`owl2.rating.Video`), mixed freely. ``task``: ``"quality"`` or ``"aesthetics"``. ``prompt``:
        ``"scorer"`` (Q-Align's scorer classes, DeQA-Score), ``"eval"`` (Q-Align's evaluation scripts) or a template
        of its own with one ``<|image|>``. ``levels`` / ``weights``: another word scale (default excellent..bad
        weighted 5..1). ``batch_size`` items share one prefill; ``num_frames`` samples that many frames of each
        video evenly (default: one per second of a video file, every frame of a list).
        """
        from owl2.rating import rate

        return rate(self, items, task=task, prompt=prompt, levels=levels, weights=weights, batch_size=batch_size,
                    num_frames=num_frames, show_progress=show_progress)

    def continuation_ids(self, prompt_ids: Sequence[int], choice: str) -> list[int]:
        """Token ids of ``choice`` as it would follow the prompt (a leading space, as after ``ASSISTANT:``)."""
        ids = self.tokenizer.encode(" " + choice.strip(), add_bos=False)
        # SentencePiece gives " x" a lone "▁" piece first when the text starts with a space; drop it
        return ids[1:] if len(ids) > 1 and self.tokenizer.decode(ids[:1]).strip() == "" else ids


def default_model() -> Path:
    """The embedded ``owl2-tiny`` checkpoint that every entry point uses when no model is given."""
    from owl2.experiments.tiny import default_model_dir

    directory = default_model_dir()
    if not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"the embedded model is missing from {directory}; rebuild it with "
                                "`owl2 experiment build-tiny --install` or pass a model")
    return directory


def load(
    path_or_id: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    *,
    policy: str | None = None,
    show_progress: bool = True,
    adapter: str | os.PathLike[str] | None = None,
) -> Pipeline:
    """Load a checkpoint directory (or hub id) with its tokenizer and image processor into a :class:`Pipeline`.

    With no path, the embedded ``owl2-tiny`` (:func:`default_model`). ``device`` defaults to CUDA when available,
    else the CPU; ``dtype`` to bfloat16. ``adapter``: a LoRA adapter directory, owl2's own
    (:func:`owl2.training.lora.save_adapter`) or the layout Q-Align and DeQA-Score publish
    (``adapter_model.bin`` + ``non_lora_trainables.bin``), merged into the loaded weights
    (:func:`owl2.training.lora.merge_into`; owl2's own layout needs peft). The tokenizer and image processor come
    from the base checkpoint.
    """
    from owl2.processing.image import load_image_processor
    from owl2.processing.tokenizer import load_tokenizer

    directory = default_model() if path_or_id is None else resolve_checkpoint(path_or_id)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(directory, dtype=parse_dtype(dtype) or torch.bfloat16, device=device,
                       show_progress=show_progress)
    if adapter is not None:
        from owl2.training.lora import merge_into

        model = merge_into(model, adapter)
    return Pipeline(model, load_tokenizer(directory), load_image_processor(directory), policy=policy)
