"""Checkpoint I/O: the official pickled shards and safetensors in, sharded safetensors out."""

from owl2.checkpoint.convert import convert_checkpoint
from owl2.checkpoint.io import CheckpointError, load_model, resolve_checkpoint, save_model

__all__ = ["CheckpointError", "convert_checkpoint", "load_model", "resolve_checkpoint", "save_model"]
