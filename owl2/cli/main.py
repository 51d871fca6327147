"""``owl2`` command-line entry point (argparse: no dependencies beyond the core)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from owl2.checkpoint import CheckpointError, convert_checkpoint
from owl2.model.config import ConfigError


def _convert(args: argparse.Namespace) -> int:
    report = convert_checkpoint(
        args.source,
        args.destination,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        verify=not args.no_verify,
        show_progress=not args.quiet,
    )
    status = "verified: every tensor equals its source" if report.verified else "not verified"
    print(
        f"wrote {report.tensors} tensors ({report.bytes / 1e9:.2f} GB) in {len(report.files)} file(s) to "
        f"{args.destination}; {status}; dropped {len(report.skipped)} recomputed buffer(s)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="owl2", description="mPLUG-Owl2 in plain PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser(
        "convert",
        help="convert an official checkpoint to sharded safetensors",
        description="Convert an official mPLUG-Owl2 checkpoint (pickled .bin shards or safetensors; local directory "
        "or hub id) into the owl2 layout: sharded safetensors plus config.json, verified tensor by tensor.",
    )
    convert.add_argument("source", help="checkpoint directory or Hugging Face hub id")
    convert.add_argument("destination", help="output directory")
    convert.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                         help="cast floating tensors (default: keep the stored dtype)")
    convert.add_argument("--max-shard-size", default="2GB", help="largest output shard (default: 2GB)")
    convert.add_argument("--no-verify", action="store_true", help="skip reading every tensor back")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(handler=_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"owl2 {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
