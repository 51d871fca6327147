"""mPLUG-Owl2 as a transformers model: ``PreTrainedModel`` + ``GenerationMixin`` over owl2's own modules.

:class:`MPLUGOwl2LlamaForCausalLM` (the official architecture name) holds ``model`` (owl2's
:class:`~owl2.model.modeling.Owl2Model`: embeddings, ViT, abstractor, the decoder with the modality-adaptive module)
and ``lm_head``, so its parameter names are the official checkpoint's keys and ``from_pretrained`` reads the released
pickled shards, safetensors, the derivative checkpoints (Q-Align, DeQA-Score) and owl2's own saved layout; its
forward is owl2's forward run on those modules, so both give the same numbers.

Inputs use owl2's expanded layout: each image takes ``config.tokens_per_image`` positions of ``input_ids`` holding
``config.image_token_index`` (:func:`owl2.prepare_official_inputs` turns the official one ``-200`` per image into
it). The key/value cache is :class:`~owl2.integrations.transformers.cache.Owl2Cache`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from owl2.checkpoint.io import RECOMPUTED_KEYS
from owl2.integrations.transformers.cache import Owl2Cache
from owl2.integrations.transformers.configuration import MPLUGOwl2Config
from owl2.model.config import Owl2Config
from owl2.model.modeling import Owl2ForCausalLM, Owl2Model

_OUTPUT_FIELDS = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
# transformers 5.x renamed the cache argument and output field from past_key_values to cache in later releases;
# the model takes either and answers under the name the installed version reads.
CACHE_FIELD = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"
_LEARNED_TOKENS = ("cls_token", "position_embedding", "query_embeds", "vit_eos")


class MPLUGOwl2PreTrainedModel(PreTrainedModel):
    """The transformers plumbing shared by mPLUG-Owl2 heads: config class, layout hints, initialisation."""

    config_class = MPLUGOwl2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # Blocks accelerate must keep on one device: a residual stream crosses each as a whole.
    _no_split_modules: ClassVar[list[str]] = ["DecoderLayer", "VisionEncoderLayer", "AbstractorLayer"]
    # The official checkpoint stores the RoPE frequencies and the abstractor's sin-cos tables; owl2 recomputes them.
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [RECOMPUTED_KEYS.pattern]
    _supports_sdpa = True  # owl2's attention is torch's scaled_dot_product_attention, whatever is asked for
    _supports_attention_backend = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' initialisation for the standard layers, N(0, initializer_range) for the learned tokens,
        and the derived tables (RoPE frequencies, sin-cos position tables) computed afresh."""
        super()._init_weights(module)
        for name in _LEARNED_TOKENS:
            param = module._parameters.get(name)
            if param is not None:  # transformers' init skips the tensors a checkpoint filled
                init.normal_(param, mean=0.0, std=self.config.initializer_range)
        if hasattr(module, "reset_buffers") and not isinstance(module, PreTrainedModel):
            module.reset_buffers()


class MPLUGOwl2LlamaForCausalLM(MPLUGOwl2PreTrainedModel, GenerationMixin):
    """mPLUG-Owl2 with its language-model head; parameters ``model.*`` and ``lm_head.weight`` as officially named."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    # owl2's forward, run on this model's own modules: it reads model, lm_head and the three helpers below only.
    _owl2_forward = Owl2ForCausalLM.forward
    _chunk_mask = staticmethod(Owl2ForCausalLM._chunk_mask)
    _attention_mask = staticmethod(Owl2ForCausalLM._attention_mask)
    loss = staticmethod(Owl2ForCausalLM.loss)

    def __init__(self, config: MPLUGOwl2Config) -> None:
        super().__init__(config)
        owl2_config = config.to_owl2()
        self.model = Owl2Model(owl2_config)
        self.lm_head = nn.Linear(owl2_config.hidden_size, owl2_config.vocab_size, bias=False)
        self.post_init()

    @property
    def owl2_config(self) -> Owl2Config:
        """The :class:`~owl2.model.config.Owl2Config` the modules were built from."""
        return self.model.config

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``, then the derived tables (RoPE frequencies, the abstractor's sin-cos
        tables) computed in float32 on each module's device, as owl2's own loader leaves them (a low-precision copy
        would change the numbers). transformers fills non-persistent buffers through ``_init_weights`` only for the
        modules it has not marked as loaded, a bookkeeping that has changed between its releases; recomputing here
        gives the same tables on every version."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.reset_buffers()
        return loaded

    def reset_buffers(self) -> None:
        """Recompute every derived buffer on its module's current device (skipped on the meta device)."""
        for module in self.model.modules():
            if hasattr(module, "reset_buffers"):
                module.reset_buffers()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    # ------------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        *,
        image_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple[Any, ...]:
        """Logits for ``input_ids`` [B, T] in owl2's expanded layout -> ``CausalLMOutputWithPast``.

        ``attention_mask`` [B, T] (or [B, cached + T] with a cache) marks real tokens; positions count real tokens
        only, so left padding changes nothing. ``pixel_values`` [N, 3, S, S] (or ``image_embeds``
        [N, tokens_per_image, hidden]) hold the chunk's images, row by row in order of appearance. With a cache,
        ``input_ids`` are the positions not cached yet. ``labels`` [B, T] (-100 ignored; image positions and padding
        never targets) give ``loss``, the mean next-token cross-entropy in float32. ``logits`` are [B, T, vocab]
        (the last ``logits_to_keep`` positions when > 0); ``hidden_states`` the embeddings and every layer's output.
        The cache is returned as ``past_key_values`` (``cache`` in transformers versions that renamed it);
        ``return_dict=False`` gives the output's fields as a tuple. ``cache_position`` and transformers' other
        per-call keywords are accepted and not needed.
        """
        if inputs_embeds is not None:
            raise ValueError("mPLUG-Owl2 takes input_ids (with image positions) and pixel_values, not inputs_embeds")
        if kwargs.get("output_attentions"):
            raise ValueError("mPLUG-Owl2 attends with torch's scaled_dot_product_attention, which returns no weights")
        if input_ids is None:
            raise ValueError("input_ids are required")
        past = past_key_values if past_key_values is not None else cache
        if use_cache is None:
            use_cache = past is not None or (self.config.use_cache and labels is None and not self.training)
        owl2_cache = self._owl2_cache(past) if use_cache or past is not None else None
        kv = None
        if owl2_cache is not None:
            kv = owl2_cache.reserve(self.owl2_config, input_ids.shape[0], input_ids.shape[1], dtype=self.dtype,
                                    device=input_ids.device)
        keep = logits_to_keep if isinstance(logits_to_keep, int) else 0
        out = self._owl2_forward(
            input_ids, attention_mask, pixel_values, image_embeds=image_embeds, labels=labels,
            position_ids=position_ids, cache=kv, output_hidden_states=bool(output_hidden_states), logits_to_keep=keep,
        )
        logits = out.logits
        if isinstance(logits_to_keep, torch.Tensor):  # positions to keep, as transformers allows
            logits = logits[:, logits_to_keep.to(logits.device)]
        fields = {"loss": out.loss, "logits": logits, "hidden_states": out.hidden_states, CACHE_FIELD: owl2_cache}
        output = CausalLMOutputWithPast(**fields)
        return output if return_dict is not False else output.to_tuple()

    @staticmethod
    def _owl2_cache(past: Cache | None) -> Owl2Cache:
        """The cache to decode into: ``past`` when it is one, a new one for nothing or an empty transformers cache
        (``generate`` may make a ``DynamicCache`` before the first forward)."""
        if isinstance(past, Owl2Cache):
            return past
        if past is None or past.get_seq_length() == 0:
            return Owl2Cache()
        raise TypeError(
            f"mPLUG-Owl2 decodes with an Owl2Cache, got a {type(past).__name__} that already holds "
            f"{past.get_seq_length()} positions"
        )

    # --------------------------------------------------------------------------------------------- generation
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The model makes its own Owl2Cache in the first forward; generate's DynamicCache would go unused.
        return False

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The next forward's inputs: the positions the cache does not hold yet, the whole attention mask, and the
        images only while the prompt is not cached (afterwards their positions live in the cache). Positions are not
        passed on: owl2 counts them from the mask and the cache, which keeps left-padded rows right."""
        past = past_key_values if past_key_values is not None else kwargs.get("cache")
        cached = past.get_seq_length() if past is not None else 0
        inputs: dict[str, Any] = {
            "input_ids": input_ids[:, cached:] if cached else input_ids,
            "attention_mask": attention_mask,
            "past_key_values": past,
            "use_cache": use_cache,
        }
        if cached == 0:
            inputs["pixel_values"] = pixel_values
            inputs["image_embeds"] = image_embeds
        for key in ("logits_to_keep", "output_hidden_states", "return_dict"):
            if key in kwargs:
                inputs[key] = kwargs[key]
        return inputs

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs: Any,
    ) -> tuple[torch.LongTensor | None, dict[str, Any]]:
        """transformers' row expansion (beam search, several sequences per prompt), with the images following
        their rows: a row with images [A, B] expanded twice needs [A, B, A, B], not [A, A, B, B]."""
        images = {key: model_kwargs.pop(key) for key in ("pixel_values", "image_embeds")
                  if model_kwargs.get(key) is not None}
        if expand_size > 1 and images and input_ids is not None:
            layout = self.owl2_config
            per_row = (input_ids == layout.image_token_index).sum(-1) // layout.tokens_per_image
            first = torch.cumsum(per_row, 0) - per_row
            index = torch.cat([
                torch.arange(int(start), int(start) + int(count)).repeat(expand_size)
                for start, count in zip(first.tolist(), per_row.tolist(), strict=True)
            ])
            images = {key: value.index_select(0, index.to(value.device)) for key, value in images.items()}
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        model_kwargs.update(images)
        return input_ids, model_kwargs


__all__ = ["CACHE_FIELD", "MPLUGOwl2LlamaForCausalLM", "MPLUGOwl2PreTrainedModel"]
