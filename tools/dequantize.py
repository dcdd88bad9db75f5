#!/usr/bin/env python
"""Turn a bitsandbytes 4-bit checkpoint into a plain 16/32-bit Hugging Face checkpoint (see --help).

The same as `qlora-kit dequantize`, runnable from a checkout without installing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qlora_kit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["dequantize", *sys.argv[1:]]))
