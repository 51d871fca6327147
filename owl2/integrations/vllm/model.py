"""mPLUG-Owl2 for vLLM's v1 engine: the multimodal processor and the model.

Prompts carry one marker per image, as the official code writes them: ``<|image|>`` in text prompts, the id ``-200``
(:data:`~owl2.constants.OFFICIAL_IMAGE_TOKEN`) in token prompts (owl2's ``Owl2Tokenizer.encode_prompt`` gives these
ids). A text prompt with images is brought to the official ids first: split at each ``<|image|>`` and each piece
tokenized on its own by owl2's tokenizer, as the official ``tokenizer_image_token`` does, since the tokens next to the
marker differ from those of the whole text. The processor then replaces each ``-200`` by ``tokens_per_image``
placeholder ids (the abstractor's queries plus its end token) and preprocesses each image with owl2's image processor
(the checkpoint's policy).

The model keeps owl2's vision tower and abstractor as they are (replicated on every tensor-parallel rank: they are
small next to the decoder) and builds the decoder from vLLM's layers:

* per layer, ``qkv_proj`` (column-parallel) holds the shared Q and the text branch's K/V (``multiway.0``), as a plain
  LLaMA layer does, and ``image_kv_proj`` (column-parallel, K/V heads split or replicated exactly as in ``qkv_proj``)
  holds the image branch's K/V (``multiway.1``); ``o_proj`` and ``down_proj`` are row-parallel;
* which positions are image positions comes from the multimodal placeholder ranges vLLM hands to
  :meth:`MPLUGOwl2ForVLLM.embed_input_ids` (``is_multimodal``), copied into a persistent device buffer that every
  layer of the next forward reads: no host sync, and no shape that depends on the number of image positions. A
  batch without image positions (every decode step) runs the text branch only, as in owl2, decided on the host from
  the list of image embeddings vLLM passes; a batch with some computes both K/V branches and picks per position with
  ``torch.where``; a forward no ``embed_input_ids`` call announced (a profiling run, a graph capture) takes that
  path too, reading the buffer, which holds the latest batch's mask. The model is not compiled
  (``support_torch_compile``) and runs eagerly; CUDA graphs and compilation are unchecked on the CPU build.

Tensor parallelism: the layer definitions shard as vLLM's LLaMA does (Q/K/V heads over ranks, K/V replicated when
there are fewer K/V heads than ranks, both K/V branches alike, the MLP's intermediate size split), so TP > 1 needs no
code path of its own. Only one rank runs on the CPU build; on GPUs, TP is checked by running the parity test's
prompts with ``tensor_parallel_size=2`` (and 4, with a checkpoint of 4 K/V heads and one of fewer K/V heads than
ranks) and comparing the greedy tokens with ``tensor_parallel_size=1`` and with owl2.

Text prompts without images never reach the processor: vLLM tokenizes them with its transformers tokenizer, which
for LLaMA-2 matches SentencePiece except on text that starts with whitespace; pass owl2's ids to be exact.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.config.multimodal import BaseDummyOptions
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.inputs import MultiModalDataDict
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.sequence import IntermediateTensors

from owl2.checkpoint.io import RECOMPUTED_KEYS, resolve_checkpoint
from owl2.constants import IMAGE_PLACEHOLDER, OFFICIAL_IMAGE_TOKEN
from owl2.model.abstractor import VisualAbstractor
from owl2.model.config import Owl2Config
from owl2.model.llama import RMSNorm
from owl2.model.vision import VisionModel
from owl2.processing.image import ImageProcessor, load_image_processor
from owl2.processing.tokenizer import Owl2Tokenizer, load_tokenizer

PLACEHOLDER_TOKEN_ID = 0
"""The id that fills an image's positions after expansion: ``<unk>`` in LLaMA-2's vocabulary, which its byte-fallback
tokenizer never produces. vLLM refuses prompt ids outside the vocabulary, so owl2's own ``image_token_index``
(``vocab_size``) cannot be used; the model never looks at this id: image positions come from the placeholder
ranges."""


# --------------------------------------------------------------------------------------------------- processing
class Owl2ProcessingInfo(BaseProcessingInfo):
    """What the processor needs to know about the checkpoint: its owl2 config and image processor."""

    @cached_property
    def owl2_config(self) -> Owl2Config:
        return self.get_hf_config().to_owl2()

    @cached_property
    def owl2_tokenizer(self) -> Owl2Tokenizer:
        return load_tokenizer(_checkpoint_dir(self.ctx.model_config))

    @cached_property
    def image_processor(self) -> ImageProcessor:
        return load_image_processor(_checkpoint_dir(self.ctx.model_config))

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        # the default asks the transformers processor; owl2's image processing takes no per-request options
        return {"text_kwargs": set(), "images_kwargs": set()}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.owl2_config.tokens_per_image}

    @property
    def image_size(self) -> int:
        return self.owl2_config.vision.image_size


def _checkpoint_dir(model_config: Any) -> Path:
    """The local folder of the checkpoint vLLM serves (a hub id is resolved to its cached snapshot)."""
    return resolve_checkpoint(model_config.model, revision=getattr(model_config, "revision", None))


class Owl2DummyInputsBuilder(BaseDummyInputsBuilder[Owl2ProcessingInfo]):
    """Profiling inputs: one marker per image and white images of the encoder's size."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int],
        mm_options: Mapping[str, BaseDummyOptions],
    ) -> MultiModalDataDict:
        size = self.info.image_size
        return {"image": self._get_dummy_images(width=size, height=size, num_images=mm_counts.get("image", 0),
                                                overrides=mm_options.get("image"))}


class Owl2MultiModalProcessor(BaseMultiModalProcessor[Owl2ProcessingInfo]):
    """Official-form prompt ids (one ``-200`` per image) -> ``tokens_per_image`` placeholders per image, and the
    images -> ``pixel_values`` [N, 3, S, S] through owl2's image processor."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        images = list(hf_data.get("images") or ())
        return BatchFeature({"pixel_values": self.info.image_processor(images)})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _postprocess_prompt(self, prompt: list[int]) -> list[int]:
        """Token ids of a text prompt -> the official ids (see the module docstring); ids that already hold
        ``-200`` or no ``<|image|>`` are returned as they are.

        The pieces are tokenized by owl2's tokenizer, not vLLM's: transformers 5's ``LlamaTokenizer`` gives other
        ids than SentencePiece (and the official code) for a piece that starts with a space, such as ``" with "``
        between two images."""
        if OFFICIAL_IMAGE_TOKEN in prompt:
            return prompt
        tokenizer = self.info.get_tokenizer()
        head = prompt[:1] if prompt and prompt[0] == tokenizer.bos_token_id else []
        text = tokenizer.decode(prompt[len(head):])
        if IMAGE_PLACEHOLDER not in text:
            return prompt
        owl2_tokenizer = self.info.owl2_tokenizer
        ids = owl2_tokenizer.encode_prompt(text)
        if ids[:1] == [owl2_tokenizer.bos_token_id]:  # the prompt's own start decides whether there is a BOS
            ids = ids[1:]
        return head + ids

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        per_image = self.info.owl2_config.tokens_per_image
        return [PromptReplacement(modality="image", target=[OFFICIAL_IMAGE_TOKEN],
                                  replacement=[PLACEHOLDER_TOKEN_ID] * per_image)]


# ------------------------------------------------------------------------------------------------------- decoder
class MultiwayRMSNorm(nn.Module):
    """owl2's MAM norm on flat tokens: one normalisation, the gain of each position's branch (``multiway.0`` text,
    ``multiway.1`` image)."""

    def __init__(self, dim: int, eps: float, branches: int) -> None:
        super().__init__()
        self.multiway = nn.ModuleList([RMSNorm(dim, eps) for _ in range(branches)])

    def forward(self, x: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` [T, D], ``image_mask`` [T] bool or None (all text) -> [T, D]."""
        text = self.multiway[0]
        normed = text.normalize(x)
        if image_mask is None or len(self.multiway) == 1:
            return text.weight * normed
        return torch.where(image_mask[:, None], self.multiway[1].weight, text.weight) * normed


class Owl2Attention(nn.Module):
    def __init__(self, config: Owl2Config, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = max(1, config.num_key_value_heads // tp)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        quant = vllm_config.quant_config
        bias = config.attention_bias
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=bias, quant_config=quant,
                                          prefix=f"{prefix}.qkv_proj")
        # No query heads: the image branch holds only K/V, sharded and replicated exactly as qkv_proj's K/V.
        self.image_kv_proj = (
            QKVParallelLinear(config.hidden_size, self.head_dim, 0, config.num_key_value_heads, bias=bias,
                              quant_config=quant, prefix=f"{prefix}.image_kv_proj")
            if config.modality_adaptive else None
        )
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias,
                                        quant_config=quant, prefix=f"{prefix}.o_proj")
        scaling = config.rope_scaling or {}
        rope = {"rope_type": "default", "rope_theta": config.rope_theta}
        if scaling:
            rope = {"rope_type": "linear", "factor": float(scaling["factor"]), "rope_theta": config.rope_theta}
        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings, is_neox_style=True,
                                   rope_parameters=rope)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=vllm_config.cache_config, quant_config=quant, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, x: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` [T, D] normalised, ``positions`` [T] -> [T, D]."""
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if image_mask is not None and self.image_kv_proj is not None:
            image_kv, _ = self.image_kv_proj(x)
            image_k, image_v = image_kv.split([self.kv_size, self.kv_size], dim=-1)
            where = image_mask[:, None]
            k, v = torch.where(where, image_k, k), torch.where(where, image_v, v)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class Owl2MLP(nn.Module):
    def __init__(self, config: Owl2Config, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        quant = vllm_config.quant_config
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2,
                                                       bias=False, quant_config=quant, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False,
                                           quant_config=quant, prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        gate, up = gate_up.chunk(2, dim=-1)
        out, _ = self.down_proj(F.silu(gate) * up)
        return out


class Owl2DecoderLayer(nn.Module):
    """owl2's ``DecoderLayer`` (see its diagram) on vLLM's flat [T, D] tokens and paged attention."""

    def __init__(self, config: Owl2Config, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        branches = 2 if config.modality_adaptive else 1
        self.input_layernorm = MultiwayRMSNorm(config.hidden_size, config.rms_norm_eps, branches)
        self.self_attn = Owl2Attention(config, vllm_config, f"{prefix}.self_attn")
        self.post_attention_layernorm = MultiwayRMSNorm(config.hidden_size, config.rms_norm_eps, branches)
        self.mlp = Owl2MLP(config, vllm_config, f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, x: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x, image_mask), image_mask)
        return x + self.mlp(self.post_attention_layernorm(x, image_mask))


class Owl2VLLMModel(nn.Module):
    """The official ``model.`` prefix: embeddings, the decoder stack, the final norm and owl2's visual path."""

    def __init__(self, config: Owl2Config, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   quant_config=vllm_config.quant_config)
        self.layers = nn.ModuleList(Owl2DecoderLayer(config, vllm_config, f"{prefix}.layers.{i}")
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vision_model = VisionModel(config.vision)
        self.visual_abstractor = VisualAbstractor(config.abstractor, config.hidden_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values`` [N, 3, S, S] -> visual tokens [N, tokens_per_image, D]."""
        return self.visual_abstractor(self.vision_model(pixel_values))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(positions, hidden, image_mask)
        return self.norm(hidden)


# --------------------------------------------------------------------------------------------------------- model
# Official key -> (parameter, shard id) for the fused layers; the rest load under their own names.
_STACKED = (
    (re.compile(r"\.self_attn\.q_proj\."), ".self_attn.qkv_proj.", "q"),
    (re.compile(r"\.self_attn\.k_proj\.multiway\.0\."), ".self_attn.qkv_proj.", "k"),
    (re.compile(r"\.self_attn\.v_proj\.multiway\.0\."), ".self_attn.qkv_proj.", "v"),
    (re.compile(r"\.self_attn\.k_proj\.multiway\.1\."), ".self_attn.image_kv_proj.", "k"),
    (re.compile(r"\.self_attn\.v_proj\.multiway\.1\."), ".self_attn.image_kv_proj.", "v"),
    (re.compile(r"\.mlp\.gate_proj\."), ".mlp.gate_up_proj.", 0),
    (re.compile(r"\.mlp\.up_proj\."), ".mlp.gate_up_proj.", 1),
)


@MULTIMODAL_REGISTRY.register_processor(Owl2MultiModalProcessor, info=Owl2ProcessingInfo,
                                        dummy_inputs=Owl2DummyInputsBuilder)
class MPLUGOwl2ForVLLM(nn.Module, SupportsMultiModal):
    """``MPLUGOwl2LlamaForCausalLM`` for vLLM: ``model.*`` (:class:`Owl2VLLMModel`) plus ``lm_head``."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config.to_owl2()
        self.config = config
        self.model = Owl2VLLMModel(config, vllm_config, "model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix="lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.configure_mm_token_handling(config.vocab_size, [PLACEHOLDER_TOKEN_ID])
        # Which of the next forward's tokens are image positions: written by embed_input_ids, read by every layer.
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.register_buffer("image_mask", torch.zeros(max_tokens, dtype=torch.bool), persistent=False)
        self._mask_dirty = False
        # Whether the next forward may hold image positions. A forward that no embed_input_ids call announced (a
        # profiling run, a graph capture) takes both branches and reads the buffer, which is right for any batch.
        self._images_in_batch = True

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_PLACEHOLDER
        raise ValueError(f"mPLUG-Owl2 takes images only, not {modality}")

    def get_language_model(self) -> nn.Module:
        return self.model

    # ---------------------------------------------------------------------------------------------- multimodal
    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """``pixel_values`` [N, 3, S, S] (or a list of [3, S, S]) -> N visual token blocks [tokens_per_image, D]."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        embeds = self.model.encode_images(pixel_values.to(self.model.embed_tokens.weight.dtype))
        return tuple(embeds.unbind(0))

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [T, D] with the visual tokens written where ``is_multimodal`` [T] is set; also records
        that mask for the MAM routing of the forward that follows."""
        embeds = self.model.embed_input_ids(input_ids)
        # The embeddings come as a list on the host: whether this batch holds image positions is known without a sync.
        has_images = multimodal_embeddings is not None and len(multimodal_embeddings) > 0 and is_multimodal is not None
        self._images_in_batch = has_images
        if not has_images:
            # The buffer always describes the latest batch: a forward replayed from a captured graph reads it as is.
            if self._mask_dirty:
                self.image_mask.fill_(False)
                self._mask_dirty = False
            return embeds
        n = input_ids.shape[0]
        mask = is_multimodal.to(device=embeds.device, non_blocking=True)
        self.image_mask[:n].copy_(mask)
        self.image_mask[n:].fill_(False)  # padded positions of the forward are text
        self._mask_dirty = True
        visual = torch.cat([e.reshape(-1, embeds.shape[-1]) for e in multimodal_embeddings]).to(embeds.dtype)
        return embeds.masked_scatter(mask[:, None], visual)

    # ------------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        """Hidden states [T, D] after the final norm, for ``inputs_embeds`` [T, D] (or ``input_ids`` [T])."""
        hidden = inputs_embeds if inputs_embeds is not None else self.model.embed_input_ids(input_ids)
        image_mask = self.image_mask[: hidden.shape[0]] if self._images_in_batch else None
        out = self.model(positions, hidden, image_mask)
        self._images_in_batch = True
        return out

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # ------------------------------------------------------------------------------------------------- weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load the official keys (``model.layers.0.self_attn.k_proj.multiway.1.weight``, ...) into the fused and
        sharded parameters; returns the parameter names loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if RECOMPUTED_KEYS.search(name):
                continue
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue
            for pattern, fused, shard in _STACKED:
                if pattern.search(name):
                    target = pattern.sub(fused, name)
                    param = params[target]
                    param.weight_loader(param, tensor, shard)
                    break
            else:
                target = name
                if target not in params:
                    raise KeyError(f"unexpected weight {name!r} in the checkpoint")
                param = params[target]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(target)
        return loaded


__all__ = ["PLACEHOLDER_TOKEN_ID", "MPLUGOwl2ForVLLM", "Owl2MultiModalProcessor", "Owl2ProcessingInfo"]
