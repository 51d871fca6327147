"""Write the text part of an owl2 model as a llama.cpp GGUF file (``general.architecture`` "llama").

The exported network is what a text-only prompt runs through: the token embeddings, each layer's shared Q/O/MLP
weights with the text branch (``multiway.0``) of its K/V projections and of both norms, the final norm and the LM
head. The image branch, the vision tower and the abstractor are left out, so llama.cpp's outputs on text-only ids
match owl2's. Matrices are stored as ``f16``, ``q8_0`` or ``q4_0`` (quantised by ``gguf.quants``); norms stay
float32, as llama.cpp's own converter keeps them.

    from llama_cpp_export import export_gguf
    export_gguf(model, "owl2-text-q8_0.gguf", "q8_0", "tests/fixtures/llama2-tokenizer/tokenizer.model")

Needs the ``gguf`` and ``sentencepiece`` packages.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from sentencepiece import SentencePieceProcessor

import owl2

# name -> (storage type of the matrices, general.file_type)
GGUF_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}


def rope_rows_for_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder the output rows of a Q or K projection ``weight`` [heads * head_dim, in] from HF's rope layout to
    llama.cpp's.

    HF's ``rotate_half`` rotates dimension ``j`` of a head together with ``j + head_dim / 2``; llama.cpp's LLaMA rope
    rotates neighbours ``2j`` and ``2j + 1``. Row ``2j`` of each head therefore takes HF's row ``j`` and row
    ``2j + 1`` HF's row ``j + head_dim / 2``. Q and K get the same reordering, so attention scores are unchanged.
    """
    out_features, in_features = weight.shape
    head_dim = out_features // heads
    # [head, half, j] -> [head, j, half]: the two halves of each head interleave
    return weight.reshape(heads, 2, head_dim // 2, in_features).swapaxes(1, 2).reshape(out_features, in_features)


def text_tensors(model: owl2.Owl2ForCausalLM) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF tensor name, float32 array) for every weight of the text path of an unquantised ``model``; matrices
    are [out, in] as in PyTorch (the writer stores them in ggml's reversed dimension order)."""
    config = model.config
    if config.attention_bias:
        raise ValueError("attention biases are not exported; the benchmark model has none")

    def array(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy()

    yield "token_embd.weight", array(model.model.embed_tokens.weight)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        yield f"blk.{i}.attn_norm.weight", array(layer.input_layernorm.multiway[0].weight)
        yield f"blk.{i}.attn_q.weight", rope_rows_for_llama_cpp(array(attn.q_proj.weight), config.num_attention_heads)
        yield f"blk.{i}.attn_k.weight", rope_rows_for_llama_cpp(
            array(attn.k_proj.multiway[0].weight), config.num_key_value_heads)
        yield f"blk.{i}.attn_v.weight", array(attn.v_proj.multiway[0].weight)
        yield f"blk.{i}.attn_output.weight", array(attn.o_proj.weight)
        yield f"blk.{i}.ffn_norm.weight", array(layer.post_attention_layernorm.multiway[0].weight)
        yield f"blk.{i}.ffn_gate.weight", array(mlp.gate_proj.weight)
        yield f"blk.{i}.ffn_up.weight", array(mlp.up_proj.weight)
        yield f"blk.{i}.ffn_down.weight", array(mlp.down_proj.weight)
    yield "output_norm.weight", array(model.model.norm.weight)
    if not config.tie_word_embeddings:  # without output.weight llama.cpp reuses token_embd, as a tied head does
        yield "output.weight", array(model.lm_head.weight)


def add_sentencepiece_vocab(writer: gguf.GGUFWriter, tokenizer_model: str | Path, vocab_size: int) -> None:
    """Write the SentencePiece vocabulary of ``tokenizer_model`` (pieces, scores, piece types, special ids) as
    llama.cpp's "llama" tokenizer; it must hold exactly ``vocab_size`` pieces, one per embedding row."""
    sp = SentencePieceProcessor(model_file=str(tokenizer_model))
    if sp.vocab_size() != vocab_size:
        raise ValueError(f"{tokenizer_model} has {sp.vocab_size()} pieces but the model's vocabulary is {vocab_size}")
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def export_gguf(model: owl2.Owl2ForCausalLM, path: str | Path, kind: str, tokenizer_model: str | Path) -> Path:
    """Write the text path of the unquantised ``model`` to ``path`` with its matrices stored as ``kind`` (a key of
    :data:`GGUF_TYPES`); returns the path."""
    if kind not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {kind!r}; use one of {', '.join(GGUF_TYPES)}")
    config = model.config
    scaling = config.rope_scaling or {}
    if scaling and scaling.get("type", scaling.get("rope_type")) != "linear":
        raise ValueError(f"only linear rope scaling is exported, got {scaling}")
    qtype, file_type = GGUF_TYPES[kind]
    path = Path(path)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"owl2 text decoder ({kind})")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    if scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_sentencepiece_vocab(writer, tokenizer_model, config.vocab_size)
    for name, data in text_tensors(model):
        if data.ndim == 1:
            writer.add_tensor(name, data)
        else:
            # quantised blocks come back as uint8 rows; raw_dtype tells the writer how to read their shape
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
