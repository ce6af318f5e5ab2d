"""``python -m fastmod.train``: see ``python -m fastmod.train --help``."""
import sys

from fastmod.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
