"""``python -m daemon``: run the bridge (same as ``pgbridge run``).

faulthandler prints every thread's stack to stderr (the journal) on SIGABRT, which is how
systemd's watchdog ends a daemon that stopped petting it: the stuck stack is then on record.
"""

import faulthandler
import sys

from .cli import run_main

if __name__ == "__main__":
    faulthandler.enable()
    sys.exit(run_main(sys.argv[1:]))
