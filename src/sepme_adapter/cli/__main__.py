"""`python -m sepme_adapter.cli ...` (used under `accelerate launch`)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
