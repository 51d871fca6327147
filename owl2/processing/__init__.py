"""Tokenizer, image processor and conversation templates (needs the ``processing`` extra: pillow, sentencepiece,
tokenizers)."""

from owl2.processing.conversation import extract_images, render_conversation
from owl2.processing.image import ImageError, ImageProcessor, load_image, load_image_processor
from owl2.processing.tokenizer import Owl2Tokenizer, load_tokenizer

__all__ = [
    "ImageError",
    "ImageProcessor",
    "Owl2Tokenizer",
    "extract_images",
    "load_image",
    "load_image_processor",
    "load_tokenizer",
    "render_conversation",
]
