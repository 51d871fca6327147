"""A small SentencePiece tokenizer in the LLaMA-2 layout, trained on a corpus (for models trained from scratch).

Same special ids as LLaMA-2 (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no pad piece), BPE with byte fallback, split digits,
no normalisation and a dummy prefix, so :func:`owl2.load_tokenizer` treats it exactly like the released tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from owl2.utils import atomic_output, atomic_write_text

TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    "pad_token": None, "clean_up_tokenization_spaces": False, "legacy": True, "tokenizer_class": "LlamaTokenizer",
}
SPACE = "\u2581"  # how SentencePiece writes a space (and the dummy prefix) inside pieces
SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_sentencepiece(texts: Iterable[str], directory: str | os.PathLike[str], vocab_size: int,
                        pieces: Sequence[str] = ()) -> Path:
    """Train on ``texts`` and write ``tokenizer.model``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    ``pieces`` are words or phrases that always become one piece of their own wherever they start a word
    (SentencePiece's user-defined symbols, with the space before them: ``"red circle"`` is the piece
    ``"▁red▁circle"``, and "two red circles" holds it and an ``"s"``); they count in ``vocab_size``.
    """
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        character_coverage=1.0, hard_vocab_limit=True, num_threads=2, minloglevel=2,
        allow_whitespace_only_pieces=True, user_defined_symbols=[SPACE + p.replace(" ", SPACE) for p in pieces],
    )
    directory = Path(directory)
    with atomic_output(directory / "tokenizer.model") as handle:
        handle.write(model.getvalue())
    atomic_write_text(directory / "tokenizer_config.json", json.dumps(TOKENIZER_CONFIG, indent=1) + "\n")
    atomic_write_text(directory / "special_tokens_map.json", json.dumps(SPECIAL_TOKENS_MAP, indent=1) + "\n")
    return directory / "tokenizer.model"
