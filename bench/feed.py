#!/usr/bin/env python3
"""What a ``feed`` start costs (PROTOCOL.md, "One feed per user") for a user in 1, 100 and 1,000
rooms, against the baseline of the same run: the same rooms followed the old way, one
``subscribe`` per room.

    python -m bench.feed [--dsn DSN] [--rooms 1,100,1000] [--starts 30] [--messages 20]

The data: the largest size's rooms, each with the bench user of every size that covers it
(the user of size N is a member of the first N rooms) and 3 other members; 0 to 2 x
``--messages`` messages a room (realistic rows, 85% by the other members), a tenth edited and
one in thirty soft-deleted; then each bench user's ``sync_state`` rows as the bridge's acks
write them (daemon/store.py ``save_acks``: sync_type ``events``, ``last_seq``): a quarter of the
rooms never acked, a quarter acked at the head, half (and always the first room) at a seq in
between, so ``unread`` is non-trivial. The daemon runs as a subprocess.

Each start opens fresh connections first (not timed: the handshake is the same either way),
then, timed from the first request sent:

* ``feed``: ``{"type":"feed"}`` on one connection, until its ``feed`` frame;
* ``subscribe``: the baseline, one ``subscribe`` per room, live only (``since`` = the room's
  head, read just before; without ``since`` it would resume from the ack and replay the unread
  events; no snapshot), on as
  many connections as ``PGBRIDGE_MAX_SUBSCRIPTIONS`` (100) requires, all sent at once, until
  every ``subscribed``.

Then a message is written in the last room and the start is "live" when its event arrives.
Each is run ``cold`` (nobody else follows the rooms: the connections are closed and the daemon's
``pgbridge_subscriptions`` is back to 0 before the next start, so the rooms are untracked) and
``warm`` (another connection's feed holds every room, so none needs its head read). Reported per
start: time to the frame / to every ``subscribed`` (p50, p99) and to the live event (p50), the
database round trips and database time from the daemon's ``pgbridge_query_duration_seconds``
(``_count`` and ``_sum`` deltas of the start's purposes: ``feed``, ``room_head``,
``cursor_info``, ``read_events``; other purposes in the window are counted apart), the daemon's
CPU (every thread's run time from /proc/PID/task/*/schedstat, in ns, over the windows; the
10 ms ticks of /proc/PID/stat where it is missing), and the bytes of the answer frames. Then the
feed statement alone (EXPLAIN ANALYZE). The subscribe rate limits would throttle the baseline:
they are raised for the run (the output says so).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
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
from bench.snapshot import WORDS, pct

OTHERS = 40  # users besides the bench users; each room has 3 of them
PURPOSES = ("feed", "room_head", "cursor_info", "read_events")
RAISED = {"PGBRIDGE_SUBSCRIBE_RATE": "1000000", "PGBRIDGE_SUBSCRIBE_BURST": "1000000",
          "PGBRIDGE_USER_SUBSCRIBE_RATE": "1000000", "PGBRIDGE_USER_SUBSCRIBE_BURST": "1000000",
          "PGBRIDGE_RATE_LIMIT": "1000000", "PGBRIDGE_RATE_BURST": "1000000",
          "PGBRIDGE_MAX_CONNECTIONS_PER_USER": "1000"}
MAX_SUBSCRIPTIONS = 100  # PGBRIDGE_MAX_SUBSCRIPTIONS, left at its default


def fill(db: str, sizes: list[int], messages: int) -> tuple[dict[int, str], list[str],
                                                             dict[str, list[str]]]:
    """Schema and data (module docstring); returns (bench user per size, rooms in id order,
    the other members of each room)."""
    from daemon.schema import apply_schema_sync

    apply_schema_sync(db, schema="public")
    rng = random.Random(7)
    top = max(sizes)
    with psycopg.connect(db, autocommit=True) as conn:
        def users(tag: str, n: int) -> list[str]:
            return [str(r[0]) for r in conn.execute(
                "INSERT INTO users (auth0_id, email, username) SELECT 'bench|' || %(t)s || g, "
                "%(t)s || g || '@bench.invalid', %(t)s || g FROM generate_series(1, %(n)s) g "
                "RETURNING id", {"t": tag, "n": n}).fetchall()]

        mine = dict(zip(sizes, users("me", len(sizes)), strict=True))
        others = users("other", OTHERS)
        rooms = sorted(str(r[0]) for r in conn.execute(
            "INSERT INTO channels (name) SELECT 'room ' || g FROM generate_series(1, %s) g "
            "RETURNING id", [top]).fetchall())
        members = {room: rng.sample(others, 3) for room in rooms}
        pairs = [(room, u) for room in rooms for u in members[room]]
        pairs += [(rooms[i], user) for size, user in mine.items() for i in range(size)]
        for k in range(0, len(pairs), 2000):
            chunk = pairs[k:k + 2000]
            conn.execute("INSERT INTO channel_members (channel_id, user_id) SELECT * FROM "
                         "unnest(%s::varchar[], %s::varchar[])",
                         [[r for r, _ in chunk], [u for _, u in chunk]])
        rows = []
        for i, room in enumerate(rooms):
            mine_here = [user for size, user in mine.items() if i < size]
            for n in range(rng.randint(0, 2 * messages)):
                author = rng.choice(mine_here if rng.random() < 0.15 else members[room])
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 80)))[:400]
                meta = json.dumps({"client": rng.choice(["web", "ios", "android"]), "n": n})
                rows.append((room, author, text, meta))
        rng.shuffle(rows)  # rooms interleave in the log, as they would
        ids: list[str] = []
        for k in range(0, len(rows), 2000):
            part = rows[k:k + 2000]
            ids += [str(r[0]) for r in conn.execute(
                "INSERT INTO messages (channel_id, user_id, content, metadata) SELECT * FROM "
                "unnest(%s::varchar[], %s::varchar[], %s::text[], %s::jsonb[]) RETURNING id",
                [list(col) for col in zip(*part, strict=True)]).fetchall()]
        conn.execute("UPDATE messages SET content = content || ' (edited)' WHERE id = ANY(%s)",
                     [ids[::10]])
        conn.execute("UPDATE messages SET deleted_at = now() WHERE id = ANY(%s)", [ids[5::30]])
        heads: dict[str, int] = dict(conn.execute(
            "SELECT room_id, last_seq FROM change_sequences").fetchall())
        acks = []  # as AckWriter writes them (daemon/store.py save_acks)
        for size, user in mine.items():
            for room in rooms[:size]:
                head, r = int(heads.get(room, 0)), rng.random()
                r = 0.75 if room == rooms[0] else r  # the first room: always partly read
                if r >= 0.25:
                    acks.append((user, room, head if r < 0.5 else rng.randint(0, head)))
        conn.execute("INSERT INTO sync_state (user_id, room_id, sync_type, last_seq, last_sync) "
                     "SELECT u, r, 'events', s, now() FROM unnest(%s::varchar[], %s::varchar[], "
                     "%s::bigint[]) AS a(u, r, s)",
                     [[a[0] for a in acks], [a[1] for a in acks], [a[2] for a in acks]])
        conn.execute("ANALYZE")
    return mine, rooms, members


def metrics(port: int) -> dict[str, float]:
    """Every sample of /metrics whose name starts with ``pgbridge_query_duration_seconds_``
    (``_sum``, ``_count``) or is ``pgbridge_subscriptions``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/metrics")
    out: dict[str, float] = {}
    for line in conn.getresponse().read().decode().splitlines():
        if line.startswith(("pgbridge_query_duration_seconds_sum",
                            "pgbridge_query_duration_seconds_count", "pgbridge_subscriptions ")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def queries(before: dict[str, float], after: dict[str, float]) -> tuple[float, float, float]:
    """(round trips of PURPOSES, their seconds, round trips of any other purpose)."""
    mine = other = seconds = 0.0
    for key, value in after.items():
        delta = value - before.get(key, 0.0)
        if key.startswith("pgbridge_query_duration_seconds_count"):
            if any(f'purpose="{p}"' in key for p in PURPOSES):
                mine += delta
            else:
                other += delta
        elif key.startswith("pgbridge_query_duration_seconds_sum") and any(
                f'purpose="{p}"' in key for p in PURPOSES):
            seconds += delta
    return mine, seconds, other


def cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by every thread of ``pid`` (schedstat, ns; else /proc/PID/stat
    ticks)."""
    try:
        return sum(int((task / "schedstat").read_text().split()[0])
                   for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9
    except (OSError, ValueError, IndexError):
        return proc_cpu(pid)


async def wait_subscriptions(port: int, want: int) -> None:
    """Until the daemon's ``pgbridge_subscriptions`` is ``want`` (the rooms of the connections
    closed are untracked when their last subscription goes)."""
    deadline = time.monotonic() + 30
    while metrics(port).get("pgbridge_subscriptions", -1.0) != want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"pgbridge_subscriptions not back to {want} within 30 s")
        await asyncio.sleep(0.005)


class Run:
    """One daemon, one size: ``starts`` of one mode, their figures in lists."""

    def __init__(self, port: int, pid: int, db: str, token: str, rooms: list[str],
                 writer: str) -> None:
        self.port, self.pid, self.db, self.token = port, pid, db, token
        self.rooms, self.writer = rooms, writer
        self.url = f"ws://127.0.0.1:{port}/ws"

    async def connect(self) -> Any:
        ws = await websockets.connect(self.url, additional_headers={
            "Authorization": f"Bearer {self.token}"}, max_size=2**26, compression=None)
        await ws.recv()  # welcome
        return ws

    async def start(self, mode: str, write: psycopg.AsyncConnection[Any]) -> dict[str, float]:
        """One start of ``mode`` (``feed`` or ``subscribe``) on fresh connections; returns its
        figures (seconds, counts, bytes)."""
        last = self.rooms[-1]
        if mode == "feed":
            conns = [await self.connect()]
        else:
            conns = [await self.connect()
                     for _ in range(math.ceil(len(self.rooms) / MAX_SUBSCRIPTIONS))]
        heads: dict[str, int] = {}
        if mode != "feed":  # what a client that holds its rooms' cursors sends as since
            async with write.cursor() as cur:
                await cur.execute("SELECT room_id, last_seq FROM change_sequences "
                                  "WHERE room_id = ANY(%s)", [self.rooms])
                heads = {str(r): int(s) for r, s in await cur.fetchall()}
        before, cpu0 = metrics(self.port), cpu_seconds(self.pid)
        started = time.perf_counter()
        if mode == "feed":
            await conns[0].send(json.dumps({"type": "feed", "ref": "f"}))
            raw = await conns[0].recv()
            frame = json.loads(raw)
            if frame.get("type") != "feed" or len(frame["rooms"]) != len(self.rooms):
                raise RuntimeError(f"unexpected answer to feed: {str(raw)[:200]}")
            size = len(raw)
        else:
            size = sum(await asyncio.gather(*(
                self._subscribe(ws, self.rooms[k * MAX_SUBSCRIPTIONS:(k + 1) * MAX_SUBSCRIPTIONS],
                                heads)
                for k, ws in enumerate(conns))))
        framed = time.perf_counter()
        await write.execute("INSERT INTO messages (channel_id, user_id, content) VALUES "
                            "(%s, %s, 'are you there?')", (last, self.writer))
        while True:
            event = json.loads(await conns[-1].recv())
            if event.get("type") == "event" and event.get("room") == last \
                    and event.get("table") == "messages":
                break
        live = time.perf_counter()
        cpu = cpu_seconds(self.pid) - cpu0
        trips, seconds, other = queries(before, metrics(self.port))
        for ws in conns:
            await ws.close()
        return {"frame": framed - started, "live": live - started, "cpu": cpu, "trips": trips,
                "db": seconds, "other": other, "bytes": size}

    @staticmethod
    async def _subscribe(ws: Any, rooms: list[str], heads: dict[str, int]) -> int:
        for room in rooms:
            await ws.send(json.dumps({"type": "subscribe", "room": room, "ref": room,
                                      "since": heads.get(room, 0)}))
        waiting, size = set(rooms), 0
        while waiting:
            raw = await ws.recv()
            frame = json.loads(raw)
            if frame.get("type") == "error":
                raise RuntimeError(f"subscribe refused: {str(raw)[:200]}")
            if frame.get("type") == "subscribed":
                waiting.discard(frame["room"])
                size += len(raw)
        return size

    async def series(self, mode: str, warm: bool, starts: int) -> list[dict[str, float]]:
        """``starts`` starts of ``mode``; ``warm``: a feed of the same user holds every room
        meanwhile (its frames are read and dropped)."""
        holder, drain = None, None
        if warm:
            holder = await self.connect()
            await holder.send(json.dumps({"type": "feed"}))
            await holder.recv()

            async def read_on() -> None:
                async for _ in holder:
                    pass

            drain = asyncio.create_task(read_on())
        held = len(self.rooms) if warm else 0
        out = []
        async with await psycopg.AsyncConnection.connect(self.db, autocommit=True) as write:
            for _ in range(starts):
                await wait_subscriptions(self.port, held)
                out.append(await self.start(mode, write))
        if holder is not None and drain is not None:
            await holder.close()
            await drain
            await wait_subscriptions(self.port, 0)
        return out


def feed_alone(db: str, user: str, n: int) -> float:
    """The feed statement run ``n`` times from here: EXPLAIN ANALYZE's execution time, p50 ms."""
    from daemon.feed_queries import FEED_ROOMS, UNREAD_MAX

    with psycopg.connect(db) as conn:
        times = [conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + FEED_ROOMS,
                              {"user": user, "max_rooms": 5000, "cap": UNREAD_MAX})
                 .fetchone()[0][0]["Execution Time"]  # type: ignore[index]
                 for _ in range(n)]
    return float(statistics.median(times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="PostgreSQL server (default: the embedded one)")
    parser.add_argument("--rooms", default="1,100,1000",
                        help="the sizes: rooms of the user, comma-separated")
    parser.add_argument("--starts", type=int, default=30, help="starts per size, mode, cold/warm")
    parser.add_argument("--messages", type=int, default=20,
                        help="messages a room on average (0 to twice this)")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.rooms.split(",")})
    from daemon.auth import mint_token

    with server_conninfo(args.dsn, Path(".pgbridge-bench")) as server, \
            scratch_database(server, "feed") as db:
        began = time.perf_counter()
        mine, rooms, members = fill(db, sizes, args.messages)
        with psycopg.connect(db) as conn:
            counts = conn.execute("SELECT (SELECT count(*) FROM messages), "
                                  "(SELECT count(*) FROM change_events), "
                                  "(SELECT count(*) FROM sync_state)").fetchone()
        print(f"data: {len(rooms)} rooms, {len(mine)} bench users (sizes {args.rooms}), "
              f"{OTHERS} others (3 a room); messages, log events, sync_state rows: {counts}; "
              f"written in {time.perf_counter() - began:.1f} s")
        port = free_port()
        env = clean_env() | RAISED | {
            "DATABASE_URL": db, "PGBRIDGE_JWT_SECRET": SECRET, "PGBRIDGE_PORT": str(port),
            "PGBRIDGE_LOG_LEVEL": "WARNING", "PGBRIDGE_QUEUE_SIZE": "100000"}
        print("raised for the baseline: " + ", ".join(f"{k}={v}" for k, v in RAISED.items())
              + f"; PGBRIDGE_MAX_SUBSCRIPTIONS left at {MAX_SUBSCRIPTIONS}")
        results: dict[tuple[int, str, str], list[dict[str, float]]] = {}
        unread: dict[int, tuple[int, int]] = {}
        with process([sys.executable, "-m", "daemon"], env, port, "pgbridge",
                     Path("/tmp") / f"bench-feed-{port}.log") as proc:
            for size in sizes:
                user = mine[size]
                last = rooms[size - 1]
                run = Run(port, proc.pid, db, mint_token(SECRET, user, ttl=3600), rooms[:size],
                          members[last][0])

                async def one(run: Run = run, size: int = size) -> None:
                    ws = await run.connect()
                    await ws.send(json.dumps({"type": "feed"}))
                    got = json.loads(await ws.recv())["rooms"]
                    await ws.close()
                    unread[size] = (sum(r["unread"] > 0 for r in got),
                                    sum(r["unread"] for r in got))
                    for warm in (False, True):
                        for mode in ("feed", "subscribe"):
                            results[size, mode, "warm" if warm else "cold"] = \
                                await run.series(mode, warm, args.starts)

                asyncio.run(one())
        report(sizes, results, unread, args.starts)
        for size in sizes:
            print(f"feed statement alone, {size} room(s) (EXPLAIN ANALYZE, {args.starts} runs): "
                  f"execution p50 {feed_alone(db, mine[size], args.starts):.2f} ms")
    print("a 1,000-message snapshot subscribe, for scale: docs/benchmarks/snapshot.md "
          "(p50 33 ms, daemon CPU 3.6 ms, 495 KB)")
    return 0


def report(sizes: list[int], results: dict[tuple[int, str, str], list[dict[str, float]]],
           unread: dict[int, tuple[int, int]], starts: int) -> None:
    print(f"\n{starts} starts per row, one at a time, each on fresh connections; per start:")
    print(f"{'rooms':>5} {'state':<5} {'mode':<9} {'frame p50':>9} {'p99 ms':>7} "
          f"{'live p50':>8} {'trips':>6} {'other':>5} {'db ms':>7} {'CPU ms':>7} {'bytes':>8}")
    for size in sizes:
        for state in ("cold", "warm"):
            for mode in ("feed", "subscribe"):
                rows = results[size, mode, state]

                def mean(key: str, rows: list[dict[str, float]] = rows) -> float:
                    return sum(r[key] for r in rows) / len(rows)

                frames = [r["frame"] for r in rows]
                print(f"{size:5d} {state:<5} {mode:<9} {1000 * pct(frames, 0.5):9.2f} "
                      f"{1000 * pct(frames, 0.99):7.2f} "
                      f"{1000 * pct([r['live'] for r in rows], 0.5):8.2f} {mean('trips'):6.2f} "
                      f"{mean('other'):5.2f} {1000 * mean('db'):7.2f} {1000 * mean('cpu'):7.2f} "
                      f"{mean('bytes'):8,.0f}")
            feed, base = results[size, "feed", state], results[size, "subscribe", state]

            def ratio(key: str, f: list[dict[str, float]] = feed,
                      b: list[dict[str, float]] = base) -> float:
                return sum(r[key] for r in f) / max(sum(r[key] for r in b), 1e-12)

            print(f"{'':5} {state:<5} feed / subscribe: frame p50 "
                  f"{pct([r['frame'] for r in feed], 0.5) / pct([r['frame'] for r in base], 0.5):.3f}"
                  f", live p50 "
                  f"{pct([r['live'] for r in feed], 0.5) / pct([r['live'] for r in base], 0.5):.3f}"
                  f", trips {ratio('trips'):.3f}, db {ratio('db'):.3f}, CPU {ratio('cpu'):.3f}, "
                  f"bytes {ratio('bytes'):.3f}")
    for size in sizes:
        rooms_unread, total = unread[size]
        print(f"user in {size} room(s): {rooms_unread} with unread > 0, {total} unread in all")


if __name__ == "__main__":
    sys.exit(main())
