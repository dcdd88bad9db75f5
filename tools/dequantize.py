#!/usr/bin/env python
"""Turn a bitsandbytes 4-bit checkpoint into a plain 16/32-bit Hugging Face checkpoint (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from qlora_kit.export_cli import DEQUANTIZE_HELP, build_dequantize_parser, main_dequantize, run_script  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_script(build_dequantize_parser, main_dequantize, DEQUANTIZE_HELP))
