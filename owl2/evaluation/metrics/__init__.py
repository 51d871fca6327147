"""Benchmark metrics of the evaluation harness, in plain Python.

* :mod:`.vqa`: VQA accuracy (official ``VQAEval`` normalisation, leave-one-out), GQA exact match, EvalAI processor.
* :mod:`.caption`: BLEU-1..4, ROUGE-L, CIDEr-D equal to pycocoevalcap, and a Java-free PTB tokeniser
  that gives the Java tokeniser's tokens.
* :mod:`.choice`: multiple-choice letter extraction, accuracy, MMBench CircularEval.
* :mod:`.mme`: MME yes/no parsing, accuracy / accuracy+, perception and cognition scores.
* :mod:`.pope`: POPE answer parsing, accuracy / precision / recall / F1 / yes-ratio per split.
* :mod:`.iqa`: SRCC, KRCC, PLCC raw and after the IQA literature's 4-parameter logistic fit.
"""

from .caption import (
    PTB_DROPPED_TOKENS,
    bleu,
    caption_scores,
    caption_tokenize,
    caption_tokenize_batch,
    cider_d,
    rouge_l,
)
from .choice import (
    CIRCULAR_INDEX_OFFSET,
    circular_eval,
    circular_variants,
    extract_choice,
    multiple_choice_accuracy,
    options_as_dict,
)
from .iqa import fit_logistic, iqa_scores, krcc, plcc, plcc_logistic, srcc
from .mme import COGNITION_SUBTASKS, PERCEPTION_SUBTASKS, mme_scores, parse_mme_answer
from .pope import parse_pope_answer, pope_metrics, pope_scores
from .vqa import (
    VQA_VARIANTS,
    evalai_process_answer,
    exact_match,
    exact_match_accuracy,
    normalize_gqa_answer,
    normalize_vqa_answer,
    vqa_accuracy,
    vqa_score,
)

__all__ = [
    "CIRCULAR_INDEX_OFFSET",
    "COGNITION_SUBTASKS",
    "PERCEPTION_SUBTASKS",
    "PTB_DROPPED_TOKENS",
    "VQA_VARIANTS",
    "bleu",
    "caption_scores",
    "caption_tokenize",
    "caption_tokenize_batch",
    "cider_d",
    "circular_eval",
    "circular_variants",
    "evalai_process_answer",
    "exact_match",
    "exact_match_accuracy",
    "extract_choice",
    "fit_logistic",
    "iqa_scores",
    "krcc",
    "mme_scores",
    "multiple_choice_accuracy",
    "normalize_gqa_answer",
    "normalize_vqa_answer",
    "options_as_dict",
    "parse_mme_answer",
    "parse_pope_answer",
    "plcc",
    "plcc_logistic",
    "pope_metrics",
    "pope_scores",
    "rouge_l",
    "srcc",
    "vqa_accuracy",
    "vqa_score",
]
