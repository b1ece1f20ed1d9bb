#!/usr/bin/env python3
"""Fan-out: N WebSocket clients over R rooms, inserts at a fixed rate, pgbridge against the
common Python recipe, measured side by side in the same run.

    python bench/fanout.py [--clients N --rooms R --rate INSERTS_PER_S] [--seconds S]
                           [--procs P] [--systems pgbridge,baseline] [--dsn DSN]

Without ``--clients/--rooms/--rate`` two scenarios run (the goals of the issue):

* ``light``: 100 clients in 10 rooms, 200 inserts/s (2,000 deliveries/s): p99 <= 5 ms;
* ``fanout``: 1,000 clients in 10 rooms, 40 inserts/s per room (400/s, 40,000 deliveries/s):
  p99 <= 50 ms and nothing lost.

Systems (one after the other, each in a database of its own on the same server):

* ``pgbridge``: ``python -m daemon`` in a subprocess (schema applied as setup_db.py does);
  each client subscribes to its room over ``/ws``;
* ``baseline``: encode/broadcaster (postgres backend) behind a Starlette WebSocket endpoint on
  uvicorn, fed by a plain NOTIFY trigger (bench/baseline_broadcaster.py); each client connects
  to ``/ws/{room}``.

Clients run in ``--procs`` processes of their own (asyncio, websockets' sans-I/O client so the
measuring side stays cheap); client ``i`` is in room ``i % R``. One writer in this process
inserts ``messages`` round-robin over the rooms at the fixed rate, each row stamped in SQL with
``clock_timestamp()`` (``metadata.bench_t``) and numbered (``metadata.n``); a client's latency
for a row is its receive time minus that stamp (same machine, same clock), so it covers the
trigger, commit, NOTIFY, the server and the client's own parsing.

Reported per system: delivered/expected (expected = rows written x clients of their room;
counted after a drain of up to ``--drain`` seconds), duplicates, connections lost, deliveries/s
(delivered / time from the first insert to the last receive), and latency p50/p99/max; then the
ratio pgbridge/baseline. The server is ``--dsn`` (needs CREATEDB) or an embedded PostgreSQL
in ``--data-dir``; the bench databases are dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.client
import multiprocessing as mp
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SECRET = "bench-secret-" + "x" * 40
STAMP = re.compile(rb'"n": (\d+), "bench_t": ([0-9.]+)')
WRITE = ("INSERT INTO messages (channel_id, user_id, content, metadata) VALUES (%s, %s, %s, "
         "jsonb_build_object('n', %s::bigint, 'bench_t', extract(epoch FROM clock_timestamp())))")


@dataclass(frozen=True)
class Scenario:
    name: str
    clients: int
    rooms: int
    rate: float  # inserts per second, all rooms together
    goal_p99_ms: float | None = None

    @property
    def deliveries_per_s(self) -> float:
        return self.rate * self.clients / self.rooms

    def describe(self) -> str:
        return (f"{self.name}: {self.clients} clients in {self.rooms} rooms, {self.rate:g} "
                f"inserts/s ({self.rate / self.rooms:g}/room) = "
                f"{self.deliveries_per_s:,.0f} deliveries/s")


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


# --- clients (in their own processes) ---------------------------------------------------------

class _Client(asyncio.Protocol):
    """One WebSocket client on websockets' sans-I/O protocol: counts stamped frames and records
    receive time - stamp. ``subscribe`` (pgbridge) is sent after the handshake; the client is
    ready at ``subscribed`` (pgbridge) or at the handshake (baseline)."""

    def __init__(self, url: str, subscribe: bytes | None, lat: array[float]) -> None:
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        self.proto = ClientProtocol(parse_uri(url), max_size=2**22)
        self.subscribe = subscribe
        self.lat = lat
        self.seen: set[int] = set()
        self.delivered = 0
        self.last = 0.0
        self.lost = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.proto.send_request(self.proto.connect())
        self._flush()

    def _flush(self) -> None:
        assert self.transport is not None
        for data in self.proto.data_to_send():
            if data:
                self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        from websockets.frames import Opcode
        from websockets.http11 import Response

        now = time.time()
        proto = self.proto
        proto.receive_data(data)
        for event in proto.events_received():
            if isinstance(event, Response):
                if proto.handshake_exc is not None:
                    if not self.ready.done():
                        self.ready.set_exception(proto.handshake_exc)
                elif self.subscribe is not None:
                    proto.send_text(self.subscribe)
                elif not self.ready.done():
                    self.ready.set_result(None)
                continue
            if event.opcode is not Opcode.TEXT:
                continue
            match = STAMP.search(event.data)
            if match is None:
                if not self.ready.done() and b'"subscribed"' in event.data:
                    self.ready.set_result(None)
                elif not self.ready.done() and b'"error"' in event.data:
                    self.ready.set_exception(RuntimeError(event.data.decode()))
                continue
            self.delivered += 1
            self.seen.add(int(match.group(1)))
            self.lat.append(now - float(match.group(2)))
            self.last = now
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost: {exc}"))


async def _clients(specs: list[tuple[str, bytes | None]], ready: Any, results: Any, stop: Any,
                   counter: Any, index: int) -> None:
    loop = asyncio.get_running_loop()
    lat: array[float] = array("d")
    clients: list[_Client] = []
    gate = asyncio.Semaphore(50)
    host_port: dict[str, tuple[str, int]] = {}

    async def open_one(url: str, subscribe: bytes | None) -> _Client:
        from urllib.parse import urlsplit

        if url not in host_port:
            parts = urlsplit(url)
            host_port[url] = (parts.hostname or "127.0.0.1", parts.port or 80)
        async with gate:
            _, client = await loop.create_connection(lambda: _Client(url, subscribe, lat),
                                                     *host_port[url])
            await asyncio.wait_for(client.ready, 60)
        return client

    try:
        clients = list(await asyncio.gather(*(open_one(u, s) for u, s in specs)))
    except Exception as exc:
        ready.put((index, f"{type(exc).__name__}: {exc}"))
        return
    gc.collect()
    gc.freeze()
    ready.put((index, None))
    while not stop.is_set():
        counter.value = sum(c.delivered for c in clients)
        await asyncio.sleep(0.1)
    delivered = sum(c.delivered for c in clients)
    results.put((index, delivered, delivered - sum(len(c.seen) for c in clients),
                 sum(c.lost for c in clients), max((c.last for c in clients), default=0.0),
                 lat.tobytes()))
    for client in clients:
        if client.transport is not None:
            client.transport.abort()


def client_process(specs: list[tuple[str, bytes | None]], ready: Any, results: Any, stop: Any,
                   counter: Any, index: int) -> None:
    asyncio.run(_clients(specs, ready, results, stop, counter, index))


# --- CPU accounting (Linux /proc; empty elsewhere) -------------------------------------------

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``; 0 if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values) - idle) / TICK, sum(values) / TICK


class CpuMeter:
    """CPU of named process groups and of the machine between :meth:`start` and :meth:`stop`,
    in % of one core (a 2-core machine can reach 200%)."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.t0 = 0.0
        self.before: dict[str, float] = {}
        self.busy0 = (0.0, 0.0)

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.before = {name: sum(map(proc_cpu, pids)) for name, pids in self.groups.items()}
        self.busy0 = machine_busy()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        if wall <= 0:
            return {}
        out = {name: 100 * (sum(map(proc_cpu, pids)) - self.before[name]) / wall
               for name, pids in self.groups.items()}
        busy, total = machine_busy()
        if total > self.busy0[1]:
            out["machine"] = 100 * (os.cpu_count() or 1) * (busy - self.busy0[0]) / (
                total - self.busy0[1])
        return out


# --- databases and servers --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


@contextlib.contextmanager
def server_conninfo(dsn: str | None, data_dir: Path) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    from daemon.embedded import start_embedded

    server = start_embedded(data_dir)
    try:
        yield server.uri
    finally:
        server.stop()


@contextlib.contextmanager
def scratch_database(server: str, tag: str, *, keep: bool = False) -> Iterator[str]:
    """A new database ``pgbridge_bench_<tag>_<random>`` on ``server`` for the block, dropped
    after it unless ``keep`` (then its name is printed). Used by the other benchmarks too."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    name = f"pgbridge_bench_{tag}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(server, dbname=name)
    finally:
        if keep:
            print(f"\nkept database {name}")
        else:
            with psycopg.connect(server, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                             .format(sql.Identifier(name)))


def wait_healthy(proc: subprocess.Popen[bytes], port: int, what: str,
                 timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} not healthy within {timeout:g} s")


@contextlib.contextmanager
def process(cmd: list[str], env: dict[str, str], port: int, what: str,
            log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(proc, port, what)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("POSTGRES_", "SSH_", "PGBRIDGE_", "PG")) and k != "DATABASE_URL"}


def setup_pgbridge(db: str, sc: Scenario) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Schema, users, rooms, memberships. Returns (room, writer user) per room and
    (user, room) per client."""
    import psycopg

    from daemon.schema import apply_schema_sync

    apply_schema_sync(db, schema="public")
    with psycopg.connect(db, autocommit=True) as conn:
        rows = conn.execute(
            "INSERT INTO users (auth0_id, email, username) SELECT 'bench|' || g, "
            "'bench' || g || '@bench.invalid', 'bench' || g FROM generate_series(1, %s) g "
            "RETURNING id", [sc.clients]).fetchall()
        users = [str(r[0]) for r in rows]
        rows = conn.execute("INSERT INTO channels (name) SELECT 'bench' || g FROM "
                            "generate_series(1, %s) g RETURNING id", [sc.rooms]).fetchall()
        rooms = [str(r[0]) for r in rows]
        members = [(users[i], rooms[i % sc.rooms]) for i in range(sc.clients)]
        conn.execute("INSERT INTO channel_members (channel_id, user_id) "
                     "SELECT * FROM unnest(%s::varchar[], %s::varchar[])",
                     [[r for _, r in members], [u for u, _ in members]])
    return [(rooms[k], users[k]) for k in range(sc.rooms)], members


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
    ctx = mp.get_context("spawn")
    ready, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs_n = max(1, min(args.procs, len(specs)))
    counters = [ctx.Value("q", 0, lock=False) for _ in range(procs_n)]
    procs = [ctx.Process(target=client_process, daemon=True,
                         args=(specs[i::procs_n], ready, results, stop, counters[i], i))
             for i in range(procs_n)]
    result = Result(system)
    for p in procs:
        p.start()
    try:
        for _ in procs:
            index, error = ready.get(timeout=180)
            if error:
                raise RuntimeError(f"client process {index} could not connect: {error}")
        time.sleep(args.settle)  # let every server-side subscription settle
        meter = CpuMeter({"server": [server_pid], "clients": [p.pid for p in procs if p.pid],
                          "writer": [os.getpid()]})
        meter.start()
        counts, first, result.write_seconds, _ = write(db, rooms, sc.rate, args.seconds)
        result.written = sum(counts.values())
        result.expected = sum(counts[room] for room in room_of_client)
        best, best_at = -1, time.monotonic()
        deadline = time.monotonic() + args.drain
        while time.monotonic() < deadline:
            got = sum(int(c.value) for c in counters)
            if got >= result.expected:
                break
            if got > best:
                best, best_at = got, time.monotonic()
            elif time.monotonic() - best_at > 3.0:
                break  # no progress for 3 s
            time.sleep(0.1)
        result.cpu = meter.stop()
        stop.set()
        last = 0.0
        for _ in procs:
            _, delivered, dupes, lost, last_at, lat = results.get(timeout=60)
            result.delivered += delivered
            result.duplicates += dupes
            result.lost_connections += lost
            last = max(last, last_at)
            result.latencies.frombytes(lat)
        result.span = last - first if last > first else 0.0
    finally:
        stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return result


def run_pgbridge(server: str, sc: Scenario, args: argparse.Namespace, logdir: Path) -> Result:
    from daemon.auth import mint_token

    with scratch_database(server, "pgbridge") as db:
        rooms, members = setup_pgbridge(db, sc)
        port = free_port()
        env = clean_env() | {
            "DATABASE_URL": db, "PGBRIDGE_JWT_SECRET": SECRET, "PGBRIDGE_PORT": str(port),
            "PGBRIDGE_QUEUE_SIZE": str(args.queue_size), "PGBRIDGE_LOG_LEVEL": "WARNING",
        }
        url = f"ws://127.0.0.1:{port}/ws?token="
        specs: list[tuple[str, bytes | None]] = [
            (url + mint_token(SECRET, user, ttl=3600),
             f'{{"type":"subscribe","room":"{room}"}}'.encode()) for user, room in members]
        with process([sys.executable, "-m", "daemon"], env, port, "pgbridge",
                     logdir / "pgbridge.log") as proc:
            profiler = start_profiler(args, proc.pid, sc)
            try:
                return run_clients_and_writer("pgbridge", sc, db, specs, rooms,
                                              [room for _, room in members], args, proc.pid)
            finally:
                stop_profiler(profiler)


def run_baseline(server: str, sc: Scenario, args: argparse.Namespace, logdir: Path) -> Result:
    import psycopg
    from baseline_broadcaster import SETUP_SQL

    with scratch_database(server, "baseline") as db:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(SETUP_SQL.encode())
        rooms = [(f"r{k}", "bench") for k in range(sc.rooms)]
        port = free_port()
        env = clean_env() | {"BASELINE_DATABASE_URL": asyncpg_url(db)}
        specs: list[tuple[str, bytes | None]] = [
            (f"ws://127.0.0.1:{port}/ws/r{i % sc.rooms}", None) for i in range(sc.clients)]
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "bench"),
               "baseline_broadcaster:app", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning", "--no-access-log"]
        with process(cmd, env, port, "baseline (uvicorn)", logdir / "baseline.log") as proc:
            return run_clients_and_writer("baseline", sc, db, specs, rooms,
                                          [f"r{i % sc.rooms}" for i in range(sc.clients)], args,
                                          proc.pid)


def start_profiler(args: argparse.Namespace, pid: int,
                   sc: Scenario) -> subprocess.Popen[bytes] | None:
    """``--profile DIR``: py-spy records the daemon for the whole scenario."""
    if not args.profile:
        return None
    args.profile.mkdir(parents=True, exist_ok=True)
    out = args.profile / f"pgbridge-{sc.name}.folded.txt"
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


def report(sc: Scenario, results: list[Result]) -> None:
    print(f"\n== {sc.describe()}")
    print(f"{'system':<10} {'delivered/expected':>22} {'dup':>5} {'lost':>5} "
          f"{'deliveries/s':>13} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}  writer")
    for r in results:
        if r.error:
            print(f"{r.system:<10} error: {r.error}")
            continue
        print(f"{r.system:<10} {f'{r.delivered:,}/{r.expected:,}':>22} {r.duplicates:>5} "
              f"{r.lost_connections:>5} {r.per_s:>13,.0f} {ms(r.pct(0.50))} {ms(r.pct(0.99))} "
              f"{ms(max(r.latencies, default=float('nan')) * 1000)}  "
              f"{r.written / r.write_seconds if r.write_seconds else 0:,.0f} rows/s")
    for r in results:
        if r.cpu:
            print(f"  cpu {r.system}: " + ", ".join(f"{k} {v:.0f}%" for k, v in r.cpu.items())
                  + " (of one core; machine: all cores)")
    by = {r.system: r for r in results if not r.error}
    if "pgbridge" in by and "baseline" in by:
        p, b = by["pgbridge"], by["baseline"]

        def ratio(x: float, y: float) -> str:
            return f"{x / y:.2f}" if y and x == x and y == y else "n/a"

        print(f"ratio pgbridge/baseline: deliveries/s {ratio(p.per_s, b.per_s)}, "
              f"p50 {ratio(p.pct(0.5), b.pct(0.5))}, p99 {ratio(p.pct(0.99), b.pct(0.99))}")
    p = by.get("pgbridge")
    if p is not None and sc.goal_p99_ms is not None:
        lossless = p.delivered == p.expected and p.duplicates == 0
        met = lossless and p.pct(0.99) <= sc.goal_p99_ms
        print(f"goal (pgbridge): p99 <= {sc.goal_p99_ms:g} ms and nothing lost: "
              f"{'MET' if met else 'MISSED'} (p99 {p.pct(0.99):.1f} ms, "
              f"{'nothing lost' if lossless else f'{p.expected - p.delivered:,} missing'})")
    sys.stdout.flush()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, help="WebSocket clients (with --rooms, --rate)")
    parser.add_argument("--rooms", type=int, help="rooms; client i is in room i %% R")
    parser.add_argument("--rate", type=float, help="inserts per second, all rooms together")
    parser.add_argument("--seconds", type=float, default=15.0, help="writing time per run (15)")
    parser.add_argument("--procs", type=int, default=2, help="client processes (2)")
    parser.add_argument("--systems", default="pgbridge,baseline",
                        help="comma-separated: pgbridge, baseline (both)")
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
    args = parser.parse_args()
    custom = (args.clients, args.rooms, args.rate)
    if any(v is not None for v in custom) and not all(v is not None for v in custom):
        parser.error("--clients, --rooms and --rate go together")
    if all(v is not None for v in custom) and min(custom) <= 0:
        parser.error("--clients, --rooms and --rate must be positive")
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not args.systems or set(args.systems) - {"pgbridge", "baseline"}:
        parser.error("--systems: pgbridge, baseline")
    return args


def main() -> int:
    args = parse_args()
    if args.clients is not None:
        scenarios = [Scenario("custom", args.clients, args.rooms, args.rate)]
    else:
        scenarios = [Scenario("light", 100, 10, 200.0, goal_p99_ms=5.0),
                     Scenario("fanout", 1000, 10, 400.0, goal_p99_ms=50.0)]
    print(f"fanout bench: {os.cpu_count()} CPUs, {args.seconds:g} s of writes per run, "
          f"{args.procs} client processes, systems: {', '.join(args.systems)}")
    runners = {"pgbridge": run_pgbridge, "baseline": run_baseline}
    with tempfile.TemporaryDirectory(prefix="fanout-") as logs, \
            server_conninfo(args.dsn, args.data_dir) as server:
        for sc in scenarios:
            results = []
            for system in args.systems:
                try:
                    results.append(runners[system](server, sc, args, Path(logs)))
                except Exception as exc:  # report it and go on with the next system
                    log = Path(logs) / f"{system}.log"
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    results.append(Result(system, error=f"{type(exc).__name__}: {exc}\n{tail}"))
            report(sc, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
