"""Caption metrics: hand-computed cases, and numerical equality with pycocoevalcap 1.2 on synthetic caption sets.

pycocoevalcap is only the reference here (``pip install pycocoevalcap==1.2``); its tokenizer needs Java and is
compared only when ``java`` is on PATH.
"""

from __future__ import annotations

import math
import random
import shutil

import pytest

from owl2.evaluation.metrics import bleu, caption_scores, caption_tokenize, cider_d, rouge_l

# ---------------------------------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------------------------------


def test_bleu_perfect_and_brevity_penalty() -> None:
    (b1, b2, b3, b4), _ = bleu({0: "a b c d"}, {0: ["a b c d"]})
    # precisions (4/4, 3/3, 2/2, 1/1) up to the 1e-15 / 1e-9 smoothing; no brevity penalty
    assert [b1, b2, b3, b4] == pytest.approx([1.0] * 4, abs=1e-9)
    (b1, b2, _, _), _ = bleu({0: "a b"}, {0: ["a b c d"]})
    # c = 2, r = 4: BP = exp(1 - 4/2) = e^-1; p1 = 2/2, p2 = 1/1
    assert b1 == pytest.approx(math.exp(-1), abs=1e-9)
    assert b2 == pytest.approx(math.exp(-1), abs=1e-9)


def test_bleu_closest_length_tie_takes_shorter() -> None:
    # c = 3; references of length 2 and 4 are equally close -> r = 2 -> no brevity penalty; p1 = 3/3.
    (b1, *_), _ = bleu({0: "a b c"}, {0: ["a b", "a b c d"]})
    assert b1 == pytest.approx(1.0, abs=1e-9)


def test_bleu_clipping() -> None:
    # "the the the the" vs "the cat": unigram matches clipped to 1 -> p1 = 1/4; c = 4 >= r = 2.
    (b1, *_), _ = bleu({0: "the the the the"}, {0: ["the cat"]})
    assert b1 == pytest.approx(0.25, abs=1e-9)


def test_rouge_l_max_p_and_r_separately() -> None:
    # cand "a b c"; ref1 "a c": LCS 2, P = 2/3, R = 1; ref2 "b c d e": LCS 2, P = 2/3, R = 2/4.
    # P = 2/3, R = 1: F = (1 + 1.44) * (2/3) * 1 / (1 + 1.44 * 2/3) = (4.88/3) / 1.96 = 4.88 / 5.88
    score, per_image = rouge_l({0: "a b c"}, {0: ["a c", "b c d e"]})
    assert score == pytest.approx(4.88 / 5.88, abs=1e-12)
    assert per_image == [score]
    assert rouge_l({0: ""}, {0: ["a b"]})[0] == 0.0


def test_cider_hand_computed() -> None:
    # Two images, each candidate equal to its single reference; every n-gram has df = 1, idf = log 2.
    # Unigram and bigram cosines are 1, there are no 3/4-grams (0), lengths equal (penalty 1):
    # image score = 10 * (1 + 1 + 0 + 0) / 4 = 5.
    score, per_image = cider_d({0: "a b", 1: "c d"}, {0: ["a b"], 1: ["c d"]})
    assert per_image == pytest.approx([5.0, 5.0])
    assert score == pytest.approx(5.0)
    # One image only: idf = log 1 - log 1 = 0 everywhere -> CIDEr 0.
    assert cider_d({0: "a b"}, {0: ["a b"]})[0] == 0.0


def test_cider_length_penalty() -> None:
    # Image 0: candidate "a b x" vs reference "a b": lengths counted as bigrams: 2 vs 1 -> penalty exp(-1/72).
    # Unigrams: cand {a, b, x}, all idf log 2 (x has df 0 -> log(max(1, 0)) = 0 -> weight log 2 too).
    # clipped dot = 2 (log 2)^2; norms sqrt(3) log 2 and sqrt(2) log 2 -> cos1 = 2/sqrt(6).
    # Bigrams: cand {ab, bx}, ref {ab}: cos2 = 1/sqrt(2). 3/4-grams: ref has none -> 0.
    per_image = cider_d({0: "a b x", 1: "c d"}, {0: ["a b"], 1: ["c d"]})[1]
    expected = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert per_image[0] == pytest.approx(expected, abs=1e-12)


def test_input_checks() -> None:
    with pytest.raises(ValueError):
        bleu({0: "a"}, {1: ["a"]})
    with pytest.raises(ValueError):
        cider_d({0: "a"}, {0: []})


# ---------------------------------------------------------------------------------------------------------------
# Equality with pycocoevalcap
# ---------------------------------------------------------------------------------------------------------------

VOCAB_TEXT = "a the dog dogs cat man woman on in of with sitting standing red blue ball park street two is are"
VOCAB = VOCAB_TEXT.split()


def _synthetic_sets(count: int = 36) -> list[tuple[dict, dict]]:
    rng = random.Random(1234)
    sets = []
    for _ in range(count):
        n_images = rng.randint(1, 9)
        preds, refs = {}, {}
        for i in range(n_images):
            vocab = VOCAB[: rng.randint(3, len(VOCAB))]  # small vocabularies -> many repeated words / n-grams
            refs[f"img{i}"] = [
                " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 14))) for _ in range(rng.randint(1, 5))
            ]
            length = rng.choice([0, 1, 2, 3, 5, 8, 12, 20])  # includes empty and one-word predictions
            if rng.random() < 0.15:
                preds[f"img{i}"] = rng.choice(refs[f"img{i}"])  # exact copy of a reference
            else:
                preds[f"img{i}"] = " ".join(rng.choice(vocab) for _ in range(length))
        sets.append((preds, refs))
    return sets


@pytest.mark.parametrize("case", range(36))
def test_equal_to_pycocoevalcap(case: int) -> None:
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    preds, refs = _synthetic_sets()[case]
    res = {k: [v] for k, v in preds.items()}
    ref_bleu, ref_bleu_img = Bleu(4).compute_score(refs, res, verbose=0)
    ref_rouge, ref_rouge_img = Rouge().compute_score(refs, res)
    ref_cider, ref_cider_img = Cider().compute_score(refs, res)

    my_bleu, my_bleu_img = bleu(preds, refs)
    my_rouge, my_rouge_img = rouge_l(preds, refs)
    my_cider, my_cider_img = cider_d(preds, refs)
    assert my_bleu == pytest.approx(ref_bleu, rel=1e-9, abs=1e-12)
    for k in range(4):
        assert my_bleu_img[k] == pytest.approx(ref_bleu_img[k], rel=1e-9, abs=1e-12)
    assert my_rouge == pytest.approx(float(ref_rouge), rel=1e-9, abs=1e-12)
    assert my_rouge_img == pytest.approx(list(ref_rouge_img), rel=1e-9, abs=1e-12)
    assert my_cider == pytest.approx(float(ref_cider), rel=1e-9, abs=1e-12)
    assert my_cider_img == pytest.approx(list(ref_cider_img), rel=1e-9, abs=1e-12)

    scores = caption_scores(preds, refs, tokenize=False)
    assert scores["Bleu_4"] == my_bleu[3]
    assert scores["ROUGE_L"] == my_rouge
    assert scores["CIDEr"] == my_cider


# ---------------------------------------------------------------------------------------------------------------
# Tokeniser
# ---------------------------------------------------------------------------------------------------------------

# Sentences on which caption_tokenize agrees with the Java PTBTokenizer (checked when java is available).
AGREEING = [
    "A man riding a wave on top of a surfboard.",
    "Two giraffes standing next to each other in a field!",
    "A man's dog doesn't like the \"red\" ball.",
    "Two dogs (brown) play in the U.S. park... really!",
    "The cat, 10,000 times 3.5 -- wow; a/b test & more: yes?",
    "She can't go; they're gonna eat cannot won't I'm.",
    "A black-and-white photo of a colour TV at 5 p.m. e.g. here",
    "`quoted' text 'single' and  double  spaces\ttab",
    "A woman's hand holding a hot-dog, with mustard.",
    "The bus is parked at the 3rd Ave. stop",
    "A group of people playing frisbee; it's sunny.",
    "An old (vintage) car parked on the side of the road.",
    "a   cat  sleeping on a laptop",
    "Kids aren't allowed here, they're told.",
    "A 10-year-old boy at 12:30 pm",
    "Dogs' toys are on the floor",
    "It is a cat?!",
    "The word 'hello' written",
    'A sign that says "STOP".',
    "People at the U.S.A. embassy",
    "Mr. Smith's 50% $20 #1 @home 1/2 \u00bd *star*",
]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A man's dog doesn't like the \"red\" ball.", "a man 's dog does n't like the red ball"),
        (
            "Two dogs (brown) play in the U.S. park... really!",
            "two dogs -lrb- brown -rrb- play in the u.s. park really",
        ),
        ("The cat, 10,000 times 3.5 -- wow; a/b", "the cat 10,000 times 3.5 wow a/b"),
        ("She can't go; they're gonna eat cannot.", "she ca n't go they 're gon na eat can not"),
        ("A black-and-white photo", "a black-and-white photo"),
        ("It is a cat?!", "it is a cat ?!"),
        ("", ""),
        ("...", ""),
    ],
)
def test_caption_tokenize(raw: str, expected: str) -> None:
    assert caption_tokenize(raw) == expected


@pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer needs java")
def test_tokenizer_matches_ptb() -> None:
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ptb = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(AGREEING)})
    for i, sentence in enumerate(AGREEING):
        assert caption_tokenize(sentence) == ptb[i][0], sentence


def test_caption_scores_tokenizes() -> None:
    refs = {1: ["A dog runs.", "A brown dog is running!"], 2: ["Two cats sleep.", "Cats sleeping on a bed."]}
    preds = {1: "A dog, running.", 2: "Two cats (sleeping)."}
    raw = caption_scores(preds, refs)
    tok = caption_scores(
        {k: caption_tokenize(v) for k, v in preds.items()},
        {k: [caption_tokenize(r) for r in v] for k, v in refs.items()},
        tokenize=False,
    )
    assert raw == tok
    assert set(raw) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
