#!/usr/bin/env python3
"""What N bridge instances cost the database, with and without a shared broker (issue 29):
transactions per second the bridges cause, the backend connections they hold, and the delivery
latency, for 1, 2, 4 and 8 instances.

    python -m bench.broker --dsn postgresql://postgres@127.0.0.1:5432/postgres
                           [--instances 1,2,4,8] [--seconds 15] [--warmup 3]
                           [--broker both|no|yes] [--modes light,polling]
                           [--takeover ROUNDS [--takeover-instances 4]]

One run, one fresh database (``pgbridge_bench_broker_*``, the schema applied, autovacuum off
on its tables, dropped at the end). For every instance count, broker setting and load mode
("configuration"), in this order:

* N daemons (``python -m daemon``, each on its own port, default settings but
  ``PGBRIDGE_LOG_LEVEL=INFO``), plus ``PGBRIDGE_DOORBELL=off`` for "polling" (the bridges keep
  writers quiet and read the log every ``PGBRIDGE_POLL_INTERVAL``, 10 ms) and
  ``PGBRIDGE_BROKER=nats://127.0.0.1:PORT`` for "broker" (a ``nats-server`` this bench starts on
  a free port);
* ``--clients`` WebSocket clients per instance (20: user ``i`` subscribed to room ``i % 10`` of
  ``--rooms`` 10), every instance holding the same rooms;
* ready when every client is subscribed, every instance's ``pgbridge_doorbell_polling`` says the
  mode, and (broker) exactly one instance reports ``pgbridge_broker_state{state="leader"} 1`` and
  every other one ``follower``;
* a writer inserting ``--rate`` messages per second (20) round-robin over the rooms, one
  autocommit ``INSERT`` each, for ``--warmup`` (3) + ``--seconds`` (15) seconds, then until
  every client has every message of its room (10 s at most); then SIGTERM to every daemon.

The transactions the bridges cause come from ``xact_commit + xact_rollback`` of the bench
database in ``pg_stat_database``. A backend publishes its counts only now and then: PostgreSQL 15
does it when the backend goes idle after a statement, at most once a second, and a LISTEN
backend, which runs no statement, keeps the transaction each notification costs it (it reads
the notification queue in one) unpublished for tens of seconds, until it exits. So a window
within a run cannot be counted; a whole lifetime can: a read before the daemons start and one
after their last backend has left ``pg_stat_activity`` (a backend publishes everything as it
exits). Each configuration runs twice: a short lifetime (ready, then stopped at once) and the
long one with the writer; the rate is the difference of their transactions over the difference
of their durations (from ready to SIGTERM), so starting and stopping (connections, subscribes,
presence) drop out. Left out of the counts: the writer's transactions (counted: one per
``INSERT``) and this bench's own statements (counted, autocommit: one transaction each; both of
its sessions call ``pg_stat_force_next_flush()`` before each read, so their counts are exact).
What else touches the database is measured first in a window with the writer and no daemon,
printed as "background", and not subtracted. The bridges' own count of their statements (their
/metrics: ``pgbridge_query_duration_seconds{purpose}`` and ``pgbridge_log_read_seconds``) is
printed per configuration, to tell what the transactions are.

The backend connections: ``pg_stat_activity`` of the bench database, client backends that are
not this bench's (it names its own sessions ``pgbridge-bench-*``), half-way through the writer's
run.

``--takeover ROUNDS`` (``--instances ''`` for it alone): ``--takeover-instances`` (4)
instances on the broker at light load with the writer running; the leader is SIGKILLed and
the bench times, from the kill, a new leader (exactly one surviving instance reports ``leader``
on its /metrics, polled every 20 ms) and the events flowing again (the first message committed
after the kill is at every surviving client of its room), takes the worst commit-to-receipt
latency of the messages around the kill, checks that the surviving clients miss no message, starts a new instance with new clients in the dead one's place, waits until it
follows, and again.

Latency: each message carries ``bench_t``, ``clock_timestamp()`` in the writer's transaction
(before its commit); a client's receive time (``time.time()``, same machine) minus it, for the
messages written after the warm-up, every delivery; p50 and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    SECRET,
    STAMP,
    WRITE,
    Scenario,
    WsClient,
    clean_env,
    free_port,
    open_clients,
    scratch_database,
    setup_pgbridge,
)

BENCH_APP = "pgbridge-bench"  # application_name prefix of this bench's own sessions
READY_WAIT = 60.0  # seconds for the daemons, clients, doorbell mode and broker roles
DRAIN_WAIT = 10.0  # seconds for the last deliveries after the writer stops


@dataclass
class Config:
    instances: int
    broker: bool
    mode: str  # "light" (PGBRIDGE_DOORBELL default) or "polling" (PGBRIDGE_DOORBELL=off)

    @property
    def name(self) -> str:
        return f"{self.instances} x {'broker' if self.broker else 'no broker'}, {self.mode}"


@dataclass
class Outcome:
    config: Config
    tps: float = 0.0  # the bridges' transactions per second
    xacts: int = 0  # the long lifetime's transactions less the short one's
    window: float = 0.0  # the long lifetime's seconds less the short one's
    short: Life | None = None
    long: Life | None = None
    backends: int = 0  # client backends of the bridges while the writer ran
    latencies: list[float] = field(default_factory=list)  # seconds
    expected: int = 0  # deliveries expected (every message written, to every client of its room)
    delivered: int = 0
    duplicates: int = 0
    roles: str = ""  # broker states at the end of the window, e.g. "1 leader, 3 follower"
    broker_notes: str = ""  # counters read on /metrics after the window
    purposes: str = ""  # the bridges' statements per second by purpose, from /metrics


class Client(WsClient):
    """Keeps, per message number ``n``, the latency of its first receipt; counts repeats."""

    def __init__(self, url: str, subscribe: bytes | None, room: str) -> None:
        super().__init__(url, subscribe)
        self.room = room
        self.got: dict[int, float] = {}
        self.at: dict[int, float] = {}  # receive time (time.time()) by n
        self.duplicates = 0

    def on_text(self, data: bytes, now: float) -> None:
        for line in data.split(b"\n"):
            match = STAMP.search(line)
            if match is None:
                continue
            n = int(match.group(1))
            if n in self.got:
                self.duplicates += 1
            else:
                self.got[n] = now - float(match.group(2))
                self.at[n] = now


class Writer:
    """``rate`` inserts per second over ``rooms`` (round-robin) until stopped; ``written`` holds
    each message's room by its number ``n``; ``transactions`` counts every statement it ran on
    its connection (autocommit: one transaction each)."""

    def __init__(self, conn: Any, rooms: list[tuple[str, str]], rate: float) -> None:
        self.conn = conn
        self.rooms = rooms
        self.rate = rate
        self.written: dict[int, str] = {}
        self.transactions = 0
        self.next = 0
        self.lock = asyncio.Lock()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        t0 = time.monotonic()
        k = 0
        while True:
            delay = t0 + k / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            n = self.next
            room, user = self.rooms[n % len(self.rooms)]
            async with self.lock:
                self.transactions += 1
                await self.conn.execute(WRITE, (room, user, f"bench message {n}", n),
                                        prepare=True)
            self.written[n] = room
            self.next += 1
            k += 1

    async def flush(self) -> None:
        """Between two inserts, make the writer's backend publish its counts."""
        async with self.lock:
            self.transactions += 1
            await self.conn.execute("SELECT pg_stat_force_next_flush()")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None


class Stats:
    """This bench's connection for ``pg_stat_database`` and ``pg_stat_activity``; every
    statement it runs is one transaction, counted in ``statements``."""

    def __init__(self, conn: Any, dbname: str, writer_conn: Any) -> None:
        self.conn = conn
        self.dbname = dbname
        self.writer_conn = writer_conn  # the writer's session (Writer)
        self.statements = 0

    async def one(self, query: str, *params: Any) -> Any:
        self.statements += 1
        cur = await self.conn.execute(query, params or None)
        row = await cur.fetchone()
        return row[0] if row else None

    async def snapshot(self, writer: Writer) -> tuple[int, int]:
        """``(xact_commit + xact_rollback of the database, this bench's own transactions so
        far)``. The writer and this connection publish their counts first
        (``pg_stat_force_next_flush()``: a backend publishes them before it answers
        ReadyForQuery), so every transaction of theirs before the read is in it and every
        later one is not: the bench's own are exact at the window's edges."""
        await writer.flush()
        await self.one("SELECT pg_stat_force_next_flush()")
        own = self.statements + writer.transactions
        total = int(await self.one("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                                   "WHERE datname = %s", self.dbname))
        return total, own

    async def backends(self) -> int:
        return int(await self.one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND backend_type = "
            "'client backend' AND application_name NOT LIKE %s", self.dbname, BENCH_APP + "%"))


class Daemon:
    """One ``python -m daemon`` on ``port``, its stderr in ``log``."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env = env | {"PGBRIDGE_PORT": str(port)}
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "daemon"], env=self.env,
                                         cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    async def healthy(self) -> None:
        deadline = time.monotonic() + READY_WAIT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon on port {self.port} exited with "
                                   f"{self.proc.returncode}; see {self.log}")
            status, _ = await http_get(self.port, "/healthz")
            if status == 200:
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"daemon on port {self.port} not healthy within {READY_WAIT:g} s")

    async def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, 20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)


async def http_get(port: int, path: str) -> tuple[int | None, str]:
    """Status and body of ``GET path`` on 127.0.0.1:port (``None``: nothing answered)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError):
        return None, ""
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                     .encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    except (OSError, TimeoutError):
        return None, ""
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    try:
        return int(parts[1]), body.decode(errors="replace")
    except (IndexError, ValueError):
        return None, ""


async def metrics(port: int) -> dict[str, float]:
    """The samples of /metrics on ``port``, by their name with labels as written."""
    _, body = await http_get(port, "/metrics")
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def role(sample: dict[str, float]) -> str:
    """The broker state an instance reports as 1 (``?`` when none, ``-`` without the gauge)."""
    states = {k.split('state="', 1)[1].split('"', 1)[0]: v for k, v in sample.items()
              if k.startswith("pgbridge_broker_state{") and 'state="' in k}
    if not states:
        return "-"
    return next((s for s, v in states.items() if v == 1), "?")


def purposes(before: list[dict[str, float]], after: list[dict[str, float]],
              seconds: float) -> str:
    """The statements the instances ran between two scrapes, per second, by
    ``pgbridge_query_duration_seconds{purpose}`` (pool) and ``pgbridge_log_read_seconds``
    (reads of the log), most frequent first."""
    rates: dict[str, float] = {}
    for b, a in zip(before, after, strict=True):
        for key, value in a.items():
            if key.startswith("pgbridge_query_duration_seconds_count{"):
                name = key.split('purpose="', 1)[1].split('"', 1)[0]
            elif key.startswith("pgbridge_log_read_seconds_count"):
                name = "log reads"
            else:
                continue
            rates[name] = rates.get(name, 0.0) + (value - b.get(key, 0.0)) / seconds
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(rates.items(), key=lambda kv: -kv[1])
                     if v > 0)


def roles_text(samples: list[dict[str, float]]) -> str:
    names = [role(s) for s in samples]
    return ", ".join(f"{names.count(r)} {r}" for r in sorted(set(names)))


def counter(samples: list[dict[str, float]], name: str) -> float:
    return sum(v for s in samples for k, v in s.items() if k == name or k.startswith(name + "{"))


def slug(config: Config) -> str:
    return f"{config.instances}-{'broker' if config.broker else 'plain'}-{config.mode}"


def broker_events(logs: Path, config: Config, last: int = 6) -> str:
    """The last ``broker_*`` (and error) log lines of each instance of ``config``."""
    out = []
    for k in range(config.instances):
        path = logs / f"{slug(config)}-{k}.log"
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()
                 if '"broker_' in line or '"level": "error"' in line] if path.exists() else []
        out.append(f"  instance {k} ({path.name}): " + (
            "\n    ".join(["", *lines[-last:]]) if lines else "no broker_* or ERROR line"))
    return "\n".join(out)


async def wait_ready(daemons: list[Daemon], config: Config) -> None:
    """Until every instance's doorbell says ``config.mode`` and, with the broker, exactly one
    is the leader and every other one a follower."""
    deadline = time.monotonic() + READY_WAIT
    want_polling = 1.0 if config.mode == "polling" else 0.0
    last: list[dict[str, float]] = []
    while time.monotonic() < deadline:
        last = list(await asyncio.gather(*(metrics(d.port) for d in daemons)))
        polling_ok = all(s.get("pgbridge_doorbell_polling") == want_polling for s in last)
        names = [role(s) for s in last]
        broker_ok = (not config.broker or (names.count("leader") == 1 and
                                           names.count("follower") == len(daemons) - 1))
        if polling_ok and broker_ok:
            return
        if (config.broker and time.monotonic() > deadline - READY_WAIT + 15
                and all(n == "-" for n in names)):
            raise RuntimeError("no instance has pgbridge_broker_state on its "
                               "/metrics after 15 s: this daemon has no broker mode")
        await asyncio.sleep(0.2)
    raise RuntimeError(
        f"not ready within {READY_WAIT:g} s: doorbell_polling "
        f"{[s.get('pgbridge_doorbell_polling') for s in last]}, broker states "
        f"{[role(s) for s in last]} (want {config.mode}"
        f"{', 1 leader and the rest followers' if config.broker else ''})")


async def delivered_all(clients: list[Client], writer: Writer) -> None:
    deadline = time.monotonic() + DRAIN_WAIT
    while time.monotonic() < deadline:
        if all(n in c.got for c in clients for n, room in writer.written.items()
               if room == c.room):
            return
        await asyncio.sleep(0.1)


def daemon_env(config: Config, db: str, nats: str | None) -> dict[str, str]:
    env = clean_env() | {"DATABASE_URL": db, "PGBRIDGE_JWT_SECRET": SECRET,
                         "PGBRIDGE_LOG_LEVEL": "INFO"}
    if config.mode == "polling":
        env["PGBRIDGE_DOORBELL"] = "off"
    if config.broker:
        assert nats is not None
        env["PGBRIDGE_BROKER"] = nats
    return env


async def clients_of(daemon: Daemon, members: list[tuple[str, str]]) -> list[Client]:
    """One subscribed client per ``(user, room)`` of ``members`` on ``daemon``."""
    from daemon.auth import mint_token

    specs = [(f"ws://127.0.0.1:{daemon.port}/ws?token={mint_token(SECRET, user, ttl=3600)}",
              f'{{"type":"subscribe","room":"{room}"}}'.encode(), room)
             for user, room in members]
    by_url: dict[tuple[str, bytes | None], str] = {(u, s): r for u, s, r in specs}
    return await open_clients([(u, s) for u, s, _ in specs],
                              lambda u, s: Client(u, s, by_url[(u, s)]))


@dataclass
class Takeover:
    """One round: the leader SIGKILLed; seconds from the kill."""

    leader: float | None  # until exactly one surviving instance reports leader on /metrics
    flowing: float | None  # until the first message committed after the kill is at every
    # surviving client of its room
    missing: int  # deliveries to surviving clients missing 10 s after the round's messages
    expected: int
    fallbacks: float  # pgbridge_broker_fallbacks_total of the survivors, during the round
    worst: float  # the largest commit-to-receipt latency of the round's messages, seconds


async def takeover(db: str, stats: Stats, rooms: list[tuple[str, str]],
                   members: list[tuple[str, str]], args: argparse.Namespace, nats: str,
                   logs: Path) -> list[Takeover]:
    """``--takeover`` rounds with ``--takeover-instances`` instances on the broker at light
    load and the writer running: SIGKILL the leader, time a new leader and the events flowing
    again to the survivors' clients, check that they miss nothing, start a new instance in the
    dead one's place (new clients), wait until it follows, and again."""
    config = Config(args.takeover_instances, True, "light")
    env = daemon_env(config, db, nats)
    daemons = [Daemon(env, free_port(), logs / f"takeover-{k}.log")
               for k in range(config.instances)]
    held: list[list[Client]] = []
    writer = Writer(stats.writer_conn, rooms, args.rate)
    out: list[Takeover] = []
    try:
        for d in daemons:
            d.start()
        await asyncio.gather(*(d.healthy() for d in daemons))
        held = [await clients_of(d, members) for d in daemons]
        await wait_ready(daemons, config)
        writer.start()
        await asyncio.sleep(2)
        for r in range(args.takeover):
            samples = list(await asyncio.gather(*(metrics(d.port) for d in daemons)))
            lead = [role(x) for x in samples].index("leader")
            survivors = [k for k in range(len(daemons)) if k != lead]
            fallbacks0 = counter([samples[k] for k in survivors],
                                 "pgbridge_broker_fallbacks_total")
            proc = daemons[lead].proc
            assert proc is not None
            first_n = writer.next + 1  # the one in flight may have begun before the kill
            killed = time.time()
            proc.kill()
            await asyncio.to_thread(proc.wait)
            leader = flowing = None
            deadline = time.monotonic() + 15
            clients = [c for k in survivors for c in held[k]]
            room = rooms[first_n % len(rooms)][0]  # that of the first message after the kill
            watch = [c for c in clients if c.room == room]
            while time.monotonic() < deadline and (leader is None or flowing is None):
                if leader is None:
                    now = list(await asyncio.gather(*(metrics(daemons[k].port)
                                                      for k in survivors)))
                    names = [role(x) for x in now]
                    if names.count("leader") == 1 and names.count("follower") == len(now) - 1:
                        leader = time.time() - killed
                if flowing is None and all(first_n in c.at for c in watch):
                    flowing = max(c.at[first_n] for c in watch) - killed
                await asyncio.sleep(0.02)
            await asyncio.sleep(1)
            last_n = writer.next
            span = [n for n in range(first_n - 2 * len(rooms), last_n) if n in writer.written]
            await delivered_all(clients, writer)
            expected = sum(1 for c in clients for n in span if writer.written[n] == c.room)
            missing = sum(1 for c in clients for n in span
                          if writer.written[n] == c.room and n not in c.got)
            worst = max((c.got[n] for c in clients for n in span if n in c.got), default=0.0)
            now = list(await asyncio.gather(*(metrics(daemons[k].port) for k in survivors)))
            out.append(Takeover(leader, flowing, missing, expected,
                                counter(now, "pgbridge_broker_fallbacks_total") - fallbacks0,
                                worst))
            t = out[-1]
            print(f"  takeover {r + 1}: new leader after {fmt_s(t.leader)}, the first message "
                  f"after the kill at every surviving client of its room after "
                  f"{fmt_s(t.flowing)}, worst latency {t.worst * 1000:.0f} ms, missing "
                  f"{t.missing} of {t.expected}, fallbacks {t.fallbacks:.0f}", flush=True)
            for c in held[lead]:
                if c.transport is not None:
                    c.transport.abort()
            daemons[lead] = Daemon(env, free_port(), logs / f"takeover-{len(out)}-new.log")
            daemons[lead].start()
            await daemons[lead].healthy()
            held[lead] = await clients_of(daemons[lead], members)
            await wait_ready(daemons, config)
            await asyncio.sleep(1)
    finally:
        await writer.stop()
        await asyncio.gather(*(d.stop() for d in daemons))
        for c in (c for h in held for c in h):
            if c.transport is not None:
                c.transport.abort()
    return out


def report_takeover(rounds: list[Takeover], args: argparse.Namespace) -> None:
    print(f"\ntakeover, {args.takeover_instances} instances on the broker at light load "
          f"({args.rate:g} inserts/s), the leader SIGKILLed, {len(rounds)} rounds (seconds "
          "from the kill)")
    for name, values in (("a new leader (exactly one on /metrics)", [t.leader for t in rounds]),
                         ("the first message after the kill received",
                          [t.flowing for t in rounds]),
                         ("worst commit-to-receipt latency", [t.worst for t in rounds])):
        known = sorted(v for v in values if v is not None)
        worst = "-" if len(known) < len(values) else fmt_s(known[-1])
        median = fmt_s(known[len(known) // 2]) if known else "-"
        print(f"{name:42} median {median:>8}, worst {worst:>8}")
    print(f"deliveries to surviving clients missing: {sum(t.missing for t in rounds)} of "
          f"{sum(t.expected for t in rounds)}; fallbacks meanwhile: "
          f"{sum(t.fallbacks for t in rounds):.0f}")


def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


@dataclass
class Life:
    """One lifetime of a configuration's daemons, from before they start to after their last
    backend is gone."""

    xacts: int  # the database's transactions over it, the bench's own left out
    seconds: float  # from ready (every client subscribed, the roles settled) to SIGTERM
    backends: int = 0  # the bridges' client backends while the writer ran
    before: list[dict[str, float]] = field(default_factory=list)  # /metrics as the writer starts
    after: list[dict[str, float]] = field(default_factory=list)  # and as it stops
    first_n: int = 0  # the first message written after the warm-up
    last_n: int = 0  # the first message written after the window
    vacuums: int = 0  # autovacuum and autoanalyze runs on the bench database during it


async def lifetime(config: Config, db: str, stats: Stats, writer: Writer | None,
                   members: list[tuple[str, str]], args: argparse.Namespace, nats: str | None,
                   logs: Path, clients: list[Client], tag: str) -> Life:
    """Start ``config``'s daemons and clients, wait until ready, run ``writer`` for
    ``--warmup`` + ``--seconds`` (``None``: no writer, stop at once), stop every daemon and wait
    until PostgreSQL has no backend of theirs left (a backend publishes its counts as it exits).
    The database's transactions over it come from two ``pg_stat_database`` reads with no daemon
    backend alive, so every one of the bridges' is in it, whenever their backends would
    otherwise have published them. ``clients`` receives the clients."""
    env = daemon_env(config, db, nats)
    daemons = [Daemon(env, free_port(), logs / f"{slug(config)}{tag}-{k}.log")
               for k in range(config.instances)]
    flush = writer or Writer(stats.writer_conn, [], 1.0)
    vacuums = await autovacuums(stats)
    x0, own0 = await stats.snapshot(flush)
    life = Life(0, 0.0)
    stopped = ready = 0.0
    try:
        for d in daemons:
            d.start()
        await asyncio.gather(*(d.healthy() for d in daemons))
        for d in daemons:
            clients += await clients_of(d, members)
        await wait_ready(daemons, config)
        ready = time.monotonic()
        if writer is not None:
            life.before = list(await asyncio.gather(*(metrics(d.port) for d in daemons)))
            writer.start()
            await asyncio.sleep(args.warmup)
            life.first_n = writer.next
            await asyncio.sleep(args.seconds / 2)
            life.backends = await stats.backends()
            await asyncio.sleep(args.seconds / 2)
            life.last_n = writer.next
            await writer.stop()
            life.after = list(await asyncio.gather(*(metrics(d.port) for d in daemons)))
            await delivered_all(clients, writer)
    finally:
        if writer is not None:
            await writer.stop()
        stopped = time.monotonic()
        await asyncio.gather(*(d.stop() for d in daemons))
        for c in clients:
            if c.transport is not None:
                c.transport.abort()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not await stats.backends():
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # a backend leaves pg_stat_activity just before it publishes
    x1, own1 = await stats.snapshot(flush)
    life.vacuums = await autovacuums(stats) - vacuums
    life.xacts = (x1 - x0) - (own1 - own0)
    life.seconds = stopped - ready
    return life


async def measure(config: Config, db: str, stats: Stats, rooms: list[tuple[str, str]],
                  members: list[tuple[str, str]], args: argparse.Namespace, nats: str | None,
                  logs: Path) -> Outcome:
    """Two lifetimes of ``config``: a short one (ready, then stopped at once) and a long one
    (the writer for ``--warmup`` + ``--seconds``); the bridges' rate is the difference of their
    transactions over the difference of their durations, so what starting and stopping cost
    (connections, subscribes, presence, the first reads) drops out."""
    out = Outcome(config)
    short = await lifetime(config, db, stats, None, members, args, nats, logs, [], "-short")
    writer = Writer(stats.writer_conn, rooms, args.rate)
    clients: list[Client] = []
    long = await lifetime(config, db, stats, writer, members, args, nats, logs, clients, "")
    out.short, out.long = short, long
    out.window = long.seconds - short.seconds
    out.xacts = long.xacts - short.xacts
    out.tps = out.xacts / out.window
    out.backends = long.backends
    out.purposes = purposes(long.before, long.after, long.seconds)
    for c in clients:
        mine = [n for n, room in writer.written.items() if room == c.room]
        out.expected += len(mine)
        out.delivered += sum(1 for n in mine if n in c.got)
        out.duplicates += c.duplicates
        out.latencies += [c.got[n] for n in mine
                          if long.first_n <= n < long.last_n and n in c.got]
    if config.broker:
        out.roles = roles_text(long.after)
        out.broker_notes = (
            f"relayed {counter(long.after, 'pgbridge_broker_relayed_total'):.0f}, fallbacks "
            f"{counter(long.after, 'pgbridge_broker_fallbacks_total'):.0f}, forged "
            f"{counter(long.after, 'pgbridge_broker_forged_total'):.0f}")
    if config.mode == "polling":
        await asyncio.sleep(2.5)  # the doorbell lease the bridges held runs out (2 s)
    return out


async def background(stats: Stats, rooms: list[tuple[str, str]],
                     args: argparse.Namespace) -> tuple[float, int]:
    """Transactions per second with the writer and no daemon, besides the writer's and this
    bench's own (autovacuum and the like), and their count."""
    writer = Writer(stats.writer_conn, rooms, args.rate)
    writer.start()
    try:
        await asyncio.sleep(min(args.warmup, 2.0))
        t0 = time.monotonic()
        x0, own0 = await stats.snapshot(writer)
        await asyncio.sleep(args.seconds)
        x1, own1 = await stats.snapshot(writer)
        t1 = time.monotonic()
    finally:
        await writer.stop()
    rest = (x1 - x0) - (own1 - own0)
    return rest / (t1 - t0), rest


def no_autovacuum(db: str) -> None:
    """Autovacuum off for every table of the bench database (``autovacuum_enabled``, a storage
    parameter of each table: the server's settings are left alone), and the catalogs, which the
    schema just churned, vacuumed and analyzed now: autovacuum's transactions, caused by the
    writer and the setup rather than the bridges, stay out of the counts (:func:`autovacuums`
    tells whether any ran)."""
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
        tables = conn.execute("SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c "
                              "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = "
                              "'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
                              ).fetchall()
        for (table,) in tables:
            conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = off, "
                         "toast.autovacuum_enabled = off)")


async def autovacuums(stats: Stats) -> int:
    """Autovacuum and autoanalyze runs on the bench database's tables, catalogs included, so
    far (``pg_stat_all_tables``)."""
    return int(await stats.one("SELECT coalesce(sum(autovacuum_count + autoanalyze_count), 0) "
                               "FROM pg_stat_all_tables"))


@contextlib.contextmanager
def nats_server(log: Path) -> Any:
    """``nats-server -a 127.0.0.1 -p PORT`` on a free port: yields ``nats://127.0.0.1:PORT``."""
    exe = shutil.which("nats-server")
    if exe is None:
        raise RuntimeError("nats-server is not on PATH (needed for the broker configurations)")
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([exe, "-a", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        import socket

        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nats-server did not start; see {log}") from None
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(outcomes: list[Outcome], args: argparse.Namespace, bg: tuple[float, int]) -> None:
    print(f"\nbackground (writer alone, no daemon; not subtracted): {bg[0]:.2f} "
          f"transactions/s ({bg[1]} in {args.seconds:g} s)")
    print("\ntransactions per second caused by the bridges (long lifetime less short one: "
          f"writer {args.rate:g} inserts/s for {args.warmup:g} + {args.seconds:g} s; "
          f"{args.clients} clients per instance in {args.rooms} rooms)")
    by = {(o.config.instances, o.config.broker, o.config.mode): o for o in outcomes}
    cols = [(b, m) for b in (False, True) for m in args.modes if b in args.brokers]
    head = "".join(f"{('broker' if b else 'no broker') + ', ' + m:>22}" for b, m in cols)
    print(f"{'instances':>9}{head}")
    for n in args.instances:
        cells = []
        for b, m in cols:
            o = by.get((n, b, m))
            cells.append(f"{o.tps:>10.2f} ({o.xacts:>5} tx)" if o else f"{'-':>22}")
        print(f"{n:>9}" + "".join(f"{c:>22}" for c in cells))
    print("\nratio to 1 instance of the same mode")
    print(f"{'instances':>9}{head}")
    for n in args.instances:
        cells = []
        for b, m in cols:
            o, one = by.get((n, b, m)), by.get((1, b, m))
            cells.append(f"{o.tps / one.tps:>10.2f}x" if o and one and one.tps > 0 else "-")
        print(f"{n:>9}" + "".join(f"{c:>22}" for c in cells))
    print("\nbackend connections the bridges held (pg_stat_activity, mid-window)")
    print(f"{'instances':>9}{head}")
    for n in args.instances:
        cells = [str(by[(n, b, m)].backends) if (n, b, m) in by else "-" for b, m in cols]
        print(f"{n:>9}" + "".join(f"{c:>22}" for c in cells))
    print("\ndelivery, commit (bench_t, in the writer's transaction) to client receipt, "
          f"messages written in the {args.seconds:g} s after the warm-up; delivered: every "
          "message written, to every client of its room")
    print(f"{'configuration':34} {'p50 ms':>8} {'p99 ms':>8} {'delivered':>17} {'dup':>4}  "
          "broker")
    for o in outcomes:
        print(f"{o.config.name:34} {pct(o.latencies, 0.5) * 1000:>8.1f} "
              f"{pct(o.latencies, 0.99) * 1000:>8.1f} {o.delivered:>8}/{o.expected:<8} "
              f"{o.duplicates:>4}  {o.roles}{'; ' if o.roles else ''}{o.broker_notes}")
    print("\nthe two lifetimes of each configuration (the bridges' transactions, seconds from "
          "ready to stop)")
    for o in outcomes:
        if o.short and o.long:
            print(f"{o.config.name:34} short {o.short.xacts:>6} tx in {o.short.seconds:5.1f} s, "
                  f"long {o.long.xacts:>6} tx in {o.long.seconds:5.1f} s; autovacuum runs "
                  f"{o.short.vacuums + o.long.vacuums}")
    print("\nstatements per second the bridges counted (all instances; their /metrics: "
          "pool statements by purpose, and reads of the log)")
    for o in outcomes:
        print(f"{o.config.name:34} {o.purposes or '-'}")
    if 1 in args.instances and 4 in args.instances and True in args.brokers:
        for m in args.modes:
            one, four = by.get((1, True, m)), by.get((4, True, m))
            pone, pfour = by.get((1, False, m)), by.get((4, False, m))
            if one and four and pone and pfour and one.tps > 0 and pone.tps > 0:
                print(f"\n{m}: 4 instances / 1 instance: broker {four.tps / one.tps:.2f}x "
                      f"(goal <= 1.5x), no broker {pfour.tps / pone.tps:.2f}x")


async def run(args: argparse.Namespace) -> int:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    started = time.monotonic()
    logs = Path(tempfile.mkdtemp(prefix="pgbridge-broker-bench-"))
    sc = Scenario("broker", clients=args.clients, rooms=args.rooms, rate=args.rate)
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores; logs in {logs}",
          flush=True)
    with contextlib.ExitStack() as stack:
        db = stack.enter_context(scratch_database(args.dsn, "broker"))
        rooms, members = await asyncio.to_thread(setup_pgbridge, db, sc)
        await asyncio.to_thread(no_autovacuum, db)
        nats = stack.enter_context(nats_server(logs / "nats.log")) if True in args.brokers \
            else None
        dbname = str(conninfo_to_dict(db)["dbname"])
        async with await psycopg.AsyncConnection.connect(
                make_conninfo(db, application_name=BENCH_APP + "-stats"),
                autocommit=True) as sconn, await psycopg.AsyncConnection.connect(
                make_conninfo(db, application_name=BENCH_APP + "-writer"),
                autocommit=True) as wconn:
            stats = Stats(sconn, dbname, wconn)
            vacuums = await autovacuums(stats)
            bg = await background(stats, rooms, args)
            print(f"background: {bg[0]:.2f} transactions/s", flush=True)
            outcomes: list[Outcome] = []
            failed: list[str] = []
            for n in args.instances:
                for broker in args.brokers:
                    for mode in args.modes:
                        config = Config(n, broker, mode)
                        try:
                            o = await measure(config, db, stats, rooms, members, args, nats,
                                              logs)
                        except RuntimeError as exc:
                            failed.append(f"{config.name}: {exc}")
                            print(f"{config.name:34} FAILED: {exc}", flush=True)
                            print(broker_events(logs, config), flush=True)
                            continue
                        outcomes.append(o)
                        print(f"{config.name:34} {o.tps:8.2f} tx/s  backends {o.backends:3}  "
                              f"p50 {pct(o.latencies, 0.5) * 1000:6.1f} ms  p99 "
                              f"{pct(o.latencies, 0.99) * 1000:6.1f} ms  delivered "
                              f"{o.delivered}/{o.expected}  {o.roles}", flush=True)
            rounds: list[Takeover] = []
            if args.takeover and nats is not None:
                print(f"takeover: {args.takeover_instances} instances on the broker, light "
                      "load, the leader SIGKILLed", flush=True)
                rounds = await takeover(db, stats, rooms, members, args, nats, logs)
            vacuums = await autovacuums(stats) - vacuums
    if outcomes:
        report(outcomes, args, bg)
    if rounds:
        report_takeover(rounds, args)
    print(f"autovacuum/autoanalyze runs in the bench database during the run: {vacuums}")
    for line in failed:
        print(f"FAILED {line}")
    print(f"\ntook {time.monotonic() - started:.0f} s")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", required=True, help="a PostgreSQL superuser's conninfo")
    parser.add_argument("--instances", default="1,2,4,8", help="instance counts (1,2,4,8)")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds of writes after the warm-up (15)")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="seconds of writes before latencies count (3)")
    parser.add_argument("--broker", choices=["both", "no", "yes"], default="both",
                        help="without the broker, with it, or both (both)")
    parser.add_argument("--modes", default="light,polling", help="light,polling")
    parser.add_argument("--clients", type=int, default=20, help="clients per instance (20)")
    parser.add_argument("--rooms", type=int, default=10, help="rooms (10)")
    parser.add_argument("--rate", type=float, default=20.0, help="inserts per second (20)")
    parser.add_argument("--takeover", type=int, default=0,
                        help="rounds of SIGKILLing the leader, after the rest (0)")
    parser.add_argument("--takeover-instances", type=int, default=4,
                        help="instances for --takeover (4)")
    args = parser.parse_args()
    args.instances = [int(s) for s in args.instances.split(",") if s.strip()]
    if args.takeover and args.broker == "no":
        parser.error("--takeover needs the broker")
    args.modes = [s.strip() for s in args.modes.split(",") if s.strip()]
    if not set(args.modes) <= {"light", "polling"}:
        parser.error("--modes: light and/or polling")
    args.brokers = {"both": [False, True], "no": [False], "yes": [True]}[args.broker]
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
