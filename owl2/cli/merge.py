"""``owl2 merge BASE ADAPTER OUT``: fold a LoRA adapter (owl2's or Q-Align's layout) into its base checkpoint."""

from __future__ import annotations

import argparse
from typing import Any


def _merge(args: argparse.Namespace) -> int:
    try:
        from owl2.training.lora import merge_adapter
        files = merge_adapter(args.base, args.adapter, args.out, dtype=args.dtype, show_progress=not args.quiet)
    except ImportError as exc:
        # main() reports ValueError as a one-line error with exit code 2; a missing extra deserves the same.
        raise ValueError(str(exc)) from None
    size = sum(f.stat().st_size for f in files)
    print(f"merged {args.adapter} into {args.base}: wrote {len(files)} weight file(s) ({size / 1e9:.2f} GB, "
          f"{args.dtype or 'base dtype'}) to {args.out}")
    return 0


def register(commands: Any) -> None:
    """Add the ``merge`` subcommand to ``commands`` (the object ``ArgumentParser.add_subparsers`` returns)."""
    merge = commands.add_parser(
        "merge",
        help="merge a LoRA adapter into its base checkpoint",
        description="Load BASE (owl2 or official checkpoint), apply the LoRA adapter directory ADAPTER, fold it into "
        "the weights and write a plain owl2 checkpoint to OUT, tokenizer and preprocessor files included. Two adapter "
        "layouts are accepted: owl2's own (owl2 train lora, owl2.training.lora.save_adapter; needs peft: pip install "
        "owl2[train]) and the one Q-Align and DeQA-Score publish (adapter_config.json, adapter_model.bin, "
        "non_lora_trainables.bin; merged with plain torch, no peft needed).",
    )
    merge.add_argument("base", help="base checkpoint directory or Hugging Face hub id")
    merge.add_argument("adapter", help="LoRA adapter directory (owl2 or Q-Align / DeQA-Score layout)")
    merge.add_argument("out", help="output directory")
    merge.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                       help="dtype of the merged weights (default: the base's recorded dtype, else fp32)")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.set_defaults(handler=_merge)
