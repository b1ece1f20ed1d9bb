#!/usr/bin/env python3
"""What a ``subscribe`` with ``"snapshot": 1000`` costs (PROTOCOL.md, "Snapshot then live"),
against the same room replayed with ``since``.

    python -m bench.snapshot [--dsn DSN] [--messages 1000] [--subscribes 50]

One room holds ``--messages`` messages of realistic rows (40 to 400 characters of text, a small
``metadata`` object; a tenth edited, one in fifty soft-deleted) written one transaction each,
so the log holds an event per write. The daemon runs as a subprocess. ``--subscribes``
connections are opened first; then, one at a time, each subscribes and waits:

* ``snapshot``: ``{"snapshot": N}`` (N = the live messages, at most 1,000) until its
  ``snapshot`` frame;
* ``since``: the baseline of the same run, ``{"since": S0}`` with S0 the seq before the first
  message, until the last of the room's events (every write replayed from the log).

Reported per mode: time from sending the subscribe to the last byte wanted (p50, p99), the
daemon's CPU (user + system, from /proc) per subscribe over the whole series, the database time
per subscribe from the daemon's ``pgbridge_query_duration_seconds{purpose}`` (``snapshot``;
``read_events`` and ``cursor_info`` for ``since``), and the bytes received; then the snapshot
statement run alone from this process (``--subscribes`` times, EXPLAIN ANALYZE's execution
time: PostgreSQL's own share). The database is ``--dsn``, else the embedded PostgreSQL; a
scratch database is created and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import websockets

from bench.common import (
    SECRET,
    clean_env,
    free_port,
    proc_cpu,
    process,
    scratch_database,
    server_conninfo,
)

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have "
         "from or one had by word but not what all were we when your can said there use an each "
         "which she do how their if will up other about out many then them these so").split()


def fill(db: str, messages: int) -> tuple[str, str, int]:
    """Schema, a user, a room with ``messages`` messages; returns (user, room, S0)."""
    from daemon.schema import apply_schema_sync

    apply_schema_sync(db, schema="public")
    rng = random.Random(7)
    with psycopg.connect(db, autocommit=True) as conn:
        user = str(conn.execute("INSERT INTO users (auth0_id, email, username) VALUES "
                                "('bench|1', 'b1@bench.invalid', 'bench1') RETURNING id")
                   .fetchone()[0])  # type: ignore[index]
        room = str(conn.execute("INSERT INTO channels (name) VALUES ('bench') RETURNING id")
                   .fetchone()[0])  # type: ignore[index]
        conn.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                     (room, user))
        start = int(conn.execute("SELECT last_seq FROM change_sequences WHERE room_id = %s",
                                 [room]).fetchone()[0])  # type: ignore[index]
        ids = []
        for i in range(messages):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 80)))[:400]
            meta = json.dumps({"client": rng.choice(["web", "ios", "android"]),
                               "mentions": [user] if i % 7 == 0 else [], "n": i})
            ids.append(conn.execute("INSERT INTO messages (channel_id, user_id, content, metadata)"
                                    " VALUES (%s, %s, %s, %s) RETURNING id",
                                    (room, user, text, meta)).fetchone()[0])  # type: ignore[index]
        for mid in ids[::10]:
            conn.execute("UPDATE messages SET content = content || ' (edited)' WHERE id = %s",
                         [mid])
        for mid in ids[5::50]:
            conn.execute("UPDATE messages SET deleted_at = now() WHERE id = %s", [mid])
        conn.execute("ANALYZE")
    return user, room, start


def metrics(port: int) -> dict[str, float]:
    """``pgbridge_query_duration_seconds`` sum and count per purpose, from /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/metrics")
    out: dict[str, float] = {}
    for line in conn.getresponse().read().decode().splitlines():
        if line.startswith(("pgbridge_query_duration_seconds_sum",
                            "pgbridge_query_duration_seconds_count")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def db_seconds(before: dict[str, float], after: dict[str, float], purpose: str) -> float:
    key = f'pgbridge_query_duration_seconds_sum{{purpose="{purpose}"}}'
    return after.get(key, 0.0) - before.get(key, 0.0)


async def series(port: int, token: str, frame: dict[str, Any], done: Any, n: int,
                 pid: int) -> tuple[list[float], float, int]:
    """``n`` connections, then one subscribe each, one at a time; returns (seconds to the
    last wanted frame each, daemon CPU seconds over the series, bytes received per subscribe)."""
    url = f"ws://127.0.0.1:{port}/ws"
    conns = [await websockets.connect(url, additional_headers={
        "Authorization": f"Bearer {token}"}, max_size=2**26, compression=None)
        for _ in range(n)]
    for ws in conns:
        await ws.recv()  # welcome
    times, received = [], 0
    cpu0 = proc_cpu(pid)
    for ws in conns:
        started = time.perf_counter()
        await ws.send(json.dumps(frame))
        while True:
            raw = await ws.recv()
            received += len(raw)
            if done(json.loads(raw)):
                break
        times.append(time.perf_counter() - started)
    cpu = proc_cpu(pid) - cpu0
    for ws in conns:
        await ws.close()
    return times, cpu, received // n


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="PostgreSQL server (default: the embedded one)")
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--subscribes", type=int, default=50)
    args = parser.parse_args()
    from daemon.auth import mint_token
    from daemon.snapshot import _SNAPSHOT

    with server_conninfo(args.dsn, Path(".pgbridge-bench")) as server, \
            scratch_database(server, "snapshot") as db:
        user, room, start = fill(db, args.messages)
        with psycopg.connect(db) as conn:
            live = int(conn.execute("SELECT count(*) FROM messages WHERE deleted_at IS NULL")
                       .fetchone()[0])  # type: ignore[index]
            final = int(conn.execute("SELECT last_seq FROM change_sequences WHERE room_id = %s",
                                     [room]).fetchone()[0])  # type: ignore[index]
        n = min(live, 1000)
        port = free_port()
        env = clean_env() | {
            "DATABASE_URL": db, "PGBRIDGE_JWT_SECRET": SECRET, "PGBRIDGE_PORT": str(port),
            "PGBRIDGE_LOG_LEVEL": "WARNING", "PGBRIDGE_MAX_CONNECTIONS_PER_USER": "1000",
            "PGBRIDGE_USER_SUBSCRIBE_BURST": "100000", "PGBRIDGE_QUEUE_SIZE": "100000"}
        token = mint_token(SECRET, user, ttl=3600)
        print(f"room: {args.messages} messages written, {live} live, log seqs {start + 1}.."
              f"{final}; snapshot N = {n}; {args.subscribes} subscribes per mode, one at a time")
        with process([sys.executable, "-m", "daemon"], env, port, "pgbridge",
                      Path("/tmp") / f"bench-snapshot-{port}.log") as proc:
            results = {}
            for mode, frame, done, purposes in (
                    ("snapshot", {"type": "subscribe", "room": room, "snapshot": n},
                     lambda f: f.get("type") == "snapshot", ("snapshot",)),
                    ("since", {"type": "subscribe", "room": room, "since": start},
                     lambda f: f.get("type") == "event" and f.get("seq") == final,
                     ("cursor_info", "read_events"))):
                before = metrics(port)
                times, cpu, size = asyncio.run(series(port, token, frame, done,
                                                      args.subscribes, proc.pid))
                after = metrics(port)
                dbs = sum(db_seconds(before, after, p) for p in purposes) / args.subscribes
                results[mode] = (times, cpu / args.subscribes, dbs, size)
        print(f"{'mode':<10} {'p50 ms':>8} {'p99 ms':>8} {'daemon CPU ms':>14} "
              f"{'db ms':>7} {'bytes':>9}")
        for mode, (times, cpu, dbs, size) in results.items():
            print(f"{mode:<10} {1000 * pct(times, 0.5):8.2f} {1000 * pct(times, 0.99):8.2f} "
                  f"{1000 * cpu:14.2f} {1000 * dbs:7.2f} {size:9,d}")
        snap, since = results["snapshot"], results["since"]
        print(f"since / snapshot: p50 {pct(since[0], 0.5) / pct(snap[0], 0.5):.1f}x, "
              f"daemon CPU {since[1] / max(snap[1], 1e-9):.1f}x, "
              f"db {since[2] / max(snap[2], 1e-9):.1f}x, bytes {since[3] / snap[3]:.1f}x")
        with psycopg.connect(db) as conn:
            params = {"user": user, "room": room, "n": n, "max_bytes": 1_000_000}
            executions = []
            for _ in range(args.subscribes):
                plan = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + _SNAPSHOT,
                                    params).fetchone()[0]  # type: ignore[index]
                executions.append(plan[0]["Execution Time"])
        print(f"snapshot statement alone (EXPLAIN ANALYZE): execution p50 "
              f"{statistics.median(executions):.2f} ms, p99 {pct(executions, 0.99):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
