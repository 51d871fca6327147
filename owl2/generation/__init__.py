"""Decoding: sampling settings, the decoding core shared by every decode loop, streaming detokenisation and the
batched generation engine."""

from owl2.generation.decoding import StepEvent
from owl2.generation.engine import (
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
    ImageEmbeddingCache,
)
from owl2.generation.sampling import SamplingParams
from owl2.generation.streaming import TextStream

__all__ = [
    "GenerationEngine",
    "GenerationRequest",
    "GenerationResult",
    "ImageEmbeddingCache",
    "SamplingParams",
    "StepEvent",
    "TextStream",
]
