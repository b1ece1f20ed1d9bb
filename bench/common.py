"""What the benchmarks share: the row they write and the stamps their clients read back, a cheap
WebSocket client (:class:`WsClient`, on websockets' sans-I/O protocol) and :func:`open_clients`,
CPU accounting from /proc (:class:`CpuMeter`), scratch databases, and the daemon as a
subprocess (:func:`process`). Imported as ``bench.common`` by the scripts of this package,
which run from the checkout's root as ``python -m bench.NAME``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent  # the checkout: daemons run from here

SECRET = "bench-secret-" + "x" * 40


STAMP = re.compile(rb'"n": (\d+), "bench_t": ([0-9.]+)')


SEQ = re.compile(rb'"seq" ?: ?(\d+)')  # the event frame's; it comes before the row ("data")


WRITE = ("INSERT INTO messages (channel_id, user_id, content, metadata) VALUES (%s, %s, %s, "
         "jsonb_build_object('n', %s::bigint, 'bench_t', extract(epoch FROM clock_timestamp())))")


@dataclass(frozen=True)
class Scenario:
    name: str
    clients: int
    rooms: int
    rate: float  # inserts per second, all rooms together
    goal_p99_ms: float | None = None
    goal_cpu_us: float | None = None  # daemon CPU per delivery

    @property
    def deliveries_per_s(self) -> float:
        return self.rate * self.clients / self.rooms

    def describe(self) -> str:
        return (f"{self.name}: {self.clients} clients in {self.rooms} rooms, {self.rate:g} "
                f"inserts/s ({self.rate / self.rooms:g}/room) = "
                f"{self.deliveries_per_s:,.0f} deliveries/s")


class WsClient(asyncio.Protocol):
    """A WebSocket client on websockets' sans-I/O protocol (cheap for the measuring side).
    ``subscribe`` is sent after the handshake and the client is ready at ``subscribed`` (an
    ``error`` fails it); with ``None`` it is ready at the handshake. Every later text message
    goes to :meth:`on_text` with its receive time (``time.time()``). A message may hold several
    frames separated by ``b"\\n"`` (pgbridge's ``?batch=``); before the client is ready they are
    looked at one by one, and the frames after ``subscribed`` in the same message go to
    :meth:`on_text` (joined as they came). ``welcome`` keeps pgbridge's welcome frame."""

    def __init__(self, url: str, subscribe: bytes | None) -> None:
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        self.proto = ClientProtocol(parse_uri(url), max_size=2**22)
        self.subscribe = subscribe
        self.subscribe_sent = 0.0  # time.time() when the subscribe frame was sent
        self.welcome = b""
        self.lost = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def on_text(self, data: bytes, now: float) -> None:
        """A text message after the client was ready (one frame, or several joined by
        ``b"\\n"``)."""

    def _before_ready(self, text: bytes, now: float) -> None:
        lines = text.split(b"\n")
        for k, line in enumerate(lines):
            if b'"subscribed"' in line:
                self.ready.set_result(None)
                if k + 1 < len(lines):
                    self.on_text(b"\n".join(lines[k + 1:]), now)
                return
            if b'"error"' in line:
                self.ready.set_exception(RuntimeError(line.decode()))
                return
            if b'"welcome"' in line and not self.welcome:
                self.welcome = line

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
        from websockets.frames import Frame, Opcode
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
                    self.subscribe_sent = time.time()
                elif not self.ready.done():
                    self.ready.set_result(None)
                continue
            if not isinstance(event, Frame) or event.opcode is not Opcode.TEXT:
                continue
            text = bytes(event.data)
            if self.ready.done():
                self.on_text(text, now)
            else:
                self._before_ready(text, now)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost: {exc}"))


WsClientT = TypeVar("WsClientT", bound=WsClient)


async def open_clients(specs: list[tuple[str, bytes | None]],
                       factory: Callable[[str, bytes | None], WsClientT], *,
                       in_flight: int = 50) -> list[WsClientT]:
    """One client per ``(url, subscribe)`` of ``specs``, made by ``factory``, with at most
    ``in_flight`` handshakes at a time; each must be ready (subscribed) within 60 s."""
    from urllib.parse import urlsplit

    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(in_flight)
    addresses: dict[str, tuple[str, int]] = {}

    async def open_one(url: str, subscribe: bytes | None) -> WsClientT:
        if url not in addresses:
            parts = urlsplit(url)
            addresses[url] = (parts.hostname or "127.0.0.1", parts.port or 80)
        async with gate:
            _, client = await loop.create_connection(lambda: factory(url, subscribe),
                                                     *addresses[url])
            await asyncio.wait_for(client.ready, 60)
        return client

    return list(await asyncio.gather(*(open_one(u, s) for u, s in specs)))


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
    in % of one core (a 2-core machine can reach 200%); after :meth:`stop`, ``seconds`` holds
    each group's CPU seconds."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.t0 = 0.0
        self.before: dict[str, float] = {}
        self.busy0 = (0.0, 0.0)
        self.seconds: dict[str, float] = {}

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.before = {name: sum(map(proc_cpu, pids)) for name, pids in self.groups.items()}
        self.busy0 = machine_busy()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        self.seconds = {name: sum(map(proc_cpu, pids)) - self.before[name]
                        for name, pids in self.groups.items()}
        if wall <= 0:
            return {}
        out = {name: 100 * used / wall for name, used in self.seconds.items()}
        busy, total = machine_busy()
        if total > self.busy0[1]:
            out["machine"] = 100 * (os.cpu_count() or 1) * (busy - self.busy0[0]) / (
                total - self.busy0[1])
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
