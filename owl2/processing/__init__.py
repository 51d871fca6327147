"""Tokenizer, image processor, conversation templates and task prompts (needs the ``processing`` extra: pillow,
sentencepiece, tokenizers)."""

from owl2.processing.conversation import (
    CAPTION_INSTRUCTION,
    MULTIPLE_CHOICE_INSTRUCTION,
    MULTIPLE_CHOICE_INSTRUCTION_ASCII,
    VQA_INSTRUCTION,
    evaluation_prompt,
    extract_images,
    image_first,
    multiple_choice_prompt,
    options_block,
    render_conversation,
    vqa_prompt,
)
from owl2.processing.image import ImageError, ImageProcessor, load_image, load_image_processor
from owl2.processing.tokenizer import Owl2Tokenizer, load_tokenizer

__all__ = [
    "CAPTION_INSTRUCTION",
    "MULTIPLE_CHOICE_INSTRUCTION",
    "MULTIPLE_CHOICE_INSTRUCTION_ASCII",
    "VQA_INSTRUCTION",
    "ImageError",
    "ImageProcessor",
    "Owl2Tokenizer",
    "evaluation_prompt",
    "extract_images",
    "image_first",
    "load_image",
    "load_image_processor",
    "load_tokenizer",
    "multiple_choice_prompt",
    "options_block",
    "render_conversation",
    "vqa_prompt",
]
