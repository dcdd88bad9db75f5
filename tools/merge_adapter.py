#!/usr/bin/env python
"""Merge a LoRA adapter into its base and write a plain Hugging Face checkpoint (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from qlora_kit.export_cli import MERGE_HELP, build_merge_parser, main_merge, run_script  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_script(build_merge_parser, main_merge, MERGE_HELP))
