"""``python -m ttaperso``: the same command line as ``ttaperso``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
