"""``python -m slimtune``: the ``slimtune`` command line."""

import sys

from slimtune.search import main

if __name__ == "__main__":
    sys.exit(main())
