"""The rating recipe of the Q-Align family: level words, their weights, the prompts, and reading a rating.

A scorer fine-tuned from mPLUG-Owl2 (Q-Align / OneAlign, DeQA-Score) rates an image by one forward pass of a prompt
that ends where the model would name a level (``... The quality of the image is``). The logits of the five level
words at that last position are soft-maxed among themselves (the rest of the vocabulary is ignored), and the score is
the expectation of the level weights under that distribution:

    probs = softmax(logits[level_ids])               # [5], excellent .. bad
    score = probs . [5, 4, 3, 2, 1]                  # 1..5 (the scorer classes print probs . [1, .75, .5, .25, 0])
    std   = sqrt(sum_i probs_i (w_i - score) ** 2)   # DeQA-Score's spread of the level distribution

A level word's id is the tokenizer's first piece of the word after BOS (``tokenizer(word).input_ids[1]``), so a word
that splits into several pieces is represented by its first piece, as in the official code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "LEVELS",
    "PROMPTS",
    "TASKS",
    "Rating",
    "RatingScale",
    "render_rating_prompt",
]

#: The five level words, best first, and their default weights.
LEVELS: tuple[str, ...] = ("excellent", "good", "fair", "poor", "bad")
TASKS: tuple[str, ...] = ("quality", "aesthetics")

#: The prompts of the family, with ``{task}`` and ``{media}`` (``image`` or ``video``) left to fill in.
#: ``scorer``: the scorer classes of Q-Align (``QAlignScorer``, ``QAlignAestheticScorer``, ``QAlignVideoScorer``),
#: DeQA-Score's ``Scorer`` and IQA-PyTorch. ``eval``: Q-Align's evaluation scripts (the paper's numbers), the
#: ``mplug_owl2`` template with a space instead of a newline before ``ASSISTANT:``. ``github_score``: what the GitHub
#: copy of ``MPLUGOwl2LlamaForCausalLM.score()`` renders, its format arguments swapped ("The image of the quality
#: is"); kept only to reproduce numbers produced with that method.
_QUESTION = "USER: How would you rate the {task} of this {media}?\n<|image|>"
PROMPTS: dict[str, str] = {
    "scorer": _QUESTION + "\nASSISTANT: The {task} of the {media} is",
    "eval": _QUESTION + " ASSISTANT: The {task} of the {media} is",
    "github_score": _QUESTION + "\nASSISTANT: The {media} of the {task} is",
}


def render_rating_prompt(prompt: str, task: str, media: str) -> str:
    """The prompt string for one item: a name from :data:`PROMPTS`, or a template of its own that holds one
    ``<|image|>`` (and optionally ``{task}`` / ``{media}``)."""
    if not isinstance(task, str) or not task.strip() or any(c in task for c in "{}\n"):
        raise ValueError(f"task must be a word such as {' or '.join(map(repr, TASKS))}, got {task!r}")
    template = PROMPTS.get(prompt)
    if template is None:
        if not isinstance(prompt, str) or prompt.count("<|image|>") != 1:
            raise ValueError(f"prompt must be one of {', '.join(PROMPTS)} or a template holding one <|image|>, "
                             f"got {prompt!r}")
        template = prompt
    try:
        return template.format(task=task, media=media)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"prompt template {prompt!r} has a field other than {{task}} and {{media}}: {exc}") from None


@dataclass(frozen=True)
class Rating:
    """One rating. ``score`` is on the scale's weights (1-5 by default); ``probs`` and ``logits`` follow
    ``levels`` (best first); ``std`` is the spread of the weights under ``probs``."""

    score: float
    probs: tuple[float, ...]
    std: float
    logits: tuple[float, ...]
    levels: tuple[str, ...]
    weights: tuple[float, ...]

    @property
    def normalized(self) -> float:
        """The score mapped to 0-1 (lowest weight 0, highest 1): the form the Q-Align scorer classes print."""
        low, high = min(self.weights), max(self.weights)
        return (self.score - low) / (high - low)

    @property
    def level(self) -> str:
        """The most probable level word."""
        return self.levels[max(range(len(self.probs)), key=self.probs.__getitem__)]

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "normalized": self.normalized, "std": self.std, "level": self.level,
                "probs": dict(zip(self.levels, self.probs, strict=True)), "logits": list(self.logits)}


class RatingScale:
    """Level words and their weights, and the reading of a rating from next-token logits.

    ``levels``: words, best first (default :data:`LEVELS`); or groups of words of equal length whose logits are
    averaged level by level before the softmax (Q-Boost's three triads ``[["good", "average", "poor"], ["high",
    "medium", "low"], ["fine", "acceptable", "bad"]]``). ``weights``: one per level (default ``n, n-1, ..., 1``).
    ``token_ids`` [groups, levels] come from ``tokenizer`` (the first piece after BOS of each word); two levels whose
    pieces are the same (``["good", "good"]``, or words that split into one shared first piece) are a ValueError.
    """

    def __init__(self, tokenizer: Any, levels: Sequence[str] | Sequence[Sequence[str]] | None = None,
                 weights: Sequence[float] | None = None) -> None:
        groups = _groups(LEVELS if levels is None else levels)
        self.groups = groups
        self.levels = groups[0] if len(groups) == 1 else tuple("/".join(words) for words in zip(*groups, strict=True))
        count = len(groups[0])
        if weights is None:
            weights = [float(count - i) for i in range(count)]
        self.weights = tuple(float(w) for w in weights)
        if len(self.weights) != count:
            raise ValueError(f"got {len(self.weights)} weights for {count} levels")
        if not all(math.isfinite(w) for w in self.weights) or min(self.weights) == max(self.weights):
            raise ValueError(f"weights must be finite and not all equal, got {list(self.weights)}")
        self.token_ids = torch.tensor([[level_token_id(tokenizer, word) for word in words] for words in groups])
        seen: dict[tuple[int, ...], int] = {}
        for level, column in enumerate(self.token_ids.T.tolist()):
            # two levels read from the same logits always get the same probability: the rating would say nothing
            # of them (and the probs, keyed by level, would drop one)
            other = seen.setdefault(tuple(column), level)
            if other != level:
                raise ValueError(f"levels {self.levels[other]!r} and {self.levels[level]!r} begin with the same "
                                 f"token {column if len(column) > 1 else column[0]}, so the model cannot tell them "
                                 "apart; use words that begin differently")

    def __repr__(self) -> str:
        return f"RatingScale(levels={list(self.levels)}, weights={list(self.weights)})"

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary ``logits`` [B, V] -> the level logits [B, levels] (groups averaged), float32."""
        picked = logits.float()[:, self.token_ids.to(logits.device)]  # [B, groups, levels]
        return picked.mean(1)

    def read(self, level_logits: torch.Tensor) -> list[Rating]:
        """Level logits [B, levels] -> one :class:`Rating` per row (softmax, score and std in float64)."""
        values = level_logits.detach().to("cpu", torch.float64)
        probs = values.softmax(-1)
        weights = torch.tensor(self.weights, dtype=torch.float64)
        scores = probs @ weights
        stds = (probs * (weights - scores[:, None]) ** 2).sum(-1).sqrt()
        return [Rating(float(s), tuple(p.tolist()), float(d), tuple(float(x) for x in level_logits[i].float()),
                       self.levels, self.weights)
                for i, (s, p, d) in enumerate(zip(scores, probs, stds, strict=True))]


def level_token_id(tokenizer: Any, word: str) -> int:
    """The id the model predicts for ``word`` after a space: the first piece after BOS of ``word`` alone."""
    ids = tokenizer.encode(word)
    if len(ids) < 2 or ids[0] != tokenizer.bos_token_id:
        raise ValueError(f"level word {word!r} does not tokenize to BOS and at least one piece: {ids}")
    return int(ids[1])


def _groups(levels: Sequence[str] | Sequence[Sequence[str]]) -> tuple[tuple[str, ...], ...]:
    if isinstance(levels, str) or not levels:
        raise ValueError(f"levels must be a list of at least two words (or of equal-length word groups), "
                         f"got {levels!r}")
    if all(isinstance(word, str) for word in levels):
        groups: tuple[tuple[str, ...], ...] = (tuple(levels),)  # type: ignore[arg-type]
    elif all(isinstance(group, (list, tuple)) and all(isinstance(w, str) for w in group) for group in levels):
        groups = tuple(tuple(group) for group in levels)
    else:
        raise ValueError(f"levels must be words or groups of words, got {levels!r}")
    if len({len(g) for g in groups}) != 1:
        raise ValueError(f"level groups must have the same length, got {[len(g) for g in groups]}")
    if len(groups[0]) < 2 or any(not w.strip() for g in groups for w in g):
        raise ValueError(f"levels need at least two non-empty words, got {levels!r}")
    return groups
