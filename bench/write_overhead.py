#!/usr/bin/env python3
"""What change capture costs the writers: insert rate of ``messages`` with and without it, with
the doorbell ringing and quiet, over a matrix of rooms x writers.

    python -m bench.write_overhead [--dsn DSN] [--rooms 1,10,100] [--writers 4,8,16]
                                   [--seconds 2] [--rounds 2] [--profile] [--async-commit]
                                   [--no-listener] [--daemon [--subscribers 100]
                                   [--drain 10]] [--keep]

Every variant is the schema applied as setup_db.py applies it, in a schema of its own
(``pgbridge_bench_<variant>``), measured in the same run, against the same server, in the same
database:

* ``plain``: the ``messages_capture`` trigger disabled (the table, its indexes, foreign keys and
  other triggers are identical): the reference every ratio is taken against;
* ``ring``: the doorbell lease (sequence ``change_doorbell``) set to 0 before each run: every
  row is logged (change_sequences -> change_events) and NOTIFYs a signed frame, as the bridge
  does at light load (and always with ``PGBRIDGE_DOORBELL=on``);
* ``quiet``: the lease set far in the future before each run: every row is logged, nothing is
  NOTIFYd (no frame JSON, no HMAC, no key read), as under a bridge that asked for quiet
  (``PGBRIDGE_DOORBELL=off``, or ``adaptive`` under load). No reader polls the log here:
  ``--daemon`` measures the real thing.

Each writer is its own connection doing autocommit single-row INSERTs as fast as it can; writer
``i``'s ``n``-th row goes to room ``(i + n) % rooms``, so with one room every writer waits for the
same per-room counter. Each cell of the matrix (``--rooms`` x ``--writers``, comma lists) runs
every variant ``--rounds`` times, alternating (ABBA order) to cancel drift; the tables are
emptied before each run. A LISTEN connection drains the notifications during the runs of every
variant but ``plain`` (``--no-listener`` to leave it out). Default: 9 cells x 3 variants x 2
rounds x 2 s (shorter and fewer than before, to keep the matrix at about 2.5 minutes on a
2-core machine; ``--daemon`` about 3, ``--profile`` about 7: pick cells, e.g. ``--rooms 100
--writers 8``, and raise ``--rounds`` on a noisy machine). Reported per cell: rows/s, spread of
the rounds (stdev/mean), ratio to ``plain`` of the same cell (and the least and greatest of
the ratios of single rounds, each to plain's run of the same round: how far noise moves it) and
WAL bytes per row (least of the rounds: the server's other activity only adds to it); then a
table of the ring/quiet ratios (rows: rooms, columns: writers) and the goals (quiet >= 0.60 at
100 rooms and 8 writers, >= 0.50 at 10 rooms and 4 writers).

``--daemon`` adds the variant ``adaptive`` (schema ``pgbridge_bench_adaptive``, lease never
touched by the bench): the real bridge (``python -m daemon``, PGBRIDGE_DOORBELL=adaptive) runs
against it in a subprocess for the whole bench, so also during the other variants' runs (idle
then: they are other schemas), with ``--subscribers`` WebSocket clients (members, one
subscription each, spread over every tenth room: rooms 0, 10, ..., 90, so that whatever the
cell, about a tenth of the rows written have subscribers, as in the issue's measurement with
subscribers in 10 of 100 rooms) in a process of their own that reads and counts every frame. Its log is kept (no TRUNCATE of change_events / change_sequences: the
bridge's cursors depend on the seqs), only ``messages`` is emptied. For its runs the bench also
reports how often the lease was held (sampled every 50 ms) and how long after the start of each
run it was first seen held (the bridge needs a moment to see the load: with short ``--seconds``
the adaptive figure mixes ringing and quiet), the frames the subscribers received against those
expected (rows written in subscribed rooms x subscribers of the room, counted after a drain of
up to ``--drain`` seconds: the loss check) and those whose seq was not the subscriber's last + 1,
the delivery latency (receive time - the event's ``ts``), and the CPU of the bridge and of the
subscribers' process. On a small machine those compete with the writers for the cores: the
``adaptive`` ratio includes that.

``--profile`` adds variants of ``pgbridge_capture`` with one part changed (ABLATIONS: in quiet
mode, without the change_events insert, without the change_sequences UPDATE, without the BRIN
index, with the old INSERT ... ON CONFLICT upsert, without the lease read, without the write
receipt; in ring mode, unsigned), each in its own schema, and a server-side cost per variant: a DO block that inserts
and COMMITs one row at a time in one room, no client, with its time and WAL bytes per row, and
the share of HOT updates of change_sequences (pg_stat_user_tables) in the matrix and in the DO
blocks. The shipped SQL files are not changed.

The database is ``--dsn``, else ``DATABASE_URL`` / ``POSTGRES_*``, else the embedded PostgreSQL
(as setup_db.py). The bench schemas are dropped at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from ulid import ULID

from bench.common import (
    SECRET,
    SEQ,
    CpuMeter,
    WsClient,
    clean_env,
    free_port,
    open_clients,
    process,
)
from daemon.db import channels_query, database, describe
from daemon.events import capture_time
from daemon.schema import apply_schema
from daemon.settings import DatabaseSettings, load_environment

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "pgbridge_bench_"
FAR = 4102444800000  # 2100-01-01 in ms since the epoch: a lease that outlasts any run
# (rooms, writers) -> the least quiet/plain ratio wanted there
GOALS: dict[tuple[int, int], float] = {(100, 8): 0.60, (10, 4): 0.50}
SUBSCRIBED_ROOMS = 10  # --daemon: the subscribers are spread over rooms 0, 10, ..., 90
EVENT_FRAME = b'{"type" : "event"'  # how pgbridge_event_frame's text starts (json_build_object)


@dataclass(frozen=True)
class Variant:
    """A bench schema: ``lease`` is what change_doorbell is set to before each of its runs (0:
    ring, FAR: quiet, None: not touched); ``replacements`` are applied to pgbridge_capture's
    definition as installed (pg_get_functiondef), then ``extra_sql`` is run in the schema."""

    name: str
    label: str
    lease: int | None
    capture: bool = True
    replacements: tuple[tuple[str, str], ...] = ()
    extra_sql: tuple[str, ...] = ()
    listen: bool = True  # the bench's LISTEN connection drains during its runs

    @property
    def schema(self) -> str:
        return PREFIX + self.name


PLAIN = Variant("plain", "plain (messages_capture disabled)", None, capture=False, listen=False)
RING = Variant("ring", "ring (lease 0: every row NOTIFYs)", 0)
QUIET = Variant("quiet", "quiet (lease far in the future: no NOTIFY)", FAR)
ADAPTIVE = Variant("adaptive", "adaptive (bridge running, PGBRIDGE_DOORBELL=adaptive)", None,
                   listen=False)

# Ablations of pgbridge_capture (--profile): the text they replace, as in
# sql/triggers/10_change_capture.sql (pg_get_functiondef gives the body back verbatim).
SEQ_UPDATE = """UPDATE change_sequences s SET last_seq = s.last_seq + 1
                WHERE s.room_id = e_room
                RETURNING s.last_seq"""
SEQ_UPSERT = """INSERT INTO change_sequences AS s (room_id, last_seq) VALUES (e_room, 1)
                ON CONFLICT (room_id) DO UPDATE SET last_seq = s.last_seq + 1
                RETURNING s.last_seq"""
NO_SEQ = "SELECT nextval('bench_seq') AS last_seq"
LOG_INSERT = """INSERT INTO change_events (room_id, seq, table_name, op, row_id, payload, created_at)
            SELECT e_room, bumped.last_seq, TG_TABLE_NAME, e_op, e_id, e_data, v_ts
            FROM bumped
            RETURNING seq INTO v_seq;"""
NO_LOG = "SELECT bumped.last_seq INTO v_seq FROM bumped;"
LEASE_READ = """v_ring := clock_timestamp() >= to_timestamp((SELECT d.last_value FROM change_doorbell d)
                                                / 1000.0);"""
KEY_READ = """SELECT k.ipad, k.opad, pgbridge_channel(k.ipad, k.opad, 'capture', TG_TABLE_SCHEMA)
            INTO v_ipad, v_opad, v_channel FROM change_notify_key k;"""
SIGNED = "pgbridge_hmac(v_ipad, v_opad, v_frame) || v_frame"
RECEIPT_APPEND = """        IF v_tag IS NULL THEN
            v_tag := pg_current_xact_id()::text || ':';"""
RECEIPT_SET = "        PERFORM set_config('pgbridge.receipt', v_receipt, true);"
ABLATIONS: list[Variant] = [
    Variant("quiet_no_log", "quiet, without the change_events insert", FAR,
            replacements=((LOG_INSERT, NO_LOG),)),
    Variant("quiet_no_seq", "quiet, seq from a plain sequence (no change_sequences UPDATE)",
            FAR, replacements=((SEQ_UPDATE, NO_SEQ),)),
    Variant("quiet_no_brin", "quiet, without the BRIN index on change_events", FAR,
            extra_sql=("DROP INDEX change_events_created_brin",)),
    Variant("quiet_upsert", "quiet, seq by INSERT ... ON CONFLICT DO UPDATE (old)", FAR,
            replacements=((SEQ_UPDATE, SEQ_UPSERT),)),
    Variant("quiet_no_lease", "quiet, lease not read (v_ring := false)", FAR,
            replacements=((LEASE_READ, "v_ring := false;"),)),
    # the write receipt: the append never runs (v_tag stays NULL), nor the set_config
    Variant("quiet_no_receipt", "quiet, without the write receipt (pgbridge_receipt)", FAR,
            replacements=((RECEIPT_APPEND, "        IF false THEN\n            NULL;"),
                          (RECEIPT_SET, "        NULL;"))),
    Variant("ring_unsigned", "ring, NOTIFY unsigned (no key read, no HMAC)", 0,
            # the schema's secret channel as a constant ({capture_channel}: prepare_schema)
            replacements=((KEY_READ, "v_ipad := ''::bytea; v_channel := '{capture_channel}';"),
                          (SIGNED, "v_frame"))),
]


@dataclass
class Setup:
    """What a variant's schema holds: rooms and writers' users (the most any cell needs)."""

    rooms: list[str]
    users: list[str]


@dataclass
class Result:
    rows: int = 0
    seconds: float = 0.0
    rounds: list[float] = field(default_factory=list)
    wal: list[float] = field(default_factory=list)  # WAL bytes per row, per round
    # adaptive only
    quiet_samples: int = 0
    samples: int = 0
    first_quiet: list[float | None] = field(default_factory=list)  # s after the start, per run
    expected: int = 0
    delivered: int = 0
    odd: int = 0  # frames whose seq was not the subscriber's last + 1
    latencies: array[float] = field(default_factory=lambda: array("d"))
    cpu: dict[str, list[float]] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def spread(self) -> float:
        return (statistics.pstdev(self.rounds) / statistics.mean(self.rounds)
                if len(self.rounds) > 1 and statistics.mean(self.rounds) else 0.0)


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers wanted") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: positive integers wanted")
    return sorted(set(values))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", help="conninfo or URL (default: DATABASE_URL, POSTGRES_*, "
                        "else the embedded PostgreSQL)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="length of one run of one variant (2.0)")
    parser.add_argument("--writers", type=int_list, default=[4, 8, 16],
                        help="concurrent writers, comma list (4,8,16)")
    parser.add_argument("--rooms", type=int_list, default=[1, 10, 100],
                        help="rooms the writers spread over, comma list (1,10,100)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating runs per variant and cell (2)")
    parser.add_argument("--profile", action="store_true",
                        help="also measure pgbridge_capture with one part changed at a time, "
                        "and the server-side cost per row (time, WAL, HOT updates)")
    parser.add_argument("--async-commit", action="store_true",
                        help="writers use synchronous_commit=off (all variants): shows what "
                        "waiting for the WAL flush while holding a lock costs")
    parser.add_argument("--no-listener", action="store_true",
                        help="no LISTEN connection draining the notifications")
    parser.add_argument("--daemon", action="store_true",
                        help="also run the bridge (PGBRIDGE_DOORBELL=adaptive) with subscribers "
                        "against the variant 'adaptive'")
    parser.add_argument("--subscribers", type=int, default=100,
                        help="--daemon: WebSocket subscribers over rooms 0, 10, ..., 90 (100)")
    parser.add_argument("--drain", type=float, default=10.0,
                        help="--daemon: at most this many seconds to wait for the frames after "
                        "an adaptive run (10; also stops after 2 s without progress)")
    parser.add_argument("--keep", action="store_true", help="keep the bench schemas")
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds <= 0 or args.subscribers < 1 or args.drain < 0:
        parser.error("--rounds, --seconds and --subscribers must be positive")
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
    """The (secret) capture channel of ``schema``, as the database derives it (the bench runs
    as the owner)."""
    row = conn.execute(channels_query(schema)).fetchone()
    assert row is not None
    return str(row[0])


def prepare_schema(conninfo: str, variant: Variant, rooms: int, writers: int) -> Setup:
    """Apply the pgbridge schema to the variant's schema, then adapt it."""
    schema = variant.schema
    with connect(conninfo) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    asyncio.run(apply_schema(conninfo, schema=schema))
    with connect(conninfo, schema) as conn:
        if not variant.capture:
            conn.execute("ALTER TABLE messages DISABLE TRIGGER messages_capture")
        if variant.replacements:
            conn.execute("CREATE SEQUENCE bench_seq")
            row = conn.execute("SELECT pg_get_functiondef(%s::regprocedure)",
                               [f"{schema}.pgbridge_capture()"]).fetchone()
            assert row
            definition = str(row[0])
            capture_channel = channel_of(conn, schema)
            for old, new in variant.replacements:
                new = new.replace("{capture_channel}", capture_channel)
                if old not in definition:
                    raise SystemExit(f"bench: pgbridge_capture no longer contains {old!r}: "
                                     "update ABLATIONS in bench/write_overhead.py")
                definition = definition.replace(old, new)
            conn.execute(definition.encode())
        for statement in variant.extra_sql:
            conn.execute(statement.encode())
        users = [str(ULID()) for _ in range(writers)]
        for uid in users:
            conn.execute("INSERT INTO users (id, auth0_id, email, username) "
                         "VALUES (%s, %s, %s, 'bench')", (uid, f"bench|{uid}", f"{uid}@b.test"))
        room_ids = [str(ULID()) for _ in range(rooms)]
        for room in room_ids:
            conn.execute("INSERT INTO channels (id, name) VALUES (%s, 'bench')", [room])
    return Setup(room_ids, users)


def empty_tables(conninfo: str, variant: Variant) -> None:
    with connect(conninfo, variant.schema) as conn:
        if variant is ADAPTIVE:  # the bridge's cursors depend on the seqs: keep the log
            conn.execute("TRUNCATE messages CASCADE")
        else:
            conn.execute("TRUNCATE messages, change_events, change_sequences CASCADE")
        if variant.lease is not None:
            conn.execute("SELECT setval('change_doorbell', %s)", [variant.lease])


def wal_lsn(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row
    return str(row[0])


def wal_since(conn: psycopg.Connection[Any], lsn: str) -> int:
    row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s::pg_lsn)",
                       [lsn]).fetchone()
    assert row
    return int(row[0])


class LeaseWatch:
    """Samples a schema's doorbell lease every 50 ms in a thread: how often writers were quiet,
    and how long after the start the lease was first seen held."""

    def __init__(self, conninfo: str, schema: str) -> None:
        self.conn = connect(conninfo)
        self.query = sql.SQL("SELECT last_value > floor(extract(epoch FROM clock_timestamp()) "
                             "* 1000) FROM {}.change_doorbell").format(sql.Identifier(schema))
        self.stop = threading.Event()
        self.quiet = self.samples = 0
        self.first_quiet: float | None = None
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def begin(self) -> None:
        """The writers start now: count from here."""
        self.quiet = self.samples = 0
        self.first_quiet = None
        self.started = time.monotonic()

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            row = self.conn.execute(self.query).fetchone()
            self.samples += 1
            if row and row[0]:
                self.quiet += 1
                if self.first_quiet is None:
                    self.first_quiet = time.monotonic() - self.started

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.conn.close()


def run_once(conninfo: str, variant: Variant, rooms: list[str], users: list[str],
             seconds: float, listen: bool, async_commit: bool,
             watch: LeaseWatch | None = None) -> tuple[int, float]:
    """All writers insert for ``seconds``; returns (rows, elapsed)."""
    schema = variant.schema
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
    if watch is not None:
        watch.begin()
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


# --- the bridge and its subscribers (--daemon) ------------------------------------------------

class _Subscriber(WsClient):
    """Counts ``event`` frames, checks that the room's seq grows by exactly 1 (``odd`` counts
    the frames where it does not), and records receive time - the event's ``ts`` (the writer's
    clock_timestamp(); same machine)."""

    def __init__(self, url: str, subscribe: bytes, lat: array[float]) -> None:
        super().__init__(url, subscribe)
        self.lat = lat
        self.delivered = 0
        self.odd = 0
        self.seq = -1

    def on_text(self, data: bytes, now: float) -> None:
        if not data.startswith(EVENT_FRAME):
            return
        self.delivered += 1
        match = SEQ.search(data)
        if match is not None:
            seq = int(match.group(1))
            if self.seq >= 0 and seq != self.seq + 1:
                self.odd += 1
            self.seq = max(self.seq, seq)
        ts = capture_time(data)
        if ts is not None:
            self.lat.append(now - ts)


async def _subscribers(specs: list[tuple[str, bytes]], ready: Any, stop: Any, stats: Any,
                       requests: Any, replies: Any) -> None:
    """Open every subscription, then keep ``stats`` (frames, connections lost, frames whose seq
    was not the last + 1) current until ``stop``; each item of ``requests`` is answered on
    ``replies`` with the latencies recorded since the last one."""
    lat: array[float] = array("d")
    try:
        clients = await open_clients(list(specs),
                                     lambda url, sub: _Subscriber(url, sub or b"", lat))
    except Exception as exc:
        ready.put(f"{type(exc).__name__}: {exc}")
        return
    ready.put(None)
    while not stop.is_set():
        stats[0] = sum(c.delivered for c in clients)
        stats[1] = sum(c.lost for c in clients)
        stats[2] = sum(c.odd for c in clients)
        with contextlib.suppress(Exception):  # queue.Empty
            while True:
                requests.get_nowait()
                replies.put(lat.tobytes())
                del lat[:]
        await asyncio.sleep(0.05)
    for client in clients:
        if client.transport is not None:
            client.transport.abort()


def subscriber_process(specs: list[tuple[str, bytes]], ready: Any, stop: Any, stats: Any,
                       requests: Any, replies: Any) -> None:
    asyncio.run(_subscribers(specs, ready, stop, stats, requests, replies))


@dataclass
class Bridge:
    """The running bridge and its subscribers' process."""

    pid: int
    proc: Any  # subprocess.Popen[bytes]
    subscribers: Any  # multiprocessing Process
    stats: Any  # frames, connections lost, frames out of seq order (subscriber_process)
    requests: Any
    replies: Any
    room_subscribers: dict[str, int]
    log: Path
    expected: int = 0  # all adaptive runs so far

    def delivered(self) -> int:
        return int(self.stats[0])

    def lost(self) -> int:
        return int(self.stats[1])

    def odd(self) -> int:
        return int(self.stats[2])

    def wait_for(self, expected: int, timeout: float) -> int:
        """Wait until the subscribers have ``expected`` frames in all, or no progress for 2 s,
        or ``timeout``; returns what they have."""
        deadline = time.monotonic() + timeout
        best, best_at = -1, time.monotonic()
        while True:
            got = self.delivered()
            if got >= expected or time.monotonic() >= deadline:
                return got
            if got > best:
                best, best_at = got, time.monotonic()
            elif time.monotonic() - best_at > 2.0:
                return got
            time.sleep(0.05)

    def latencies(self) -> array[float]:
        self.requests.put(None)
        out: array[float] = array("d")
        out.frombytes(self.replies.get(timeout=30))
        return out

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the bridge exited with {self.proc.returncode}:\n{tail}")


def add_subscribers(conninfo: str, setup: Setup, n: int) -> list[tuple[str, str]]:
    """``n`` users, member each of one of SUBSCRIBED_ROOMS rooms, every tenth: in a cell of R
    rooms (the first R), those of them with subscribers are a tenth (one at least); (user,
    room)."""
    rooms = setup.rooms[::10][:SUBSCRIBED_ROOMS]
    with connect(conninfo, ADAPTIVE.schema) as conn:
        rows = conn.execute(
            "INSERT INTO users (auth0_id, email, username) SELECT 'sub|' || g, "
            "'sub' || g || '@b.test', 'sub' || g FROM generate_series(1, %s) g RETURNING id",
            [n]).fetchall()
        members = [(str(row[0]), rooms[i % len(rooms)]) for i, row in enumerate(rows)]
        conn.execute("INSERT INTO channel_members (channel_id, user_id) "
                     "SELECT * FROM unnest(%s::varchar[], %s::varchar[])",
                     [[r for _, r in members], [u for u, _ in members]])
    return members


@contextlib.contextmanager
def run_bridge(conninfo: str, setup: Setup, args: argparse.Namespace) -> Iterator[Bridge]:
    from daemon.auth import mint_token

    members = add_subscribers(conninfo, setup, args.subscribers)
    port = free_port()
    env = clean_env() | {
        "DATABASE_URL": conninfo, "PGBRIDGE_SCHEMA": ADAPTIVE.schema,
        "PGBRIDGE_DOORBELL": "adaptive", "PGBRIDGE_JWT_SECRET": SECRET,
        "PGBRIDGE_PORT": str(port), "PGBRIDGE_HOST": "127.0.0.1",
        "PGBRIDGE_QUEUE_SIZE": "100000", "PGBRIDGE_LOG_LEVEL": "WARNING",
    }
    url = f"ws://127.0.0.1:{port}/ws?token="
    specs = [(url + mint_token(SECRET, user, ttl=86400),
              f'{{"type":"subscribe","room":"{room}"}}'.encode()) for user, room in members]
    room_subscribers: dict[str, int] = {}
    for _, room in members:
        room_subscribers[room] = room_subscribers.get(room, 0) + 1
    ctx = mp.get_context("spawn")
    ready, requests, replies, stop = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Event()
    stats = ctx.Array("q", 3, lock=False)
    with tempfile.TemporaryDirectory(prefix="write-overhead-") as logdir, \
            contextlib.ExitStack() as stack:
        log = Path(logdir) / "pgbridge.log"
        try:
            proc = stack.enter_context(process([sys.executable, "-m", "daemon"], env, port,
                                               "pgbridge", log))
        except Exception:
            print(log.read_text(errors="replace")[-2000:] if log.exists() else "",
                  file=sys.stderr)
            raise
        subs = ctx.Process(target=subscriber_process, daemon=True,
                           args=(specs, ready, stop, stats, requests, replies))
        subs.start()
        try:
            error = ready.get(timeout=180)
            if error:
                raise RuntimeError(f"subscribers could not connect: {error}")
            time.sleep(1.0)  # let every subscription settle
            yield Bridge(proc.pid, proc, subs, stats, requests, replies, room_subscribers, log)
        finally:
            stop.set()
            subs.join(10)
            if subs.is_alive():
                subs.kill()


# --- measuring --------------------------------------------------------------------------------

def measure(conninfo: str, variants: list[Variant], setups: dict[str, Setup], rooms_n: int,
            writers_n: int, args: argparse.Namespace,
            bridge: Bridge | None) -> dict[str, Result]:
    """One cell of the matrix: every variant ``--rounds`` times, ABBA order."""
    results = {v.name: Result() for v in variants}
    with connect(conninfo) as probe:
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]  # ABBA: cancels slow drift
            for variant in order:
                setup = setups[variant.name]
                empty_tables(conninfo, variant)
                res = results[variant.name]
                watch = before = meter = None
                odd = 0
                if variant is ADAPTIVE and bridge is not None:
                    bridge.check()
                    watch = LeaseWatch(conninfo, variant.schema)
                    before, odd = bridge.delivered(), bridge.odd()
                    meter = CpuMeter({"bridge": [bridge.pid],
                                      "subscribers": [bridge.subscribers.pid]})
                    meter.start()
                lsn = wal_lsn(probe)
                rows, elapsed = run_once(conninfo, variant, setup.rooms[:rooms_n],
                                         setup.users[:writers_n], args.seconds,
                                         listen=variant.listen and not args.no_listener,
                                         async_commit=args.async_commit, watch=watch)
                res.wal.append(wal_since(probe, lsn) / rows if rows else 0.0)
                res.rows += rows
                res.seconds += elapsed
                res.rounds.append(rows / elapsed)
                if (watch is not None and bridge is not None and before is not None
                        and meter is not None):
                    for name, value in meter.stop().items():
                        res.cpu.setdefault(name, []).append(value)
                    watch.close()
                    res.quiet_samples += watch.quiet
                    res.samples += watch.samples
                    res.first_quiet.append(watch.first_quiet)
                    expected = adaptive_expected(probe, bridge)
                    bridge.expected += expected
                    res.expected += expected
                    res.delivered += bridge.wait_for(before + expected, args.drain) - before
                    res.odd += bridge.odd() - odd
                    res.latencies.extend(bridge.latencies())
    return results


def adaptive_expected(conn: psycopg.Connection[Any], bridge: Bridge) -> int:
    """Frames the subscribers should get for the run just done: rows per subscribed room x
    subscribers of the room."""
    rows = conn.execute(sql.SQL("SELECT channel_id, count(*) FROM {}.messages GROUP BY 1")
                        .format(sql.Identifier(ADAPTIVE.schema))).fetchall()
    return sum(int(n) * bridge.room_subscribers.get(str(room), 0) for room, n in rows)


def hot_counts(conninfo: str, variants: list[Variant]) -> dict[str, tuple[int, int]]:
    """(n_tup_upd, n_tup_hot_upd) of each variant's change_sequences, after the writers'
    statistics are flushed (they are at backend exit; the statistics lag ~1 s otherwise)."""
    time.sleep(1.0)
    out: dict[str, tuple[int, int]] = {}
    with connect(conninfo) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        for v in variants:
            row = conn.execute("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                               "WHERE relid = to_regclass(%s)",
                               [f"{v.schema}.change_sequences"]).fetchone()
            out[v.name] = (int(row[0]), int(row[1])) if row else (0, 0)
    return out


def server_cost(conninfo: str, variants: list[Variant], setups: dict[str, Setup],
                args: argparse.Namespace, rows: int = 2000) -> dict[str, tuple[float, float]]:
    """Server-side time and WAL per row of one-row transactions, without any client: a DO block
    that inserts and COMMITs ``rows`` times (one room), per variant; best of ``--rounds`` (at
    least 3) alternating runs. A LISTEN connection is open on every variant's channel.
    Returns {variant: (us per row, WAL bytes per row)}."""
    best: dict[str, tuple[float, float]] = {}
    with connect(conninfo, async_commit=args.async_commit) as conn, connect(conninfo) as lis:
        for v in variants:
            lis.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel_of(lis, v.schema))))
        for r in range(max(5, args.rounds)):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                setup = setups[v.name]
                empty_tables(conninfo, v)
                conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(v.schema)))
                block = sql.SQL(
                    "DO $$ BEGIN FOR i IN 1..{} LOOP INSERT INTO messages (channel_id, user_id, "
                    "content) VALUES ({}, {}, 'bench message ' || i); COMMIT; END LOOP; END $$"
                ).format(rows, sql.Literal(setup.rooms[0]), sql.Literal(setup.users[0]))
                lsn = wal_lsn(conn)
                started = time.perf_counter()
                conn.execute(block)
                per_row = (time.perf_counter() - started) / rows * 1e6
                wal = wal_since(conn, lsn) / rows
                old = best.get(v.name, (per_row, wal))
                best[v.name] = (min(old[0], per_row), min(old[1], wal))
                for _ in lis.notifies(timeout=0.01):
                    pass
        if conn.info.server_version >= 150000:
            conn.execute("SELECT pg_stat_force_next_flush()")
    return best


# --- report -----------------------------------------------------------------------------------

def server_line(conninfo: str) -> str:
    with connect(conninfo) as conn:
        row = conn.execute("SELECT current_setting('server_version'), "
                           "current_setting('synchronous_commit'), current_setting('fsync'), "
                           "current_setting('max_connections')").fetchone()
    assert row
    return (f"PostgreSQL {row[0]} at {describe(conninfo)} (synchronous_commit={row[1]}, "
            f"fsync={row[2]})")


def pct(values: array[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def report_cell(rooms_n: int, writers_n: int, variants: list[Variant],
                results: dict[str, Result], bridge: Bridge | None) -> None:
    plain = results["plain"].rate
    print(f"\nrooms={rooms_n}, writers={writers_n}")
    print(f"  {'variant':<62} {'rows/s':>8} {'spread':>7} {'ratio':>6} {'(rounds)':>11} "
          f"{'WAL B/row':>10}")
    for v in variants:
        res = results[v.name]
        ratio = res.rate / plain if plain else 0.0
        # the ratios of each round (to plain's run of the same round): how far noise moves it
        paired = [x / p for x, p in zip(res.rounds, results["plain"].rounds, strict=True) if p]
        span = (f"{min(paired):.2f}-{max(paired):.2f}" if len(paired) > 1 and v is not PLAIN
                else "")
        wal = min(res.wal, default=0.0)  # other activity on the server only adds
        print(f"  {v.label:<62} {res.rate:8.0f} {res.spread:7.1%} {ratio:6.2f} {span:>11} "
              f"{wal:10.0f}")
        if v is ADAPTIVE and bridge is not None:
            quiet = res.quiet_samples / res.samples if res.samples else 0.0
            cpu = ", ".join(f"{k} {statistics.mean(x):.0f}%" for k, x in res.cpu.items())
            first = "/".join("never" if t is None else f"{t:.2f}s" for t in res.first_quiet)
            print(f"    lease held in {quiet:.0%} of {res.samples} samples (first after {first}); "
                  f"frames "
                  f"{res.delivered:,}/{res.expected:,} expected"
                  f"{'' if res.delivered == res.expected else ' (MISMATCH)'}, {res.odd} out of "
                  f"seq order; latency p50 "
                  f"{pct(res.latencies, 0.5):.1f} ms, p99 {pct(res.latencies, 0.99):.1f} ms; "
                  f"cpu {cpu} (% of one core; machine: all cores)")
    sys.stdout.flush()


def ratio_of(cells: dict[tuple[int, int], dict[str, Result]], cell: tuple[int, int],
             name: str) -> float | None:
    results = cells.get(cell)
    if results is None or name not in results or not results["plain"].rate:
        return None
    return results[name].rate / results["plain"].rate


def matrix_table(title: str, cells: dict[tuple[int, int], dict[str, Result]],
                 rooms: list[int], writers: list[int], names: list[str]) -> None:
    print(f"\n{title} (rows: rooms, columns: writers)")
    width = max(10, 5 * len(names) + len(names) - 1)
    print(f"  {'rooms':>6} " + " ".join(f"{w:>{width}}" for w in writers))
    for r in rooms:
        texts = []
        for w in writers:
            values = [ratio_of(cells, (r, w), n) for n in names]
            texts.append("/".join("n/a" if x is None else f"{x:.2f}" for x in values))
        print(f"  {r:>6} " + " ".join(f"{t:>{width}}" for t in texts))


def variant_table(cells: dict[tuple[int, int], dict[str, Result]],
                  variants: list[Variant]) -> None:
    """Ratio to plain of every variant (rows) in every cell (columns: rooms/writers)."""
    print("\nratio to plain per variant (columns: rooms/writers)")
    heads = [f"{r}/{w}" for r, w in cells]
    width = max(6, *(len(h) for h in heads))
    print(f"  {'variant':<62} " + " ".join(f"{h:>{width}}" for h in heads))
    for v in variants:
        values = [ratio_of(cells, cell, v.name) for cell in cells]
        print(f"  {v.label:<62} " + " ".join(
            f"{'n/a' if x is None else f'{x:.2f}':>{width}}" for x in values))


def main() -> int:
    args = parse_args()
    variants = [PLAIN, RING, QUIET]
    if args.daemon:
        variants.append(ADAPTIVE)
    if args.profile:
        variants += ABLATIONS
    max_rooms, max_writers = max(args.rooms), max(args.writers)
    cells: dict[tuple[int, int], dict[str, Result]] = {}
    with target(args.dsn) as conninfo:
        setups: dict[str, Setup] = {}
        try:
            for v in variants:
                # the adaptive schema has rooms 0, 10, ..., 90 to subscribe to whatever the cells
                rooms_n = max(max_rooms, 10 * SUBSCRIBED_ROOMS) if v is ADAPTIVE else max_rooms
                setups[v.name] = prepare_schema(conninfo, v, rooms_n, max_writers)
            print(f"pgbridge write overhead: INSERT INTO messages, autocommit single-row "
                  f"inserts, rooms {','.join(map(str, args.rooms))} x writers "
                  f"{','.join(map(str, args.writers))}, {args.rounds} alternating runs x "
                  f"{args.seconds:g} s per variant and cell")
            print(f"server: {server_line(conninfo)}")
            print("listener: " + ("none" if args.no_listener else
                                  "one LISTEN connection draining during the runs of every "
                                  "variant but plain" + (" and adaptive (the bridge listens)"
                                                         if args.daemon else "")))
            if args.async_commit:
                print("writers: synchronous_commit=off")
            with contextlib.ExitStack() as stack:
                bridge = None
                if args.daemon:
                    supported = "PGBRIDGE_DOORBELL" in (ROOT / "daemon" / "settings.py"
                                                        ).read_text()
                    bridge = stack.enter_context(run_bridge(conninfo, setups["adaptive"], args))
                    print(f"bridge: python -m daemon (pid {bridge.pid}) on {ADAPTIVE.schema}, "
                          f"PGBRIDGE_DOORBELL=adaptive"
                          + ("" if supported else " (NOT supported by this checkout's "
                             "daemon/settings.py: it rings always)")
                          + f", {args.subscribers} subscribers over "
                          f"{len(bridge.room_subscribers)} rooms; it runs during every "
                          "variant's runs (idle but for its own schema)")
                for rooms_n in args.rooms:
                    for writers_n in args.writers:
                        results = measure(conninfo, variants, setups, rooms_n, writers_n, args,
                                          bridge)
                        cells[rooms_n, writers_n] = results
                        report_cell(rooms_n, writers_n, variants, results, bridge)
                if bridge is not None:
                    bridge.check()
                    got = bridge.wait_for(bridge.expected, args.drain)
                    missing = bridge.expected - got
                    print(f"\nloss check (adaptive, all runs, after a drain of up to "
                          f"{args.drain:g} s): subscribers received {got:,} of "
                          f"{bridge.expected:,} expected frames ("
                          + ("none missing" if missing == 0 else
                             f"{missing:,} missing" if missing > 0 else f"{-missing:,} extra")
                          + f"), {bridge.odd()} out of seq order, {bridge.lost()} connections "
                          "lost")
            profiled = [v for v in variants if v is not ADAPTIVE]
            if args.profile:
                hot_matrix = hot_counts(conninfo, profiled)
                cost = server_cost(conninfo, profiled, setups, args)
                hot_all = hot_counts(conninfo, profiled)
                print("\nserver side per one-row transaction, no client (DO block with COMMIT "
                      "per row, one room, best run); HOT: share of change_sequences updates "
                      "that were HOT, in the matrix runs and in the DO blocks")
                print(f"  {'variant':<62} {'us/row':>7} {'added':>7} {'WAL B/row':>10} "
                      f"{'HOT matrix':>17} {'HOT DO':>13}")

                def hot(upd: int, hot_upd: int) -> str:
                    return f"{hot_upd / upd:.0%} of {upd:,}" if upd else "n/a"

                for v in profiled:
                    us, wal = cost[v.name]
                    m_upd, m_hot = hot_matrix[v.name]
                    a_upd, a_hot = hot_all[v.name]
                    print(f"  {v.label:<62} {us:7.1f} {us - cost['plain'][0]:+7.1f} "
                          f"{wal:10.0f} {hot(m_upd, m_hot):>17} "
                          f"{hot(a_upd - m_upd, a_hot - m_hot):>13}")
                variant_table(cells, profiled)
            print()
            matrix_table("ratios to plain, ring/quiet", cells, args.rooms, args.writers,
                         ["ring", "quiet"])
            if args.daemon:
                matrix_table("ratio to plain, adaptive (bridge and subscribers running)", cells,
                             args.rooms, args.writers, ["adaptive"])
            print()
            for (rooms_n, writers_n), goal in GOALS.items():
                ratio = ratio_of(cells, (rooms_n, writers_n), "quiet")
                if ratio is None:
                    print(f"ratio quiet/plain at {rooms_n} rooms, {writers_n} writers: not "
                          f"measured (goal >= {goal:.2f})")
                    continue
                verdict = "ok" if ratio >= goal else "BELOW GOAL"
                print(f"ratio quiet/plain at {rooms_n} rooms, {writers_n} writers: {ratio:.2f} "
                      f"(goal >= {goal:.2f}: {verdict})")
        finally:
            if not args.keep:
                with connect(conninfo) as conn:
                    for v in variants:
                        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                            sql.Identifier(v.schema)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
