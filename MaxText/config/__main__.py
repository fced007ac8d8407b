"""`python3 -m MaxText.config --write` (see MaxText/config/__init__.py)."""

import sys

from MaxText.config import main

sys.exit(main(sys.argv))
