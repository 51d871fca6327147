"""The Python API: ``pipe = owl2.load(path)``, then ``pipe.chat``, ``generate``, ``stream``, ``score``, ``rate``.

A pipeline bundles the model, its tokenizer and image processor, and a generation engine (which keeps the visual
tokens of images it has seen). Prompts are either OpenAI-style message lists or a plain question string plus
optional images; both are rendered with the ``mplug_owl2`` template.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from owl2.assets import EMBEDDED_IMAGE_SIZE, default_model, default_model_dir
from owl2.checkpoint.io import load_model, parse_dtype, resolve_checkpoint
from owl2.constants import DEFAULT_TEMPLATE
from owl2.generation import GenerationEngine, GenerationRequest, GenerationResult, SamplingParams
from owl2.model.modeling import Owl2ForCausalLM
from owl2.processing.conversation import CAPTION_INSTRUCTION

if TYPE_CHECKING:
    from PIL import Image

    from owl2.rating import Rating

Messages = list[dict[str, Any]]
Prompt = str | Messages

EMBEDDED_MODEL_NOTICE = (
    "note: owl2-tiny, the embedded default model, knows only synthetic 64 px scenes of coloured shapes and answers "
    "anything else with confident nonsense. For real images convert a real checkpoint (owl2 convert "
    "MAGAer13/mplug-owl2-llama2-7b ./owl2-7b --dtype bf16) and pass --model ./owl2-7b"
)
"""What the CLI prints (to stderr, once) when the embedded model answers, so that its nonsense about photos is not
mistaken for a bug."""

EMBEDDED_NO_IMAGE_HINT = ("hint: owl2-tiny answers questions about an image of coloured shapes; without --image its "
                          "answer means nothing (try `owl2 demo` to see it with a scene it can read)")

EMBEDDED_EXAMPLE_QUESTIONS = (
    "How many circles are there?",
    "Is there a green cross?",
    "What colour is the small circle?",
    CAPTION_INSTRUCTION,
)
"""Questions of the kinds owl2-tiny was trained on, with answers it gets right about :func:`example_scene`."""

EXAMPLE_SCENE_SEED = "example/82"
"""The shapes-world seed of ``examples/scene.png`` (:func:`example_scene` draws it again, pixel for pixel)."""


def example_scene() -> Image.Image:
    """The example scene of the README (``examples/scene.png``), drawn at owl2-tiny's 64 px. It is drawn rather than
    read because ``examples/`` is not part of the installed package."""
    from owl2.experiments.shapes import generate_scene, render_scene

    return render_scene(generate_scene(EXAMPLE_SCENE_SEED), size=EMBEDDED_IMAGE_SIZE)


def _is_single_image(images: Any) -> bool:
    """Whether ``images`` is one image rather than a list of them: a path, bytes, a binary file, a PIL image or an
    array.

    Without this a path string would be iterated as its characters, each taken for an image path."""
    if isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike)) or hasattr(images, "read"):
        return True
    # PIL images carry __array_interface__, numpy arrays and tensors __array__; iterating either gives rows of pixels
    return hasattr(images, "__array_interface__") or hasattr(images, "__array__") or not isinstance(images, Iterable)


def image_list(images: Any) -> list[Any]:
    """``images`` as a list: None gives no images, one image (:func:`_is_single_image`) a list of it."""
    if images is None:
        return []
    return [images] if _is_single_image(images) else list(images)


def _max_tokens_alias(sampling: dict[str, Any]) -> dict[str, Any]:
    """Accept ``max_tokens`` (OpenAI's and LLaVA's name) for ``max_new_tokens``; both with different values is an
    error rather than a silent pick."""
    if "max_tokens" not in sampling:
        return sampling
    sampling = dict(sampling)
    alias = sampling.pop("max_tokens")
    if "max_new_tokens" in sampling and sampling["max_new_tokens"] != alias:
        raise ValueError(f"max_tokens={alias} and max_new_tokens={sampling['max_new_tokens']} disagree; they are the "
                         "same setting, give one of them")
    sampling["max_new_tokens"] = alias
    return sampling


class Pipeline:
    """Chat, batched generation, streaming and answer scoring with one model."""

    def __init__(
        self,
        model: Owl2ForCausalLM,
        tokenizer: Any,
        image_processor: Any,
        *,
        template: str = DEFAULT_TEMPLATE,
        policy: str | None = None,
        source: str | os.PathLike[str] | None = None,
        adapter: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.policy = policy
        self.source = None if source is None else Path(source)
        """The checkpoint directory the pipeline was loaded from (None when built from parts)."""
        self.adapter = adapter
        """The LoRA adapter merged into the weights, if any."""
        self.engine = GenerationEngine(
            model,
            tokenizer.decode,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    @property
    def is_embedded(self) -> bool:
        """Whether this is the embedded ``owl2-tiny`` (the entry points then say what it can and cannot do)."""
        if self.source is None or self.adapter is not None:  # an adapter makes it another model
            return False
        return self.source.resolve() == default_model_dir().resolve()

    # ------------------------------------------------------------------------------------------------ rendering
    def messages(self, prompt: Prompt, images: Any = ()) -> Messages:
        """A plain string becomes one user turn. Each ``<|image|>`` written in it marks where the next image goes
        (the official prompt form); with none, the images go first, as the official CLI puts them. ``images``: a
        list, or one image (a path, bytes, a PIL image)."""
        images = image_list(images)
        if isinstance(prompt, str):
            from owl2.processing.conversation import prompt_parts

            return [{"role": "user", "content": prompt_parts(prompt, images)}]
        if images:
            raise ValueError("pass images inside the messages (image parts), not as a separate argument")
        return list(prompt)

    def request(self, prompt: Prompt, images: Any = (), **sampling: Any) -> GenerationRequest:
        from owl2.processing.conversation import extract_images, render_conversation

        sampling = _max_tokens_alias(sampling)
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
    def chat(self, prompt: Prompt, images: Any = (), **sampling: Any) -> str:
        """The answer to a message list, or to a question about ``images`` (a list, or one image).

        Sampling options as :class:`~owl2.generation.SamplingParams`; ``max_tokens`` is accepted for
        ``max_new_tokens``."""
        return self.engine.generate([self.request(prompt, images, **sampling)])[0].text

    def generate(
        self, prompts: Sequence[Prompt] | str, images: Any = None, **sampling: Any
    ) -> list[GenerationResult]:
        """Batched: ``prompts[i]`` with ``images[i]``; rows are independent (greedy rows equal runs alone).

        ``images[i]`` may be a list or one image. ``images`` itself may be one image, which then goes with every
        prompt. A single prompt string is a batch of one, and ``images`` is then its images."""
        if isinstance(prompts, str):
            prompts, images = [prompts], [image_list(images)]
        if images is None:
            rows: list[Any] = [()] * len(prompts)
        elif _is_single_image(images):
            rows = [[images]] * len(prompts)
        else:
            rows = list(images)
        if len(rows) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(rows)} image lists")
        requests = [self.request(p, imgs, **dict(sampling)) for p, imgs in zip(prompts, rows, strict=True)]
        return self.engine.generate(requests)

    def stream(self, prompt: Prompt, images: Any = (), **sampling: Any) -> Iterator[str]:
        """Text deltas as they are decoded (never splitting a character)."""
        return self.engine.stream(self.request(prompt, images, **sampling))

    def score(self, image: Any, prompt: str, choices: Sequence[str]) -> list[float]:
        """Probabilities (summing to 1) of each answer in ``choices`` given the image (or None, or a list of images)
        and question.

        Each choice is scored by the log-likelihood of its tokens after the rendered prompt; the probabilities are
        the softmax of those totals over the choices.
        """
        if isinstance(choices, str):  # iterating it would score each character as an answer
            raise ValueError(f"choices must be a list of answers, got the string {choices!r}; write [{choices!r}]")
        if not choices:
            raise ValueError("score needs at least one choice")
        request = self.request(prompt, image_list(image))
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


def load(
    path_or_id: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    *,
    policy: str | None = None,
    show_progress: bool = True,
    adapter: str | os.PathLike[str] | None = None,
    quantize: str | None = None,
) -> Pipeline:
    """Load a checkpoint directory (or hub id) with its tokenizer and image processor into a :class:`Pipeline`.

    With no path, the embedded ``owl2-tiny`` (:func:`default_model`). ``device`` defaults to CUDA when available,
    else the CPU; ``dtype`` to bfloat16. ``adapter``: a LoRA adapter directory, owl2's own
    (:func:`owl2.training.lora.save_adapter`) or the layout Q-Align and DeQA-Score publish
    (``adapter_model.bin`` + ``non_lora_trainables.bin``), merged into the loaded weights
    (:func:`owl2.training.lora.merge_into`; owl2's own layout needs peft). The tokenizer and image processor come
    from the base checkpoint.
    ``quantize``: ``"int8-dynamic"``, ``"int8"`` or ``"int4"`` quantises the language model's linear layers for
    faster decoding (:mod:`owl2.model.quantize`), after the adapter is merged; a checkpoint saved quantised loads as
    saved. Unquantised layers on the CPU get oneDNN's prepacked weights
    (:func:`~owl2.model.quantize.pack_for_cpu_inference`). ``device`` is checked first (:func:`check_device`).
    """
    from owl2.processing.image import load_image_processor
    from owl2.processing.tokenizer import load_tokenizer

    # The device first: a bad one should fail in a line before any download or weight is read, not as torch's
    # assertion halfway through the load.
    device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    directory = default_model() if path_or_id is None else resolve_checkpoint(path_or_id)
    model = load_model(directory, dtype=parse_dtype(dtype) or torch.bfloat16, device=device,
                       show_progress=show_progress, quantize=None if adapter is not None else quantize)
    if adapter is not None:
        from owl2.training.lora import merge_into

        model = merge_into(model, adapter)
        if quantize is not None:  # the adapter is merged into float weights, so quantise only afterwards
            from owl2.model.quantize import quantize_language_model

            quantize_language_model(model, quantize)
    from owl2.model.quantize import pack_for_cpu_inference

    pack_for_cpu_inference(model)
    return Pipeline(model, load_tokenizer(directory), load_image_processor(directory), policy=policy,
                    source=directory, adapter=adapter)


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device`` once it is known to work here, else ``ValueError`` saying why in one line.

    torch's own failures are an ``AssertionError`` ("Torch not compiled with CUDA enabled") deep inside the first
    copy, or a ``RuntimeError`` listing every device type it knows; neither says what to do."""
    text = str(device)
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {text!r}; use cpu, cuda, cuda:N or mps") from None
    build = f"this torch ({torch.__version__})"
    if device.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise ValueError(f"device {text!r} is not available: {build} is a CPU-only build; install a CUDA build "
                             "of torch (https://pytorch.org/get-started/locally/) or use the CPU (--device cpu)")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {text!r} is not available: {build} sees no CUDA GPU (no driver, or "
                             "CUDA_VISIBLE_DEVICES hides them); use the CPU (--device cpu)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {text!r} does not exist: {build} sees {count} CUDA GPU(s), cuda:0 to "
                             f"cuda:{count - 1}")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_built():
            raise ValueError(f"device {text!r} is not available: {build} was built without MPS (Apple GPUs, macOS "
                             "only); use the CPU (--device cpu)")
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {text!r} is not available: MPS needs macOS 12.3 or later on an Apple GPU; use "
                             "the CPU (--device cpu)")
        return device
    if device.type != "cpu":
        try:  # another backend (xpu, ...): the only general test is to put a tensor there
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"device {text!r} is not available: {reason}") from None
    return device
