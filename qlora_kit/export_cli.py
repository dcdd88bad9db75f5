"""Command-line front ends of the exports: argparse builders and runners for merge and dequantize.

`tools/merge_adapter.py` and `tools/dequantize.py` are these as scripts; the main
CLI mounts the same builders as subcommands:

    build_merge_parser(subparsers.add_parser("merge", help=..., description=MERGE_HELP, ...))
    ...
    return main_merge(args)          # QLoRAKitError propagates: the caller prints it
"""

from __future__ import annotations

import argparse
import logging
import sys

from .checkpoint_writer import DEFAULT_MAX_SHARD_SIZE
from .errors import QLoRAKitError
from .export import DEFAULT_VERIFY_BATCHES, MERGE_HELP, MODES, OUTPUT_DTYPES, dequantize, merge
from .verify import DEFAULT_MIN_AGREEMENT, summary

__all__ = ["DEQUANTIZE_HELP", "MERGE_HELP", "build_dequantize_parser", "build_merge_parser", "main_dequantize",
           "main_merge", "run_script"]

DEQUANTIZE_HELP = """\
Turn a bitsandbytes 4-bit checkpoint (a model transformers saved with
BitsAndBytesConfig(load_in_4bit=True)) back into a plain 16/32-bit Hugging Face
checkpoint. Each weight is dequantized exactly as the 4-bit model computes with
it, so the result computes what the 4-bit model did, without bitsandbytes. It
does not recover the original pre-quantization weights: that information is gone.
"""


def build_merge_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("adapter", help="adapter folder, or a training run folder containing adapter/")
    parser.add_argument("out_dir", help="folder to write the merged checkpoint to")
    parser.add_argument("--base", help="base checkpoint (default: the one recorded in the adapter's qlora_kit.json)")
    parser.add_argument("--mode", choices=MODES, default="nf4",
                        help="merge into the base as 4-bit training saw it (nf4, default) or into the original "
                             "weights (original); see above")
    _add_dtype(parser)
    parser.add_argument("--force", action="store_true",
                        help="merge even if the base's fingerprint differs from the one the adapter was trained on")
    _add_overwrite(parser)
    parser.add_argument("--verify", type=int, default=DEFAULT_VERIFY_BATCHES, metavar="N",
                        help=f"compare merged vs adapter-on-base on N batches of 4x128 tokens before putting the "
                             f"export in place; 0 skips (default {DEFAULT_VERIFY_BATCHES})")
    parser.add_argument("--verify-file", metavar="FILE",
                        help="text for verification: .txt (paragraphs) or .jsonl (all strings of each record); "
                             "default: built-in English paragraphs")
    parser.add_argument("--min-agreement", type=float, default=None, metavar="X",
                        help=f"fail when top-1 token agreement is below X (default {DEFAULT_MIN_AGREEMENT})")
    _add_shard_size(parser)
    return parser


def build_dequantize_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("src", help="4-bit bitsandbytes checkpoint folder (or Hub id)")
    parser.add_argument("out_dir", help="folder to write the plain checkpoint to")
    _add_dtype(parser)
    _add_overwrite(parser)
    _add_shard_size(parser)
    return parser


def _add_dtype(parser):
    parser.add_argument("--dtype", choices=list(OUTPUT_DTYPES), default="bf16", help="weights' dtype (default bf16)")


def _add_overwrite(parser):
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output folder (only after the new one is complete)")


def _add_shard_size(parser):
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                        help=f"largest output shard, e.g. 500MB, 5GB (default {DEFAULT_MAX_SHARD_SIZE}); "
                             "host RAM peaks near one input plus one output shard")


def main_merge(args: argparse.Namespace) -> int:
    """Run a merge from parsed arguments and print a summary; QLoRAKitError propagates."""
    result = merge(
        args.adapter, args.out_dir, base=args.base, mode=args.mode, dtype=args.dtype, force=args.force,
        overwrite=args.overwrite, verify_batches=args.verify, verify_texts=args.verify_file,
        min_agreement=args.min_agreement, max_shard_size=args.max_shard_size,
    )
    print(f"merged {result.merged_modules} adapter modules into {result.out_dir} "
          f"(mode {args.mode}, {args.dtype}, {_size(result.bytes)} in {len(result.files)} file(s), "
          f"{result.seconds:.1f}s)")
    if result.verification:
        print("verification: " + summary(result.verification))
    else:
        print("verification: skipped (--verify 0)")
    return 0


def main_dequantize(args: argparse.Namespace) -> int:
    """Run a dequantize from parsed arguments and print a summary; QLoRAKitError propagates."""
    result = dequantize(args.src, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                        max_shard_size=args.max_shard_size)
    print(f"dequantized {args.src} into {result.out_dir} ({args.dtype}, {result.tensors} tensors, "
          f"{_size(result.bytes)}, {result.seconds:.1f}s)")
    return 0


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def run_script(build, main, description: str, argv: list[str] | None = None) -> int:
    """A standalone script: parse, run, and turn a QLoRAKitError into `error: ...` and exit status 2."""
    parser = build(argparse.ArgumentParser(description=description,
                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main(args)
    except QLoRAKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
