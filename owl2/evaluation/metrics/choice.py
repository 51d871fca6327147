"""Multiple-choice answer extraction, accuracy, and MMBench CircularEval.

Answer extraction follows the rule-based stage of the MMBench evaluation (VLMEvalKit's ``can_infer``, also what
lmms-eval falls back to before asking a GPT judge): (1) look for exactly one option letter written as a separate
token; (2) otherwise look for exactly one option TEXT contained in the answer. The GPT-judge stage of the official
MMBench pipeline is not reproduced: an answer neither rule resolves counts as wrong (``None``).

CircularEval (MMBench, Liu et al. 2023): a question with n options is asked n times, the option list rotated by
0..n-1 positions; it counts as solved only if EVERY rotation is answered correctly. In the MMBench TSV files the
rotated copies are separate rows whose ``index`` is ``base_index + k * 1_000_000`` (k = rotation), so rows are
grouped by ``index % 1_000_000``. The "vanilla" accuracy is the single-pass accuracy on the k = 0 rows.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "CIRCULAR_INDEX_OFFSET",
    "circular_eval",
    "circular_variants",
    "extract_choice",
    "multiple_choice_accuracy",
    "options_as_dict",
]

CIRCULAR_INDEX_OFFSET = 1_000_000
LETTERS = string.ascii_uppercase

# Characters turned into spaces before looking for a stand-alone letter, so "(B)", "B.", "[B]", "B:" all work.
_SEPARATORS = ".()[],:;!*#{}"


def options_as_dict(options: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    """``["cat", "dog"]`` -> ``{"A": "cat", "B": "dog"}``; a mapping is returned with upper-cased letter keys."""
    if isinstance(options, Mapping):
        return {str(k).upper(): str(v) for k, v in options.items()}
    if len(options) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options are supported")
    return {LETTERS[i]: str(o) for i, o in enumerate(options)}


def extract_choice(response: str | None, options: Mapping[str, str] | Sequence[str]) -> str | None:
    """The option letter a free-form answer designates, or ``None``.

    Rules, in order:

    1. Upper-case option letters that appear as separate tokens after turning ``.()[],:;!*#{}`` into spaces:
       exactly one distinct letter -> that letter. Handles "B", "B.", "(B)", "The answer is B", "B. cat".
       (As in VLMEvalKit, an English article "A" counts as a letter: "A cat" -> "A" if "A" is an option.)
    2. If the whole answer, stripped of those separators and whitespace, is one LOWER-case option letter
       ("b", "(b)", "b.") -> that letter. Lower-case letters inside sentences are not taken (too ambiguous).
    3. Exactly one option text (case-insensitive) occurs as a substring of the answer -> its letter.

    Ambiguous answers ("A or B", two option texts) and no match give ``None``.
    """
    if not response:
        return None
    opts = options_as_dict(options)
    cleaned = response
    for ch in _SEPARATORS:
        cleaned = cleaned.replace(ch, " ")
    tokens = cleaned.split()
    found = [letter for letter in opts if letter in tokens]
    if len(found) == 1:
        return found[0]
    if not found and len(tokens) == 1 and tokens[0].upper() in opts and len(tokens[0]) == 1:
        return tokens[0].upper()
    if not found:
        low = response.lower()
        texts = [letter for letter, text in opts.items() if text and text.lower() in low]
        if len(texts) == 1:
            return texts[0]
    return None


def multiple_choice_accuracy(
    predictions: Sequence[str | None],
    answers: Sequence[str],
    options: Sequence[Mapping[str, str] | Sequence[str]] | None = None,
) -> float:
    """Accuracy x100. With ``options`` the raw predictions are passed through :func:`extract_choice`; without, each
    prediction must already be a letter (compared after strip/upper-case). ``None`` predictions are wrong."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    if options is not None and len(options) != len(answers):
        raise ValueError(f"{len(options)} option lists for {len(answers)} questions")
    if not answers:
        return 0.0
    correct = 0
    for i, (pred, ans) in enumerate(zip(predictions, answers, strict=True)):
        letter = extract_choice(pred, options[i]) if options is not None else (pred or "").strip().upper() or None
        correct += letter is not None and letter == ans.strip().upper()
    return 100.0 * correct / len(answers)


def circular_variants(options: Sequence[str], answer: str) -> list[tuple[list[str], str]]:
    """All n rotations of an n-option question, as MMBench CircularEval asks them.

    Rotation k moves every option k places towards "A" (the option at letter i becomes the one that was at
    i + k mod n), so the correct letter moves from a to a - k mod n. Rotation 0 is the original question. The
    question text is the same for every rotation, so it is not an argument.

    >>> circular_variants(["cat", "dog", "cow"], "B")
    [(['cat', 'dog', 'cow'], 'B'), (['dog', 'cow', 'cat'], 'A'), (['cow', 'cat', 'dog'], 'C')]
    """
    n = len(options)
    if n == 0:
        raise ValueError("no options")
    a = LETTERS.index(answer.strip().upper())
    if a >= n:
        raise ValueError(f"answer {answer!r} out of range for {n} options")
    return [([options[(i + k) % n] for i in range(n)], LETTERS[(a - k) % n]) for k in range(n)]


def circular_eval(records: Iterable[Mapping]) -> dict:
    """MMBench CircularEval accuracy (x100), overall and per category / L2 category.

    Each record is one asked (possibly rotated) question, a mapping with:

    * ``"index"``: MMBench row index; rotations of one question share ``index % 1_000_000``;
    * ``"answer"``: the correct letter for THIS rotation;
    * ``"prediction"``: the model output: a letter, or free text when ``"options"`` is given;
    * optional ``"options"``: this rotation's options (list or letter -> text), used to extract the letter;
    * optional ``"category"`` and ``"l2-category"`` (MMBench column names; ``"l2_category"`` is accepted too);
    * optional ``"rotation"`` (0 = original): when present it decides which rows are "vanilla", so ``"index"`` may
      then be the plain base index of every rotation.

    Returns ``{"overall", "vanilla", "per_category", "per_l2_category", "n_questions", "metrics", "breakdown"}``
    (``metrics`` = ``{"circular_accuracy", "vanilla_accuracy"}``, ``breakdown`` = ``{"category", "l2_category"}``:
    the same numbers, shaped for report tables). The categories of a group
    are taken from its first record. "vanilla" is the accuracy of the rotation-0 rows alone.
    """
    groups: dict[int, list[bool]] = {}
    meta: dict[int, tuple[str | None, str | None]] = {}
    vanilla: list[bool] = []
    for rec in records:
        idx = int(rec["index"])
        base = idx % CIRCULAR_INDEX_OFFSET
        pred = rec.get("prediction")
        if "options" in rec and rec["options"] is not None:
            letter = extract_choice(pred, rec["options"])
        else:
            letter = (pred or "").strip().upper() or None
        ok = letter is not None and letter == str(rec["answer"]).strip().upper()
        groups.setdefault(base, []).append(ok)
        if base not in meta:
            meta[base] = (rec.get("category"), rec.get("l2-category", rec.get("l2_category")))
        # Rotation 0 is the original question: an explicit "rotation" field, else the MMBench index convention.
        rotation = rec.get("rotation")
        if (rotation == 0) if rotation is not None else idx < CIRCULAR_INDEX_OFFSET:
            vanilla.append(ok)

    solved = {base: all(oks) for base, oks in groups.items()}

    def pct(values: Iterable[bool]) -> float:
        values = list(values)
        return 100.0 * sum(values) / len(values) if values else 0.0

    def breakdown(pos: int) -> dict[str, float]:
        by: dict[str, list[bool]] = {}
        for base, ok in solved.items():
            cat = meta[base][pos]
            if cat is not None:
                by.setdefault(str(cat), []).append(ok)
        return {cat: pct(v) for cat, v in sorted(by.items())}

    overall, vanilla_acc = pct(solved.values()), pct(vanilla)
    per_category, per_l2 = breakdown(0), breakdown(1)
    return {
        "overall": overall,
        "vanilla": vanilla_acc,
        "per_category": per_category,
        "per_l2_category": per_l2,
        "n_questions": len(solved),
        # The same numbers grouped for report tables: flat float metrics, and the breakdowns.
        "metrics": {"circular_accuracy": overall, "vanilla_accuracy": vanilla_acc},
        "breakdown": {"category": per_category, "l2_category": per_l2},
    }
