"""mPLUG-Owl2 end to end: vision encoder -> visual abstractor -> LLaMA decoder with the MAM -> LM head.

Images enter as pixel values plus positions: each image occupies ``config.tokens_per_image`` (65) consecutive
positions of ``input_ids`` holding ``config.image_token_index``. The model encodes the images, writes their visual
tokens at those positions, and routes every position through the text or the image branch of the MAM accordingly.
Parameter names equal the official checkpoint's keys (``model.layers.0.self_attn.k_proj.multiway.1.weight``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from owl2.constants import IGNORE_INDEX
from owl2.model.abstractor import VisualAbstractor
from owl2.model.cache import KVCache
from owl2.model.config import Owl2Config
from owl2.model.llama import AttentionContext, DecoderLayer, ModalityRoute, RMSNorm, RotaryEmbedding
from owl2.model.vision import VisionModel


@dataclass
class Owl2Output:
    """``logits`` [B, T (or logits_to_keep), vocab] in the model dtype; ``loss`` a float32 scalar when labels given;
    ``hidden_states`` (embeddings, each layer's output, the last one after the final norm) when asked for."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    cache: KVCache | None = None


@dataclass
class GenerateOutput:
    """``sequences`` [B, new] new token ids; ``scores`` [B, new, vocab] float32 logits of each step."""

    sequences: torch.Tensor
    scores: torch.Tensor


class Owl2Model(nn.Module):
    """Token embeddings, the visual path and the decoder stack (the official ``model.`` prefix)."""

    def __init__(self, config: Owl2Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.vision_model = VisionModel(config.vision)
        self.visual_abstractor = VisualAbstractor(config.abstractor, config.hidden_size)
        self.gradient_checkpointing = False

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values`` [N, 3, S, S] -> visual tokens [N, tokens_per_image, hidden]."""
        return self.visual_abstractor(self.vision_model(pixel_values))

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_embeds: torch.Tensor | None,
        check_text: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings with the visual tokens written at the image positions, and the image mask [B, T]
        (``None`` when every position is text)."""
        image_id = self.config.image_token_index
        if pixel_values is None and image_embeds is None:
            if check_text and bool((input_ids == image_id).any()):
                raise ValueError(
                    f"input_ids contain image positions (id {image_id}) but no pixel_values or image_embeds were given"
                )
            self._check_ids(input_ids, check_text)
            return self.embed_tokens(input_ids), None
        image_mask = input_ids == image_id
        text_ids = input_ids.masked_fill(image_mask, 0)
        self._check_ids(text_ids, check_text)
        embeds = self.embed_tokens(text_ids)
        num_positions = int(image_mask.sum())
        num_images = image_embeds.shape[0] if image_embeds is not None else pixel_values.shape[0]
        per_image = self.config.tokens_per_image
        if num_positions != num_images * per_image:
            raise ValueError(
                f"got {num_images} image(s) but {num_positions} image positions in input_ids; each image needs "
                f"exactly {per_image} positions holding id {image_id} (use owl2.prepare_official_inputs with "
                "config=model.config to expand official-style ids)"
            )
        if num_images == 0:
            return embeds, None
        if image_embeds is None:
            image_embeds = self.encode_images(pixel_values)
        elif tuple(image_embeds.shape[1:]) != (per_image, self.config.hidden_size):
            raise ValueError(
                f"image_embeds must have shape [num_images, {per_image}, {self.config.hidden_size}], "
                f"got {list(image_embeds.shape)}"
            )
        embeds = embeds.masked_scatter(image_mask[..., None], image_embeds.to(embeds.dtype))
        return embeds, image_mask

    def _check_ids(self, ids: torch.Tensor, check: bool) -> None:
        vocab = self.config.vocab_size
        if check and ids.numel() and not bool(((ids >= 0) & (ids < vocab)).all()):
            bad = ids[(ids < 0) | (ids >= vocab)].unique()[:5].tolist()
            raise ValueError(f"input_ids hold ids outside the vocabulary [0, {vocab}): {bad}")

    def decode(
        self,
        hidden: torch.Tensor,
        ctx: AttentionContext,
        cache: KVCache | None,
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Run the decoder stack and the final norm on ``hidden`` [B, T, D]."""
        states: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                states.append(hidden)
            layer_cache = cache.layer(i) if cache is not None else None
            if self.gradient_checkpointing and self.training:
                hidden = torch.utils.checkpoint.checkpoint(layer, hidden, ctx, layer_cache, use_reentrant=False)
            else:
                hidden = layer(hidden, ctx, layer_cache)
        hidden = self.norm(hidden)
        if output_hidden_states:
            states.append(hidden)
        return hidden, tuple(states) if output_hidden_states else None


class Owl2ForCausalLM(nn.Module):
    """The full model (official class ``MPLUGOwl2LlamaForCausalLM``): ``model.*`` plus ``lm_head``."""

    def __init__(self, config: Owl2Config) -> None:
        super().__init__()
        self.config = config
        self.model = Owl2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (that of the embeddings, which are never quantised)."""
        return self.model.embed_tokens.weight.dtype

    def reset_buffers(self) -> None:
        """Recompute the derived buffers (RoPE frequencies, abstractor sin-cos tables) on the current device."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_buffers"):
                module.reset_buffers()

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.model.gradient_checkpointing = enabled
        self.model.vision_model.encoder.gradient_checkpointing = enabled
        self.model.visual_abstractor.encoder.gradient_checkpointing = enabled

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return KVCache(self.config, batch_size, max_length, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        image_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
    ) -> Owl2Output:
        """Logits for ``input_ids`` [B, T] (image positions hold ``config.image_token_index``).

        ``attention_mask`` [B, T] marks real tokens (1) and padding (0); with a cache it may also cover the cached
        positions ([B, cached + T]), of which only the last T columns are read. Positions are counted over the real
        tokens of each row, so a left-padded row gives the same result as the row alone. ``pixel_values``
        [N, 3, S, S] (or precomputed ``image_embeds`` [N, tokens_per_image, D]) hold the images of the chunk in order
        of appearance, row by row. ``labels`` [B, T] use -100 for ignored positions; image positions and padding
        are never targets. ``logits_to_keep`` > 0 computes logits for the last positions only.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {list(input_ids.shape)}")
        b, t = input_ids.shape
        start = cache.reserve(t) if cache is not None else 0
        valid, has_padding = self._chunk_mask(attention_mask, b, t, start, input_ids.device)
        first_chunk = cache is None or cache.length == 0
        embeds, image_mask = self.model.embed(input_ids, pixel_values, image_embeds, check_text=first_chunk)

        if position_ids is None:
            offset = cache.next_position[:, None] if cache is not None else 0
            position_ids = offset + (valid.long().cumsum(-1) - 1).clamp(min=0)
        cos, sin = self.model.rotary_emb(position_ids, embeds.dtype)
        any_padding = has_padding or (cache is not None and cache.has_padding)
        mask = self._attention_mask(valid, cache, start) if any_padding or (start > 0 and t > 1) else None
        ctx = AttentionContext(
            route=ModalityRoute.from_image_mask(image_mask),
            cos=cos,
            sin=sin,
            mask=mask,
            is_causal=mask is None and start == 0 and t > 1,
            cache_start=start,
        )
        hidden, states = self.model.decode(embeds, ctx, cache, output_hidden_states)
        if cache is not None:
            cache.commit(valid, has_padding)
        if logits_to_keep > 0:
            # contiguous: the CPU's float32 matmul on the strided slice of a batch is several times slower
            hidden = hidden[:, -logits_to_keep:].contiguous()
        logits = self.lm_head(hidden)

        loss = None
        if labels is not None:
            if logits_to_keep > 0:
                raise ValueError("labels cannot be combined with logits_to_keep")
            loss = self.loss(logits, labels, valid, image_mask)
        return Owl2Output(logits=logits, loss=loss, hidden_states=states, cache=cache)

    @staticmethod
    def loss(
        logits: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor,
        image_mask: torch.Tensor | None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Next-token cross-entropy in float32, averaged over the target positions (``reduction="sum"``: summed,
        for losses normalised over a whole accumulated or distributed batch)."""
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"labels must have shape {list(logits.shape[:2])}, got {list(labels.shape)}")
        ignore = ~valid if image_mask is None else (~valid | image_mask)
        labels = labels.masked_fill(ignore, IGNORE_INDEX)
        return F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction=reduction,
        )

    @staticmethod
    def _chunk_mask(
        attention_mask: torch.Tensor | None, b: int, t: int, start: int, device: torch.device
    ) -> tuple[torch.Tensor, bool]:
        if attention_mask is None:
            return torch.ones(b, t, dtype=torch.bool, device=device), False
        if attention_mask.ndim == 2 and attention_mask.shape == (b, start + t) and start > 0:
            attention_mask = attention_mask[:, start:]
        if attention_mask.shape != (b, t):
            raise ValueError(
                f"attention_mask must have shape [{b}, {t}] (or [{b}, {start + t}] with a cache), "
                f"got {list(attention_mask.shape)}"
            )
        valid = attention_mask.bool()
        return valid, not bool(valid.all())

    @staticmethod
    def _attention_mask(valid: torch.Tensor, cache: KVCache | None, start: int) -> torch.Tensor:
        """Causal and padding mask [B, 1, T, start + T] (True = attend). Every position may attend to itself, so
        padded rows stay finite (their outputs are never used)."""
        t = valid.shape[1]
        keys_valid = valid
        if cache is not None:
            keys_valid = torch.cat([cache.valid[:, :start], valid.to(cache.valid.device)], 1)
        query_pos = torch.arange(start, start + t, device=valid.device)[:, None]
        key_pos = torch.arange(start + t, device=valid.device)[None, :]
        allowed = (key_pos <= query_pos) & keys_valid[:, None, :]
        return (allowed | (key_pos == query_pos))[:, None]

    # --------------------------------------------------------------------------------------------------- generation
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        image_embeds: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = True,
        cache: KVCache | None = None,
        return_dict: bool = False,
    ) -> torch.Tensor | GenerateOutput:
        """Greedy decoding of up to ``max_new_tokens`` new ids per row -> [B, new] (``GenerateOutput`` with the
        per-step logits when ``return_dict``). Prompts must be left-padded. A row that emits an id of
        ``eos_token_id`` is filled with ``pad_token_id`` afterwards; decoding stops once every row has finished.
        ``cache`` reuses a preallocated :class:`KVCache` (reset first).

        Decoding lives in ``owl2.generation.decoding`` (:func:`~owl2.generation.decoding.generate_ids`), beside the
        sampling decode loops, and the model keeps only its forward, as gpt-fast keeps decoding outside the model;
        it is imported here, when called, because ``owl2.generation`` sits above ``owl2.model``."""
        from owl2.generation.decoding import generate_ids

        return generate_ids(
            self, input_ids, attention_mask, pixel_values, image_embeds=image_embeds, max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=use_cache, cache=cache,
            return_dict=return_dict,
        )
