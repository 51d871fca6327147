"""Training data: records (LLaVA and messages formats), loss-masked tokenisation, the dataset, collate, sampler.

See :mod:`owl2.data.records` (formats, placeholder rule, bad records), :mod:`owl2.data.masking` (loss masking,
over-length rule), :mod:`owl2.data.dataset` (lazy images, no dummy image for text-only samples) and
:mod:`owl2.data.sampler` (batches that never mix text-only and multimodal samples).
"""

from owl2.constants import DEFAULT_TEMPLATE, IGNORE_INDEX
from owl2.data.dataset import DEFAULT_TOKENS_PER_IMAGE, TRAINING_IMAGE_POLICY, SupervisedDataset, collate
from owl2.data.masking import TokenizedConversation, tokenize_conversation, truncate
from owl2.data.records import BadRecord, Record, parse_record, read_records
from owl2.data.sampler import ModalityLengthGroupedSampler

__all__ = [
    "DEFAULT_TEMPLATE",
    "DEFAULT_TOKENS_PER_IMAGE",
    "IGNORE_INDEX",
    "TRAINING_IMAGE_POLICY",
    "BadRecord",
    "ModalityLengthGroupedSampler",
    "Record",
    "SupervisedDataset",
    "TokenizedConversation",
    "collate",
    "parse_record",
    "read_records",
    "tokenize_conversation",
    "truncate",
]
