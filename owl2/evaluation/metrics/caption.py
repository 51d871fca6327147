"""Caption metrics: BLEU-1..4, ROUGE-L and CIDEr-D, numerically equal to ``pycocoevalcap`` 1.2 (COCO caption
evaluation), plus a pure-Python reimplementation of its PTB tokenisation (measured against the Java tokenizer).

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
from collections.abc import Callable, Hashable, Mapping, Sequence

__all__ = [
    "PTB_DROPPED_TOKENS",
    "bleu",
    "caption_scores",
    "caption_tokenize",
    "caption_tokenize_batch",
    "cider_d",
    "rouge_l",
]

# ---------------------------------------------------------------------------------------------------------------
# Tokeniser
# ---------------------------------------------------------------------------------------------------------------

# Tokens pycocoevalcap's PTBTokenizer wrapper deletes after running the Stanford tokenizer. Note that the wrapper
# lists the bracket tokens in upper case ("-LRB-") while the Java tokenizer runs with -lowerCase and emits "-lrb-",
# so bracket tokens are in fact KEPT in the COCO pipeline; we reproduce that (only the lower-case entries can match).
PTB_DROPPED_TOKENS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_DROPPED = frozenset(t for t in PTB_DROPPED_TOKENS if t == t.lower())

# The behaviour reproduced below was measured on the tokenizer pycocoevalcap 1.2 runs (stanford-corenlp-3.4.1.jar,
# ``PTBTokenizer -preserveLines -lowerCase``, default options: PTB3 escaping, ``untokenizable=firstDelete``): every
# BMP character alone and between letters and digits, every abbreviation candidate of up to five letters, and the
# sentences of tests/evaluation/test_metrics_caption.py. The lexer picks the LONGEST match among the rules below at
# each position (ties: the earlier rule), like the JFlex lexer it imitates; a rule may look further than the text it
# returns (trailing context), and that longer length is what competes.

# Character classes. Python's "\w" minus "_" is str.isalnum(); the Java lexer treats the "other number" characters
# (superscripts, subscripts, vulgar fractions, roman and circled numerals) as symbols and keeps combining diacritics
# inside words.
_NUMBER_SYMBOLS = (
    "\u00b2\u00b3\u00b9\u00bc-\u00be\u2070\u2074-\u2079\u2080-\u2089"
    "\u2150-\u2182\u2185-\u2189\u2460-\u24ff\u2776-\u2793"
)
_AL = rf"(?:[^\W_{_NUMBER_SYMBOLS}]|[\u0300-\u036f])"  # word character: letter, digit or combining mark
_LT = rf"(?:[^\W\d_{_NUMBER_SYMBOLS}]|[\u0300-\u036f])"  # letter (or combining mark)
_AP = "['\u2019]"  # apostrophe: ASCII or RIGHT SINGLE QUOTATION MARK
_AP_WORD = "['`\u2018\u2019]"  # inside words like "o'clock" a backtick or LEFT SINGLE QUOTATION MARK counts too
_HY = "[-\u2010\u2011]"  # hyphen inside a word (ASCII, HYPHEN, NON-BREAKING HYPHEN)
_UNICODE_QUOTES = "\u2018\u2019\u201b\u201c\u201d\u00ab\u00bb\u2039\u203a\u0091-\u0094"

# Pieces of words.
# "a_b"; "and/or", "24/7", "1/2" (joined by "/" only in ASCII; "a/b_c" is "a/b _ c")
_BASE = rf"(?:[A-Za-z0-9]+(?:/+[A-Za-z0-9]+)+|{_AL}+(?:_+{_AL}+)*)"
_PERIOD_BEFORE_COMMA = r"(?:\.(?=[,;:]))?"  # a word keeps a period that a comma, semicolon or colon follows
_DOTTED = rf"{_LT}{_AL}*(?:[.!?]{_LT}{_AL}*)+"  # "a.b.c", "www.x.com", "yes?no"
# E-mail-like: anything around an "@" up to a space or one of "(){}|@ (not ending in a period); "a@b.com", "x@:2".
_EMAIL = r'[A-Za-z0-9][^\s@"(){}|]*@[^\s@"(){}|.<>][^\s"(){}|]*(?<!\.)'
_ACRONYM = r"(?:[A-Za-z]\.){2,}"  # "u.s.", "e.g.", "p.m."
# "3.5", "10,000", "12:30", "-5", "+5.5", ".5" (and ",5", ":10": a leading comma or colon sticks to the digits)
_NUMBER = r"[-+]?(?:\d+|[.,:]\d+)(?:[.,:\u2044]\d+)*"


def _words(text: str) -> list[str]:
    return text.split()


# Abbreviations that keep their period, found by running the Java tokenizer on every letter string of up to five
# letters followed by ". the" (and a few longer candidates). Most match in any case; a few only when not all
# upper-case, a few (US states that are also English words) only when capitalised or all upper-case.
_ABBREV_ANY_CASE = _words(
    "adj adm adv al ala alex apr ariz assn assoc asst atty attys aug ave bhd bldg blvd brig bros capt cf cie cmdr "
    "co col colo comdr conn corp cos cpl ct dak dec dept det dr drs elec ens esq est etc ext feb fla fri ft ga gen "
    "gov govs hon inc ind insp intl invt jan jos jr jul jun kan kans ky lieut lt ltd maj mar md messrs mich minn "
    "mlle mme mo mon mont mr mrs ms msgr mt natl neb nev nov oct okla penn pfc ph plc pres prof profs pvt rd rep "
    "reps rev rt sen sens sep sept seq sfc sgt spc sq sr st ste supt supts sys tel tenn thu thurs treas tue tues "
    "univ va vs vt wed wis wisc wm wyo"
)
_ABBREV_NOT_UPPER = _words("mfg mtg ppte pptes ppty pptys pte ptes pty ptys")
_ABBREV_CAPITALISED = _words("ark az del ill la mass miss ore pa tex wash")
# Abbreviations that keep their period only before a number ("No. 5", "pp.12"; one space at most).
_ABBREV_BEFORE_NUMBER = _words("art ca fig figs no nos op pp prop")
# After a single letter, the period is split off ("vitamin C. The ...") when the next word, possibly the first of the
# next caption, is one of these (capitalised or in capitals) followed by whitespace; otherwise "c." is one token.
_SENTENCE_STARTERS = _words(
    "A About According After An As At But He Her Here However If In It Last Many More Now Once One Other Our She "
    "Since So Some Such That The Their Then There These They This What When While Yet You We"
)


def _longest_first(words: list[str]) -> str:
    return "|".join(sorted(words, key=lambda w: (-len(w), w)))


# Those that can end a sentence (the Java lexer adds a "." token after them before a capital, which the wrapper drops)
# also win against a longer word by one character: "Inc.n" is "inc. n" but "Mr.n" stays "mr.n".
_ABBREV_SENTENCE_FINAL = frozenset(
    _words(
        "al ala apr ariz ark assn aug az bhd bldg blvd bros co colo conn corp cos ct dak dec del esq est etc ext feb "
        "fla fri ga ill inc ind intl jan jr jul jun kan kans ky la ltd mar mass md mich minn miss mo mon mont neb nev "
        "nov oct okla ore pa penn plc ppte pptes ppty pptys pte ptes pty ptys rd rt sep sept seq sq sr sys tel tenn "
        "tex thu thurs tue tues univ va vt wash wed wis wisc wyo"
    )
)


def _abbrev_pattern(sentence_final: bool) -> str:
    def pick(words: list[str]) -> list[str]:
        return [w for w in words if (w in _ABBREV_SENTENCE_FINAL) == sentence_final]

    return (
        f"(?:(?i:{_longest_first(pick(_ABBREV_ANY_CASE))})"
        + "".join(f"|[{w[0].upper()}{w[0]}]{w[1:]}" for w in pick(_ABBREV_NOT_UPPER))
        + "".join(f"|{w.capitalize()}|{w.upper()}" for w in pick(_ABBREV_CAPITALISED))
        + ")"
    )


_STARTERS = _longest_first(_SENTENCE_STARTERS + [w.upper() for w in _SENTENCE_STARTERS])


def _sgml(tok: str) -> str:
    return re.sub(r"\s", "\u00a0", tok)  # PTB's normalizeSpace: a space inside a token becomes U+00A0


def _smiley(tok: str) -> str:
    return tok.replace("(", "-lrb-").replace(")", "-rrb-")


def _clitic(tok: str) -> str:
    return "'" + tok[1:]


def _quotes(tok: str) -> str:
    return "".join(_SINGLE.get(ch, ch) for ch in tok)


# (pattern, output): output None keeps the matched text, a string replaces it, a function maps it. A pattern with a
# group "t" returns only that group (the rest of the match is trailing context). Where the ASCII apostrophe and
# U+2019 behave differently, the ASCII one is the more restricted.
_RULES: list[tuple[re.Pattern[str], str | Callable[[str], str] | None]] = [
    (re.compile(p), out)
    for p, out in [
        # SGML/XML tags ("<br/>", "</s>", "<a href=x>"): one token, inner spaces -> U+00A0.
        (r"</?[A-Za-z][\w:.-]*(?:[^\S\n][^<>\n]*)?/?>|<![^<>\n]*>", _sgml),
        # URLs: printable ASCII up to a space, bracket, quote or angle bracket, not ending in punctuation.
        (
            r"(?:https?://(?=[!-~]*\.)|www\.(?=[^\s.\d]))(?:(?![<>\"(){}\[\]])[!-~])*(?![<>\"(){}\[\].,;:!?'])[!-~]",
            None,
        ),
        # Emoticons; their parentheses are escaped like any other (":-rrb-").
        (rf"[:;=]'?-?[()\[\]{{|\\DdPpO@](?!{_AL}|\Z)", _smiley),
        # Words PTB splits in two ("gonna" -> "gon na", "cannot" -> "can not").
        (rf"(?P<t>(?i:gon(?=na)|wan(?=na)|got(?=ta)|lem(?=me)|gim(?=me)|can(?=not)))(?i:na|ta|me|not)(?!{_AL})", None),
        # Clitics: the word before them, then the clitic itself ("does n't", "man 's", "they 're"). Before "n't" the
        # word is letters only and does not end in "n" ("inn't" stays "inn ' t").
        (r"(?P<t>[A-Za-z]+)(?<![nN])(?i:n['\u2019\u2018`]t)", None),
        (rf"(?P<t>{_AL}+)(?:'(?i:s|m|d|re|ve|ll)(?![A-Za-z])|\u2019(?i:s|m|d|re|ve|ll))", None),
        (r"(?i:n['\u2019]t)", "n't"),
        (r"(?i:n[\u2018`]t)", "n`t"),
        (r"'(?i:s|m|d|re|ve|ll)(?![A-Za-z])|\u2019(?i:s|m|d|re|ve|ll)", _clitic),
        # Words with an apostrophe inside, kept whole with the apostrophe as written.
        (r"'[nN](?:'|(?=\s)|\Z)|\u2019[nN]['\u2019]?", None),  # rock 'n' roll
        (r"'[tT](?=(?:is|was)(?!\w))", None),  # 'tis -> 't is
        (rf"{_AP}(?:[2-9]0s|\d\d(?=\s))", None),  # '90s, '99
        (rf"{_AP}(?i:em|cause|till?)|(?i:dunkin|somethin){_AP}|(?i:ol){_AP}(?!{_LT})", None),
        (rf"(?i:c{_AP}mon|nor{_AP}easter|e{_AP}er|s{_AP}mores|ev{_AP}ry|nat{_AP}l|li{_AP}l|cont{_AP}d\.)", None),
        (rf"(?:[A-HJ-XZ]|[dlno]){_AP_WORD}{_LT}{{2,}}", None),  # o'clock, O'Neill, d'you, l'amour
        (rf"[dDlLjJ]{_AP}|[yY]{_AP}(?=[A-Za-z])(?![dmsDMS])", None),  # d', l', y'all -> y' all
        (rf"{_LT}+[aeiouyAEIOUY]{_AP_WORD}[aeiouA-Z]{_LT}*", None),  # ma'am, qu'il
        # Quotes: "``" and "''" are one token, so is a pair of unicode quotes ("\u201c\u2018" -> "```", kept).
        (r"``|''", None),
        (rf"[{_UNICODE_QUOTES}][{_UNICODE_QUOTES}`]|`[{_UNICODE_QUOTES}]", _quotes),
        # Abbreviations and acronyms that keep their period (ASCII letters only).
        (_ACRONYM + "|(?i:ph\\.d\\.|ed\\.d\\.)", None),
        (rf"{_abbrev_pattern(False)}\.", None),
        (rf"(?P<t>{_abbrev_pattern(True)}\.)[\s\S]?", None),
        (rf"(?i:{_longest_first(_ABBREV_BEFORE_NUMBER)})\.(?= ?\d)", None),
        (rf"[A-Za-z]\.(?!\s+(?:{_STARTERS})\s)", None),
        # Numbers, words, hyphenated words.
        (r"\d+ \d+[/\u2044]\d+", _sgml),  # "2 1/2" is one token "2\u00a01/2"
        (_NUMBER + _PERIOD_BEFORE_COMMA, None),
        (
            rf"(?:{_ACRONYM}|{_LT}(?:{_AL}|[_@])*(?:\.{_LT}(?:{_AL}|[_@])*)+|\d+(?:[.,]\d+)+|{_BASE})"
            rf"(?:{_HY}{_BASE})+{_PERIOD_BEFORE_COMMA}",
            None,
        ),
        (_DOTTED + _PERIOD_BEFORE_COMMA, None),
        (_BASE + _PERIOD_BEFORE_COMMA, None),
        (_EMAIL, None),
        (r"[A-Z]+(?:(?:&|&(?i:amp);|\+)[A-Z]+)+", lambda t: re.sub("(?i)&amp;", "&", t)),  # AT&T, R&B, Q&A
        (r"[A-Z]*\$", None),  # $, US$, A$
        (rf"#{_LT}+|#+", None),  # hashtags, "##"
        (r"@[A-Za-z_][A-Za-z0-9_]*|@+", None),  # @user
        (r"_+|\*+|(?:\\\*)+|<<|>>|[!?]{2,}", None),
        # Entities and dots.
        (r"&(?i:amp);", "&"),
        (r"&lt;", "<"),
        (r"&gt;", ">"),
        (r"&quot;", "''"),
        (r"&apos;", "'"),
        (r"&nbsp;", ""),
        (r"&#\d+;", None),
        (r"\.\.\.+|\.(?: \.){2}", "..."),
        (r"--+", "--"),
    ]
]

# Characters that become other text when they stand alone (PTB3 escaping: brackets, currency, fractions, quotes,
# dashes, ellipsis). Quote directions are as measured for a quote between two words; every quote token is dropped
# by the wrapper anyway.
_SINGLE = {
    "(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-",
    "\u00a3": "#", "\u00a2": "cents", "\u0080": "$", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$",
    "\u00bd": "1/2", "\u00bc": "1/4", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3",
    "\u2026": "...", "\u2013": "--", "\u2014": "--", "\u2015": "--", "\u0096": "--", "\u0097": "--",
    '"': "''", "\u201c": "``", "\u00ab": "``", "\u0093": "``", "\u201d": "''", "\u00bb": "''", "\u0094": "''",
    "\u2018": "`", "\u201b": "`", "\u2039": "`", "\u0091": "`", "\u2019": "'", "\u203a": "'", "\u0092": "'",
    "\u00ad": "-",
}  # fmt: skip
# Characters the Java lexer deletes as untokenizable (measured over the BMP; only characters that are not word
# characters here are listed), which then separate tokens like a space; everything above the BMP (emoji) too.
_DELETED = (
    "\u007f\u0081-\u0090\u0095\u0098-\u009f\u0380-\u0383\u038b-\u03a2\u0482\u0488-\u0558\u058a-\u0590"
    "\u05c8-\u05ee\u05f5-\u05ff\u0604-\u0605\u060d-\u0613\u061c-\u061d\u065f\u066b-\u066c\u070e\u07b2-\u07bf"
    "\u07f9-\u08ff\u093a-\u093b\u094f\u0956-\u0957\u0970\u0984-\u09bb\u09c5-\u09c6\u09c9-\u09ca\u09cf-\u09d6"
    "\u09d8-\u09de\u09e4-\u0a00\u0a04-\u0a3b\u0a3d\u0a50-\u0a80\u0a84-\u0abb\u0ad1-\u0b81\u0b84-\u0bbd"
    "\u0bc3-\u0bc5\u0bc9\u0bce-\u0c00\u0c04-\u0c3c\u0c57-\u0d3c\u0d45\u0d49-\u0e00\u0e3b-\u0e3e\u0e5a-\u0ea6"
    "\u0ebe-\u0ec7\u0ece-\u187f\u18a9-\u1fb5\u1fbf-\u2012\u2024-\u2025\u2027-\u202e\u203c-\u203d\u2043"
    "\u2045-\u206f\u2072-\u2073\u208f\u209d-\u209f\u20a1-\u20a3\u20a5-\u20ab\u20ad-\u20ff\u2150-\u2152"
    "\u215f-\u2182\u2185-\u218f\u2ce5-\u2fff\u3003-\u3011\u3013-\u30a0\u3100-\uff00\uffbf-\uffdf\uffe2-\uffe4"
    "\uffe7-\uffff\U00010000-\U0010ffff"
)
_SKIP = re.compile(rf"(?:\s|[\x00-\x1f]|(?!{_AL})[{_DELETED}])+")
_PLAIN_WORD = re.compile(r"[A-Za-z]+(?=\s|\Z)")
_SPLIT_WORDS = frozenset(["gonna", "wanna", "gotta", "lemme", "gimme", "cannot"])
# A soft hyphen disappears after a letter or between digits ("qq\u00adzz" -> "qqzz"); elsewhere it is "-".
_SOFT_HYPHEN_IN_WORD = re.compile(r"(?<=[^\W\d_])\u00ad+|(?<=\d)\u00ad+(?=\d)")


def _ptb_tokens(line: str, after: str = "\n") -> list[str]:
    """The Java tokenizer's tokens for one line (before lower-casing and punctuation removal). ``after`` is what
    follows the line in the file the wrapper writes: "\n" and the next caption, or "" for the last caption. A few
    rules look past the end of the line ("vitamin C." followed by a caption starting with "The"; "'99" and ":)" at
    the very end of the file)."""
    line = _SOFT_HYPHEN_IN_WORD.sub("", line)
    text = line + after
    tokens: list[str] = []
    pos, n = 0, len(line)
    while pos < n:
        skip = _SKIP.match(text, pos)
        if skip is not None:
            pos = skip.end()
            continue
        plain = _PLAIN_WORD.match(text, pos)
        if plain is not None and plain.group().lower() not in _SPLIT_WORDS:
            tokens.append(plain.group())  # fast path: no rule matches more than a plain word before a space
            pos = plain.end()
            continue
        best: re.Match[str] | None = None
        best_out: str | Callable[[str], str] | None = None
        for pattern, out in _RULES:
            m = pattern.match(text, pos)
            if m is not None and (best is None or m.end() > best.end()):
                best, best_out = m, out
        if best is None:
            ch = text[pos]
            tokens.append(_SINGLE.get(ch, ch))
            pos += 1
            continue
        if "t" in best.re.groupindex:
            tok, pos = best.group("t"), best.end("t")
        else:
            tok, pos = best.group(), best.end()
        if best_out is None:
            tokens.append(tok)
        elif isinstance(best_out, str):
            if best_out:
                tokens.append(best_out)
        else:
            tokens.append(best_out(tok))
    return tokens


def _finish(tokens: list[str]) -> str:
    lowered = (tok.lower() for tok in tokens)
    return " ".join(tok for tok in lowered if tok not in _DROPPED)


def caption_tokenize(text: str) -> str:
    """pycocoevalcap's ``PTBTokenizer`` without Java: Stanford CoreNLP 3.4.1's ``PTBTokenizer -preserveLines
    -lowerCase`` on one caption, then deletion of the punctuation tokens in :data:`PTB_DROPPED_TOKENS`.

    Reproduces the Java lexer's splitting (clitics "does n't", "man 's"; "gon na", "can not"; hyphenated words,
    numbers "10,000" "3.5" "-5" "2\u00a01/2", acronyms "u.s." and its list of abbreviations that keep their period,
    URLs, e-mail addresses, "AT&T", "US$", emoticons, SGML tags) and its PTB3 normalisations: brackets ->
    ``-lrb-``/``-rrb-``/``-lsb-``... (kept, as in the real pipeline), "\u00a3" -> "#", "\u20ac" -> "$", "\u00a2" ->
    "cents", vulgar fractions -> "1/2", unicode quotes and dashes and "\u2026" -> PTB quotes, "--" and "..." (all
    dropped), "&amp;" -> "&"; characters it cannot tokenize (emoji, most other currency signs) are deleted.

    The caption is tokenized as if it were followed by a caption that does not start with a sentence starter; use
    :func:`caption_tokenize_batch` to reproduce a whole ``PTBTokenizer.tokenize`` call exactly. Not reproduced:
    letters and combining marks of scripts whose Unicode tables differ between the 2014 Java lexer and Python, a
    few adversarial symbol sequences, and the misalignment pycocoevalcap itself suffers from line separators other
    than "\n" inside a caption (we read them as spaces).
    """
    return _finish(_ptb_tokens(text.replace("\n", " ")))


def caption_tokenize_batch(captions: Sequence[str]) -> list[str]:
    """:func:`caption_tokenize` for the captions of ONE ``PTBTokenizer.tokenize`` call, in the order the wrapper
    writes them (for each image in dict order, each caption): the Java lexer sees them as the lines of one file, and
    a caption can depend on the start of the next one (or on being the last)."""
    lines = [c.replace("\n", " ") for c in captions]
    return [
        _finish(_ptb_tokens(line, "\n" + lines[i + 1] if i + 1 < len(lines) else "")) for i, line in enumerate(lines)
    ]


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
        tokenize: tokenize both sides first as COCOEvalCap runs PTBTokenizer (one call for all references in
            their order, one for all predictions: :func:`caption_tokenize_batch`); pass False for already tokenised
            strings.

    Returns:
        ``{"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}`` as fractions (COCOEvalCap convention; papers
        report x100, e.g. CIDEr 137.3 == 1.373). METEOR and SPICE (Java tools) are not provided.
    """
    if tokenize:
        _check_inputs(predictions, references)
        predictions = dict(zip(predictions, caption_tokenize_batch(list(predictions.values())), strict=True))
        flat = iter(caption_tokenize_batch([r for refs in references.values() for r in refs]))
        references = {k: [next(flat) for _ in refs] for k, refs in references.items()}
    b, _ = bleu(predictions, references, 4)
    r, _ = rouge_l(predictions, references)
    c, _ = cider_d(predictions, references)
    out = {f"Bleu_{i + 1}": b[i] for i in range(4)}
    out["ROUGE_L"] = r
    out["CIDEr"] = c
    return out
