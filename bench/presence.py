#!/usr/bin/env python3
"""Presence under churn: what users connecting and disconnecting cost the daemon and the
database, with the grace period absorbing quick reconnects.

    python -m bench.presence [--users N] [--seconds S] [--grace G] [--procs P]
                             [--scenarios a,b,c] [--dsn DSN]

One daemon (``python -m daemon`` in a subprocess, ``PGBRIDGE_PRESENCE_GRACE`` = ``--grace``)
over a scratch database (schema applied and ``users`` rows created as bench/fanout.py does, one
row per simulated user). N users connect once to ``/ws`` (one token each, ready at the
``welcome`` frame) and stay connected; then the scenarios run one after the other, each for
``--seconds``:

* ``A`` "reconnect within grace": every user holds its connection a random 0.5..2 s, closes it
  (close handshake, 1000) and reconnects after a random gap, uniform in 0.05..grace/4; the grace
  should absorb every one of these, so ``user_status`` is not written at all;
* ``B`` "churn across the grace": the same with gaps uniform in grace*1.5..grace*3, so that every
  disconnect becomes a real transition (offline once the grace passed, online at the reconnect);
* ``C`` "steady": N connected, no churn: the daemon's idle CPU with N connections.

A user whose next gap would end after the scenario's last second stays connected instead, so
every scenario ends as it began, with all N users connected, and every transition its churn
causes (an offline written ``grace`` seconds after a close included) falls inside it. Each user
has at most one connection at a time (the previous one is closed, TCP included, before the next
opens): the per-user limit (``PGBRIDGE_MAX_CONNECTIONS_PER_USER``, 20) is never approached, the
total one is raised above N, and the daemon has no handshake rate limit (docs/PROTOCOL.md,
"Limits"). Clients run in ``--procs`` processes of their own (asyncio, websockets' sans-I/O
client, bench/fanout.py's).

Measured per scenario, over its window (from the start of the churn to the last reconnect):

* connections opened and closed per second, connect latency (TCP connect to ``welcome``, a
  wait for the client's connect gate included), and ``late``: reconnects whose ``welcome`` came
  more than the grace after the close completed (in A only an overloaded machine makes any, and
  the daemon then rightly writes them: the user was away longer than the grace);
* ``user_status`` writes: ``n_tup_ins + n_tup_upd + n_tup_del`` of the relation in
  ``pg_stat_user_tables`` of the bench database, read at a quiet point before and after. Before
  the first read (the initial joins) and after each scenario the bench waits until the daemon's
  ``pgbridge_presence_transitions_total`` stopped moving and then ``--stats-wait`` seconds (11):
  PostgreSQL 15 backends flush their table counters when they go idle, at most once per second
  (PGSTAT_MIN_INTERVAL); one that went idle sooner than that arms a timer and flushes
  PGSTAT_IDLE_INTERVAL (10 s) later, so 11 s after the last write every write is counted (the
  counter is then also read until it stays put). Nothing else writes ``user_status`` in the
  bench database, so the delta is exact;
* the daemon's ``pgbridge_presence_transitions_total`` delta (should equal the writes: one
  UPDATE per transition once a user's row exists);
* the baseline: what a per-connect implementation writes (one write per connect and one per
  disconnect), and writes/baseline;
* the daemon's CPU (utime + stime of its process, /proc/<pid>/stat) as % of one core and in
  CPU-ms per 1,000 connects; the bench database's backends (the daemon's pool and listener),
  the client processes and the machine as a whole, for context; writes to the other presence
  tables (``presence_sessions``; ``presence_instances``: the lease, renewed every third of
  ``PGBRIDGE_PRESENCE_LEASE``);
* connection errors (refused or failed handshakes, no ``welcome``, connections lost or a close
  handshake not completed): must be 0.

The initial connect (N joins, N ``user_status`` rows created and turned online: two writes per
user) is reported on its own line and excluded from every scenario. The server is ``--dsn``
(needs CREATEDB) or an embedded PostgreSQL in ``--data-dir``; the bench database is dropped at
the end and the daemon stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import math
import multiprocessing as mp
import os
import random
import re
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.common import (
    SECRET,
    CpuMeter,
    Scenario,
    WsClient,
    clean_env,
    free_port,
    process,
    scratch_database,
    server_conninfo,
    setup_pgbridge,
)

HOLD = (0.5, 2.0)  # seconds a user stays connected between two closes
CONNECT_GATE = 50  # connects in progress at once per client process
CLOSE_TIMEOUT = 5.0  # seconds for the server to complete a close handshake
PRESENCE_TABLES = ("user_status", "presence_sessions", "presence_instances")
METRIC = re.compile(rb"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})? ([0-9.eE+-]+|NaN)$", re.M)


# --- clients (in their own processes) ---------------------------------------------------------

class _Conn(WsClient):
    """One connection: ready at the ``welcome`` frame; ``closed`` resolves when the TCP
    connection is gone (after our close handshake, or unexpectedly)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, None)
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        from websockets.frames import Frame, Opcode
        from websockets.http11 import Response

        proto = self.proto
        proto.receive_data(data)
        for event in proto.events_received():
            if isinstance(event, Response):
                if proto.handshake_exc is not None and not self.ready.done():
                    self.ready.set_exception(proto.handshake_exc)
            elif (isinstance(event, Frame) and event.opcode is Opcode.TEXT
                  and not self.ready.done()
                  and b'"welcome"' in event.data):
                self.ready.set_result(None)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost before welcome: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)


@dataclass
class _Stats:
    opened: int = 0
    closed: int = 0
    errors: int = 0
    late: int = 0  # reconnects more than the grace after the close completed
    samples: list[str] = field(default_factory=list)
    latency: array[float] = field(default_factory=lambda: array("d"))

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.samples) < 5:
            self.samples.append(what)

    def out(self) -> dict[str, Any]:
        return {"opened": self.opened, "closed": self.closed, "errors": self.errors,
                "late": self.late, "samples": self.samples, "latency": self.latency.tobytes(),
                "finished": time.time()}


class _Users:
    """The users of one client process: one connection (or none) each."""

    def __init__(self, urls: list[str], timeout: float, grace: float) -> None:
        parts = urlsplit(urls[0])
        self.addr = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.urls = urls
        self.conns: list[_Conn | None] = [None] * len(urls)
        self.timeout = timeout
        self.grace = grace
        self.gate = asyncio.Semaphore(CONNECT_GATE)

    async def connect(self, i: int, st: _Stats) -> bool:
        loop = asyncio.get_running_loop()
        conn: _Conn | None = None
        started = time.perf_counter()
        try:
            async with self.gate:
                _, conn = await loop.create_connection(lambda: _Conn(self.urls[i]), *self.addr)
                await asyncio.wait_for(conn.ready, self.timeout)
        except Exception as exc:
            st.error(f"connect: {type(exc).__name__}: {exc}")
            if conn is not None and conn.transport is not None:
                conn.transport.abort()
            self.conns[i] = None
            return False
        st.latency.append(time.perf_counter() - started)
        st.opened += 1
        self.conns[i] = conn
        return True

    async def close(self, i: int, st: _Stats) -> None:
        conn = self.conns[i]
        self.conns[i] = None
        if conn is None:
            return
        if not conn.closed.done():
            conn.proto.send_close(1000)
            conn._flush()
            try:
                await asyncio.wait_for(asyncio.shield(conn.closed), CLOSE_TIMEOUT)
            except TimeoutError:
                st.error("close handshake not completed")
            if conn.transport is not None:
                conn.transport.abort()
        else:
            st.error("connection lost before the close")
        st.closed += 1

    async def lost_within(self, i: int, seconds: float) -> bool:
        """Wait up to ``seconds``; true if the connection went away meanwhile."""
        conn = self.conns[i]
        if conn is None:
            return True
        if seconds > 0 and not conn.closed.done():
            await asyncio.wait({conn.closed}, timeout=seconds)
        return conn.closed.done()

    async def cycle(self, i: int, end: float, gaps: tuple[float, float] | None,
                    rng: random.Random, st: _Stats) -> None:
        """User ``i`` until ``end`` (loop time): hold, close, wait a gap, reconnect; ends
        connected. ``gaps`` None: hold until ``end`` (steady)."""
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            if self.conns[i] is None:  # lost or refused (counted): try again shortly
                failures += 1
                if failures > 20:
                    st.error("gave up reconnecting")
                    return
                await asyncio.sleep(0.2)
                await self.connect(i, st)
                continue
            now = loop.time()
            until = end if gaps is None else min(end, now + rng.uniform(*HOLD))
            if await self.lost_within(i, until - now):
                st.error("connection lost")
                self.conns[i] = None
                continue
            if gaps is None or loop.time() >= end:
                return
            gap = rng.uniform(*gaps)
            if loop.time() + gap >= end:  # would end away: stay connected to the end instead
                if await self.lost_within(i, end - loop.time()):
                    st.error("connection lost")
                    self.conns[i] = None
                    continue
                return
            await self.close(i, st)
            away = loop.time()
            await asyncio.sleep(gap)
            if await self.connect(i, st) and loop.time() - away > self.grace:
                st.late += 1

    def abort(self) -> None:
        for conn in self.conns:
            if conn is not None and conn.transport is not None:
                conn.transport.abort()


async def _work(urls: list[str], commands: Any, results: Any, index: int, timeout: float,
                grace: float, seed: int) -> None:
    loop = asyncio.get_running_loop()
    users = _Users(urls, timeout, grace)
    rng = random.Random(seed * 1000 + index)
    try:
        while True:
            cmd = await loop.run_in_executor(None, commands.get)
            if cmd[0] == "stop":
                return
            st = _Stats()
            if cmd[0] == "connect":
                await asyncio.gather(*(users.connect(i, st) for i in range(len(urls))))
            elif cmd[0] == "run":
                _, start_at, seconds, gaps = cmd
                await asyncio.sleep(max(0.0, start_at - time.time()))
                end = loop.time() + seconds
                await asyncio.gather(*(users.cycle(i, end, gaps, rng, st)
                                       for i in range(len(urls))))
            results.put((index, st.out()))
    finally:
        users.abort()


def client_process(urls: list[str], commands: Any, results: Any, index: int, timeout: float,
                   grace: float, seed: int) -> None:
    asyncio.run(_work(urls, commands, results, index, timeout, grace, seed))


class Clients:
    """``procs`` client processes over ``urls``; each command runs in all of them."""

    def __init__(self, urls: list[str], procs: int, timeout: float, grace: float,
                 seed: int) -> None:
        ctx = mp.get_context("spawn")
        n = max(1, min(procs, len(urls)))
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(n)]
        self.procs = [ctx.Process(target=client_process, daemon=True,
                                  args=(urls[k::n], self.commands[k], self.results, k, timeout,
                                        grace, seed))
                      for k in range(n)]
        for p in self.procs:
            p.start()

    def send(self, *cmd: Any) -> None:
        for q in self.commands:
            q.put(cmd)

    def gather(self, timeout: float) -> dict[str, Any]:
        total: dict[str, Any] = {"opened": 0, "closed": 0, "errors": 0, "late": 0, "samples": [],
                                 "latency": array("d"), "finished": 0.0}
        for _ in self.procs:
            _, out = self.results.get(timeout=timeout)
            for key in ("opened", "closed", "errors", "late"):
                total[key] += out[key]
            total["samples"] += out["samples"]
            total["latency"].frombytes(out["latency"])
            total["finished"] = max(total["finished"], out["finished"])
        return total

    def close(self) -> None:
        self.send("stop")
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()


# --- the daemon's metrics and the database's counters ----------------------------------------

def scrape(port: int) -> dict[str, float]:
    """The daemon's /metrics, summed over labels."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        body = conn.getresponse().read()
    finally:
        conn.close()
    out: dict[str, float] = {}
    for name, value in METRIC.findall(body):
        key = name.decode()
        out[key] = out.get(key, 0.0) + float(value)
    return out


def table_writes(db: str) -> dict[str, int]:
    """n_tup_ins + n_tup_upd + n_tup_del of the presence tables (as flushed so far)."""
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables "
            "WHERE schemaname = 'public' AND relname = ANY(%s)", [list(PRESENCE_TABLES)]
        ).fetchall()
    return {str(name): int(n) for name, n in rows}


def db_backend_pids(db: str) -> list[int]:
    """The bench database's other backends, when they are processes of this machine."""
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                            "AND pid <> pg_backend_pid()").fetchall()
        own = conn.execute("SELECT pg_backend_pid()").fetchone()
        try:  # the server is local if our own backend is a postgres process here
            local = own is not None and Path(f"/proc/{own[0]}/comm").read_text().startswith(
                "postgres")
        except OSError:
            local = False
    return [int(pid) for (pid,) in rows] if local else []


@dataclass
class Quiet:
    transitions: float
    users: float
    writes: dict[str, int]
    metrics: dict[str, float]


def settle(port: int, db: str, users: int, stats_wait: float, timeout: float = 120.0) -> Quiet:
    """Wait until the daemon holds ``users`` users and has written its last transition, then
    until PostgreSQL flushed the counters of that write (see the module docstring)."""
    deadline = time.monotonic() + timeout
    last, since = -1.0, time.monotonic()
    while True:
        metrics = scrape(port)
        value = metrics.get("pgbridge_presence_transitions_total", 0.0)
        if value != last:
            last, since = value, time.monotonic()
        elif (time.monotonic() - since >= 1.0
              and metrics.get("pgbridge_presence_users") == users):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"presence did not settle within {timeout:g} s "
                               f"(users {metrics.get('pgbridge_presence_users')}, expected "
                               f"{users})")
        time.sleep(0.2)
    time.sleep(max(0.0, since + stats_wait - time.monotonic()))
    writes = table_writes(db)
    while True:
        time.sleep(1.0)
        again = table_writes(db)
        if again == writes:
            break
        writes = again
    return Quiet(last, metrics.get("pgbridge_presence_users", 0.0), writes, scrape(port))


# --- scenarios --------------------------------------------------------------------------------

@dataclass
class Result:
    name: str
    title: str
    wall: float = 0.0
    opened: int = 0
    closed: int = 0
    errors: int = 0
    late: int = 0
    samples: list[str] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    writes: int = 0  # user_status
    other_writes: dict[str, int] = field(default_factory=dict)
    transitions: float = 0.0
    refusals: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def baseline(self) -> int:
        return self.opened + self.closed

    def pct(self, q: float) -> float:
        if not self.latency:
            return float("nan")
        return self.latency[min(len(self.latency) - 1, int(q * len(self.latency)))] * 1000

    def cpu_ms_per_1k(self, group: str = "daemon") -> float:
        if not self.opened or group not in self.cpu:
            return float("nan")
        return self.cpu[group] / 100 * self.wall * 1000 / (self.opened / 1000)


def scenario_gaps(name: str, grace: float) -> tuple[str, tuple[float, float] | None]:
    if name == "a":
        return f"A reconnect within grace (gaps 0.05..{grace / 4:g} s)", (0.05, grace / 4)
    if name == "b":
        return (f"B churn across the grace (gaps {grace * 1.5:g}..{grace * 3:g} s)",
                (grace * 1.5, grace * 3))
    return "C steady (no churn)", None


def refusals(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items()
               if k in ("pgbridge_handshake_refusals_total", "pgbridge_refusals_total"))


def run_scenario(name: str, clients: Clients, before: Quiet, port: int, db: str, pid: int,
                 args: argparse.Namespace) -> tuple[Result, Quiet]:
    title, gaps = scenario_gaps(name, args.grace)
    result = Result(name.upper(), title)
    meter = CpuMeter({"daemon": [pid], "db": db_backend_pids(db),
                      "clients": [p.pid for p in clients.procs if p.pid]})
    start_at = time.time() + 0.5
    clients.send("run", start_at, args.seconds, gaps)
    time.sleep(max(0.0, start_at - time.time()))
    meter.start()
    out = clients.gather(timeout=args.seconds + 300)
    result.wall = max(time.time(), out["finished"]) - start_at
    result.cpu = meter.stop()
    print(f"  {title}: {out['opened']:,} connects in {result.wall:.1f} s; settling",
          file=sys.stderr)
    after = settle(port, db, args.users, args.stats_wait)
    result.opened, result.closed = out["opened"], out["closed"]
    result.errors, result.samples, result.late = out["errors"], out["samples"], out["late"]
    result.latency = sorted(out["latency"])
    result.writes = after.writes.get("user_status", 0) - before.writes.get("user_status", 0)
    result.other_writes = {t: after.writes.get(t, 0) - before.writes.get(t, 0)
                           for t in PRESENCE_TABLES[1:]}
    result.transitions = after.transitions - before.transitions
    result.refusals = refusals(after.metrics) - refusals(before.metrics)
    return result, after


# --- report -----------------------------------------------------------------------------------

def num(value: float, width: int, fmt: str = ",.0f") -> str:
    return f"{value:>{width}{fmt}}" if value == value and not math.isinf(value) else (
        " " * (width - 3) + "n/a")


def report(results: list[Result], args: argparse.Namespace) -> None:
    nan = float("nan")
    print(f"\nchurn and writes\n{'':<2} {'open/s':>7} {'close/s':>7} {'errors':>6} {'late':>5} "
          f"{'us writes':>9} {'writes/s':>8} {'trans':>6} {'baseline':>8} {'base/s':>7} "
          f"{'w/base':>7}")
    for r in results:
        w = r.wall or nan
        print(f"{r.name:<2} {num(r.opened / w, 7, ',.1f')} {num(r.closed / w, 7, ',.1f')} "
              f"{r.errors:>6} {r.late:>5,} {r.writes:>9,} {num(r.writes / w, 8, ',.2f')} "
              f"{r.transitions:>6,.0f} {r.baseline:>8,} {num(r.baseline / w, 7, ',.0f')} "
              f"{num(r.writes / r.baseline if r.baseline else nan, 7, '.4f')}")
    print(f"\ncpu (% of one core) and connect latency\n{'':<2} {'daemon':>7} {'ms/1k':>6} "
          f"{'db':>6} {'clients':>7} {'machine':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    for r in results:
        print(f"{r.name:<2} {num(r.cpu.get('daemon', nan), 7, '.1f')} "
              f"{num(r.cpu_ms_per_1k(), 6, ',.0f')} {num(r.cpu.get('db', nan), 6, '.1f')} "
              f"{num(r.cpu.get('clients', nan), 7, '.1f')} "
              f"{num(r.cpu.get('machine', nan), 7, '.0f')} {num(r.pct(0.5), 7, '.1f')} "
              f"{num(r.pct(0.99), 7, '.1f')} "
              f"{num(r.latency[-1] * 1000 if r.latency else nan, 7, '.1f')}")
    print(f"\nopen/s, close/s: connections per second of the window; errors: connection errors; "
          f"late: reconnects whose welcome came more than the grace ({args.grace:g} s) after the "
          f"close (the daemon may rightly write those); us writes: user_status rows written "
          f"(pg_stat_user_tables); trans: pgbridge_presence_transitions_total delta; baseline: "
          f"what a per-connect implementation writes (opens + closes); w/base: us writes / "
          f"baseline; ms/1k: daemon CPU-ms per 1,000 connects; db: the bench database's "
          f"backends; machine: all cores (max {100 * (os.cpu_count() or 1)})")
    for r in results:
        print(f"  {r.name}: {r.title}; window {r.wall:.1f} s; other presence tables: "
              + ", ".join(f"{t} {n:,} writes" for t, n in r.other_writes.items())
              + (f"; server refusals {r.refusals:.0f}" if r.refusals else ""))
        if r.errors:
            print(f"     errors ({r.errors}): " + "; ".join(r.samples))
    by = {r.name: r for r in results}
    lines = []
    if "A" in by and by["A"].baseline:
        a = by["A"]
        lines.append(f"A: {a.writes} user_status writes for {a.baseline:,} connects+closes "
                     f"(per-connect writes would be {a.baseline / a.wall:,.0f}/s; "
                     f"{a.writes / a.wall:.2f}/s written)")
    if "B" in by and by["B"].baseline:
        b = by["B"]
        lines.append(f"B: writes/baseline {b.writes / b.baseline:.3f}, transitions/writes "
                     f"{b.transitions / b.writes if b.writes else float('nan'):.3f}")
    if "A" in by and "B" in by:
        a, b = by["A"], by["B"]
        lines.append(f"daemon CPU-ms per 1k connects B/A: "
                     f"{b.cpu_ms_per_1k() / a.cpu_ms_per_1k():.2f}"
                     if a.cpu_ms_per_1k() == a.cpu_ms_per_1k() and a.cpu_ms_per_1k() else
                     "daemon CPU-ms per 1k connects B/A: n/a")
    if "C" in by:
        c = by["C"]
        for name in ("A", "B"):
            if name in by and "daemon" in c.cpu and "daemon" in by[name].cpu:
                lines.append(f"{name} over steady C: daemon "
                             f"{by[name].cpu['daemon'] - c.cpu['daemon']:+.1f}% of a core "
                             f"(C idle: {c.cpu['daemon']:.1f}% with {args.users:,} connections)")
    if lines:
        print("ratios: " + "\n        ".join(lines))
    total = sum(r.errors for r in results)
    print(f"connection errors: {total} ({'OK' if total == 0 else 'MUST BE 0'})")
    sys.stdout.flush()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1000, help="simulated users (1000)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per scenario (20)")
    parser.add_argument("--grace", type=float, default=2.0,
                        help="PGBRIDGE_PRESENCE_GRACE of the daemon, seconds (2.0; at least 0.4)")
    parser.add_argument("--procs", type=int, default=2, help="client processes (2)")
    parser.add_argument("--scenarios", default="a,b,c", help="comma-separated: a, b, c (all)")
    parser.add_argument("--dsn", help="PostgreSQL server (superuser or CREATEDB); default: an "
                        "embedded PostgreSQL in --data-dir")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "pgbridge-bench",
                        help="embedded PostgreSQL's directory ($TMPDIR/pgbridge-bench)")
    parser.add_argument("--stats-wait", type=float, default=11.0,
                        help="seconds after the last transition before pg_stat_user_tables is "
                        "read (11: PostgreSQL 15 flushes an idle backend's counters within 10)")
    parser.add_argument("--connect-timeout", type=float, default=10.0,
                        help="seconds from TCP connect to welcome before it counts as an error")
    parser.add_argument("--seed", type=int, default=1, help="random seed (1)")
    args = parser.parse_args()
    if args.users < 1 or args.seconds <= 0 or args.procs < 1:
        parser.error("--users, --seconds and --procs must be positive")
    if args.grace < 0.4:
        parser.error("--grace must be at least 0.4 (scenario A's gaps are 0.05..grace/4)")
    args.scenarios = [s.strip().lower() for s in args.scenarios.split(",") if s.strip()]
    if not args.scenarios or set(args.scenarios) - {"a", "b", "c"}:
        parser.error("--scenarios: a, b, c")
    return args


def main() -> int:
    args = parse_args()
    from daemon.auth import mint_token

    print(f"presence bench: {os.cpu_count()} CPUs, {args.users:,} users, {args.seconds:g} s per "
          f"scenario, grace {args.grace:g} s, {args.procs} client processes")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="presence-") as logs, \
            server_conninfo(args.dsn, args.data_dir) as server, \
            scratch_database(server, "presence") as db:
        _, members = setup_pgbridge(db, Scenario("presence", args.users, 1, 1.0))
        port = free_port()
        env = clean_env() | {
            "DATABASE_URL": db, "PGBRIDGE_JWT_SECRET": SECRET, "PGBRIDGE_PORT": str(port),
            "PGBRIDGE_LOG_LEVEL": "WARNING", "PGBRIDGE_PRESENCE_GRACE": str(args.grace),
            "PGBRIDGE_MAX_CONNECTIONS": str(max(10000, 2 * args.users + 100)),
        }
        ttl = 3600 + 4 * args.seconds
        urls = [f"ws://127.0.0.1:{port}/ws?token={mint_token(SECRET, user, ttl=ttl)}"
                for user, _ in members]
        log = Path(logs) / "pgbridge.log"
        try:
            with process([sys.executable, "-m", "daemon"], env, port, "pgbridge", log) as proc:
                clients = Clients(urls, args.procs, args.connect_timeout, args.grace, args.seed)
                try:
                    started = time.monotonic()
                    clients.send("connect")
                    out = clients.gather(timeout=300)
                    took = time.monotonic() - started
                    if out["errors"]:
                        raise RuntimeError(f"{out['errors']} users could not connect: "
                                           + "; ".join(out["samples"]))
                    quiet = settle(port, db, args.users, args.stats_wait)
                    print(f"initial connect: {out['opened']:,} connections in {took:.1f} s; "
                          f"{quiet.transitions:,.0f} transitions, "
                          f"{quiet.writes.get('user_status', 0):,} user_status writes "
                          f"(row created + turned online), excluded below", flush=True)
                    for name in args.scenarios:
                        result, quiet = run_scenario(name, clients, quiet, port, db, proc.pid,
                                                     args)
                        results.append(result)
                finally:
                    clients.close()
        except Exception:
            if log.exists():
                print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
    report(results, args)
    return 0 if all(r.errors == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
