"""Entry point for ``python -m jstab``."""

import sys

from jstab.cli import main

if __name__ == "__main__":
    sys.exit(main())
