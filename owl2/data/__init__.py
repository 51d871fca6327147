"""Training data: records (LLaVA and messages formats), loss-masked tokenisation, the dataset, collate, sampler.

See :mod:`owl2.data.records` (formats, placeholder rule, bad records), :mod:`owl2.data.masking` (loss masking,
over-length rule), :mod:`owl2.data.dataset` (lazy images, no dummy image for text-only samples) and
:mod:`owl2.data.sampler` (batches that never mix text-only and multimodal samples) and :mod:`owl2.data.shapes` (the
synthetic shapes world: scenes, questions, training and held-out sets).
"""

from owl2.constants import DEFAULT_TEMPLATE, IGNORE_INDEX
from owl2.data.dataset import DEFAULT_TOKENS_PER_IMAGE, TRAINING_IMAGE_POLICY, SupervisedDataset, collate
from owl2.data.masking import TokenizedConversation, tokenize_conversation, truncate
from owl2.data.records import BadRecord, Record, parse_record, read_records
from owl2.data.sampler import ModalityLengthGroupedSampler
from owl2.data.shapes import (
    ANSWER_STYLES,
    QAItem,
    Scene,
    ShapeObject,
    accuracy_by_type,
    binding_drills,
    counted_existence_answer,
    generate_scene,
    listed_answer,
    read_eval_set,
    render_scene,
    scene_questions,
    score_answer,
    text_questions,
    write_eval_set,
    write_training_set,
)

__all__ = [
    "ANSWER_STYLES",
    "DEFAULT_TEMPLATE",
    "DEFAULT_TOKENS_PER_IMAGE",
    "IGNORE_INDEX",
    "TRAINING_IMAGE_POLICY",
    "BadRecord",
    "ModalityLengthGroupedSampler",
    "QAItem",
    "Record",
    "Scene",
    "ShapeObject",
    "SupervisedDataset",
    "TokenizedConversation",
    "accuracy_by_type",
    "binding_drills",
    "counted_existence_answer",
    "collate",
    "generate_scene",
    "listed_answer",
    "parse_record",
    "read_eval_set",
    "read_records",
    "render_scene",
    "scene_questions",
    "score_answer",
    "text_questions",
    "tokenize_conversation",
    "truncate",
    "write_eval_set",
    "write_training_set",
]
