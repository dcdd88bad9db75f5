"""`python -m qlora_kit ...`: the same as the `qlora-kit` command."""

import sys

from .cli import main

sys.exit(main())
