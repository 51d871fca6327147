"""Tokenising a conversation for training, with the official loss masking, and the over-length rule.

Masking (official ``preprocess_v1``): only the assistant answers and the ``</s>`` that closes each answer are
targets; the BOS, the system text (``vicuna_v1``), every user part, each ``ASSISTANT:`` prompt and the image
placeholders are ``-100``. Where the official code tokenises the whole conversation and then guesses the masked
lengths (``len(tok(part)) - 2``, masking the whole sample on a mismatch), here the rendered conversation is
tokenised *piece by piece*, so each id is known to belong to a prompt or an answer by construction:

* prompt piece of round r: ``[system + sep] + "USER: " + u_r + " ASSISTANT:"`` through ``encode_prompt`` (round 0
  keeps its BOS; later rounds are encoded behind a ``</s>`` that is then dropped, so a ``legacy=False`` tokenizer
  sees the same context as in the full text);
* answer piece: ``a_r + "</s>"`` through ``encode`` without BOS. The space after ``ASSISTANT:`` is not encoded: it
  is the SentencePiece dummy prefix of the answer, which is what the whole text gives because SentencePiece never
  merges across a space.

The concatenated pieces render exactly the string :func:`owl2.processing.render_conversation` gives for the complete
conversation (checked for every sample), and the ids equal ``tokenizer.encode_prompt`` of that string (checked in the
tests; ``verify=True`` checks it per sample at twice the cost).

Over-long samples (expanded length ``text tokens + tokens_per_image * images`` above ``max_length``): the ids are cut
at the end, keeping the longest prefix that fits (an answer may be cut in the middle, as in the official collator,
which however cuts *before* expanding the images and so overshoots). An image is one ``-200`` id, so a cut never
falls inside an image's positions; if the cut would remove an image (it does not fit) or would leave no target token,
the sample is skipped instead (:class:`~owl2.data.records.BadRecord`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from owl2.constants import DEFAULT_TEMPLATE, IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from owl2.data.records import BadRecord
from owl2.processing.conversation import ConversationTemplate, get_template, render_conversation
from owl2.processing.tokenizer import Owl2Tokenizer

__all__ = ["DEFAULT_TEMPLATE", "IGNORE_INDEX", "TokenizedConversation", "tokenize_conversation", "truncate"]


@dataclass
class TokenizedConversation:
    """Official-form ids (one ``-200`` per image) and labels of the same length (``-100`` where masked)."""

    input_ids: list[int]
    labels: list[int]
    text: str

    @property
    def num_images(self) -> int:
        return sum(1 for i in self.input_ids if i == IMAGE_TOKEN_INDEX)

    def expanded_length(self, tokens_per_image: int) -> int:
        """Length the model sees: every image id becomes ``tokens_per_image`` positions."""
        return len(self.input_ids) + (tokens_per_image - 1) * self.num_images


def _pieces(
    turns: Sequence[tuple[str, str]], template: ConversationTemplate, system: str | None
) -> list[tuple[str, bool]]:
    """``(text, is_answer)`` pieces whose concatenation is the rendered conversation; answers carry their sep2."""
    user, assistant = template.roles
    pieces: list[tuple[str, bool]] = []
    for k in range(0, len(turns), 2):
        prefix = ""
        if k == 0 and template.emits_system:
            prefix = (template.system if system is None else system) + template.sep
        pieces.append((f"{prefix}{user}: {turns[k][1]}{template.sep}{assistant}:", False))
        pieces.append((f" {turns[k + 1][1]}{template.sep2}", True))
    return pieces


def tokenize_conversation(
    tokenizer: Owl2Tokenizer,
    turns: Sequence[tuple[str, str]],
    template: str | ConversationTemplate = DEFAULT_TEMPLATE,
    *,
    system: str | None = None,
    verify: bool = False,
) -> TokenizedConversation:
    """Ids and labels of a complete conversation (alternating user/assistant ``turns``, user first, assistant last).

    Raises :class:`BadRecord` when the turns are malformed or (``verify=True``) when the piecewise ids differ from
    ``encode_prompt`` of the whole text.
    """
    conv_template = get_template(template)
    if not turns or len(turns) % 2 or any(role != ("user", "assistant")[k % 2] for k, (role, _) in enumerate(turns)):
        raise BadRecord("turns must alternate user/assistant, starting with user and ending with assistant")
    if conv_template.sep2 != tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False):
        raise ValueError(f"template {conv_template.name!r}: sep2 {conv_template.sep2!r} is not the EOS token")
    pieces = _pieces(turns, conv_template, system)
    text = "".join(piece for piece, _ in pieces)
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": role, "content": content} for role, content in turns
    ]
    num_images = text.count(IMAGE_PLACEHOLDER)
    try:
        rendered = render_conversation(
            messages, conv_template, add_generation_prompt=False, images=[None] * num_images if num_images else None
        )
    except ValueError as exc:
        raise BadRecord(str(exc)) from exc
    if rendered != text:  # pragma: no cover - guards the piece layout against template changes
        raise AssertionError(f"piecewise rendering differs from render_conversation: {text!r} != {rendered!r}")

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    for index, (piece, is_answer) in enumerate(pieces):
        if is_answer:
            # The leading space is the dummy prefix SentencePiece adds (see the module docstring).
            piece_ids = tokenizer.encode(piece[1:], add_bos=False)
            labels.extend(piece_ids)
        else:
            if index == 0:
                piece_ids = tokenizer.encode_prompt(piece)
            else:
                after_eos = tokenizer.encode_prompt(conv_template.sep2 + piece)
                if after_eos[:2] != [bos, eos]:  # pragma: no cover - a tokenizer without add_bos_token
                    raise ValueError("the tokenizer must add BOS and keep </s> as one token")
                piece_ids = after_eos[2:]
            labels.extend([IGNORE_INDEX] * len(piece_ids))
        ids.extend(piece_ids)
    if verify and ids != tokenizer.encode_prompt(text):
        raise BadRecord("piecewise tokenisation differs from encode_prompt of the whole conversation")
    return TokenizedConversation(ids, labels, text)


def truncate(sample: TokenizedConversation, max_length: int | None, tokens_per_image: int) -> TokenizedConversation:
    """Apply the over-length rule of the module docstring; raises :class:`BadRecord` when the sample is skipped."""
    length = sample.expanded_length(tokens_per_image)
    if max_length is None or length <= max_length:
        return sample
    keep, used = 0, 0
    for token in sample.input_ids:
        cost = tokens_per_image if token == IMAGE_TOKEN_INDEX else 1
        if used + cost > max_length:
            break
        keep, used = keep + 1, used + cost
    ids, labels = sample.input_ids[:keep], sample.labels[:keep]
    if IMAGE_TOKEN_INDEX in sample.input_ids[keep:]:
        raise BadRecord(f"expanded length {length} > max_length {max_length} and the cut would remove an image")
    if all(label == IGNORE_INDEX for label in labels):
        raise BadRecord(f"expanded length {length} > max_length {max_length}: no answer token would remain")
    return TokenizedConversation(ids, labels, sample.text)
