"""``python -m daemon``: run the bridge (same as ``pgbridge run``)."""

import sys

from .cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(sys.argv[1:]))
