#!/usr/bin/env python
"""Merge a LoRA adapter into its base and write a plain Hugging Face checkpoint (see --help).

The same as `qlora-kit merge`, runnable from a checkout without installing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qlora_kit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))
