"""Caption metrics: BLEU-1..4, ROUGE-L and CIDEr-D, numerically equal to ``pycocoevalcap`` 1.2 (COCO caption
evaluation), plus a pure-Python approximation of its PTB tokenisation.

Written from the metric definitions (Papineni et al. 2002; Lin 2004; Vedantam et al. 2015) and the documented
conventions of the COCO caption evaluation toolkit. The scorers take PRE-TOKENISED strings (space-separated tokens)
exactly like pycocoevalcap's ``compute_score``; :func:`caption_scores` tokenises first.

Conventions reproduced on purpose (they change the numbers):

* BLEU is corpus-level: clipped n-gram matches and candidate n-gram counts are summed over all images, the reference
  length of each image is the "closest" reference length (ties -> the shorter one), and the brevity penalty
  exp(1 - r/c) uses the summed lengths. BLEU-n is the geometric mean of the 1..n precisions. Each precision is
  smoothed as (matches + 1e-15) / (total + 1e-9) (so an empty corpus gives ~0, not a division error), and the length
  ratio as (c + 1e-15) / (r + 1e-9).
* ROUGE-L is per image: precision and recall of the LCS are maximised SEPARATELY over the references (the max
  precision and the max recall may come from different references), then F_beta with beta = 1.2; the corpus score
  is the mean over images. Tokens are split on single spaces (like pycocoevalcap).
* CIDEr-D: tf-idf vectors of 1..4-grams with raw counts as tf; document frequency = number of images whose
  reference set contains the n-gram (over the evaluated set only); idf = log(#images) - log(max(1, df)). For each
  reference: per-n cosine-like similarity with "clipping" (sum over candidate n-grams of min(w_c, w_r) * w_r,
  divided by |w_c| |w_r| when both norms are non-zero), times a gaussian length penalty
  exp(-(l_c - l_r)^2 / (2 sigma^2)), sigma = 6. Image score = 10 * mean over n of the mean over references.
  Quirk: the "length" used in the penalty is the number of BIGRAMS (max(0, #words - 1)), not the number of words,
  because pycocoevalcap counts the length inside its bigram branch. This only matters when exactly one of the two
  sentences is empty. With a single image, idf is 0 for every reference n-gram and CIDEr is 0.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

__all__ = [
    "PTB_DROPPED_TOKENS",
    "bleu",
    "caption_scores",
    "caption_tokenize",
    "cider_d",
    "rouge_l",
]

# ---------------------------------------------------------------------------------------------------------------
# Tokeniser
# ---------------------------------------------------------------------------------------------------------------

# Tokens pycocoevalcap's PTBTokenizer wrapper deletes after running the Stanford tokenizer. Note that the wrapper
# lists the bracket tokens in upper case ("-LRB-") while the Java tokenizer runs with -lowerCase and emits "-lrb-",
# so bracket tokens are in fact KEPT in the COCO pipeline; we reproduce that (they are not in this set).
PTB_DROPPED_TOKENS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# A double quote becomes `` or '' in PTB, both dropped.
_DROPPED = PTB_DROPPED_TOKENS | {'"'}
# PTB normalises vulgar fractions to ASCII.
_FRACTIONS = {"\u00bd": " 1/2 ", "\u00bc": " 1/4 ", "\u00be": " 3/4 ", "\u2153": " 1/3 ", "\u2154": " 2/3 "}
_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
# Clitics the PTB tokenizer splits off: "doesn't" -> "does n't", "can't" -> "ca n't", "dog's" -> "dog 's".
_NT = re.compile(r"(?<=\w)(n't)\b")
_CLITIC = re.compile(r"(?<=\w)('(?:s|re|ve|ll|d|m))\b")
# Words PTB splits in two.
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na", "gimme": "gim me"}
_SPLIT_WORDS_RE = re.compile(r"\b(" + "|".join(_SPLIT_WORDS) + r")\b")
# A few abbreviations that keep their period in PTB (small list: captions rarely contain others).
_ABBREV = r"(?:mr|mrs|ms|dr|jr|sr|st|vs|etc|inc|ltd|co|mt|ft|ave|blvd|rd|prof|gen|sgt|capt|lt|col|rev)\.(?=\s|$)"
_WORD_CHARS = r"[^\s.,;:!?\"'`%$#*()\[\]{}-]"
_TOKEN = re.compile(
    r"-(?:lrb|rrb|lsb|rsb|lcb|rcb)-"  # bracket tokens inserted above
    r"|n't|'(?:s|re|ve|ll|d|m)\b"  # clitics split off above
    r"|(?:[a-z]\.){2,}"  # acronyms keep their periods: "u.s.", "p.m.", "e.g."
    rf"|\b{_ABBREV}"
    # words: internal hyphens, apostrophes ("o'neill"), digit-separators ("10,000", "3.5") and dotted names stay
    rf"|{_WORD_CHARS}+(?:(?:-+|'|(?<=\d)[.,:](?=\d)|\.(?={_WORD_CHARS})){_WORD_CHARS}+)*"
    r"|[?!]{2,}"  # PTB keeps runs like "?!" as ONE token, which is not in the dropped list
    r"|\.\.\.|--|[%$#*]"  # kept symbols; "..." and "--" are dropped later
    r"|\S"  # any other single punctuation character (dropped later if in the PTB list)
)


def caption_tokenize(text: str) -> str:
    """Approximate pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP 3.4.1, ``-preserveLines -lowerCase``, then
    deletion of the punctuation tokens in :data:`PTB_DROPPED_TOKENS`) without Java.

    Lower-cases; splits off punctuation and the clitics n't/'s/'re/'ve/'ll/'d/'m; keeps hyphenated words, numbers
    with separators ("10,000", "3.5"), acronyms ("u.s."), "a/b"; turns brackets into ``-lrb-``/``-rrb-`` tokens
    (kept, as in the real pipeline); keeps ``% $ # * &``; drops quotes, ``. , ; : ! ? - -- ...``.

    It is an approximation: PTB's abbreviation list, unicode normalisation (e.g. "½" -> "1/2"), URLs, emoticons and
    some apostrophe cases are not reproduced. On ordinary English captions it agrees with the Java tokenizer (see
    tests/evaluation/test_metrics_caption.py for the sentences compared).
    """
    out = text.replace("\n", " ").lower()
    for ch, rep in (*_BRACKETS.items(), *_FRACTIONS.items()):
        out = out.replace(ch, rep)
    out = _SPLIT_WORDS_RE.sub(lambda m: _SPLIT_WORDS[m.group(1)], out)
    out = _NT.sub(r" \1", out)
    out = _CLITIC.sub(r" \1", out)
    tokens = _TOKEN.findall(out)
    return " ".join(t for t in tokens if t not in _DROPPED)


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------


def _ngrams(words: Sequence[str], n: int) -> Counter:
    """Counts of all 1..n-grams (as tuples) of a token list."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def _check_inputs(predictions: Mapping, references: Mapping) -> list:
    if set(predictions) != set(references):
        raise ValueError("predictions and references must have the same image ids")
    for k, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{k!r}] must be a non-empty list of strings")
    # Iterate in the references' order (pycocoevalcap iterates the gts dict); only float summation order depends
    # on it.
    return list(references)


# ---------------------------------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------------------------------

_TINY = 1e-15  # added to numerators, so a zero match count gives a tiny (not zero) precision, as pycocoevalcap
_SMALL = 1e-9  # added to denominators, to avoid division by zero


def bleu(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], n: int = 4
) -> tuple[list[float], list[list[float]]]:
    """Corpus BLEU-1..n with the "closest" reference length, as ``pycocoevalcap.bleu.Bleu(n).compute_score``.

    Args:
        predictions: image id -> one pre-tokenised candidate (tokens separated by whitespace).
        references: image id -> list of pre-tokenised references.

    Returns:
        ``(corpus, per_image)``: ``corpus[k]`` is BLEU-(k+1); ``per_image[k][i]`` is the sentence-level BLEU-(k+1)
        of image i (same smoothing, own brevity penalty), in the references' key order.
    """
    ids = _check_inputs(predictions, references)
    total_match = [0] * n
    total_guess = [0] * n
    total_c = 0
    total_r = 0
    per_image: list[list[float]] = [[] for _ in range(n)]
    for key in ids:
        cand = predictions[key].split()
        c = len(cand)
        max_ref_counts: dict[tuple, int] = {}
        ref_lens = []
        for ref in references[key]:
            words = ref.split()
            ref_lens.append(len(words))
            for g, cnt in _ngrams(words, n).items():
                if cnt > max_ref_counts.get(g, 0):
                    max_ref_counts[g] = cnt
        # Closest reference length; on a tie the shorter reference wins.
        r = min(ref_lens, key=lambda length: (abs(length - c), length))
        match = [0] * n
        for g, cnt in _ngrams(cand, n).items():
            match[len(g) - 1] += min(cnt, max_ref_counts.get(g, 0))
        guess = [max(0, c - k) for k in range(n)]
        for k in range(n):
            total_match[k] += match[k]
            total_guess[k] += guess[k]
        total_c += c
        total_r += r
        for k, value in enumerate(_bleu_from_counts(match, guess, c, r)):
            per_image[k].append(value)
    return _bleu_from_counts(total_match, total_guess, total_c, total_r), per_image


def _bleu_from_counts(match: Sequence[int], guess: Sequence[int], c: float, r: float) -> list[float]:
    """BLEU-1..n from (summed) clipped matches, candidate n-gram counts and lengths."""
    scores = []
    prod = 1.0
    for k in range(len(match)):
        prod *= (match[k] + _TINY) / (guess[k] + _SMALL)
        scores.append(prod ** (1.0 / (k + 1)))
    ratio = (c + _TINY) / (r + _SMALL)
    if ratio < 1:  # brevity penalty only for candidates shorter than the references
        bp = math.exp(1 - 1 / ratio)
        scores = [s * bp for s in scores]
    return scores


# ---------------------------------------------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------------------------------------------


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) dynamic programme, one row kept)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _rouge_l_single(candidate: str, refs: Sequence[str], beta: float) -> float:
    cand = candidate.split(" ")
    best_p = best_r = 0.0
    for ref in refs:
        words = ref.split(" ")
        lcs = _lcs_length(words, cand)
        best_p = max(best_p, lcs / len(cand))
        best_r = max(best_r, lcs / len(words))
    if best_p == 0 or best_r == 0:
        return 0.0
    return (1 + beta**2) * best_p * best_r / (best_r + beta**2 * best_p)


def rouge_l(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], beta: float = 1.2
) -> tuple[float, list[float]]:
    """ROUGE-L as ``pycocoevalcap.rouge.Rouge().compute_score``: ``(mean over images, per-image scores)``.

    Per image: P = max_ref LCS/len(candidate), R = max_ref LCS/len(ref) (maximised independently), then
    F = (1 + beta^2) P R / (R + beta^2 P). Tokens are split on single spaces, like pycocoevalcap (so an empty string
    is one empty token, which changes nothing unless a reference is also empty).
    """
    ids = _check_inputs(predictions, references)
    scores = [_rouge_l_single(predictions[k], references[k], beta) for k in ids]
    return (sum(scores) / len(scores) if scores else 0.0), scores


# ---------------------------------------------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------------------------------------------


def cider_d(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, list[float]]:
    """CIDEr-D as ``pycocoevalcap.cider.Cider().compute_score``: ``(mean over images, per-image scores)``.

    The document frequencies come from the references of the images passed in (so the score of one image depends
    on the whole evaluated set). See the module docstring for the exact formula and its quirks.
    """
    ids = _check_inputs(predictions, references)
    cand_counts = {k: _ngrams(predictions[k].split(), n) for k in ids}
    ref_counts = {k: [_ngrams(r.split(), n) for r in references[k]] for k in ids}

    df: Counter = Counter()
    for k in ids:
        df.update(set().union(*ref_counts[k]))  # each image counts once per n-gram
    log_n_images = math.log(float(len(ids))) if ids else 0.0

    def to_vec(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        sq = [0.0] * n
        length = 0
        for g, tf in counts.items():
            w = float(tf) * (log_n_images - math.log(max(1.0, df[g])))
            order = len(g) - 1
            vec[order][g] = w
            sq[order] += w * w
            if order == 1:  # pycocoevalcap's "length" = number of bigrams (see module docstring)
                length += tf
        return vec, [math.sqrt(s) for s in sq], length

    penalty_denominator = 2 * sigma**2
    scores = []
    for k in ids:
        vc, nc, lc = to_vec(cand_counts[k])
        per_n = [0.0] * n
        for rc in ref_counts[k]:
            vr, nr, lr = to_vec(rc)
            penalty = math.exp(-(float(lc - lr) ** 2) / penalty_denominator)
            for order in range(n):
                ref_vec = vr[order]
                # "Clipping" (the -D of CIDEr-D): a candidate n-gram cannot earn more than its reference weight.
                val = sum(min(w, ref_vec.get(g, 0.0)) * ref_vec.get(g, 0.0) for g, w in vc[order].items())
                if nc[order] != 0 and nr[order] != 0:
                    val /= nc[order] * nr[order]
                per_n[order] += val * penalty
        scores.append(10.0 * (sum(per_n) / n) / len(ref_counts[k]))
    return (sum(scores) / len(scores) if scores else 0.0), scores


# ---------------------------------------------------------------------------------------------------------------
# All together
# ---------------------------------------------------------------------------------------------------------------


def caption_scores(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    tokenize: bool = True,
) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr(-D) of a caption set, with COCOEvalCap's key names.

    Args:
        predictions: image id -> generated caption (raw text).
        references: image id -> list of reference captions (raw text).
        tokenize: run :func:`caption_tokenize` on both sides first (as COCOEvalCap runs PTBTokenizer); pass False
            for already tokenised strings.

    Returns:
        ``{"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}`` as fractions (COCOEvalCap convention; papers
        report x100, e.g. CIDEr 137.3 == 1.373). METEOR and SPICE (Java tools) are not provided.
    """
    if tokenize:
        predictions = {k: caption_tokenize(v) for k, v in predictions.items()}
        references = {k: [caption_tokenize(r) for r in refs] for k, refs in references.items()}
    b, _ = bleu(predictions, references, 4)
    r, _ = rouge_l(predictions, references)
    c, _ = cider_d(predictions, references)
    out = {f"Bleu_{i + 1}": b[i] for i in range(4)}
    out["ROUGE_L"] = r
    out["CIDEr"] = c
    return out
