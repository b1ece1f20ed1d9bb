#!/usr/bin/env python3
"""What re-running ``setup_db.py`` on a live database costs its writers.

    python -m bench.live_apply [--dsn DSN] [--runs 10] [--writers 4] [--long-tx 2.0]
                               [--idle 10] [--setup-root DIR]

Writers insert into ``messages`` continuously (one connection each, autocommit, one row per
statement) while ``setup_db.py`` runs ``--runs`` times, one after the other, as a separate
process each time (as an operator or a deploy script runs it). Each phase reports the writers'
insert latencies; the first phase, writers alone, is the baseline of the same run:

* ``idle`` (``--idle`` seconds): nobody runs setup_db.py;
* ``unchanged``: setup_db.py over an unchanged schema (the common case: a deploy that changes
  nothing in sql/);
* ``changed``: every file run again each time (the ledger in ``schema_files`` is cleared before
  each run): CREATE INDEX IF NOT EXISTS, CREATE OR REPLACE TRIGGER/FUNCTION, under lock_timeout;
* ``unchanged + long tx``, ``changed + long tx``: the same while another session holds a
  transaction with the lock a writer of ``messages`` takes (ROW EXCLUSIVE) open for
  ``--long-tx`` seconds from just before each run (a slow request, a batch job): DDL waiting
  for it queues every writer behind it.

``--setup-root DIR`` (a checkout of an older pgbridge) adds the same phases run with that
checkout's setup_db.py, for a before/after figure in one run.

The database is ``--dsn``, else the embedded PostgreSQL; a scratch database is created and
dropped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from ulid import ULID

from bench.common import scratch_database, server_conninfo

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)  # seconds
    seconds: float = 0.0
    runs: int = 0
    failures: int = 0

    def row(self) -> str:
        lat = sorted(self.latencies)
        if not lat:
            return f"{self.name:<28} no inserts"
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        return (f"{self.name:<28} {self.runs:>4} {self.failures:>5} {len(lat):>8} "
                f"{len(lat) / self.seconds:>8.0f} {statistics.median(lat) * 1e3:>7.2f} "
                f"{p99 * 1e3:>8.2f} {lat[-1] * 1e3:>9.1f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", help="PostgreSQL server (superuser or CREATEDB); default: the "
                        "embedded PostgreSQL in a scratch directory")
    parser.add_argument("--runs", type=int, default=10, help="setup_db.py runs per phase (10)")
    parser.add_argument("--writers", type=int, default=4, help="concurrent writers (4)")
    parser.add_argument("--long-tx", type=float, default=2.0,
                        help="seconds the long transaction stays open in the last phase (2.0)")
    parser.add_argument("--idle", type=float, default=10.0,
                        help="seconds of the baseline phase, writers alone (10)")
    parser.add_argument("--setup-root", type=Path,
                        help="also run the phases with this checkout's setup_db.py")
    args = parser.parse_args()
    if args.runs < 1 or args.writers < 1 or args.long_tx <= 0:
        parser.error("--runs, --writers and --long-tx must be positive")
    return args


class Writers:
    """``n`` threads inserting into ``messages`` until stopped; latencies go to ``phase``."""

    def __init__(self, conninfo: str, n: int, rooms: list[str], user: str) -> None:
        self.conns = [psycopg.connect(conninfo, autocommit=True) for _ in range(n)]
        self.rooms, self.user = rooms, user
        self.phase: Phase | None = None
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._write, args=(c,), daemon=True)
                        for c in self.conns]
        for t in self.threads:
            t.start()

    def _write(self, conn: psycopg.Connection[Any]) -> None:
        cur = conn.cursor()
        i = 0
        while not self.stop.is_set():
            started = time.perf_counter()
            cur.execute("INSERT INTO messages (channel_id, user_id, content) VALUES (%s, %s, %s)",
                        (self.rooms[i % len(self.rooms)], self.user, f"live {i}"), prepare=True)
            took = time.perf_counter() - started
            i += 1
            with self.lock:
                if self.phase is not None:
                    self.phase.latencies.append(took)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
        for c in self.conns:
            c.close()


def setup_db(root: Path, conninfo: str) -> bool:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("POSTGRES_", "SSH_", "PGBRIDGE_", "PG")) and k != "DATABASE_URL"}
    env["DATABASE_URL"] = conninfo
    done = subprocess.run([sys.executable, str(root / "setup_db.py")], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        print(f"  setup_db.py ({root}) failed: {done.stderr.strip()[:300]}", file=sys.stderr)
    return done.returncode == 0


def hold_long_transaction(conninfo: str, seconds: float, opened: threading.Event) -> None:
    """A transaction that holds what a writer of ``messages`` holds (ROW EXCLUSIVE) for
    ``seconds``, without the row lock of a room's counter, so that it blocks no writer itself."""
    with psycopg.connect(conninfo) as conn:
        conn.execute("LOCK TABLE messages IN ROW EXCLUSIVE MODE")
        opened.set()
        time.sleep(seconds)
        conn.rollback()


def run_phase(name: str, writers: Writers, conninfo: str, args: argparse.Namespace, *,
              root: Path | None, changed: bool = False, long_tx: bool = False,
              seconds: float | None = None) -> Phase:
    phase = Phase(name)
    with writers.lock:
        writers.phase = phase
    started = time.perf_counter()
    if root is None:
        assert seconds is not None
        time.sleep(seconds)
    else:
        for _ in range(args.runs):
            if changed:
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    if conn.execute("SELECT to_regclass('schema_files')").fetchone() != (None,):
                        conn.execute("DELETE FROM schema_files")
            holder = None
            if long_tx:
                opened = threading.Event()
                holder = threading.Thread(target=hold_long_transaction, args=(
                    conninfo, args.long_tx, opened))
                holder.start()
                opened.wait()
            phase.runs += 1
            if not setup_db(root, conninfo):
                phase.failures += 1
            if holder is not None:
                holder.join()
    with writers.lock:
        writers.phase = None
    phase.seconds = time.perf_counter() - started
    return phase


def main() -> int:
    args = parse_args()
    data_dir = Path(f"/tmp/pgbridge-bench-live-{os.getuid()}")
    with server_conninfo(args.dsn, data_dir) as server, \
            scratch_database(server, "live") as conninfo:
        roots = [("", ROOT)]
        if args.setup_root:
            roots.append((" (before)", args.setup_root.resolve()))
        if not setup_db(ROOT, conninfo):
            return 1
        with psycopg.connect(conninfo, autocommit=True) as conn:
            user = str(ULID())
            conn.execute("INSERT INTO users (id, auth0_id, email, username) VALUES "
                         "(%s, %s, %s, 'live')", (user, f"live|{user}", f"{user}@b.test"))
            rooms = [str(ULID()) for _ in range(10)]
            for room in rooms:
                conn.execute("INSERT INTO channels (id, name) VALUES (%s, 'live')", [room])
        writers = Writers(conninfo, args.writers, rooms, user)
        phases: list[Phase] = []
        try:
            idle = run_phase("idle (baseline)", writers, conninfo, args, root=None,
                             seconds=args.idle)
            for label, root in roots:
                for title, changed, long_tx in (("unchanged", False, False),
                                                ("unchanged + long tx", False, True),
                                                ("changed", True, False),
                                                ("changed + long tx", True, True)):
                    phase = run_phase(f"{title}{label}", writers, conninfo, args, root=root,
                                      changed=changed, long_tx=long_tx)
                    print(f"  {phase.name}: {phase.runs} runs in {phase.seconds:.1f} s",
                          file=sys.stderr)
                    phases.append(phase)
        finally:
            writers.close()
    print(f"\nwriters' INSERT latency while setup_db.py runs {args.runs} times "
          f"({args.writers} writers, long transaction {args.long_tx:g} s)\n")
    print(f"{'phase':<28} {'runs':>4} {'fails':>5} {'inserts':>8} {'rows/s':>8} "
          f"{'p50 ms':>7} {'p99 ms':>8} {'worst ms':>9}")
    for phase in [idle, *phases]:
        print(phase.row())
    worst_idle = max(idle.latencies)
    print("\nworst latency / idle worst: " + ", ".join(
        f"{p.name} {max(p.latencies) / worst_idle:.1f}x" for p in phases if p.latencies))
    return 0


if __name__ == "__main__":
    sys.exit(main())
