"""The lmms-eval model ``owl2``: ``lmms-eval --model owl2 --model_args pretrained=PATH[,dtype=...] --tasks ...``.

:class:`Owl2LMMS` is a *simple* lmms-eval model (``is_simple = True``): lmms-eval hands it the task's text context
and a ``doc_to_visual`` callable, and the model builds its own prompt. Prompts are rendered with the ``mplug_owl2``
template (``USER: <|image|>question ASSISTANT:``), as the official evaluation does:

* a context with no image placeholder gets one ``<|image|>`` per image in front of the text (the official CLI's
  form, no separator);
* a context that already carries placeholders (``<|image|>``, or the LLaVA-style ``<image>`` many task files use)
  keeps them where they are; their number must equal the number of images.

``model_args`` (all ``key=value``, parsed by lmms-eval):

================== ====================================================================================== ==========
``pretrained``     checkpoint directory or hub id (anything :func:`owl2.load` takes)                        required
``device``         ``cuda``, ``cuda:1``, ``cpu``...; under ``accelerate launch`` each process takes          auto
                   ``cuda:$LOCAL_RANK``
``dtype``          ``bfloat16``, ``float16``, ``float32``                                                   bfloat16
``batch_size``     requests decoded (or continuations scored) together; ``auto`` means ``max_batch_size``   1
``max_batch_size`` the batch size for ``batch_size=auto``                                                   16
``policy``         image preprocessing policy passed to the image processor (``None``: its default)       None
``max_new_tokens`` generation length when a task's ``generation_kwargs`` give none                          1024
``template``       conversation template (``mplug_owl2`` or ``vicuna_v1``)                                  mplug_owl2
================== ====================================================================================== ==========

Generation honours the task's ``until`` (stop strings, removed from the answer), ``max_new_tokens``,
``temperature``, ``top_p``, ``top_k``, ``do_sample``, ``min_new_tokens`` and ``repetition_penalty``; only
``num_beams=1`` is supported. Log-likelihoods score the continuation's tokens after the rendered prompt (what the
model would have to answer) and report whether greedy decoding would have produced exactly those tokens.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

import owl2
from owl2.constants import DEFAULT_TEMPLATE, IMAGE_PLACEHOLDER
from owl2.generation import GenerationRequest, SamplingParams
from owl2.processing.conversation import get_template, render_conversation

LLAVA_IMAGE_PLACEHOLDER = "<image>"
"""The placeholder LLaVA-derived task prompts use; it means the same as ``<|image|>``."""

DEFAULT_MAX_NEW_TOKENS = 1024
DEFAULT_MAX_BATCH_SIZE = 16

# generation_kwargs keys that are understood; others are reported once and ignored, since task files carry keys
# meant for other models (``image_aspect_ratio``, ``use_cache``...) that must not stop an evaluation
_GEN_KEYS = frozenset({"until", "max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample",
                       "min_new_tokens", "repetition_penalty"})


def _parse_batch_size(value: int | str | None, max_batch_size: int) -> int:
    """lmms-eval passes ``--batch_size`` as a string: ``N``, ``auto`` or ``auto:N``."""
    if value is None:
        return 1
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        # no memory probing: the engine's batch cost is predictable, so ``auto`` just means the configured maximum
        return max_batch_size
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {value!r}")
    return size


def _resolve_device(device: str | None) -> torch.device:
    """The device of this process; under ``accelerate launch`` (WORLD_SIZE > 1) each rank takes its own GPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if device is None or device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", local_rank if multi_process else 0)
    parsed = torch.device(device)
    if parsed.type == "cuda" and parsed.index is None and multi_process:
        return torch.device("cuda", local_rank)
    return parsed


class Owl2LMMS(lmms):
    """mPLUG-Owl2 (an owl2 checkpoint) as an lmms-eval model; see the module docstring for ``model_args``."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = "bfloat16",
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        policy: str | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        template: str = DEFAULT_TEMPLATE,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            # a misspelt argument (``dtpye=float16``) would otherwise silently evaluate another configuration
            raise TypeError(
                f"owl2 got unknown model_args {sorted(unknown)}; it accepts pretrained, device, dtype, batch_size, "
                "max_batch_size, policy, max_new_tokens, template"
            )
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        get_template(template)  # an unknown template name fails here, not at the first request
        self._device = _resolve_device(device)
        # str(): lmms-eval's argument parser turns a purely numeric value into an int
        self.pipeline = owl2.load(str(pretrained), dtype=dtype, device=self._device, policy=policy,
                                  show_progress=False)
        self.pipeline.template = template
        self.batch_size_per_gpu = _parse_batch_size(batch_size, int(max_batch_size or DEFAULT_MAX_BATCH_SIZE))
        # the engine splits anything larger than its max_batch_size; make that our batch size so one call is one batch
        self.pipeline.engine.max_batch_size = self.batch_size_per_gpu
        self.max_new_tokens = int(max_new_tokens)
        self.template = template
        # lmms-eval overwrites these for multi-process runs; reading them here also covers ranks it does not touch
        self._rank = int(os.environ.get("RANK", "0"))
        self._world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self._ignored_gen_keys: set[str] = set()

    # --------------------------------------------------------------------------------------------------- properties
    @property
    def model(self) -> owl2.Owl2ForCausalLM:
        return self.pipeline.model

    @property
    def tokenizer(self) -> Any:
        return self.pipeline.tokenizer

    @property
    def device(self) -> torch.device:
        """Where the model lives (lmms-eval puts its cross-rank counters here)."""
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ------------------------------------------------------------------------------------------------------ prompts
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except KeyError:
            raise KeyError(f"document {doc_id} of task {task!r} split {split!r} is not in the model's task_dict "
                           "(lmms-eval fills it before evaluating)") from None

    def _visuals(self, doc_to_visual: Callable[[Any], Any] | None, doc_id: int, task: str, split: str) -> list[Any]:
        """The images of one document, in order (``doc_to_visual`` may give None, one image or a list)."""
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._doc(task, split, doc_id))
        if visuals is None:
            return []
        if isinstance(visuals, (list, tuple)):
            return [v for v in visuals if v is not None]
        return [visuals]

    def render(self, context: str, visuals: Sequence[Any]) -> str:
        """The full prompt string for a task context and its images (rules in the module docstring)."""
        text = context.replace(LLAVA_IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER)
        placeholders = text.count(IMAGE_PLACEHOLDER)
        if placeholders == 0:
            return render_conversation(self.pipeline.messages(text, visuals), template=self.template)
        if placeholders != len(visuals):
            raise ValueError(f"the context has {placeholders} image placeholder(s) but the document has "
                             f"{len(visuals)} image(s): {context[:200]!r}")
        return render_conversation([{"role": "user", "content": text}], template=self.template, images=visuals)

    def sampling_params(self, gen_kwargs: dict[str, Any] | None) -> SamplingParams:
        """A task's ``generation_kwargs`` as :class:`SamplingParams` (the pipeline's ``</s>`` stop string added)."""
        kwargs = dict(gen_kwargs or {})
        unknown = set(kwargs) - _GEN_KEYS - self._ignored_gen_keys
        if unknown:
            self._ignored_gen_keys |= unknown
            from loguru import logger

            logger.warning(f"owl2: ignoring generation_kwargs {sorted(unknown)}")
        num_beams = kwargs.get("num_beams")
        if num_beams not in (None, 1):
            raise ValueError(f"owl2 supports only num_beams=1 (greedy or sampling), got num_beams={num_beams}")
        until = kwargs.get("until")
        stop = [until] if isinstance(until, str) else [s for s in (until or []) if s]
        temperature = float(kwargs.get("temperature") or 0.0)
        do_sample = kwargs.get("do_sample")
        if do_sample is False:
            temperature = 0.0
        elif do_sample and temperature == 0.0:
            temperature = 1.0  # transformers' default temperature when sampling is asked for without one
        top_p = kwargs.get("top_p")
        top_p = 1.0 if top_p is None else float(top_p)
        if top_p <= 0:
            # task files write top_p: 0 next to temperature: 0; as a limit it keeps only the best token, i.e. greedy
            top_p, temperature = 1.0, 0.0
        max_new_tokens = kwargs.get("max_new_tokens")
        return SamplingParams(
            max_new_tokens=int(max_new_tokens) if max_new_tokens else self.max_new_tokens,
            temperature=temperature,
            top_p=min(top_p, 1.0),
            top_k=int(kwargs.get("top_k") or 0),
            repetition_penalty=float(kwargs.get("repetition_penalty") or 1.0),
            min_new_tokens=int(kwargs.get("min_new_tokens") or 0),
            stop=(*stop, "</s>"),  # as Pipeline.request: a literal "</s>" in the text ends the answer too
        )

    # --------------------------------------------------------------------------------------------------- generation
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """The answer to each request, in request order.

        ``req.args`` is ``(context, generation_kwargs, doc_to_visual, doc_id, task, split)``. Requests are decoded
        in batches of ``batch_size``, longest context first (less padding); a greedy row's answer does not depend on
        its batch. Images are loaded and preprocessed one batch at a time, so a large task never holds them all.
        """
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        answers: list[str | None] = [None] * len(requests)
        progress = self._progress(len(requests), "owl2 generate_until")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            batch = []
            for i in chunk:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = requests[i].args[:6]
                visuals = self._visuals(doc_to_visual, doc_id, task, split)
                batch.append(self.request(context, visuals, self.sampling_params(gen_kwargs)))
            for i, result in zip(chunk, self.pipeline.engine.generate(batch), strict=True):
                answers[i] = result.text
                self.cache_hook.add_partial("generate_until", requests[i].args[:2], result.text)
            progress.update(len(chunk))
        progress.close()
        return [a for a in answers if a is not None]

    def request(self, context: str, visuals: Sequence[Any], params: SamplingParams) -> GenerationRequest:
        """The engine request for one context: rendered, tokenized (one -200 per image) and with its pixels."""
        text = self.render(context, visuals)
        return GenerationRequest(self.tokenizer.encode_prompt(text), self.pipeline.pixels(visuals), params)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("owl2 does not implement generate_until_multi_round (multi-round tasks)")

    # ------------------------------------------------------------------------------------------------------ scoring
    def split_continuation(self, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
        """(prompt ids, continuation ids) for scoring ``continuation`` right after the rendered ``prompt``.

        Both come from tokenizing the whole text once and cutting it at the prompt's length, so the scored tokens
        are those the model would see (SentencePiece can tokenize a boundary differently from either half alone).
        An empty prompt (lmms-eval's unconditional scoring) gives just BOS as the prompt.
        """
        if IMAGE_PLACEHOLDER in continuation:
            raise ValueError(f"a continuation cannot contain {IMAGE_PLACEHOLDER}: {continuation[:200]!r}")
        context_ids = self.tokenizer.encode_prompt(prompt) or [self.tokenizer.bos_token_id]
        whole = self.tokenizer.encode_prompt(prompt + continuation)
        if len(whole) <= len(context_ids):
            raise ValueError(f"the continuation {continuation!r} adds no tokens to the prompt")
        return whole[:len(context_ids)], whole[len(context_ids):]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(summed log-probability, is_greedy)`` of each request's continuation, in request order.

        ``req.args`` is ``(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)``, or just
        ``(context, continuation)`` for unconditional scoring. Requests sharing a prompt and images (the choices of
        one multiple-choice question) are scored in one batch, and one greedy decode of the longest choice's length
        tells which choice greedy decoding would produce: a continuation is greedy when it equals the start of that
        decode, i.e. when every one of its tokens is the argmax after the ones before it.
        """
        groups: dict[tuple[Any, ...], list[tuple[int, list[int]]]] = defaultdict(list)
        prompts: dict[tuple[Any, ...], tuple[list[int], list[Any]]] = {}
        for index, req in enumerate(requests):
            context, target = req.args[0], req.args[1]
            visuals: list[Any] = []
            doc_key: tuple[Any, ...] | None = None
            if len(req.args) >= 6:
                doc_to_visual, doc_id, task, split = req.args[2:6]
                visuals = self._visuals(doc_to_visual, doc_id, task, split)
                doc_key = (task, split, doc_id)
                if callable(target):
                    target = target(self._doc(task, split, doc_id))
            if not isinstance(target, str):
                raise TypeError(f"a loglikelihood continuation must be a string, got {type(target).__name__}")
            prompt = self.render(context, visuals) if context or visuals else ""
            prompt_ids, cont_ids = self.split_continuation(prompt, target)
            key = (tuple(prompt_ids), doc_key if visuals else None)
            groups[key].append((index, cont_ids))
            prompts.setdefault(key, (prompt_ids, visuals))

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        keys = list(groups)
        progress = self._progress(len(requests), "owl2 loglikelihood")
        engine = self.pipeline.engine
        for start in range(0, len(keys), self.batch_size):
            chunk = keys[start:start + self.batch_size]
            pixels = {key: self.pipeline.pixels(prompts[key][1]) for key in chunk}
            # one greedy decode per prompt, as long as its longest continuation; no stop ids, so EOS inside a
            # continuation is compared like any other token
            greedy = engine.generate([
                GenerationRequest(prompts[key][0], pixels[key], SamplingParams(
                    max_new_tokens=max(len(c) for _, c in groups[key]), stop_token_ids=()))
                for key in chunk
            ])
            for key, decoded in zip(chunk, greedy, strict=True):
                members = groups[key]
                logprobs = engine.loglikelihoods(prompts[key][0], pixels[key], [c for _, c in members])
                for (index, cont), logprob in zip(members, logprobs.tolist(), strict=True):
                    results[index] = (float(logprob), decoded.token_ids[:len(cont)] == cont)
                progress.update(len(members))
        progress.close()
        return [r for r in results if r is not None]

    # ------------------------------------------------------------------------------------------------------ helpers
    def clean(self) -> None:
        """Free the model once lmms-eval has every response (it calls this before starting a local LLM judge).

        The base class frees the ``nn.Module`` attributes it finds on the object; ours sits inside the pipeline.
        """
        self.__dict__.pop("pipeline", None)
        super().clean()

    def _progress(self, total: int, description: str) -> Any:
        """A tqdm bar on rank 0 (a no-op object elsewhere, or without tqdm)."""
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is an lmms-eval dependency
            return _NoProgress()
        return tqdm(total=total, desc=description, disable=self.rank != 0 or total == 0)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


__all__ = ["Owl2LMMS"]
