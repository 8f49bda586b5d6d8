"""``python -m benchmarks`` (from the repository root) and the ``softtopk-bench`` console script."""

import sys

from .suite import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
