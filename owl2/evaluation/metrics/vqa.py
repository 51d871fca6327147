"""VQA accuracy (the VQAv2 / OK-VQA / TextVQA / VizWiz metric), GQA exact match, EvalAI answer processing.

Written from the published definition of the VQA metric (Antol et al. 2015 and the VQA evaluation page):

    acc(pred) = mean over the 10 leave-one-out subsets of the 10 human answers of min(1, #humans that said pred / 3)

and from the answer normalisation the official evaluation applies before comparing strings. The normalisation has
several non-obvious behaviours that must be reproduced exactly for the numbers to agree with published ones; each
is commented where it is implemented.

Two official variants exist (see :data:`VQA_VARIANTS`):

* ``"owl2"`` (default): the ``VQAEval`` that mPLUG-Owl2's ``evaluate/vqa_eval.py`` uses (a LAVIS / Qwen-VL copy):
  the prediction is always fully normalised; the human answers get only the punctuation step, and only when they
  are not all identical.
* ``"vqa"``: the original GT-Vision-Lab ``vqaEval.py``: the human answers are whitespace-stripped; then, only when
  the human answers are not all identical, both the prediction and the human answers are fully normalised. With
  unanimous human answers the raw (stripped) prediction must match exactly, e.g. ``"Yes"`` vs ``"yes"`` scores 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "VQA_VARIANTS",
    "evalai_process_answer",
    "exact_match",
    "exact_match_accuracy",
    "normalize_gqa_answer",
    "normalize_vqa_answer",
    "vqa_accuracy",
    "vqa_score",
]

VQA_VARIANTS = ("owl2", "vqa")

# ---------------------------------------------------------------------------------------------------------------
# Normalisation tables (data of the official metric; the exact content matters for exact string matching)
# ---------------------------------------------------------------------------------------------------------------

# Contracted forms the official table restores. Written without apostrophes by annotators, e.g. "dont", they are
# mapped back to the apostrophe form. For a form with one apostrophe the key is the form without it; for a form
# with several apostrophes the official table lists exactly the variants that miss ONE apostrophe (e.g.
# "couldnt've" and "couldn'tve" -> "couldn't've", but not "couldntve"). We generate the table from that rule.
_CONTRACTED_FORMS_TEXT = (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll how's "
    "I'm I've isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't "
    "should've shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll that's "
    "there'd there're there's they'd they'll they're they've 'twas wasn't we've weren't what'll what're what's "
    "what've when's where'd where's where've who'd who'll who's who've why'll why're why's won't would've wouldn't "
    "y'all you'd you'll you're you've "
    "couldn't've hadn't've he'd've I'd've it'd've mightn't've 'ow's'at she'd've shouldn't've somebody'd've "
    "someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've y'all'll y'all'd've you'd've"
)


def _build_contractions() -> dict[str, str]:
    table: dict[str, str] = {}
    for form in _CONTRACTED_FORMS_TEXT.split():
        positions = [i for i, ch in enumerate(form) if ch == "'"]
        if len(positions) == 1:
            table[form.replace("'", "")] = form
        else:
            for i in positions:
                table[form[:i] + form[i + 1 :]] = form
    # Quirk of the official table: this one entry is inverted (it removes the apostrophe instead of restoring it).
    table["somebody'd"] = "somebodyd"
    # Keys with capitals ("Im", "Ive", "Id've", "I'dve") never match, because the words are lower-cased before the
    # lookup; they are kept for fidelity. The official table also has identity entries ("let's", "she's") which
    # have no effect and are omitted.
    return table


CONTRACTIONS: dict[str, str] = _build_contractions()

# Number words -> digits. Only zero..ten, plus "none" -> "0" (so "none" and "0" and "zero" all match).
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

ARTICLES = frozenset({"a", "an", "the"})

# Punctuation characters the official code handles (note: NOT "." ":" "'" "%" "$" "#" "&" "*"; "." is handled by
# _PERIOD, the others are kept verbatim).
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")

# The official regex is "(?!<=\d)(\.)(?!\d)". "(?!<=\d)" is a (mistyped) negative LOOKAHEAD for the text "<=digit",
# not a lookbehind, so in practice it removes every "." that is not followed by a digit: "3.5" keeps its period,
# "5." and "dr." lose theirs, ".5" keeps it.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# A digit-comma-digit anywhere in the answer ("10,000") switches the punctuation step from "replace by a space" to
# "delete", for ALL punctuation characters of that answer (so "10,000" -> "10000", and "1,2-3" -> "123").
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official code calls `_PERIOD.sub("", text, re.UNICODE)`: the third positional argument of `sub` is `count`,
# so at most re.UNICODE == 32 periods are removed. Reproduced for exactness (it only matters for very long outputs).
_PERIOD_MAX_SUBS = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
    """Official punctuation step: each listed character is deleted if it touches a space (or if the answer contains
    a digit-comma-digit), else replaced by a space ("black-and-white" -> "black and white"); then periods that are
    not followed by a digit are deleted. The conditions are tested on the INPUT text, for each character in turn."""
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCT:
        touches_space = p + " " in text or " " + p in text
        out = out.replace(p, "" if touches_space or has_digit_comma else " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX_SUBS)


def _process_digit_article(text: str) -> str:
    """Official word step: lower-case, split on whitespace, number words -> digits, drop articles, restore
    contractions, re-join with single spaces. (Number mapping happens before the article test, contractions last.)"""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(text: str) -> str:
    """Full official VQA normalisation of one answer string.

    newline/tab -> space, strip, punctuation step, then lower-case / number words / articles / contractions.

    >>> normalize_vqa_answer("Two dogs.")
    '2 dogs'
    >>> normalize_vqa_answer("10,000")
    '10000'
    """
    return _process_digit_article(_process_punctuation(_clean_whitespace(text)))


def _leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over i of min(1, #{j != i : answers[j] == prediction} / 3)."""
    matches = sum(a == prediction for a in answers)
    total = 0.0
    for a in answers:
        # Leaving out a matching answer removes one match from the count of the others.
        others = matches - (a == prediction)
        total += min(1.0, others / 3.0)
    return total / len(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str], variant: str = "owl2") -> float:
    """VQA accuracy in [0, 1] of one predicted answer against the human answers (normally 10).

    Args:
        prediction: the model's raw answer.
        answers: the human answers, raw (as in the annotation file).
        variant: ``"owl2"`` (mPLUG-Owl2 / LAVIS / Qwen-VL ``VQAEval``) or ``"vqa"`` (original GT-Vision-Lab code);
            see the module docstring.

    With 10 answers and k matches the value is min(1, k/3) for k = 0 or k >= 4, and 0.3, 0.6, 0.9 for k = 1, 2, 3
    (e.g. k=2: the 2 matching left-outs see 1 match -> 1/3, the 8 others see 2 -> 2/3; (2/3 + 16/3)/10 = 0.6).
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    if variant == "owl2":
        pred = normalize_vqa_answer(prediction)
        refs = list(answers)
        if len(set(refs)) > 1:
            refs = [_process_punctuation(a) for a in refs]
    elif variant == "vqa":
        pred = _clean_whitespace(prediction)
        refs = [_clean_whitespace(a) for a in answers]
        if len(set(refs)) > 1:
            refs = [_process_digit_article(_process_punctuation(a)) for a in refs]
            pred = _process_digit_article(_process_punctuation(pred))
    else:
        raise ValueError(f"unknown VQA variant {variant!r}; expected one of {VQA_VARIANTS}")
    return _leave_one_out_accuracy(pred, refs)


def vqa_score(
    predictions: Sequence[str],
    answer_lists: Sequence[Sequence[str]],
    answer_types: Sequence[str] | None = None,
    question_types: Sequence[str] | None = None,
    variant: str = "owl2",
    ndigits: int | None = None,
) -> dict:
    """Dataset VQA accuracy, x100 like the official ``VQAEval.accuracy``.

    Returns ``{"overall": float, "per_question": list[float] (x100), "n": int}`` plus ``"perAnswerType"`` /
    ``"perQuestionType"`` dicts when the types are given. The official code rounds to 2 decimals (``n=2``); pass
    ``ndigits=2`` to do the same, default ``None`` keeps full precision (rounding happens on the means, never on the
    per-question values before averaging, as officially).
    """
    if len(predictions) != len(answer_lists):
        raise ValueError(f"{len(predictions)} predictions but {len(answer_lists)} answer lists")
    accs = [vqa_accuracy(p, a, variant) for p, a in zip(predictions, answer_lists, strict=True)]

    def pct(values: Sequence[float]) -> float:
        v = 100.0 * sum(values) / len(values) if values else 0.0
        return round(v, ndigits) if ndigits is not None else v

    out: dict = {"overall": pct(accs), "per_question": [100.0 * a for a in accs], "n": len(accs)}
    for key, types in (("perAnswerType", answer_types), ("perQuestionType", question_types)):
        if types is None:
            continue
        if len(types) != len(accs):
            raise ValueError(f"{key}: {len(types)} types for {len(accs)} questions")
        groups: dict[str, list[float]] = {}
        for t, a in zip(types, accs, strict=True):
            groups.setdefault(t, []).append(a)
        out[key] = {t: pct(v) for t, v in groups.items()}
    return out


# ---------------------------------------------------------------------------------------------------------------
# GQA exact match
# ---------------------------------------------------------------------------------------------------------------


def normalize_gqa_answer(text: str) -> str:
    """Basic normalisation for exact-match benchmarks (GQA, also used for VizWiz-style short answers by some
    harnesses): newline/tab -> space, lower-case, strip, drop ONE trailing period, strip again."""
    out = _clean_whitespace(text).lower()
    if out.endswith("."):
        out = out[:-1].rstrip()
    return out


def exact_match(prediction: str, answer: str) -> float:
    """1.0 if the normalised prediction equals the normalised answer, else 0.0 (see :func:`normalize_gqa_answer`)."""
    return float(normalize_gqa_answer(prediction) == normalize_gqa_answer(answer))


def exact_match_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Mean exact match, x100."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    if not answers:
        return 0.0
    return 100.0 * sum(exact_match(p, a) for p, a in zip(predictions, answers, strict=True)) / len(answers)


# ---------------------------------------------------------------------------------------------------------------
# EvalAI answer processor (for VQAv2 / VizWiz test-dev submission files)
# ---------------------------------------------------------------------------------------------------------------


def evalai_process_answer(text: str) -> str:
    """Normalise an answer the way the EvalAI VQA server does before scoring (the processor mPLUG-Owl2 applies to
    its test-dev submissions): lower-case, delete "," and "?", split off a possessive "'s" (-> " 's"), strip,
    newline/tab -> space, then the official punctuation and number/article/contraction steps.

    Because commas are deleted first, the digit-comma-digit rule never triggers here ("10,000" -> "10000" anyway).
    """
    out = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    out = _clean_whitespace(out)
    return _process_digit_article(_process_punctuation(out))
