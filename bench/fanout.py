#!/usr/bin/env python3
"""Fan-out: N WebSocket clients over R rooms, inserts at a fixed rate, pgbridge against the
common Python recipe, measured side by side in the same run; and what an idle connection and a
catch-up cost.

    python -m bench.fanout [--clients N --rooms R --rate INSERTS_PER_S] [--seconds S]
                           [--procs P] [--systems pgbridge,baseline] [--dsn DSN]
                           [--batch off,0] [--event-loop asyncio,uvloop]
    python -m bench.fanout --scenario light,fanout,switch,idle,catchup [--clients N]
                           [--rooms R] [--phase-seconds 10,10,15] [--phase-rates 200,2000,200]
                           [--doorbell adaptive,on,off] [--writers 4] [--events E] [--dsn DSN]

Without ``--clients/--rooms/--rate`` or ``--scenario`` two scenarios run (the goals of the
issue), as ``--scenario light,fanout``:

* ``light``: 100 clients in 10 rooms, 200 inserts/s (2,000 deliveries/s): p99 <= 3 ms;
* ``fanout``: 1,000 clients in 10 rooms, 40 inserts/s per room (400/s, 40,000 deliveries/s):
  p99 <= 25 ms, nothing lost, and <= 5 µs of daemon CPU per delivery (each part shown, MET or
  MISSED).

pgbridge runs once per ``--batch`` value times ``--event-loop`` value, in light, fanout, custom,
idle and catchup, each in a fresh database with a fresh daemon: ``--batch`` (comma-separated,
default ``off,0``) is ``off`` (no parameter: one frame per message) or MS from 0 to 1000, added
to every client's URL as ``/ws?batch=MS&token=...`` (the daemon may then coalesce frames into
one message, newline-separated, holding a frame at most MS ms; docs/PROTOCOL.md, "Coalesced
messages"); ``--event-loop`` (comma-separated, default ``asyncio``) is the daemon's
``PGBRIDGE_EVENT_LOOP`` (asyncio or uvloop; a run whose daemon did not map uvloop as asked is
noted). Runs are named ``pgbridge``, ``pgbridge batch=0``, ``pgbridge batch=0 uvloop``, ...
(asyncio is not named). Every client splits each message on ``b"\\n"`` and handles each line
as a frame; the report gives the frames per message the clients received, and notes a batch run
whose welcome frames did not say ``"batch"`` (a daemon that ignores the parameter).

``--scenario switch`` crosses the daemon's adaptive doorbell (daemon/doorbell.py) both ways:
100 clients in 10 rooms (``--clients``/``--rooms`` change them, for every named scenario)
while the insert rate goes light -> heavy -> light (``--phase-rates``, default 200, 2,000,
200 inserts/s; ``--phase-seconds``, default 10, 10, 15: the way back takes a few seconds, 3
calm ones, the 3 s lease running out, then a barrier). It runs pgbridge only (``--systems``
does not apply), without ``?batch=`` and with the first ``--event-loop``, once per
``--doorbell`` mode (``PGBRIDGE_DOORBELL``: adaptive, on = always
ring, off = always poll), each in a fresh database with the same parameters. ``--writers``
connections (threads, default 4) share one global schedule, so the heavy rate is really
sustained; rows are numbered and stamped as below, and each row's phase is known by its
number. Reported per mode and phase: rows written and the rate actually reached (and how late
the writers got), delivered/expected, duplicates, gaps and reorders (each client is in one
room, whose ``seq`` must grow by exactly 1), p50/p99/max latency, and the CPU seconds of the
daemon and of the bench database's backends (/proc) and the machine's load; then the same
latencies split by the daemon's doorbell state when each row was sent, the doorbell switches
with their time from the phase starts (the daemon's JSON log, ``doorbell_quiet``,
``doorbell_settling``, ``doorbell_ringing``; it runs at ``PGBRIDGE_LOG_LEVEL=INFO`` here), p99
and max per second, and the goals: light p99 <= 3 ms (first and last light phase, adaptive),
heavy p99 <= 25 ms at the heavy rate, nothing lost, duplicated or reordered. The switch
scenario takes about a minute per mode, so it is not in the default list (which stays as it
was); name it.

``--scenario idle``: N idle connections (default 10,000, ``--clients``), each its own user,
client ``i`` subscribed to room ``i % R`` (R default 10, ``--rooms``; baseline: connected to
``/ws/{room}``, ready at the handshake), opened across ``--procs`` processes with at most 50
handshakes in flight per process, and no writes. Per system: the server's RSS (VmRSS,
/proc/PID/status) once settled (moving by at most 256 KB over 1 s) after it is healthy and
before any client, and again after the last client is ready, as KB per connection = (after -
before) / N; and its CPU seconds (sampled every 10 ms) from the first connect to the last
client ready, as µs per handshake + subscribe; then the ratio pgbridge/baseline and the goals:
<= 10 KB per connection, <= 400 µs per handshake + subscribe. The daemon gets
``PGBRIDGE_MAX_CONNECTIONS`` = N + 100, and this process raises its soft limit of open files to
the hard one, which the servers and the client processes inherit.

``--scenario catchup`` (pgbridge only): one room whose log holds E events (default 50,000,
``--events``: the room's creation and membership, then messages inserted through pgbridge's
triggers, INSERT ... SELECT, 10,000 rows per transaction, before the daemon starts; its last seq
in change_events must be E); then one client, in this process (asyncio), subscribes with
``"since": 0``, parses every frame with ``json.loads`` and checks the events are seq 1..E of
the room, in order. Reported per run: events/s = E / (subscribe sent -> the E-th event
parsed), the daemon's CPU seconds from the connect to then and µs per event, this process's
(the client's) CPU seconds, frames per message; goal >= 50,000 events/s.

Systems (one after the other, each in a database of its own on the same server):

* ``pgbridge``: ``python -m daemon`` in a subprocess (schema applied as setup_db.py does);
  each client subscribes to its room over ``/ws``;
* ``baseline``: encode/broadcaster (postgres backend) behind a Starlette WebSocket endpoint on
  uvicorn with its defaults (``--loop auto``: uvloop when installed), fed by a plain NOTIFY
  trigger (bench/baseline_broadcaster.py); each client connects to ``/ws/{room}``. It runs
  once per scenario, whatever ``--batch`` and ``--event-loop`` say.

Clients run in ``--procs`` processes of their own (asyncio, websockets' sans-I/O client so the
measuring side stays cheap); client ``i`` is in room ``i % R``. One writer in this process
inserts ``messages`` round-robin over the rooms at the fixed rate, each row stamped in SQL with
``clock_timestamp()`` (``metadata.bench_t``) and numbered (``metadata.n``); a client's latency
for a row is its receive time minus that stamp (same machine, same clock), so it covers the
trigger, commit, NOTIFY, the server and the client's own parsing.

Reported per run (light, fanout, custom): delivered/expected (expected = rows written x clients
of their room; counted after a drain of up to ``--drain`` seconds), duplicates, connections
lost, deliveries/s (delivered / time from the first insert to the last receive), latency
p50/p99/max, µs of daemon CPU per delivery (the server process's user + system CPU seconds from
/proc over the writes and the drain, divided by the deliveries: its own CPU time, so the figure
holds when the clients starve the machine) and frames per message; then, per pgbridge run, the
ratio to the baseline (deliveries/s, p50, p99, daemon CPU per delivery) and the goal. The server
is ``--dsn`` (needs CREATEDB) or an embedded PostgreSQL in ``--data-dir``; the bench databases
are dropped at the end. ``--profile DIR`` records each daemon with py-spy into
``DIR/<run>-<scenario>.folded.txt``; ``--log-dir DIR`` keeps the servers' logs
(``<run>-<scenario>.log``).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import gc
import itertools
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench.common import (
    ROOT,
    SECRET,
    SEQ,
    STAMP,
    WRITE,
    CpuMeter,
    Scenario,
    WsClient,
    clean_env,
    free_port,
    machine_busy,
    open_clients,
    proc_cpu,
    process,
    scratch_database,
    server_conninfo,
    setup_pgbridge,
)


@dataclass
class Result:
    system: str
    expected: int = 0
    delivered: int = 0
    duplicates: int = 0
    lost_connections: int = 0
    written: int = 0
    write_seconds: float = 0.0
    span: float = 0.0
    latencies: array[float] = field(default_factory=lambda: array("d"))
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core, writes + drain
    server_cpu: float = 0.0  # CPU seconds of the server process, writes + drain
    messages: int = 0  # text messages the clients received after subscribed
    frames: int = 0  # frames in them
    batched: int = 0  # clients whose welcome said "batch"
    error: str | None = None
    _sorted: list[float] | None = None

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        if self._sorted is None or len(self._sorted) != len(self.latencies):
            self._sorted = sorted(self.latencies)
        ordered = self._sorted
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def per_s(self) -> float:
        return self.delivered / self.span if self.span > 0 else 0.0

    @property
    def cpu_us(self) -> float:
        """µs of the server's CPU per delivery (nan without deliveries)."""
        return 1e6 * self.server_cpu / self.delivered if self.delivered else float("nan")


@dataclass(frozen=True)
class Variant:
    """One way of running pgbridge: ``batch`` (``?batch=``; None: no parameter) and the
    daemon's ``PGBRIDGE_EVENT_LOOP``. Named ``pgbridge``, ``pgbridge batch=0``,
    ``pgbridge batch=0 uvloop``, ... (asyncio, the first choice, is not named)."""

    batch: int | None = None
    loop: str = "asyncio"

    @property
    def name(self) -> str:
        return " ".join(["pgbridge", *([f"batch={self.batch}"] if self.batch is not None
                                       else []), *([self.loop] if self.loop != "asyncio"
                                                   else [])])

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "-").replace("=", "")

    @property
    def env(self) -> dict[str, str]:
        return {"PGBRIDGE_EVENT_LOOP": self.loop}


def variants(args: argparse.Namespace) -> list[Variant]:
    """Every ``--batch`` value times every ``--event-loop``, batch first."""
    return [Variant(batch, loop) for batch in args.batch for loop in args.event_loop]


# --- clients (in their own processes) ---------------------------------------------------------

class _Sink:
    """What the clients of one process record: per delivery, the row number ``n`` and the
    latency; and the odd deliveries as ``(n, kind)``: a duplicate (``DUP``, a row this client
    already had), a gap (``GAP``, the room's seq jumped past the next one) or a reorder
    (``REORDER``, a seq at or below one already delivered, not a duplicate)."""

    def __init__(self) -> None:
        self.lat: array[float] = array("d")
        self.ns: array[int] = array("q")
        self.odd: list[tuple[int, int]] = []


DUP, GAP, REORDER = 0, 1, 2






class _Client(WsClient):
    """Counts stamped frames and records receive time - stamp. Each client is in one room:
    where frames carry the room's ``seq`` (pgbridge), it must grow by exactly 1. A message is
    split on ``b"\\n"`` and each line handled as a frame; messages and frames are counted."""

    def __init__(self, url: str, subscribe: bytes | None, sink: _Sink) -> None:
        super().__init__(url, subscribe)
        self.sink = sink
        self.seen: set[int] = set()
        self.seq = -1  # highest seq delivered so far (-1: none yet)
        self.delivered = 0
        self.messages = 0
        self.frames = 0
        self.last = 0.0

    def on_text(self, data: bytes, now: float) -> None:
        self.messages += 1
        if b"\n" not in data:
            self.frames += 1
            self.on_frame(data, now)
            return
        lines = data.split(b"\n")
        self.frames += len(lines)
        for line in lines:
            self.on_frame(line, now)

    def on_frame(self, data: bytes, now: float) -> None:
        match = STAMP.search(data)
        if match is None:
            return
        n = int(match.group(1))
        sink = self.sink
        self.delivered += 1
        if n in self.seen:
            sink.odd.append((n, DUP))
        else:
            self.seen.add(n)
            seq = SEQ.search(data)
            if seq is not None:
                value = int(seq.group(1))
                if self.seq >= 0 and value != self.seq + 1:
                    sink.odd.append((n, GAP if value > self.seq else REORDER))
                self.seq = max(self.seq, value)
        sink.ns.append(n)
        sink.lat.append(now - float(match.group(2)))
        self.last = now




async def _clients(specs: list[tuple[str, bytes | None]], ready: Any, results: Any, stop: Any,
                   counter: Any, index: int) -> None:
    sink = _Sink()
    clients: list[_Client] = []

    first = time.time()
    try:
        clients = await open_clients(specs, lambda url, sub: _Client(url, sub, sink))
    except Exception as exc:
        ready.put((index, f"{type(exc).__name__}: {exc}", first, time.time()))
        return
    last = time.time()
    gc.collect()
    gc.freeze()
    ready.put((index, None, first, last))
    while not stop.is_set():
        counter.value = sum(c.delivered for c in clients)
        await asyncio.sleep(0.1)
    delivered = sum(c.delivered for c in clients)
    results.put((delivered, delivered - sum(len(c.seen) for c in clients),
                 sum(c.lost for c in clients), max((c.last for c in clients), default=0.0),
                 sink.lat.tobytes(), sink.ns.tobytes(), sink.odd,
                 sum(c.messages for c in clients), sum(c.frames for c in clients),
                 sum(b'"batch"' in c.welcome for c in clients)))  # a Delivered
    for client in clients:
        if client.transport is not None:
            client.transport.abort()


def client_process(specs: list[tuple[str, bytes | None]], ready: Any, results: Any, stop: Any,
                   counter: Any, index: int) -> None:
    asyncio.run(_clients(specs, ready, results, stop, counter, index))


@dataclass
class Delivered:
    """What one client process received (latencies and row numbers as array bytes; sent as a
    tuple: a class of a spawned ``__main__`` would not unpickle here)."""

    delivered: int
    duplicates: int
    lost: int
    last: float  # wall time of the last receive
    lat: bytes
    ns: bytes
    odd: list[tuple[int, int]]
    messages: int = 0  # text messages after subscribed
    frames: int = 0  # frames in them (one per message without ?batch=)
    batched: int = 0  # clients whose welcome frame says "batch"


class Fleet:
    """``specs`` spread over ``procs`` client processes (client ``i`` in process ``i % procs``):
    :meth:`start` connects them all and returns once every one is subscribed (``connecting``:
    wall times of the first connect and of the last client ready, over all processes);
    :meth:`drain` waits for deliveries; :meth:`collect` stops them and returns what they
    received."""

    def __init__(self, specs: list[tuple[str, bytes | None]], procs: int) -> None:
        ctx = mp.get_context("spawn")
        self.ready, self.results, self.stop = ctx.Queue(), ctx.Queue(), ctx.Event()
        n = max(1, min(procs, len(specs)))
        self.counters = [ctx.Value("q", 0, lock=False) for _ in range(n)]
        self.procs = [ctx.Process(target=client_process, daemon=True,
                                  args=(specs[i::n], self.ready, self.results, self.stop,
                                        self.counters[i], i))
                      for i in range(n)]
        self.connecting = (0.0, 0.0)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid]

    def start(self) -> None:
        for p in self.procs:
            p.start()
        spans = []
        for _ in self.procs:
            index, error, first, last = self.ready.get(timeout=180)
            if error:
                raise RuntimeError(f"client process {index} could not connect: {error}")
            spans.append((first, last))
        self.connecting = (min(f for f, _ in spans), max(t for _, t in spans))

    def delivered(self) -> int:
        return sum(int(c.value) for c in self.counters)

    def drain(self, expected: int, seconds: float) -> None:
        """Wait until ``expected`` deliveries arrived, at most ``seconds``, or 3 s without
        progress."""
        best, best_at = -1, time.monotonic()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            got = self.delivered()
            if got >= expected:
                break
            if got > best:
                best, best_at = got, time.monotonic()
            elif time.monotonic() - best_at > 3.0:
                break  # no progress for 3 s
            time.sleep(0.1)

    def collect(self) -> list[Delivered]:
        self.stop.set()
        return [Delivered(*self.results.get(timeout=60)) for _ in self.procs]

    def close(self) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


# --- CPU accounting (Linux /proc; empty elsewhere) -------------------------------------------









class CpuTrace:
    """Samples process ``pid``'s CPU seconds every ``interval`` seconds in a thread while the
    block runs; :meth:`between` gives the CPU used between two wall times (from the last sample
    at or before the first to the first sample at or after the second: never less)."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((time.time(), proc_cpu(self.pid)))
            if self._stop.wait(self.interval):
                self.samples.append((time.time(), proc_cpu(self.pid)))
                return

    def __enter__(self) -> CpuTrace:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, t0: float, t1: float) -> float:
        times = [t for t, _ in self.samples]
        a = max(0, bisect.bisect_right(times, t0) - 1)
        b = min(len(times) - 1, bisect.bisect_left(times, t1))
        return self.samples[b][1] - self.samples[a][1] if times else 0.0


def rss_kb(pid: int) -> int:
    """Resident set size (VmRSS, KB) of process ``pid``; 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def settled_rss(pid: int, *, window: float = 1.0, within_kb: int = 256,
                timeout: float = 15.0) -> int:
    """Process ``pid``'s RSS (KB) once it moved by at most ``within_kb`` over ``window`` seconds
    (sampled every 0.1 s), or after ``timeout`` seconds."""
    steps = max(2, round(window / 0.1) + 1)
    recent: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        recent = [*recent, rss_kb(pid)][-steps:]
        steady = len(recent) == steps and max(recent) - min(recent) <= within_kb
        if steady or time.monotonic() > deadline:
            return recent[-1]
        time.sleep(0.1)


# --- databases and servers --------------------------------------------------------------------



def asyncpg_url(conninfo: str) -> str:
    """A postgresql:// URL (what asyncpg takes) for a libpq conninfo of any form."""
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(conninfo)
    user = quote(str(parts.get("user") or ""), safe="")
    password = parts.get("password")
    auth = f"{user}:{quote(str(password), safe='')}@" if password else (f"{user}@" if user else "")
    host = str(parts.get("host") or "")
    query = ""
    if host.startswith("/"):
        query, host = f"?host={quote(host)}", ""
    port = f":{parts['port']}" if parts.get("port") and host else ""
    if parts.get("port") and not host:
        query += f"&port={parts['port']}" if query else f"?port={parts['port']}"
    return f"postgresql://{auth}{host}{port}/{parts.get('dbname') or ''}{query}"














def write(db: str, rooms: list[tuple[str, str]], rate: float,
          seconds: float) -> tuple[dict[str, int], float, float, float]:
    """Insert round-robin over ``rooms`` at ``rate`` rows/s for ``seconds``. Returns rows per
    room, wall time of the first insert, seconds it took and the achieved rate."""
    import psycopg

    counts = dict.fromkeys((room for room, _ in rooms), 0)
    total = int(rate * seconds)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("SELECT 1")
        start_wall = time.time()
        t0 = time.perf_counter()
        for i in range(total):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            room, user = rooms[i % len(rooms)]
            conn.execute(WRITE, (room, user, f"bench message {i}", i), prepare=True)
            counts[room] += 1
        took = time.perf_counter() - t0
    return counts, start_wall, took, total / took if took else 0.0


def run_clients_and_writer(system: str, sc: Scenario, db: str,
                           specs: list[tuple[str, bytes | None]], rooms: list[tuple[str, str]],
                           room_of_client: list[str], args: argparse.Namespace,
                           server_pid: int) -> Result:
    fleet = Fleet(specs, args.procs)
    result = Result(system)
    try:
        fleet.start()
        time.sleep(args.settle)  # let every server-side subscription settle
        meter = CpuMeter({"server": [server_pid], "clients": fleet.pids,
                          "writer": [os.getpid()]})
        meter.start()
        counts, first, result.write_seconds, _ = write(db, rooms, sc.rate, args.seconds)
        result.written = sum(counts.values())
        result.expected = sum(counts[room] for room in room_of_client)
        fleet.drain(result.expected, args.drain)
        result.cpu = meter.stop()
        result.server_cpu = meter.seconds["server"]
        last = 0.0
        for got in fleet.collect():
            result.delivered += got.delivered
            result.duplicates += got.duplicates
            result.lost_connections += got.lost
            result.messages += got.messages
            result.frames += got.frames
            result.batched += got.batched
            last = max(last, got.last)
            result.latencies.frombytes(got.lat)
        result.span = last - first if last > first else 0.0
    finally:
        fleet.close()
    return result


def pgbridge_run(db: str, members: list[tuple[str, str]], args: argparse.Namespace,
                 batch: int | None = None, since: int | None = None,
                 **env: str) -> tuple[int, dict[str, str], list[tuple[str, bytes | None]]]:
    """What starting the daemon on ``db`` takes: a free port, its environment (``env`` added,
    log level WARNING unless given) and one ``(url, subscribe frame)`` per ``(user, room)`` of
    ``members``; ``batch``: ``&batch=`` in each URL, ``since``: in each subscribe."""
    from daemon.auth import mint_token

    port = free_port()
    environment = clean_env() | {
        "DATABASE_URL": db, "PGBRIDGE_JWT_SECRET": SECRET, "PGBRIDGE_PORT": str(port),
        "PGBRIDGE_QUEUE_SIZE": str(args.queue_size), "PGBRIDGE_LOG_LEVEL": "WARNING",
    } | env
    url = f"ws://127.0.0.1:{port}/ws?{'' if batch is None else f'batch={batch}&'}token="
    extra = "" if since is None else f',"since":{since}'
    specs: list[tuple[str, bytes | None]] = [
        (url + mint_token(SECRET, user, ttl=3600),
         f'{{"type":"subscribe","room":"{room}"{extra}}}'.encode()) for user, room in members]
    return port, environment, specs


@contextlib.contextmanager
def pgbridge_daemon(db: str, members: list[tuple[str, str]], args: argparse.Namespace,
                    variant: Variant, log: Path, profile: str, since: int | None = None,
                    **env: str) -> Iterator[tuple[subprocess.Popen[bytes],
                                                  list[tuple[str, bytes | None]]]]:
    """The daemon on ``db`` run as ``variant`` (``env`` added), logging to ``log``, recorded
    by py-spy as ``profile`` under ``--profile``: the process and the clients' specs (as
    :func:`pgbridge_run`'s)."""
    port, environment, specs = pgbridge_run(db, members, args, variant.batch, since,
                                            **variant.env, **env)
    with process([sys.executable, "-m", "daemon"], environment, port, variant.name,
                 log) as proc:
        loaded = uses_uvloop(proc.pid)
        if loaded is not None and loaded != (variant.loop == "uvloop"):
            print(f"  note: {variant.name} ({profile}): the daemon has "
                  f"{'' if loaded else 'not '}loaded uvloop (PGBRIDGE_EVENT_LOOP="
                  f"{variant.loop} not applied?)", flush=True)
        profiler = start_profiler(args, proc.pid, profile)
        try:
            yield proc, specs
        finally:
            stop_profiler(profiler)


def uses_uvloop(pid: int) -> bool | None:
    """Whether process ``pid`` has uvloop's extension mapped (None: unknown)."""
    try:
        return "/uvloop/" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None


def run_pgbridge(server: str, sc: Scenario, args: argparse.Namespace, logdir: Path,
                 variant: Variant) -> Result:
    with scratch_database(server, "pgbridge") as db:
        rooms, members = setup_pgbridge(db, sc)
        with pgbridge_daemon(db, members, args, variant,
                             logdir / f"{variant.slug}-{sc.name}.log",
                             f"{variant.slug}-{sc.name}") as (proc, specs):
            return run_clients_and_writer(variant.name, sc, db, specs, rooms,
                                          [room for _, room in members], args, proc.pid)


@contextlib.contextmanager
def baseline_server(server: str, rooms: int, clients: int,
                    log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes],
                                                 list[tuple[str, bytes | None]]]]:
    """The baseline on a database of its own: the database, the uvicorn process, and one
    ``(url, None)`` per client (client ``i`` in room ``r{i % rooms}``)."""
    import psycopg
    from baseline_broadcaster import SETUP_SQL

    with scratch_database(server, "baseline") as db:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(SETUP_SQL.encode())
        port = free_port()
        env = clean_env() | {"BASELINE_DATABASE_URL": asyncpg_url(db)}
        specs: list[tuple[str, bytes | None]] = [
            (f"ws://127.0.0.1:{port}/ws/r{i % rooms}", None) for i in range(clients)]
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "bench"),
               "baseline_broadcaster:app", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning", "--no-access-log"]
        with process(cmd, env, port, "baseline (uvicorn)", log) as proc:
            yield db, proc, specs


def run_baseline(server: str, sc: Scenario, args: argparse.Namespace, logdir: Path) -> Result:
    with baseline_server(server, sc.rooms, sc.clients, logdir / f"baseline-{sc.name}.log") as (
            db, proc, specs):
        rooms = [(f"r{k}", "bench") for k in range(sc.rooms)]
        return run_clients_and_writer("baseline", sc, db, specs, rooms,
                                      [f"r{i % sc.rooms}" for i in range(sc.clients)], args,
                                      proc.pid)


# --- the switch scenario: light -> heavy -> light, per doorbell mode ---------------------------

LIGHT_P99_MS = 3.0  # goal at light load (adaptive)
HEAVY_P99_MS = 25.0  # goal at heavy load
STATES = ("ringing", "quiet", "settling")  # the daemon's doorbell modes (daemon/doorbell.py)


@dataclass(frozen=True)
class Phase:
    name: str
    rate: float  # inserts per second, all rooms together
    seconds: float

    @property
    def rows(self) -> int:
        return int(self.rate * self.seconds)


@dataclass(frozen=True)
class Switch:
    """The switch scenario: ``clients`` in ``rooms`` while the insert rate goes through
    ``phases``, written by ``writers`` connections sharing one schedule."""

    clients: int
    rooms: int
    phases: tuple[Phase, ...]
    writers: int

    def describe(self) -> str:
        steps = " -> ".join(f"{p.name} {p.rate:,.0f}/s for {p.seconds:g} s" for p in self.phases)
        return (f"switch: {self.clients} clients in {self.rooms} rooms, {steps} "
                f"({self.writers} writer connections)")


@dataclass
class Sample:
    """Counters read at a phase boundary."""

    wall: float
    daemon: float  # CPU seconds of the daemon so far
    db: float  # CPU seconds of the bench database's backends so far
    rest: float  # CPU seconds of the client processes and this one so far
    busy: tuple[float, float]  # machine_busy()


@dataclass
class Written:
    """What the writers did. Times: ``t0`` wall time of the first phase's start, ``offsets``
    seconds after it (one per phase, then the scheduled end)."""

    t0: float
    offsets: list[float]
    phase_of: array[int]  # per row n
    sent: array[float]  # per row n: wall time its insert was sent
    done: list[float]  # per phase: seconds after t0 when its last insert returned
    late: list[float]  # per phase: the most an insert was sent behind its schedule, seconds
    samples: list[Sample]  # at each phase start, at the end of the writes (then the drain's)
    errors: list[str]


def write_phases(db: str, rooms: list[tuple[str, str]], sw: Switch,
                 sample: Any) -> Written:
    """Insert round-robin over ``rooms`` (row ``n`` in ``rooms[n % R]``) on one global
    schedule: phase by phase, row ``j`` of a phase at ``start + j / rate``. ``sw.writers``
    threads, each with its own connection, take the next row number in turn and send it at
    its time (late rows at once). ``sample()`` is called at each phase start and at the end."""
    import psycopg

    phases = sw.phases
    offsets = list(itertools.accumulate((p.seconds for p in phases), initial=0.0))
    schedule: array[float] = array("d")
    phase_of: array[int] = array("b")
    for k, ph in enumerate(phases):
        schedule.extend(offsets[k] + j / ph.rate for j in range(ph.rows))
        phase_of.extend([k] * ph.rows)
    total = len(schedule)
    sent = array("d", bytes(8 * total))
    taken = itertools.count()  # next() is atomic under the GIL
    late = [[0.0] * len(phases) for _ in range(sw.writers)]
    done = [[0.0] * len(phases) for _ in range(sw.writers)]
    errors: list[str] = []
    conns = [psycopg.connect(db, autocommit=True) for _ in range(sw.writers)]
    try:
        for conn in conns:
            conn.execute("SELECT 1")
        start = time.perf_counter() + 0.2
        t0 = time.time() + (start - time.perf_counter())

        def writer(k: int) -> None:
            conn, my_late, my_done = conns[k], late[k], done[k]
            try:
                while (i := next(taken)) < total:
                    due = start + schedule[i]
                    now = time.perf_counter()
                    if due > now:
                        time.sleep(due - now)
                        now = time.perf_counter()
                    p = phase_of[i]
                    my_late[p] = max(my_late[p], now - due)
                    sent[i] = t0 + (now - start)
                    room, user = rooms[i % len(rooms)]
                    conn.execute(WRITE, (room, user, f"bench message {i}", i), prepare=True)
                    my_done[p] = max(my_done[p], time.perf_counter() - start)
            except Exception as exc:  # reported; the other writers go on
                errors.append(f"writer {k}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=writer, args=(k,), daemon=True)
                   for k in range(sw.writers)]
        for thread in threads:
            thread.start()
        samples = []
        for offset in offsets[:-1]:
            delay = start + offset - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            samples.append(sample())
        for thread in threads:
            thread.join()
        samples.append(sample())
    finally:
        for conn in conns:
            conn.close()
    return Written(t0=t0, offsets=offsets, phase_of=phase_of, sent=sent,
                   done=[max(d[p] for d in done) for p in range(len(phases))],
                   late=[max(x[p] for x in late) for p in range(len(phases))],
                   samples=samples, errors=errors)


def doorbell_log(log: Path) -> list[tuple[float, str]]:
    """The daemon's doorbell switches from its JSON log lines: ``(wall time, state)``."""
    from datetime import datetime

    out = []
    for line in log.read_text(errors="replace").splitlines():
        if '"doorbell_' not in line:
            continue
        try:
            entry = json.loads(line)
            event = str(entry.get("event") or "")
            if event.startswith("doorbell_") and event[9:] in STATES:
                out.append((datetime.fromisoformat(entry["ts"]).timestamp(), event[9:]))
        except (ValueError, KeyError, TypeError):
            continue
    return sorted(out)


def pct(ordered: list[float], q: float) -> float:
    """Percentile ``q`` of sorted seconds, in ms (nan when empty)."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


@dataclass
class PhaseStats:
    name: str
    rows: int = 0
    rate: float = 0.0  # rows/s actually written: rows / (phase start -> last insert returned)
    late: float = 0.0  # seconds the most late insert was sent behind its schedule
    expected: int = 0
    delivered: int = 0  # distinct (client, row)
    duplicates: int = 0
    gaps: int = 0
    reorders: int = 0
    latencies: list[float] = field(default_factory=list)  # sorted, seconds
    daemon_cpu: float = 0.0  # seconds
    db_cpu: float = 0.0  # seconds
    machine: float = 0.0  # % of one core, all cores together
    others: float = 0.0  # % of one core: the machine minus daemon, backends, clients, writers
    wall: float = 0.0  # seconds between the samples


@dataclass
class SwitchRun:
    mode: str
    phases: list[PhaseStats] = field(default_factory=list)
    transitions: list[tuple[float, str]] = field(default_factory=list)  # (s after t0, state)
    by_state: dict[tuple[int, str], list[float]] = field(default_factory=dict)  # sorted
    seconds: dict[int, tuple[list[float], str]] = field(default_factory=dict)  # per second
    drain_cpu: float = 0.0
    lost_connections: int = 0
    errors: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def lossless(self) -> bool:
        return all(p.delivered == p.expected and not (p.duplicates or p.gaps or p.reorders)
                   for p in self.phases) and not self.lost_connections and not self.errors


def analyse(sw: Switch, mode: str, w: Written, got: list[Delivered],
            transitions: list[tuple[float, str]]) -> SwitchRun:
    run = SwitchRun(mode, transitions=[(t - w.t0, s) for t, s in transitions])
    run.errors = w.errors
    per_room = [0] * sw.rooms
    for i in range(sw.clients):
        per_room[i % sw.rooms] += 1
    stats = [PhaseStats(p.name) for p in sw.phases]
    times = [t for t, _ in run.transitions]
    state_of = array("b", bytes(len(w.phase_of)))  # doorbell state when the row was sent
    second_of = array("l", bytes(8 * len(w.phase_of)))
    for n, p in enumerate(w.phase_of):
        stats[p].rows += 1
        stats[p].expected += per_room[n % sw.rooms]
        at = w.sent[n] - w.t0
        k = bisect.bisect_right(times, at)
        state_of[n] = STATES.index(run.transitions[k - 1][1]) if k else 0
        second_of[n] = int(at)
    by_state: dict[tuple[int, str], list[float]] = {}
    per_second: dict[int, list[float]] = {}
    states_in: dict[int, list[int]] = {}
    for d in got:
        run.lost_connections += d.lost
        ns: array[int] = array("q")
        ns.frombytes(d.ns)
        lat: array[float] = array("d")
        lat.frombytes(d.lat)
        for n, x in zip(ns, lat, strict=True):
            p = w.phase_of[n]
            stats[p].latencies.append(x)
            stats[p].delivered += 1
            by_state.setdefault((p, STATES[state_of[n]]), []).append(x)
            per_second.setdefault(second_of[n], []).append(x)
        for n, kind in d.odd:
            ph = stats[w.phase_of[n]]
            if kind == DUP:
                ph.duplicates += 1
                ph.delivered -= 1
            elif kind == GAP:
                ph.gaps += 1
            else:
                ph.reorders += 1
    for n, s in enumerate(state_of):
        states_in.setdefault(second_of[n], [0, 0, 0])[s] += 1
    for k, ph in enumerate(stats):
        ph.latencies.sort()
        ph.late = w.late[k]
        took = w.done[k] - w.offsets[k]
        ph.rate = ph.rows / took if took > 0 else 0.0
        a, b = w.samples[k], w.samples[k + 1]
        ph.daemon_cpu, ph.db_cpu, ph.wall = b.daemon - a.daemon, b.db - a.db, b.wall - a.wall
        if b.busy[1] > a.busy[1]:
            ph.machine = 100 * (os.cpu_count() or 1) * (b.busy[0] - a.busy[0]) / (
                b.busy[1] - a.busy[1])
            if ph.wall > 0:
                ours = ph.daemon_cpu + ph.db_cpu + b.rest - a.rest
                ph.others = max(0.0, ph.machine - 100 * ours / ph.wall)
    if len(w.samples) > len(stats) + 1:
        run.drain_cpu = w.samples[-1].daemon - w.samples[len(stats)].daemon
    run.phases = stats
    run.by_state = {key: sorted(v) for key, v in by_state.items()}
    for second, values in per_second.items():
        counts = states_in.get(second, [1, 0, 0])
        run.seconds[second] = (sorted(values), STATES[counts.index(max(counts))])
    return run


def run_switch(server: str, sw: Switch, mode: str, args: argparse.Namespace,
               log: Path) -> SwitchRun:
    """One run of the switch scenario with ``PGBRIDGE_DOORBELL=mode``, in a new database;
    the daemon logs to ``log``."""
    import psycopg

    sc = Scenario(f"switch-{mode}", sw.clients, sw.rooms, max(p.rate for p in sw.phases))
    with scratch_database(server, "switch") as db:
        rooms, members = setup_pgbridge(db, sc)
        port, env, specs = pgbridge_run(db, members, args, PGBRIDGE_LOG_LEVEL="INFO",
                                        PGBRIDGE_DOORBELL=mode,
                                        PGBRIDGE_EVENT_LOOP=args.event_loop[0])
        with process([sys.executable, "-m", "daemon"], env, port, "pgbridge", log) as proc:
            profiler = start_profiler(args, proc.pid, f"pgbridge-{sc.name}")
            fleet = Fleet(specs, args.procs)
            try:
                fleet.start()
                time.sleep(args.settle)
                with psycopg.connect(db, autocommit=True) as monitor:

                    def sample() -> Sample:
                        pids = [r[0] for r in monitor.execute(
                            "SELECT pid FROM pg_stat_activity WHERE datname = "
                            "current_database() AND pid <> pg_backend_pid()").fetchall()]
                        return Sample(time.time(), proc_cpu(proc.pid),
                                      sum(map(proc_cpu, pids)),
                                      sum(map(proc_cpu, [*fleet.pids, os.getpid()])),
                                      machine_busy())

                    written = write_phases(db, rooms, sw, sample)
                    per_room = [0] * sw.rooms
                    for i in range(sw.clients):
                        per_room[i % sw.rooms] += 1
                    fleet.drain(sum(per_room[n % sw.rooms] for n in range(len(written.sent))),
                                args.drain)
                    written.samples.append(sample())
                got = fleet.collect()
            finally:
                fleet.close()
                stop_profiler(profiler)
    return analyse(sw, mode, written, got, doorbell_log(log))


def at_phase(sw: Switch, t: float) -> str:
    """``t`` seconds after the first phase's start, as ``phase+s``."""
    start = 0.0
    if t < 0:
        return f"start{t:+.2f}s"
    for ph in sw.phases[:-1]:
        if t < start + ph.seconds:
            break
        start += ph.seconds
    else:
        ph = sw.phases[-1]
    return f"{ph.name}+{t - start:.2f}s"


def fmt_ms(value: float) -> str:
    return "n/a" if value != value else f"{value:.1f}" if value < 10 else f"{value:.0f}"


def cpu_share(seconds: float, wall: float) -> str:
    return f"{seconds:5.2f} ({100 * seconds / wall:3.0f}%)" if wall > 0 else f"{seconds:5.2f}"


def report_switch(sw: Switch, runs: list[SwitchRun]) -> None:
    print(f"\n== {sw.describe()}")
    print("pgbridge only; one fresh database and daemon per doorbell mode; latency: commit "
          "stamp -> client receive; late: the most an insert was sent behind schedule; cpu: "
          "seconds in the phase (% of one core); db: the bench database's backends; machine: "
          "all cores; others: the machine minus this bench's processes (interrupts, i.e. "
          "loopback networking, PostgreSQL's background processes, anything else running: "
          "well above 10-20% means another load spoiled the figures)")
    print(f"{'mode':<9} {'phase':<7} {'rows':>6} {'rows/s':>7} {'late ms':>8} "
          f"{'delivered/expected':>19} {'dup':>4} {'gap':>4} {'reord':>5} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'max ms':>7} {'daemon cpu':>13} {'db cpu':>12} {'machine':>8} "
          f"{'others':>7}")
    for run in runs:
        if run.error:
            print(f"{run.mode:<9} error: {run.error}")
            continue
        for ph in run.phases:
            print(f"{run.mode:<9} {ph.name:<7} {ph.rows:>6,} {ph.rate:>7,.0f} "
                  f"{ph.late * 1000:>8.1f} {f'{ph.delivered:,}/{ph.expected:,}':>19} "
                  f"{ph.duplicates:>4} {ph.gaps:>4} {ph.reorders:>5} "
                  f"{fmt_ms(pct(ph.latencies, 0.5)):>7} {fmt_ms(pct(ph.latencies, 0.99)):>7} "
                  f"{fmt_ms(pct(ph.latencies, 1.0)):>7} {cpu_share(ph.daemon_cpu, ph.wall):>13} "
                  f"{cpu_share(ph.db_cpu, ph.wall):>12} {ph.machine:>7.0f}% "
                  f"{ph.others:>6.0f}%")
        extra = []
        if run.drain_cpu:
            extra.append(f"daemon cpu during the drain {run.drain_cpu:.2f} s")
        if run.lost_connections:
            extra.append(f"{run.lost_connections} client connections lost")
        extra += run.errors
        if extra:
            print(f"{'':<9} " + "; ".join(extra))

    print("\nby doorbell state (of the daemon when the row was sent; daemon log):")
    print(f"{'mode':<9} {'phase':<7} {'state':<9} {'deliveries':>10} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'max ms':>7}")
    for run in runs:
        for (k, state), values in sorted(run.by_state.items(),
                                         key=lambda kv: (kv[0][0], STATES.index(kv[0][1]))):
            print(f"{run.mode:<9} {sw.phases[k].name:<7} {state:<9} {len(values):>10,} "
                  f"{fmt_ms(pct(values, 0.5)):>7} {fmt_ms(pct(values, 0.99)):>7} "
                  f"{fmt_ms(pct(values, 1.0)):>7}")

    print("\ndoorbell switches (daemon log; phase+seconds since its start):")
    for run in runs:
        switches = ", ".join(f"{state} at {at_phase(sw, t)}" for t, state in run.transitions)
        print(f"  {run.mode:<9} {switches or 'none (ringing throughout)'}")

    print("\np99 / max ms per second of writes (by send time; r ringing, q quiet, s settling):")
    for run in runs:
        if run.error:
            continue
        print(f"  {run.mode}:")
        start = 0.0
        for phase in sw.phases:
            cells = []
            for second in range(int(start), int(start + phase.seconds)):
                values, state = run.seconds.get(second, ([], "ringing"))
                cells.append(f"{fmt_ms(pct(values, 0.99))}/{fmt_ms(pct(values, 1.0))}"
                             f"{state[0]}")
            print(f"    {phase.name:<7} " + " ".join(cells))
            start += phase.seconds

    print(f"\ngoals: light p99 <= {LIGHT_P99_MS:g} ms (first and last light phase, adaptive), "
          f"heavy p99 <= {HEAVY_P99_MS:g} ms at the heavy rate, nothing lost, duplicated or "
          f"reordered (shown for every mode, for comparison):")
    for run in runs:
        if run.error or len(run.phases) != 3:
            continue
        light1, heavy, light2 = run.phases
        verdicts = []
        for k, ph in ((0, light1), (2, light2)):
            p99 = pct(ph.latencies, 0.99)
            text = (f"{ph.name} p99 {fmt_ms(p99)} ms "
                    f"{'MET' if p99 <= LIGHT_P99_MS else 'MISSED'}")
            ringing = run.by_state.get((k, "ringing"), [])
            if k == 2 and any((k, state) in run.by_state for state in STATES[1:]):
                back = [t for t, s in run.transitions if s == "ringing"]
                p99r = pct(ringing, 0.99)
                text += (f" (once ringing again{f' from {at_phase(sw, back[-1])}' if back else ''}"
                         f": {fmt_ms(p99r)} ms "
                         f"{'MET' if p99r <= LIGHT_P99_MS else 'MISSED'})" if ringing else
                         " (never ringing again)")
            verdicts.append(text)
        p99 = pct(heavy.latencies, 0.99)
        target = sw.phases[1].rate
        kept_up = heavy.rate >= 0.98 * target
        verdicts.insert(1, f"heavy p99 {fmt_ms(p99)} ms at {heavy.rate:,.0f} rows/s "
                        f"{'MET' if p99 <= HEAVY_P99_MS and kept_up else 'MISSED'}"
                        f"{'' if kept_up else f' (writers behind {target:,.0f}/s)'}")
        verdicts.append(f"lossless {'MET' if run.lossless else 'MISSED'}")
        print(f"  {run.mode:<9} " + "; ".join(verdicts))
    sys.stdout.flush()


# --- the idle scenario: memory and CPU per connection -----------------------------------------

IDLE_KB_GOAL = 10.0  # KB of daemon RSS per idle, subscribed connection
IDLE_CPU_GOAL_US = 400.0  # µs of daemon CPU per handshake + subscribe


@dataclass
class IdleResult:
    system: str
    clients: int = 0
    rss_before: int = 0  # KB, the server settled before any client
    rss_after: int = 0  # KB, settled after the last client was ready
    connect_seconds: float = 0.0  # first connect -> last client ready
    server_cpu: float = 0.0  # CPU seconds of the server over that span
    lost: int = 0  # connections lost before the measurement ended
    batched: int = 0  # clients whose welcome said "batch"
    error: str | None = None

    @property
    def kb_per_connection(self) -> float:
        return (self.rss_after - self.rss_before) / self.clients if self.clients else 0.0

    @property
    def cpu_us(self) -> float:
        return 1e6 * self.server_cpu / self.clients if self.clients else 0.0


def measure_idle(system: str, specs: list[tuple[str, bytes | None]], pid: int,
                 args: argparse.Namespace) -> IdleResult:
    """Connect ``specs`` (across ``--procs`` processes) to the server ``pid`` and keep them
    connected: its RSS before (settled) and after (settled again), its CPU between the first
    connect and the last client ready."""
    result = IdleResult(system, len(specs))
    result.rss_before = settled_rss(pid)
    fleet = Fleet(specs, args.procs)
    try:
        with CpuTrace(pid) as trace:
            fleet.start()
        first, last = fleet.connecting
        result.connect_seconds = last - first
        result.server_cpu = trace.between(first, last)
        result.rss_after = settled_rss(pid)
        for got in fleet.collect():
            result.lost += got.lost
            result.batched += got.batched
    finally:
        fleet.close()
    return result


def run_idle_pgbridge(server: str, sc: Scenario, args: argparse.Namespace, logdir: Path,
                      variant: Variant) -> IdleResult:
    with scratch_database(server, "idle") as db:
        _, members = setup_pgbridge(db, sc)
        with pgbridge_daemon(db, members, args, variant, logdir / f"{variant.slug}-idle.log",
                             f"{variant.slug}-idle",
                             PGBRIDGE_MAX_CONNECTIONS=str(sc.clients + 100)) as (proc, specs):
            return measure_idle(variant.name, specs, proc.pid, args)


def run_idle_baseline(server: str, sc: Scenario, args: argparse.Namespace,
                      logdir: Path) -> IdleResult:
    with baseline_server(server, sc.rooms, sc.clients, logdir / "baseline-idle.log") as (
            _, proc, specs):
        return measure_idle("baseline", specs, proc.pid, args)


def report_idle(sc: Scenario, results: list[IdleResult]) -> None:
    print(f"\n== idle: {sc.clients:,} connections in {sc.rooms} rooms, each its own user, "
          f"subscribed (baseline: connected to /ws/{{room}}), no writes")
    print("RSS (VmRSS) settled before any client and after the last one was ready; cpu: the "
          "server's, first connect -> last client ready")
    print(f"{'system':<24} {'connected':>9} {'lost':>5} {'RSS before MB':>13} "
          f"{'RSS after MB':>12} {'KB/conn':>8} {'connect s':>9} {'cpu s':>6} "
          f"{'µs/conn':>8}")
    for r in results:
        if r.error:
            print(f"{r.system:<24} error: {r.error}")
            continue
        print(f"{r.system:<24} {r.clients:>9,} {r.lost:>5} {r.rss_before / 1024:>13.1f} "
              f"{r.rss_after / 1024:>12.1f} {r.kb_per_connection:>8.1f} "
              f"{r.connect_seconds:>9.2f} {r.server_cpu:>6.2f} {r.cpu_us:>8.0f}"
              + batch_note(r.system, r.batched, r.clients))
    ok = [r for r in results if not r.error]
    base = next((r for r in ok if r.system == "baseline"), None)
    for r in ok:
        if r.system == "baseline":
            continue
        if base is not None:
            print(f"ratio {r.system}/baseline: KB per connection "
                  f"{ratio(r.kb_per_connection, base.kb_per_connection)}, µs per handshake "
                  f"{ratio(r.cpu_us, base.cpu_us)}")
        print(f"goal ({r.system}): <= {IDLE_KB_GOAL:g} KB per connection "
              f"{verdict(r.kb_per_connection <= IDLE_KB_GOAL)} ({r.kb_per_connection:.1f}); "
              f"<= {IDLE_CPU_GOAL_US:g} µs per handshake + subscribe "
              f"{verdict(r.cpu_us <= IDLE_CPU_GOAL_US)} ({r.cpu_us:.0f})"
              + ("" if not r.lost else f"; {r.lost} connections lost"))
    sys.stdout.flush()


# --- the catchup scenario: one client replays a room's log --------------------------------------

CATCHUP_GOAL = 50000.0  # events per second


@dataclass
class CatchupResult:
    system: str
    events: int = 0  # in the room's log, all replayed
    received: int = 0  # event frames received in order
    seconds: float = 0.0  # subscribe sent -> the last event parsed
    server_cpu: float = 0.0  # CPU seconds of the daemon, connect -> the last event parsed
    client_cpu: float = 0.0  # CPU seconds of this process (the client) over the same span
    messages: int = 0
    frames: int = 0
    batched: bool = False  # the welcome said "batch"
    error: str | None = None

    @property
    def per_s(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0


class _CatchupClient(WsClient):
    """Parses every frame with ``json.loads`` (messages split on ``b"\\n"``) and checks the
    events are seq 1, 2, ... of ``room``; ``done`` resolves at the ``events``-th (or at the
    first one out of order)."""

    def __init__(self, url: str, subscribe: bytes | None, room: str, events: int) -> None:
        super().__init__(url, subscribe)
        self.room = room
        self.events = events
        self.received = 0
        self.messages = 0
        self.frames = 0
        self.finished = 0.0
        self.problem: str | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_text(self, data: bytes, now: float) -> None:
        self.messages += 1
        for line in data.split(b"\n"):
            self.frames += 1
            frame = json.loads(line)
            if frame.get("type") != "event" or self.done.done():
                continue
            if frame.get("seq") != self.received + 1 or frame.get("room") != self.room:
                self.problem = (f"after seq {self.received}: seq {frame.get('seq')} of room "
                                f"{frame.get('room')}")
                self.done.set_result(None)
                continue
            self.received += 1
            if self.received == self.events:
                self.finished = time.time()
                self.done.set_result(None)


async def catch_up(spec: tuple[str, bytes | None], room: str, events: int,
                   pid: int) -> CatchupResult:
    """One client replays ``events`` events of ``room`` from the daemon ``pid``."""
    result = CatchupResult("", events)
    cpu0, mine0 = proc_cpu(pid), time.process_time()
    (client,) = await open_clients([spec], lambda url, sub: _CatchupClient(url, sub, room,
                                                                           events))
    try:
        await asyncio.wait_for(asyncio.shield(client.done), max(60.0, events / 2000))
    except TimeoutError:
        result.error = f"timed out after {client.received:,} of {events:,} events"
    result.server_cpu = proc_cpu(pid) - cpu0
    result.client_cpu = time.process_time() - mine0
    if client.problem:
        result.error = f"out of order: {client.problem}"
    result.received, result.messages, result.frames = (client.received, client.messages,
                                                       client.frames)
    result.batched = b'"batch"' in client.welcome
    if client.finished:
        result.seconds = client.finished - client.subscribe_sent
    if client.transport is not None:
        client.transport.abort()
    return result


def write_backlog(db: str, room: str, user: str, events: int, chunk: int = 10000) -> None:
    """Messages in ``room`` through pgbridge's triggers until its log holds ``events`` events
    (the room's creation and its membership are already there), ``chunk`` rows per transaction
    (INSERT ... SELECT); the room's last seq in change_events must then be ``events``."""
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(max(seq), 0) FROM change_events WHERE room_id = %s",
                           [room]).fetchone()
        for start in range(1 + (row[0] if row else 0), events + 1, chunk):
            with conn.transaction():
                conn.execute("INSERT INTO messages (channel_id, user_id, content, metadata) "
                             "SELECT %s, %s, 'catch-up message ' || g, jsonb_build_object("
                             "'n', g) FROM generate_series(%s::bigint, %s::bigint) g",
                             [room, user, start, min(events, start + chunk - 1)])
        row = conn.execute("SELECT max(seq) FROM change_events WHERE room_id = %s",
                           [room]).fetchone()
    if row is None or row[0] != events:
        raise RuntimeError(f"the room's last seq is {row[0] if row else None}, not {events}")


def run_catchup(server: str, events: int, args: argparse.Namespace, logdir: Path,
                variant: Variant) -> CatchupResult:
    sc = Scenario("catchup", 1, 1, 0.0)
    with scratch_database(server, "catchup") as db:
        rooms, members = setup_pgbridge(db, sc)
        room, user = rooms[0]
        write_backlog(db, room, user, events)
        with pgbridge_daemon(db, members, args, variant, logdir / f"{variant.slug}-catchup.log",
                             f"{variant.slug}-catchup", since=0) as (proc, specs):
            result = asyncio.run(catch_up(specs[0], room, events, proc.pid))
    result.system = variant.name
    return result


def report_catchup(events: int, results: list[CatchupResult]) -> None:
    print(f"\n== catchup: one room holding {events:,} events, one client subscribes with "
          f"since=0 and parses every frame (json.loads, this process, asyncio)")
    print("time: subscribe sent -> the last event parsed; cpu: from the connect; frames/msg: "
          "frames per WebSocket message")
    print(f"{'system':<24} {'received':>9} {'seconds':>8} {'events/s':>9} {'daemon cpu s':>12} "
          f"{'µs/event':>8} {'client cpu s':>12} {'frames/msg':>10}  goal >= "
          f"{CATCHUP_GOAL:,.0f}/s")
    for r in results:
        if r.error and not r.received:
            print(f"{r.system:<24} error: {r.error}")
            continue
        us = 1e6 * r.server_cpu / r.received if r.received else float("nan")
        print(f"{r.system:<24} {r.received:>9,} {r.seconds:>8.2f} {r.per_s:>9,.0f} "
              f"{r.server_cpu:>12.2f} {us:>8.1f} {r.client_cpu:>12.2f} "
              f"{frames_per_message(r.frames, r.messages):>10}  "
              f"{verdict(r.per_s >= CATCHUP_GOAL and not r.error)}"
              + (f" ({r.error})" if r.error else "")
              + batch_note(r.system, int(r.batched), 1))
    sys.stdout.flush()


def start_profiler(args: argparse.Namespace, pid: int,
                   name: str) -> subprocess.Popen[bytes] | None:
    """``--profile DIR``: py-spy records the daemon for the whole run, into
    ``DIR/<name>.folded.txt``."""
    if not args.profile:
        return None
    args.profile.mkdir(parents=True, exist_ok=True)
    out = args.profile / f"{name}.folded.txt"
    spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(spy) if spy.exists() else "py-spy", "record", "--pid",
                             str(pid), "--rate", "250", "--nonblocking", "--format", "raw",
                             "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


# --- report -----------------------------------------------------------------------------------

def ms(value: float) -> str:
    return f"{value:9.1f}" if value == value else "      n/a"


def ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}" if y and x == x and y == y else "n/a"


def verdict(met: bool) -> str:
    return "MET" if met else "MISSED"


def frames_per_message(frames: int, messages: int) -> str:
    return f"{frames / messages:.2f}" if messages else "n/a"


def batch_note(system: str, batched: int, clients: int) -> str:
    """A note when a ``batch=`` run's welcome frames did not say ``batch`` (a daemon without
    coalescing ignores the parameter)."""
    if "batch=" not in system or batched >= clients:
        return ""
    return (f" (welcome without \"batch\" for {clients - batched:,} of {clients:,} clients: "
            f"the daemon ignored ?batch=)")


def report(sc: Scenario, results: list[Result]) -> None:
    print(f"\n== {sc.describe()}")
    print("cpu µs/dlv: µs of the server process's CPU (user + system, /proc) per delivery, "
          "writes + drain; frames/msg: frames per WebSocket message the clients received")
    print(f"{'system':<24} {'delivered/expected':>20} {'dup':>4} {'lost':>4} "
          f"{'deliveries/s':>12} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} "
          f"{'cpu µs/dlv':>10} {'frames/msg':>10}  writer")
    for r in results:
        if r.error:
            print(f"{r.system:<24} error: {r.error}")
            continue
        print(f"{r.system:<24} {f'{r.delivered:,}/{r.expected:,}':>20} {r.duplicates:>4} "
              f"{r.lost_connections:>4} {r.per_s:>12,.0f} {ms(r.pct(0.50))} {ms(r.pct(0.99))} "
              f"{ms(max(r.latencies, default=float('nan')) * 1000)} {r.cpu_us:>10.2f} "
              f"{frames_per_message(r.frames, r.messages):>10}  "
              f"{r.written / r.write_seconds if r.write_seconds else 0:,.0f} rows/s"
              + batch_note(r.system, r.batched, sc.clients))
    for r in results:
        if r.cpu:
            print(f"  cpu {r.system}: " + ", ".join(f"{k} {v:.0f}%" for k, v in r.cpu.items())
                  + f" (of one core; machine: all cores); server {r.server_cpu:.2f} s")
    ok = [r for r in results if not r.error]
    base = next((r for r in ok if r.system == "baseline"), None)
    for p in ok:
        if p.system == "baseline":
            continue
        if base is not None:
            print(f"ratio {p.system}/baseline: deliveries/s {ratio(p.per_s, base.per_s)}, "
                  f"p50 {ratio(p.pct(0.5), base.pct(0.5))}, "
                  f"p99 {ratio(p.pct(0.99), base.pct(0.99))}, "
                  f"daemon cpu per delivery {ratio(p.cpu_us, base.cpu_us)}")
        if sc.goal_p99_ms is None:
            continue
        lossless = p.delivered == p.expected and p.duplicates == 0
        parts = [f"p99 <= {sc.goal_p99_ms:g} ms {verdict(p.pct(0.99) <= sc.goal_p99_ms)} "
                 f"({p.pct(0.99):.1f} ms)",
                 f"nothing lost {verdict(lossless)} ("
                 + ("nothing lost" if lossless else
                    f"{p.expected - p.delivered:,} missing, {p.duplicates:,} duplicates") + ")"]
        met = p.pct(0.99) <= sc.goal_p99_ms and lossless
        if sc.goal_cpu_us is not None:
            parts.append(f"<= {sc.goal_cpu_us:g} µs daemon CPU per delivery "
                         f"{verdict(p.cpu_us <= sc.goal_cpu_us)} ({p.cpu_us:.2f} µs)")
            met = met and p.cpu_us <= sc.goal_cpu_us
        print(f"goal ({p.system}): {verdict(met)}: " + "; ".join(parts))
    sys.stdout.flush()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, help="WebSocket clients (with --rooms, --rate; "
                        "with --scenario: instead of each scenario's own; idle: 10000)")
    parser.add_argument("--rooms", type=int, help="rooms; client i is in room i %% R (as "
                        "--clients)")
    parser.add_argument("--rate", type=float, help="inserts per second, all rooms together")
    parser.add_argument("--seconds", type=float, default=15.0, help="writing time per run (15)")
    parser.add_argument("--procs", type=int, default=2, help="client processes (2)")
    parser.add_argument("--systems", default="pgbridge,baseline",
                        help="comma-separated: pgbridge, baseline (both; catchup and switch "
                        "run pgbridge only)")
    parser.add_argument("--dsn", help="PostgreSQL server (superuser or CREATEDB); default: an "
                        "embedded PostgreSQL in --data-dir")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "pgbridge-bench",
                        help="embedded PostgreSQL's directory ($TMPDIR/pgbridge-bench)")
    parser.add_argument("--queue-size", type=int, default=100000,
                        help="PGBRIDGE_QUEUE_SIZE of the daemon (100000)")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds between the last client ready and the first insert (1)")
    parser.add_argument("--drain", type=float, default=20.0,
                        help="at most this many seconds to wait for deliveries after the last "
                        "insert (20; also stops after 3 s without progress)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record the daemon with py-spy into DIR (collapsed stacks)")
    parser.add_argument("--log-dir", type=Path, metavar="DIR",
                        help="keep the servers' logs in DIR (default: a temporary directory)")
    parser.add_argument("--scenario", metavar="NAMES",
                        help="comma-separated: light, fanout, switch, idle, catchup (default: "
                        "light,fanout; with --clients/--rooms/--rate: custom)")
    parser.add_argument("--batch", default="off,0", metavar="VALUES",
                        help="pgbridge runs once per value (light, fanout, custom, idle, "
                        "catchup), comma-separated: off (no batch parameter) or ms from 0 to "
                        "1000 (?batch=MS: frames coalesced into messages); default off,0")
    parser.add_argument("--event-loop", default="asyncio", metavar="VALUES",
                        help="and once per PGBRIDGE_EVENT_LOOP, comma-separated: asyncio, "
                        "uvloop (asyncio; the switch scenario takes the first)")
    parser.add_argument("--events", type=int, default=50000,
                        help="catchup: events in the room before the client subscribes "
                        "(50000)")
    parser.add_argument("--phase-seconds", default="10,10,15", metavar="L,H,L",
                        help="switch: seconds of the light, heavy and light phases (10,10,15)")
    parser.add_argument("--phase-rates", default="200,2000,200", metavar="L,H,L",
                        help="switch: inserts/s of the three phases (200,2000,200)")
    parser.add_argument("--doorbell", default="adaptive,on,off", metavar="MODES",
                        help="switch: PGBRIDGE_DOORBELL of each run, comma-separated, in "
                        "order (adaptive,on,off; a mode may repeat)")
    parser.add_argument("--writers", type=int, default=4,
                        help="switch: writer connections sharing the schedule (4)")
    args = parser.parse_args()
    custom = (args.clients, args.rooms, args.rate)
    if args.scenario is not None:
        args.scenario = [s.strip() for s in args.scenario.split(",") if s.strip()]
        if not args.scenario or set(args.scenario) - {"light", "fanout", "switch", "idle",
                                                      "catchup"}:
            parser.error("--scenario: light, fanout, switch, idle, catchup")
        if args.rate is not None:
            parser.error("--rate is for the custom scenario (not with --scenario); the switch "
                         "scenario takes --phase-rates")
        if min(v for v in (args.clients, args.rooms, 1) if v is not None) <= 0:
            parser.error("--clients and --rooms must be positive")
    else:
        if any(v is not None for v in custom) and not all(v is not None for v in custom):
            parser.error("--clients, --rooms and --rate go together")
        if all(v is not None for v in custom) and min(custom) <= 0:
            parser.error("--clients, --rooms and --rate must be positive")
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not args.systems or set(args.systems) - {"pgbridge", "baseline"}:
        parser.error("--systems: pgbridge, baseline")
    try:
        args.phase_seconds = [float(v) for v in args.phase_seconds.split(",")]
        args.phase_rates = [float(v) for v in args.phase_rates.split(",")]
    except ValueError:
        parser.error("--phase-seconds and --phase-rates: three numbers, comma-separated")
    if len(args.phase_seconds) != 3 or len(args.phase_rates) != 3 \
            or min(args.phase_seconds + args.phase_rates) <= 0:
        parser.error("--phase-seconds and --phase-rates: three positive numbers (light, heavy, "
                     "light)")
    args.doorbell = [m.strip() for m in args.doorbell.split(",") if m.strip()]
    if not args.doorbell or set(args.doorbell) - {"adaptive", "on", "off"}:
        parser.error("--doorbell: adaptive, on, off")
    if args.writers < 1:
        parser.error("--writers must be at least 1")
    if args.events < 1:
        parser.error("--events must be positive")
    batch: list[int | None] = []
    for value in (v.strip() for v in args.batch.split(",")):
        if value == "off":
            batch.append(None)
        elif value.isdigit() and int(value) <= 1000:
            batch.append(int(value))
        else:
            parser.error("--batch: off or an integer from 0 to 1000, comma-separated")
    args.batch = list(dict.fromkeys(batch))
    args.event_loop = list(dict.fromkeys(v.strip() for v in args.event_loop.split(",")
                                         if v.strip()))
    if not args.event_loop or set(args.event_loop) - {"asyncio", "uvloop"}:
        parser.error("--event-loop: asyncio, uvloop")
    return args


def raise_nofile() -> None:
    """The soft limit of open files up to the hard one (servers and client processes inherit
    it: the idle scenario holds thousands of sockets)."""
    try:
        import resource
    except ImportError:  # not on Linux
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def failure(exc: Exception, log: Path) -> str:
    """An exception of a run and the end of its server's log."""
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    return f"{type(exc).__name__}: {exc}\n{tail}"


def main() -> int:
    args = parse_args()
    raise_nofile()
    switch: Switch | None = None
    names = args.scenario or ["light", "fanout"]
    if args.scenario is None and args.clients is not None:
        scenarios = [Scenario("custom", args.clients, args.rooms, args.rate)]
    else:
        known = {"light": Scenario("light", 100, 10, 200.0, goal_p99_ms=3.0),
                 "fanout": Scenario("fanout", 1000, 10, 400.0, goal_p99_ms=25.0,
                                    goal_cpu_us=5.0)}
        scenarios = [dataclasses.replace(known[name], clients=args.clients or known[name].clients,
                                         rooms=args.rooms or known[name].rooms)
                     for name in names if name in known]
        if "switch" in names:
            switch = Switch(args.clients or 100, args.rooms or 10, tuple(
                Phase(name, rate, seconds) for name, rate, seconds in zip(
                    ("light1", "heavy", "light2"), args.phase_rates, args.phase_seconds,
                    strict=True)), args.writers)
    idle = (Scenario("idle", args.clients or 10000, args.rooms or 10, 0.0)
            if args.scenario is not None and "idle" in names else None)
    catchup = args.scenario is not None and "catchup" in names
    runs = variants(args)
    print(f"fanout bench: {os.cpu_count()} CPUs, {args.procs} client processes, pgbridge "
          f"runs: {', '.join(v.name for v in runs)}")
    if scenarios:
        print(f"  {args.seconds:g} s of writes per run, systems: {', '.join(args.systems)}")
    if switch is not None:
        print(f"  {switch.describe()}, doorbell modes: {', '.join(args.doorbell)}, "
              f"PGBRIDGE_EVENT_LOOP={args.event_loop[0]}")
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(str(args.log_dir)) if args.log_dir is not None
          else tempfile.TemporaryDirectory(prefix="fanout-")) as logs, \
            server_conninfo(args.dsn, args.data_dir) as server:
        logdir = Path(logs)
        if switch is not None:
            switch_runs = []
            for k, mode in enumerate(args.doorbell, 1):
                log = logdir / f"pgbridge-switch-{k}-{mode}.log"
                try:
                    switch_runs.append(run_switch(server, switch, mode, args, log))
                except Exception as exc:  # report it and go on with the next mode
                    switch_runs.append(SwitchRun(mode, error=failure(exc, log)))
                print(f"  ran doorbell={mode} (daemon log: {log.name})", flush=True)
            report_switch(switch, switch_runs)
        for sc in scenarios:
            results = []
            for system in args.systems:
                if system == "baseline":
                    try:
                        results.append(run_baseline(server, sc, args, logdir))
                    except Exception as exc:  # report it and go on with the next run
                        results.append(Result(system, error=failure(
                            exc, logdir / f"baseline-{sc.name}.log")))
                    continue
                for v in runs:
                    try:
                        results.append(run_pgbridge(server, sc, args, logdir, v))
                    except Exception as exc:
                        results.append(Result(v.name, error=failure(
                            exc, logdir / f"{v.slug}-{sc.name}.log")))
            report(sc, results)
        if idle is not None:
            idle_results = []
            for system in args.systems:
                if system == "baseline":
                    try:
                        idle_results.append(run_idle_baseline(server, idle, args, logdir))
                    except Exception as exc:
                        idle_results.append(IdleResult(system, error=failure(
                            exc, logdir / "baseline-idle.log")))
                    continue
                for v in runs:
                    try:
                        idle_results.append(run_idle_pgbridge(server, idle, args, logdir, v))
                    except Exception as exc:
                        idle_results.append(IdleResult(v.name, error=failure(
                            exc, logdir / f"{v.slug}-idle.log")))
            report_idle(idle, idle_results)
        if catchup:
            catchup_results = []
            for v in runs:
                try:
                    catchup_results.append(run_catchup(server, args.events, args, logdir, v))
                except Exception as exc:
                    catchup_results.append(CatchupResult(v.name, args.events, error=failure(
                        exc, logdir / f"{v.slug}-catchup.log")))
            report_catchup(args.events, catchup_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
