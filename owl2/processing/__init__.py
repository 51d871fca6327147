"""Tokenizer, image processor and conversation templates."""
