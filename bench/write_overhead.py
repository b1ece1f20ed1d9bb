#!/usr/bin/env python3
"""What change capture costs the writers: insert rate of ``messages`` with and without it.

    python bench/write_overhead.py [--dsn DSN] [--seconds N] [--writers 4] [--rooms R]
                                   [--rounds K] [--profile] [--async-commit] [--no-listener]
                                   [--keep]

Both variants are measured in the same run, against the same server, in the same database:

* ``capture``: the schema applied as setup_db.py applies it, in schema ``pgbridge_bench_capture``
  (AFTER ROW trigger -> change_sequences -> change_events -> pg_notify);
* ``plain``: the same schema in ``pgbridge_bench_plain`` with the ``messages_capture`` trigger
  disabled (the table, its indexes, foreign keys and other triggers are identical).

Each writer is its own connection doing autocommit single-row INSERTs as fast as it can. Runs
alternate between the variants (ABBA order, ``--rounds`` times) to cancel drift, and the tables
are emptied before each run. Two scenarios: the writers spread over ``--rooms`` rooms (10), and
all writers in one room (the per-room counter serializes them). A LISTEN connection drains the
notifications during capture runs, as the daemon would (``--no-listener`` to leave it out).

``--profile`` adds variants of ``pgbridge_capture`` with one part taken out (the NOTIFY, the frame
JSON, the change_events insert, the change_sequences counter, everything), each in its own
schema, to show where the time goes. The shipped SQL files are not changed.

The database is ``--dsn``, else ``DATABASE_URL`` / ``POSTGRES_*``, else the embedded PostgreSQL
(as setup_db.py). The bench schemas are dropped at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from psycopg import sql
from ulid import ULID

from daemon.db import channel_query, database, describe
from daemon.schema import apply_schema
from daemon.settings import DatabaseSettings, load_environment

GOAL = 0.50
PREFIX = "pgbridge_bench_"

# Ablations of pgbridge_capture: (name, what is taken out, [(old, new), ...]) applied to the
# function's definition as installed (pg_get_functiondef).
SEQ_UPSERT = """INSERT INTO change_sequences AS s (room_id, last_seq) VALUES (v_rooms[i], 1)
            ON CONFLICT (room_id) DO UPDATE SET last_seq = s.last_seq + 1
            RETURNING s.last_seq"""
LOG_INSERT = """INSERT INTO change_events (room_id, seq, table_name, op, row_id, payload, created_at)
        SELECT v_rooms[i], bumped.last_seq, TG_TABLE_NAME, v_ops[i], v_ids[i], v_datas[i], v_ts
        FROM bumped"""
NO_LOG = """SELECT bumped.last_seq, (SELECT k.ipad FROM change_notify_key k),
               (SELECT k.opad FROM change_notify_key k) FROM bumped"""
FRAME = """v_frame := pgbridge_event_frame(v_rooms[i], v_seq, TG_TABLE_NAME, v_ops[i], v_ids[i],
                                        v_datas[i], v_ts);"""
NOTIFY = "PERFORM pg_notify(v_channel, pgbridge_hmac(v_ipad, v_opad, v_frame) || v_frame);"
KEY_READ = """RETURNING seq, (SELECT k.ipad FROM change_notify_key k),
                  (SELECT k.opad FROM change_notify_key k)
        INTO v_seq, v_ipad, v_opad;"""
NO_SEQ = "SELECT nextval('bench_seq') AS last_seq"
ABLATIONS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("no_notify", "without pg_notify", [(NOTIFY, "NULL;")]),
    ("no_sign", "NOTIFY unsigned (no key read, no HMAC)",
     [(NOTIFY, "PERFORM pg_notify(v_channel, v_frame);"),
      (KEY_READ, "RETURNING seq INTO v_seq;")]),
    ("no_frame", "NOTIFY {room, seq} only (no frame JSON)",
     [(FRAME, "v_frame := json_build_object('room', v_rooms[i], 'seq', v_seq)::text;")]),
    ("no_log", "without the change_events insert",
     [(LOG_INSERT, NO_LOG), (KEY_READ, "INTO v_seq, v_ipad, v_opad;")]),
    ("no_seq", "seq from a plain sequence (no per-room row lock)", [(SEQ_UPSERT, NO_SEQ)]),
    ("no_locks", "without pg_notify and without the per-room row lock",
     [(NOTIFY, "NULL;"), (SEQ_UPSERT, NO_SEQ)]),
    ("no_emit", "trigger only (to_jsonb, room lookup; nothing written)",
     [("FOR i IN 1..array_length(v_rooms, 1) LOOP", "FOR i IN 1..0 LOOP")]),
]


@dataclass
class Result:
    rows: int = 0
    seconds: float = 0.0
    rounds: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", help="conninfo or URL (default: DATABASE_URL, POSTGRES_*, "
                        "else the embedded PostgreSQL)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="length of one run of one variant (2.0)")
    parser.add_argument("--writers", type=int, default=4, help="concurrent writers (4)")
    parser.add_argument("--rooms", type=int, default=10,
                        help="rooms of the spread scenario (10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating runs per variant and scenario (3)")
    parser.add_argument("--profile", action="store_true",
                        help="also measure pgbridge_capture with one part taken out at a time")
    parser.add_argument("--async-commit", action="store_true",
                        help="writers use synchronous_commit=off (both variants): shows what "
                        "waiting for the WAL flush while holding a lock costs")
    parser.add_argument("--no-listener", action="store_true",
                        help="no LISTEN connection draining the notifications")
    parser.add_argument("--keep", action="store_true", help="keep the bench schemas")
    args = parser.parse_args()
    if args.writers < 1 or args.rooms < 1 or args.rounds < 1 or args.seconds <= 0:
        parser.error("--writers, --rooms, --rounds and --seconds must be positive")
    return args


@contextlib.contextmanager
def target(dsn: str | None) -> Iterator[str]:
    """The conninfo to use: --dsn, else what setup_db.py would use (embedded if nothing)."""
    if dsn:
        yield dsn
        return
    settings = DatabaseSettings.from_env(load_environment())
    manager = database(settings)
    loop = asyncio.new_event_loop()
    try:
        conninfo = loop.run_until_complete(manager.__aenter__())
        try:
            yield conninfo
        finally:
            loop.run_until_complete(manager.__aexit__(None, None, None))
    finally:
        loop.close()


def connect(conninfo: str, schema: str | None = None,
            async_commit: bool = False) -> psycopg.Connection[Any]:
    conn = psycopg.connect(conninfo, autocommit=True)
    if schema:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    if async_commit:
        conn.execute("SET synchronous_commit TO off")
    return conn


def channel_of(conn: psycopg.Connection[Any], schema: str) -> str:
    """The NOTIFY channel of ``schema``, as the database derives it."""
    row = conn.execute(channel_query(schema)).fetchone()
    assert row is not None
    return str(row[0])


def prepare_schema(conninfo: str, name: str, rooms: int, writers: int,
                   replacements: list[tuple[str, str]] | None = None,
                   capture: bool = True) -> tuple[list[str], list[str]]:
    """Apply the pgbridge schema to ``name``, then adapt it; returns (rooms, users)."""
    schema = PREFIX + name
    with connect(conninfo) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    asyncio.run(apply_schema(conninfo, schema=schema))
    with connect(conninfo, schema) as conn:
        if not capture:
            conn.execute("ALTER TABLE messages DISABLE TRIGGER messages_capture")
        if replacements:
            conn.execute("CREATE SEQUENCE bench_seq")
            row = conn.execute("SELECT pg_get_functiondef(%s::regprocedure)",
                               [f"{schema}.pgbridge_capture()"]
                               ).fetchone()
            assert row
            definition = str(row[0])
            for old, new in replacements:
                if old not in definition:
                    raise SystemExit(f"bench: pgbridge_capture no longer contains {old!r}: "
                                     "update ABLATIONS in bench/write_overhead.py")
                definition = definition.replace(old, new)
            conn.execute(definition.encode())
        users = [str(ULID()) for _ in range(writers)]
        for uid in users:
            conn.execute("INSERT INTO users (id, auth0_id, email, username) "
                         "VALUES (%s, %s, %s, 'bench')", (uid, f"bench|{uid}", f"{uid}@b.test"))
        room_ids = [str(ULID()) for _ in range(rooms)]
        for room in room_ids:
            conn.execute("INSERT INTO channels (id, name) VALUES (%s, 'bench')", [room])
    return room_ids, users


def empty_tables(conninfo: str, schema: str) -> None:
    with connect(conninfo, schema) as conn:
        conn.execute("TRUNCATE messages, change_events, change_sequences CASCADE")


def run_once(conninfo: str, schema: str, rooms: list[str], users: list[str], seconds: float,
             listen: bool, async_commit: bool) -> tuple[int, float]:
    """All writers insert for ``seconds``; returns (rows, elapsed)."""
    writers = len(users)
    conns = [connect(conninfo, schema, async_commit) for _ in range(writers)]
    listener = None
    if listen:
        listener = connect(conninfo, schema)
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(
            channel_of(listener, schema))))
    start_line = threading.Barrier(writers + 1)
    stop = threading.Event()
    counts = [0] * writers
    ends = [0.0] * writers
    start = [0.0]

    def write(i: int) -> None:
        conn, user = conns[i], users[i]
        cur = conn.cursor()
        query = "INSERT INTO messages (channel_id, user_id, content) VALUES (%s, %s, %s)"
        n = 0
        start_line.wait()
        deadline = start[0] + seconds
        while True:
            cur.execute(query, (rooms[(i + n) % len(rooms)], user, f"bench message {n}"),
                        prepare=True)
            n += 1
            if time.perf_counter() >= deadline:
                break
        counts[i] = n
        ends[i] = time.perf_counter()

    def drain() -> None:
        assert listener is not None
        while not stop.is_set():
            for _ in listener.notifies(timeout=0.2):
                pass

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    drainer = threading.Thread(target=drain) if listener else None
    for t in threads:
        t.start()
    if drainer:
        drainer.start()
    start[0] = time.perf_counter() + 0.05
    start_line.wait()
    for t in threads:
        t.join()
    stop.set()
    if drainer:
        drainer.join()
    for c in conns:
        c.close()
    if listener:
        listener.close()
    return sum(counts), max(ends) - start[0]


def measure(conninfo: str, variants: dict[str, tuple[list[str], list[str]]], one_room: bool,
            args: argparse.Namespace) -> dict[str, Result]:
    results = {name: Result() for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]  # ABBA: cancels slow drift
        for name in order:
            rooms, users = variants[name]
            schema = PREFIX + name
            empty_tables(conninfo, schema)
            rows, elapsed = run_once(conninfo, schema, rooms[:1] if one_room else rooms, users,
                                     args.seconds, listen=not args.no_listener
                                     and name != "plain", async_commit=args.async_commit)
            res = results[name]
            res.rows += rows
            res.seconds += elapsed
            res.rounds.append(rows / elapsed)
    return results


def server_cost(conninfo: str, variants: dict[str, tuple[list[str], list[str]]],
                args: argparse.Namespace, rows: int = 2000) -> dict[str, float]:
    """Server-side time per row of one-row transactions, without any client: a DO block that
    inserts and COMMITs ``rows`` times (one room), per variant; best of ``--rounds`` (at least
    3) alternating runs. A LISTEN connection is open on every variant's channel."""
    best: dict[str, float] = {}
    with connect(conninfo, async_commit=args.async_commit) as conn, connect(conninfo) as lis:
        for name in variants:
            lis.execute(sql.SQL("LISTEN {}").format(sql.Identifier(
                channel_of(lis, PREFIX + name))))
        for r in range(max(3, args.rounds)):
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                room_ids, users = variants[name]
                empty_tables(conninfo, PREFIX + name)
                conn.execute(sql.SQL("SET search_path TO {}").format(
                    sql.Identifier(PREFIX + name)))
                block = sql.SQL(
                    "DO $$ BEGIN FOR i IN 1..{} LOOP INSERT INTO messages (channel_id, user_id, "
                    "content) VALUES ({}, {}, 'bench message ' || i); COMMIT; END LOOP; END $$"
                ).format(rows, sql.Literal(room_ids[0]), sql.Literal(users[0]))
                started = time.perf_counter()
                conn.execute(block)
                per_row = (time.perf_counter() - started) / rows * 1e6
                best[name] = min(best.get(name, per_row), per_row)
                for _ in lis.notifies(timeout=0.01):
                    pass
    return best


def server_line(conninfo: str) -> str:
    with connect(conninfo) as conn:
        row = conn.execute("SELECT current_setting('server_version'), "
                           "current_setting('synchronous_commit'), current_setting('fsync'), "
                           "current_setting('max_connections')").fetchone()
    assert row
    return (f"PostgreSQL {row[0]} at {describe(conninfo)} (synchronous_commit={row[1]}, "
            f"fsync={row[2]})")


def report(title: str, results: dict[str, Result], labels: dict[str, str]) -> float:
    plain = results["plain"].rate
    print(f"\n{title}")
    print(f"  {'variant':<66} {'rows/s':>9} {'spread':>7} {'ratio':>6}")
    for name, res in results.items():
        spread = (statistics.pstdev(res.rounds) / statistics.mean(res.rounds)
                  if len(res.rounds) > 1 else 0.0)
        ratio = res.rate / plain if plain else 0.0
        print(f"  {labels.get(name, name):<66} {res.rate:9.0f} {spread:7.1%} {ratio:6.2f}")
    return results["capture"].rate / plain if plain else 0.0


def main() -> int:
    args = parse_args()
    with target(args.dsn) as conninfo:
        variants: dict[str, tuple[list[str], list[str]]] = {
            "plain": prepare_schema(conninfo, "plain", args.rooms, args.writers, capture=False),
            "capture": prepare_schema(conninfo, "capture", args.rooms, args.writers),
        }
        labels = {"plain": "plain (messages_capture disabled)",
                  "capture": "capture (as shipped)"}
        if args.profile:
            for name, label, replacements in ABLATIONS:
                variants[name] = prepare_schema(conninfo, name, args.rooms, args.writers,
                                                replacements)
                labels[name] = f"capture {label}"
        try:
            print(f"pgbridge write overhead: INSERT INTO messages, {args.writers} writers, "
                  f"autocommit single-row inserts, {args.rounds} alternating runs x "
                  f"{args.seconds:g} s per variant")
            print(f"server: {server_line(conninfo)}")
            print("listener: " + ("none" if args.no_listener else
                                  "one LISTEN connection draining during capture runs"))
            if args.async_commit:
                print("writers: synchronous_commit=off")
            ratios = {}
            for one_room, title in ((False, f"writers spread over {args.rooms} rooms"),
                                    (True, "all writers in one room")):
                results = measure(conninfo, variants, one_room, args)
                ratios[title] = report(title, results, labels)
            if args.profile:
                cost = server_cost(conninfo, variants, args)
                print("\nserver time per one-row transaction, no client (DO block with COMMIT "
                      "per row, one room, best run)")
                print(f"  {'variant':<66} {'us/row':>9} {'added':>7}")
                for name, us in cost.items():
                    print(f"  {labels.get(name, name):<66} {us:9.1f} "
                          f"{us - cost['plain']:+7.1f}")
            print()
            for title, ratio in ratios.items():
                verdict = "ok" if ratio >= GOAL else "BELOW GOAL"
                print(f"ratio capture/plain, {title}: {ratio:.2f} (goal >= {GOAL:.2f}: "
                      f"{verdict})")
        finally:
            if not args.keep:
                with connect(conninfo) as conn:
                    for name in variants:
                        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                            sql.Identifier(PREFIX + name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
