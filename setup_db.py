#!/usr/bin/env python3
"""Apply the pgbridge chat schema, change capture and migrations to PostgreSQL.

    python setup_db.py               # public schema of the configured (or embedded) database
    python setup_db.py --test        # schema "test", public untouched
    python setup_db.py --dry-run     # print the SQL, connect to nothing
    python setup_db.py --verify      # check objects and prove capture end to end
    python setup_db.py --rollback    # take pgbridge off again, keep the chat tables and rows

A thin CLI over :mod:`daemon.schema` and :mod:`daemon.rollback` (same as ``pgbridge setup``);
``--help`` lists the flags, settings and exit codes. Run by a Python without pgbridge's
dependencies (``python3`` outside the venv), it says so in one line and exits 2: use
``./dev setup``.
"""

import os
import sys

# The checkout's daemon package, also under python -I (which leaves this directory out).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from daemon.cli import setup_main

if __name__ == "__main__":
    sys.exit(setup_main())
