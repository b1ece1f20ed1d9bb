#!/usr/bin/env python3
"""Abuse: do abusive clients hurt a legitimate one? The real daemon, its default limits, one
legitimate subscriber, and one abuse after the other, measured in the same run.

    python -m bench.abuse [--seconds S] [--rate INSERTS_PER_S] [--phases a,b,c,d,e,f] [--dsn DSN]

``python -m daemon`` runs in a subprocess on a database of its own (created on ``--dsn``, which
needs CREATEDB, and dropped at the end), with only ``PGBRIDGE_JWT_SECRET`` and
``PGBRIDGE_PORT`` set: every limit is the daemon's default, which is the point (defaults must
protect). All traffic goes to 127.0.0.1.

The legitimate client (a user of its own, member of one room, subscribed) runs in a process of
its own for the whole run; if its connection drops it reconnects and resumes with ``since``, as
a real client does (PROTOCOL.md). A writer in this process inserts ``messages`` into that room
at ``--rate`` rows/s, each row numbered (``metadata.n``) and stamped with ``clock_timestamp()``
inside the inserting transaction (``metadata.bench_t``), as bench/fanout.py does; the latency
of a row is the client's receive time minus that stamp (same machine, same clock): trigger,
commit, NOTIFY, daemon, client parsing.

Phases, each ``--seconds`` long (writer and attacker start together and stop by themselves):

* ``0`` baseline: no abuse (always run, the reference for the deltas);
* ``a`` connection flood: 2,000 connection attempts of one user, 200 in flight at a time, as
  fast as they are answered; accepted connections are kept open to the end of the phase;
* ``b`` subscribe/unsubscribe churn: 40 connections of one user, member of the legitimate
  client's room, each cycling subscribe/unsubscribe of it as fast as the server answers;
* ``c`` subscribes to rooms that do not exist (fresh ULIDs): 100 connections, 45/s each;
* ``d`` ping flood: protocol ``ping`` frames and WebSocket control pings, alternating, as fast
  as the socket takes them, on 20 connections;
* ``e`` hostile frames: JSON nested 1,000 deep, lone surrogates and NUL in room ids, raw NUL,
  invalid JSON, binary frames, in turn, as fast as the socket takes them, on 20 connections;
* ``f`` frames with the request: on 20 connections, the upgrade request and, in the same write,
  256 KiB of empty pings (frames a client may not send before the 101; past 64 KiB the bridge
  answers 400), then the answer and every pong read; again on a new connection (issue 25: 20 such connections once pushed a legitimate client's
  latency to 18.7 s).

Each abuse is done by a user of its own with valid tokens, in ``--attacker-procs`` processes
of their own (so its client CPU never runs on the legitimate client's event loop), niced by
``--attacker-nice`` (default 10: the attacker's CPU would be on other machines in real life;
here it shares 2 cores with the daemon, PostgreSQL and the measuring client, and without
niceness the phase would mostly measure CPU contention). A connection closed by the server is
reopened (b to e) at most 20 times per connection slot; a refused one is retried after 0.1 s.

Reported per phase: delivered/expected to the legitimate client (nothing may be lost),
latency p50/p99/max and the p99's delta and ratio against the baseline, the writer's achieved
rate, the daemon's CPU (% of one core) and RSS (VmRSS before → after, peak sampled every
0.25 s), whether the daemon is still alive (and /healthz's answer), and what the attacker
achieved: connections accepted and refused (HTTP status), frames sent and answered, answers by
type and error code, ``rate_limited`` errors, close codes the server sent (1006: the
connection dropped without a close frame). A daemon that dies is restarted before the next
phase (the legitimate client resumes), and the phase says so.

Takes about (``--seconds`` + 4) s per phase plus 5-10 s of set-up: 1 minute with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import json
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    SECRET,
    WRITE,
    clean_env,
    free_port,
    machine_busy,
    proc_cpu,
    scratch_database,
)

PHASES = {
    "a": "connection flood",
    "b": "subscribe churn",
    "c": "ghost-room subscribes",
    "d": "ping flood",
    "e": "hostile frames",
    "f": "frames with the request",
}
FLOOD_ATTEMPTS, FLOOD_IN_FLIGHT = 2000, 200
CHURN_CONNECTIONS = 40
GHOST_CONNECTIONS, GHOST_RATE = 100, 45.0
PING_CONNECTIONS = 20
HOSTILE_CONNECTIONS = 20
EARLY_CONNECTIONS, EARLY_TAIL = 20, 256 * 1024  # phase f: bytes of empty pings per request
CONNECTS_PER_SLOT = 20  # a connection slot reopens a closed connection at most this often
FRAMES_PER_CONNECTION = 200_000  # upper bound of frames one connection sends
REFUSED_PAUSE = 0.1  # seconds before a refused or failed connection is retried
ANSWER_TIMEOUT = 5.0  # seconds phase b waits for the answer to one request

HOSTILE_FRAMES: list[str | bytes] = [
    '{"type":"ping","ref":"deep","x":' + "[" * 1000 + "]" * 1000 + "}",
    '{"type":"subscribe","room":"\\ud800","ref":"surrogate"}',  # the escape, as raw text
    '{"type":"ping","ref":"\\udfff"}',
    '{"type":"subscribe","room":"a\\u0000b","ref":"nul"}',
    '{"type":"ping","ref":"a\x00b"}',  # a raw NUL inside a JSON string: invalid JSON
    "\x00",
    '{"type":"subscribe","room":',
    "not json at all",
    b'\x00\xff\xfe{"type":"ping"}',  # a binary frame
]


# --- the attacker (processes of its own) -----------------------------------------------------

def _answer_key(raw: str | bytes) -> str:
    """What kind of frame the server sent: ``event``, ``welcome``, ``pong``, ``error
    rate_limited``, ..."""
    if isinstance(raw, bytes):
        return "binary"
    try:
        obj = json.loads(raw)
    except ValueError:
        return "not JSON"
    kind = str(obj.get("type")) if isinstance(obj, dict) else "not an object"
    return f"error {obj.get('code')}" if kind == "error" else kind


async def _read(ws: Any, tally: Counter[str], answers: asyncio.Queue[str] | None) -> int:
    """Count what the server sends until it closes; return the close code it sent (1006:
    none, the connection just dropped)."""
    from websockets.exceptions import ConnectionClosed

    try:
        while True:
            key = _answer_key(await ws.recv())
            tally[f"got {key}"] += 1
            if key not in ("event", "welcome"):
                tally["answered"] += 1
                if answers is not None:
                    answers.put_nowait(key)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else 1006


async def _churn(ws: Any, room: str, tally: Counter[str], answers: asyncio.Queue[str],
                 deadline: float) -> None:
    """Phase b: subscribe, wait for the answer, unsubscribe once subscribed, and again."""
    loop = asyncio.get_running_loop()
    subscribed = False
    for k in range(FRAMES_PER_CONNECTION):
        if loop.time() >= deadline:
            return
        await asyncio.sleep(0)  # a queued answer and a free socket never suspend: yield here
        kind = "unsubscribe" if subscribed else "subscribe"
        await ws.send(json.dumps({"type": kind, "room": room, "ref": f"c{k}"}))
        tally["sent"] += 1
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT):  # not wait_for: 3.11's can eat a cancel
                answer = await answers.get()
        except TimeoutError:
            tally[f"unanswered within {ANSWER_TIMEOUT:g} s"] += 1
            continue
        if answer == "subscribed":
            subscribed = True
        elif answer == "unsubscribed":
            subscribed = False


async def _ghosts(ws: Any, tally: Counter[str], deadline: float) -> None:
    """Phase c: subscribe to fresh ULIDs (no such room) at GHOST_RATE per second."""
    from ulid import ULID

    loop = asyncio.get_running_loop()
    start = loop.time()
    for k in range(FRAMES_PER_CONNECTION):
        if loop.time() >= deadline:
            return
        delay = start + k / GHOST_RATE - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await ws.send(json.dumps({"type": "subscribe", "room": str(ULID()), "ref": f"g{k}"}))
        tally["sent"] += 1


async def _pings(ws: Any, tally: Counter[str], deadline: float) -> None:
    """Phase d: protocol pings and WebSocket pings, alternating, without waiting."""
    loop = asyncio.get_running_loop()

    def pong_done(fut: asyncio.Future[float]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            tally["got control pong"] += 1

    for k in range(FRAMES_PER_CONNECTION):
        if k % 2:
            await ws.send('{"type":"ping","ref":"p"}')
            tally["sent"] += 1
        else:
            waiter = await ws.ping()
            waiter.add_done_callback(pong_done)
            tally["sent control ping"] += 1
        if k % 64 == 63:
            if loop.time() >= deadline:
                return
            await asyncio.sleep(0)  # let the reader count the answers


async def _hostile(ws: Any, tally: Counter[str], deadline: float) -> None:
    """Phase e: the HOSTILE_FRAMES in turn, without waiting."""
    loop = asyncio.get_running_loop()
    for k in range(FRAMES_PER_CONNECTION):
        await ws.send(HOSTILE_FRAMES[k % len(HOSTILE_FRAMES)])
        tally["sent"] += 1
        if k % 32 == 31:
            if loop.time() >= deadline:
                return
            await asyncio.sleep(0)


async def _early(url: str, deadline: float, tally: Counter[str]) -> None:
    """Phase f: the upgrade request and EARLY_TAIL bytes of empty pings in one write, then
    read the 101 and the pongs; again on a new connection, until ``deadline``."""
    from urllib.parse import urlsplit

    target = urlsplit(url)
    request = (f"GET {target.path}?{target.query} HTTP/1.1\r\nHost: {target.netloc}\r\n"
               "Upgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               "\r\n").encode()
    pings = EARLY_TAIL // 6
    tail = b"\x89\x80\x00\x00\x00\x00" * pings  # masked, empty: 6 bytes each
    loop = asyncio.get_running_loop()
    for _ in range(CONNECTS_PER_SLOT):
        if loop.time() >= deadline:
            return
        tally["connect attempts"] += 1
        try:
            async with asyncio.timeout_at(deadline):
                reader, writer = await asyncio.open_connection(target.hostname, target.port)
                writer.write(request + tail)
                tally["sent"] += pings
                head = await reader.readuntil(b"\r\n\r\n")
                status = head[9:12].decode()
                tally["accepted" if status == "101" else f"refused HTTP {status}"] += 1
                pongs = 0
                while pongs < pings and (chunk := await reader.read(65536)):
                    pongs += chunk.count(b"\x8a\x00")  # approximate: the pongs' two bytes
                tally["got control pong"] += min(pongs, pings)
                writer.close()
        except TimeoutError:
            tally["connect unfinished at the end"] += 1
            return
        except OSError as exc:
            tally[f"connect failed: {type(exc).__name__}"] += 1


async def _slot(phase: str, url: str, room: str, deadline: float, tally: Counter[str],
                gate: asyncio.Semaphore) -> None:
    """One connection slot: connect, abuse until ``deadline`` (loop time), reconnect after a
    server close (phases b-e, at most CONNECTS_PER_SLOT times)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidHandshake, InvalidStatus

    if phase == "f":
        await _early(url, deadline, tally)
        return
    loop = asyncio.get_running_loop()
    for _ in range(1 if phase == "a" else CONNECTS_PER_SLOT):
        if loop.time() >= deadline:
            return
        tally["connect attempts"] += 1
        try:
            async with gate, asyncio.timeout_at(deadline):
                ws = await connect(url, open_timeout=None, ping_interval=None,
                                   close_timeout=1, compression=None, max_size=2**22,
                                   user_agent_header=None)
        except TimeoutError:
            tally["connect unfinished at the end"] += 1
            return
        except InvalidStatus as exc:
            tally[f"refused HTTP {exc.response.status_code}"] += 1
        except (OSError, InvalidHandshake) as exc:
            tally[f"connect failed: {type(exc).__name__}"] += 1
        else:
            tally["accepted"] += 1
            if await _drive(phase, ws, room, deadline, tally) is None:
                return  # still open at the deadline
            continue
        await asyncio.sleep(max(0.0, min(REFUSED_PAUSE, deadline - loop.time())))


async def _drive(phase: str, ws: Any, room: str, deadline: float,
                 tally: Counter[str]) -> int | None:
    """Run the phase's abuse on an open connection until the deadline (then close it and
    return ``None``) or until the server closes it (return its close code)."""
    from websockets.exceptions import ConnectionClosed

    answers: asyncio.Queue[str] | None = asyncio.Queue() if phase == "b" else None
    reader = asyncio.create_task(_read(ws, tally, answers))
    body: asyncio.Task[None] | None = None  # phase a only holds the connection open
    if answers is not None:
        body = asyncio.create_task(_churn(ws, room, tally, answers, deadline))
    elif phase in ("c", "d", "e"):
        abuse = {"c": _ghosts, "d": _pings, "e": _hostile}[phase]
        body = asyncio.create_task(abuse(ws, tally, deadline))
    try:
        async with asyncio.timeout_at(deadline):
            await asyncio.wait([t for t in (reader, body) if t is not None],
                               return_when=asyncio.FIRST_COMPLETED)
            await reader  # the body ended (closed, or its count reached): read to the end
    except TimeoutError:
        pass
    finally:
        if body is not None:
            body.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await body
    if reader.done():
        code = reader.result()
        tally[f"closed by server {code}"] += 1
        return code
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2):
            await ws.close()
    return None


async def _attack(phase: str, url: str, room: str, slots: int, deadline_wall: float) -> Counter[str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (deadline_wall - time.time())
    tally: Counter[str] = Counter()
    gate = asyncio.Semaphore(FLOOD_IN_FLIGHT)
    await asyncio.gather(*(_slot(phase, url, room, deadline, tally, gate)
                           for _ in range(slots)))
    return tally


def attacker_process(phase: str, url: str, room: str, slots: int, nice: int, index: int,
                     ready: Any, go: Any, deadline: Any, results: Any) -> None:
    """Entry point of one attacker process: ``slots`` connection slots of ``phase``."""
    import websockets.asyncio.client  # noqa: F401  (imported before the start, not during)

    if nice:
        os.nice(nice)
    ready.put(index)
    if not go.wait(120):
        return
    cpu0 = time.process_time()
    tally = asyncio.run(_attack(phase, url, room, slots, float(deadline.value)))
    results.put((index, dict(tally), time.process_time() - cpu0))


# --- the legitimate client (a process of its own) --------------------------------------------

async def _legit(url: str, room: str, ready: Any, control: Any) -> None:
    """Stay subscribed to ``room``; record (n, latency) of every bench row once; answer
    ``report`` on ``control`` with what arrived since the last report; stop at ``stop``."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake

    loop = asyncio.get_running_loop()
    seen: set[int] = set()
    fresh: list[tuple[int, float]] = []
    notes: Counter[str] = Counter()
    last_seq: int | None = None
    stopping = asyncio.Event()
    announced = False

    lag = [0.0]  # the client's own worst event-loop lag since the last report, seconds

    def on_command() -> None:
        command = control.recv()
        if command == "report":
            control.send((fresh.copy(), dict(notes), lag[0]))
            fresh.clear()
            notes.clear()
            lag[0] = 0.0
        else:
            stopping.set()

    async def lag_probe() -> None:
        while True:
            before = loop.time()
            await asyncio.sleep(0.005)
            lag[0] = max(lag[0], loop.time() - before - 0.005)

    loop.add_reader(control.fileno(), on_command)

    async def session() -> None:
        nonlocal last_seq, announced
        async with connect(url, open_timeout=10, close_timeout=2, compression=None,
                           max_size=2**24) as ws:
            subscribe: dict[str, Any] = {"type": "subscribe", "room": room, "ref": "legit"}
            if last_seq is not None:
                subscribe["since"] = last_seq
            await ws.send(json.dumps(subscribe))
            async for raw in ws:
                now = time.time()
                obj = json.loads(raw)
                kind = obj.get("type")
                if kind == "event":
                    last_seq = int(obj["seq"])
                    meta = (obj.get("data") or {}).get("metadata") or {}
                    if "n" not in meta:
                        continue
                    n = int(meta["n"])
                    if n in seen:
                        notes["duplicates"] += 1
                        continue
                    seen.add(n)
                    fresh.append((n, now - float(meta["bench_t"])))
                elif kind == "subscribed" and not announced:
                    announced = True
                    ready.put(None)
                elif kind not in ("welcome", "subscribed", "pong"):
                    notes[f"got {_answer_key(raw)}"] += 1
                    if not announced:
                        ready.put(f"subscribe refused: {raw!r}")
                        announced = True
        notes[f"closed by server {ws.close_code}"] += 1

    async def forever() -> None:
        while True:
            try:
                await session()
            except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake) as exc:
                notes[f"connection lost: {type(exc).__name__}"] += 1
            except Exception as exc:  # a bug here must show in the report, not stop the client
                notes[f"client error: {type(exc).__name__}: {exc}"] += 1
            notes["reconnects"] += 1
            await asyncio.sleep(0.2)

    tasks = [asyncio.create_task(forever()), asyncio.create_task(lag_probe())]
    await stopping.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def legit_process(url: str, room: str, ready: Any, control: Any) -> None:
    asyncio.run(_legit(url, room, ready, control))


# --- the daemon -------------------------------------------------------------------------------

class Daemon:
    """``python -m daemon`` on ``port`` with default limits; log in ``log``."""

    def __init__(self, db: str, port: int, log: Path) -> None:
        self.env = clean_env() | {"DATABASE_URL": db, "PGBRIDGE_JWT_SECRET": SECRET,
                                  "PGBRIDGE_PORT": str(port)}
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "daemon"], env=self.env,
                                         cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while self.healthz()[0] != 200:
            if not self.alive():
                raise RuntimeError(f"daemon exited with {self.proc.returncode} at start-up; "
                                   f"log: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError("daemon not healthy within 60 s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_mib(self) -> float:
        """VmRSS from /proc/<pid>/status in MiB; NaN once the process is gone."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except (OSError, ValueError):
            pass
        return math.nan

    def healthz(self, timeout: float = 2.0) -> tuple[int | None, dict[str, Any]]:
        """(HTTP status, JSON body) of GET /healthz; (None, {}) without an answer."""
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            body = response.read()
            conn.close()
        except (OSError, http.client.HTTPException):
            return None, {}
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = {}
        return response.status, parsed if isinstance(parsed, dict) else {}

    def tail(self, lines: int = 3) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line[:300] for line in text[-lines:])

    def post_mortem(self) -> str:
        """The last error the daemon logged (message and the exception's last line), and a
        copy of its log kept in the temporary directory (the run's own is removed)."""
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        keep = Path(tempfile.gettempdir()) / f"pgbridge-abuse-daemon-{self.pid}.log"
        with contextlib.suppress(OSError):
            keep.write_text("\n".join(lines) + "\n")
        last = f"no error logged; last line: {lines[-1] if lines else '(empty log)'}"
        for line in reversed(lines[-200:]):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("level") in ("error", "critical"):
                exc = str(record.get("exception") or "").strip().splitlines()
                last = f"last error logged: {record.get('message')}" + (
                    f": {exc[-1]}" if exc else "")
                break
        return f"{last[:300]} (log kept in {keep})"


@dataclass(frozen=True)
class Cast:
    room: str
    writer: str
    legit: str
    attackers: dict[str, str]  # phase -> users.id


def setup(db: str, phases: list[str]) -> Cast:
    """Schema, one room, the writer and the legitimate user in it, one attacker user per
    phase (phase b's is a member of the room too)."""
    import psycopg

    from daemon.schema import apply_schema_sync

    apply_schema_sync(db, schema="public")
    names = ["writer", "legit", *(f"attacker_{p}" for p in phases)]
    with psycopg.connect(db, autocommit=True) as conn:
        users = {name: str(conn.execute(
            "INSERT INTO users (auth0_id, email, username) VALUES (%s, %s, %s) RETURNING id",
            [f"abuse|{name}", f"{name}@abuse.invalid", name]).fetchone()[0])  # type: ignore[index]
            for name in names}
        room = str(conn.execute("INSERT INTO channels (name) VALUES ('abuse') "
                                "RETURNING id").fetchone()[0])  # type: ignore[index]
        members = ["writer", "legit", *(["attacker_b"] if "b" in phases else [])]
        for name in members:
            conn.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                         [room, users[name]])
    return Cast(room, users["writer"], users["legit"],
                {p: users[f"attacker_{p}"] for p in phases})


# --- one phase --------------------------------------------------------------------------------

@dataclass
class Phase:
    key: str
    name: str
    n0: int = 0  # the phase's rows are numbered n0, n0 + 1, ...
    written: int = 0
    write_rate: float = 0.0
    got: dict[int, float] = field(default_factory=dict)  # row -> latency (s), in the phase
    late: int = 0  # rows of this phase delivered only after its drain (e.g. after a restart)
    legit_notes: dict[str, int] = field(default_factory=dict)
    client_lag: float = 0.0  # ms, the legitimate client's worst event-loop lag
    machine_cpu: float = math.nan  # % of one core, all cores together
    attack: Counter[str] = field(default_factory=Counter)
    attacker_cpu: float = 0.0
    daemon_cpu: float = 0.0
    rss_before: float = math.nan
    rss_after: float = math.nan
    rss_peak: float = math.nan
    alive: bool = True
    exit_code: int | None = None
    healthz: int | None = None
    restarted: bool = False
    died_log: str = ""
    error: str | None = None

    @property
    def latencies(self) -> list[float]:
        return list(self.got.values())

    def pct(self, q: float) -> float:
        if not self.got:
            return math.nan
        ordered = sorted(self.got.values())
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


@dataclass
class Run:
    """The run's state: the legitimate client's control pipe, the phases so far, the next
    row number."""

    control: Any
    phases: list[Phase] = field(default_factory=list)
    next_n: int = 0

    def collect(self, current: Phase | None) -> None:
        """Fetch what the legitimate client received since the last call: rows of ``current``
        go to its latencies, rows of earlier phases count as late there; the client's notes and
        loop lag go to ``current`` (else to the last phase)."""
        self.control.send("report")
        fresh, notes, lag = self.control.recv()
        target = current or (self.phases[-1] if self.phases else None)
        if target is None:
            return
        for n, latency in fresh:
            if current is not None and current.n0 <= n < current.n0 + current.written:
                current.got[n] = latency
                continue
            for p in self.phases:
                if p.n0 <= n < p.n0 + p.written:
                    p.late += 1
        merged = Counter(target.legit_notes)
        merged.update(notes)
        target.legit_notes = dict(merged)
        target.client_lag = max(target.client_lag, lag * 1000)


def slots_of(phase: str) -> int:
    return {"a": FLOOD_ATTEMPTS, "b": CHURN_CONNECTIONS, "c": GHOST_CONNECTIONS,
            "d": PING_CONNECTIONS, "e": HOSTILE_CONNECTIONS, "f": EARLY_CONNECTIONS}[phase]


def write_until(conn: Any, room: str, user: str, rate: float, end: float, run: Run,
                phase: Phase, tick: Callable[[], None]) -> None:
    """Insert at ``rate`` rows/s until ``end`` (perf_counter), numbered from ``run.next_n``
    (advanced per row, so a failure leaves the numbering right), counted in ``phase.written``;
    call ``tick`` between rows."""
    start, i = time.perf_counter(), 0
    while True:
        at = start + i / rate
        if at >= end or time.perf_counter() >= end:
            return
        delay = at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        n = run.next_n
        conn.execute(WRITE, (room, user, f"abuse message {n}", n), prepare=True)
        run.next_n += 1
        phase.written += 1
        i += 1
        tick()


def run_phase(phase: Phase, daemon: Daemon, cast: Cast, args: argparse.Namespace, conn: Any,
              run: Run) -> None:
    from daemon.auth import mint_token

    key = phase.key
    ctx = mp.get_context("spawn")
    ready, go, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    deadline = ctx.Value("d", 0.0, lock=False)
    procs: list[Any] = []
    if key != "0":
        url = (f"ws://127.0.0.1:{daemon.port}/ws?token="
               + mint_token(SECRET, cast.attackers[key], ttl=3600))
        total = slots_of(key)
        count = max(1, min(args.attacker_procs, total))
        procs = [ctx.Process(target=attacker_process, daemon=True,
                             args=(key, url, cast.room, total // count + (i < total % count),
                                   args.attacker_nice, i, ready, go, deadline, results))
                 for i in range(count)]
        for p in procs:
            p.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        phase.rss_before = phase.rss_peak = daemon.rss_mib()
        cpu0, t0, busy0 = proc_cpu(daemon.pid), time.monotonic(), machine_busy()
        deadline.value = time.time() + 0.05 + args.seconds
        go.set()
        next_sample = 0.0

        def sample() -> None:
            nonlocal next_sample
            if time.monotonic() >= next_sample:
                next_sample = time.monotonic() + 0.25
                phase.rss_peak = max(phase.rss_peak, daemon.rss_mib())

        time.sleep(0.05)
        end = time.perf_counter() + args.seconds
        write_until(conn, cast.room, cast.writer, args.rate, end, run, phase, sample)
        phase.write_rate = phase.written / args.seconds
        drain(phase, run, args.drain, sample)
        phase.daemon_cpu = 100 * (proc_cpu(daemon.pid) - cpu0) / (time.monotonic() - t0)
        busy1 = machine_busy()
        if busy1[1] > busy0[1]:
            phase.machine_cpu = (100 * (os.cpu_count() or 1) * (busy1[0] - busy0[0])
                                 / (busy1[1] - busy0[1]))
        for _ in procs:
            with contextlib.suppress(Exception):
                _, tally, cpu = results.get(timeout=60)
                phase.attack.update(tally)
                phase.attacker_cpu += 100 * cpu / args.seconds
    finally:
        go.set()
        for p in procs:
            p.join(15)
            if p.is_alive():
                p.kill()
                phase.attack["attacker process killed (did not stop)"] += 1
    settle(daemon)
    phase.rss_after = daemon.rss_mib()
    phase.alive = daemon.alive()
    phase.healthz = daemon.healthz()[0] if phase.alive else None
    if not phase.alive:
        assert daemon.proc is not None
        phase.exit_code = daemon.proc.returncode
        phase.died_log = daemon.post_mortem()


def drain(phase: Phase, run: Run, limit: float, tick: Callable[[], None]) -> None:
    """Collect the legitimate client's deliveries of this phase's rows, waiting up to ``limit``
    seconds (or 3 s without progress) for the last ones."""
    stop_at, best, best_at = time.monotonic() + limit, -1, time.monotonic()
    while True:
        run.collect(phase)
        now = time.monotonic()
        if len(phase.got) >= phase.written or now >= stop_at:
            return
        if len(phase.got) > best:
            best, best_at = len(phase.got), now
        elif now - best_at > 3.0:
            return
        tick()
        time.sleep(0.1)


def resumed(daemon: Daemon, timeout: float = 10.0) -> None:
    """After a restart: wait until the legitimate client is connected again (if /healthz
    counts connections; else 2 s), then 0.5 s for its replay."""
    stop_at = time.monotonic() + timeout
    while time.monotonic() < stop_at:
        status, body = daemon.healthz()
        count = body.get("connections")
        if status is not None and not isinstance(count, int):
            time.sleep(2.0)
            break
        if isinstance(count, int) and count >= 1:
            break
        time.sleep(0.1)
    time.sleep(0.5)


def settle(daemon: Daemon, timeout: float = 10.0) -> None:
    """Wait until the daemon counts only the legitimate connection (if /healthz says)."""
    stop_at = time.monotonic() + timeout
    while daemon.alive() and time.monotonic() < stop_at:
        status, body = daemon.healthz()
        if status is not None and not isinstance(body.get("connections"), int):
            return
        if isinstance(body.get("connections"), int) and body["connections"] <= 1:
            return
        time.sleep(0.2)


# --- report -----------------------------------------------------------------------------------

def ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f}"


def daemon_state() -> str:
    """Which daemon code ran: HEAD and a digest of daemon/*.py as they are on disk."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "daemon").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "daemon"], cwd=ROOT,
                               text=True, capture_output=True, timeout=10).stdout.splitlines()
    except OSError:
        head, dirty = "?", []
    changes = f" + uncommitted changes in {len(dirty)} file(s) of daemon/" if dirty else ""
    return f"HEAD {head or '?'}{changes}; daemon/*.py sha256 {digest.hexdigest()[:12]}"


def attack_summary(p: Phase) -> list[str]:
    t = p.attack
    if p.key == "0":
        return ["no attacker"]
    refused = ", ".join(f"{k.removeprefix('refused ')} x{v:,}" for k, v in sorted(t.items())
                        if k.startswith("refused "))
    failed = ", ".join(f"{k.removeprefix('connect failed: ')} x{v:,}"
                       for k, v in sorted(t.items()) if k.startswith("connect failed: "))
    lines = [f"connections: {t['connect attempts']:,} attempts, {t['accepted']:,} accepted, "
             f"refused: {refused or 'none'}" + (f", failed: {failed}" if failed else "")
             + (f", unfinished at the end: {t['connect unfinished at the end']:,}"
                if t["connect unfinished at the end"] else "")]
    sent = t["sent"] + t["sent control ping"]
    if sent or p.key != "a":
        pings = (f" (incl. {t['sent control ping']:,} control pings, "
                 f"{t['got control pong']:,} control pongs back)" if t["sent control ping"] else "")
        lines.append(f"frames: {sent:,} sent{pings}, {t['answered']:,} answered, "
                     f"{t['got error rate_limited']:,} rate_limited")
        answers = ", ".join(f"{k.removeprefix('got ')} x{v:,}" for k, v in t.most_common()
                            if k.startswith("got ") and k not in (
                                "got control pong", "got error rate_limited"))
        lines.append(f"received: {answers or 'nothing'}")
    unanswered = [f"{k} x{v:,}" for k, v in t.items() if k.startswith("unanswered")]
    closes = ", ".join(f"{k.removeprefix('closed by server ')} x{v:,}"
                       for k, v in sorted(t.items()) if k.startswith("closed by server "))
    lines.append(f"close codes from the server: {closes or 'none'}"
                 + (f"; {', '.join(unanswered)}" if unanswered else "")
                 + f"; attacker CPU {p.attacker_cpu:.0f}%")
    killed = t["attacker process killed (did not stop)"]
    if killed:
        lines.append(f"{killed} attacker process(es) had to be killed")
    return lines


def report(phases: list[Phase], args: argparse.Namespace) -> None:
    base = next((p for p in phases if p.key == "0" and not p.error), None)
    base_p99 = base.pct(0.99) if base else math.nan
    print(f"\n{'phase':<25} {'delivered/expected':>18} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'max ms':>7} {'p99 delta':>9} {'p99 ratio':>9} {'writer/s':>8} {'daemon CPU':>10} "
          f"{'daemon RSS MiB before->after (peak)':>35}  daemon after the phase")
    for p in phases:
        label = f"{p.key} {p.name}"
        if p.error:
            print(f"{label:<25} error: {p.error}")
            continue
        p99 = p.pct(0.99)
        delta = ratio = "-"
        if p.key != "0":
            delta = ms(p99 - base_p99)
            ratio = f"{p99 / base_p99:.2f}" if base_p99 > 0 and not math.isnan(p99) else "n/a"
        state = (f"alive, /healthz {p.healthz or 'no answer'}" if p.alive else
                 f"DAEMON DIED (exit code {p.exit_code})")
        if p.restarted:
            state += "; restarted before this phase"
        after = "gone" if math.isnan(p.rss_after) else f"{p.rss_after:.0f}"
        rss = f"{p.rss_before:.0f} -> {after} ({p.rss_peak:.0f})"
        delivered = f"{len(p.got):,}/{p.written:,}" + (f" +{p.late:,} late" if p.late else "")
        worst = max(p.got.values(), default=math.nan) * 1000
        print(f"{label:<25} {delivered:>18} {ms(p.pct(0.5)):>7} {ms(p99):>7} {ms(worst):>7} "
              f"{delta:>9} {ratio:>9} {p.write_rate:>8.0f} {p.daemon_cpu:>9.0f}% {rss:>35}  "
              f"{state}")
    print("\nper phase: the attacker (a user of its own with valid tokens, "
          f"{args.attacker_procs} process(es) niced +{args.attacker_nice}), the legitimate "
          "client, the machine")
    cores = 100 * (os.cpu_count() or 1)
    for p in phases:
        if p.error:
            continue
        lines = attack_summary(p)
        notes = "".join(f", {k} x{v:,}" for k, v in sorted(p.legit_notes.items()) if v)
        lines.append(f"legitimate client: worst event-loop lag of its own {p.client_lag:.1f} ms"
                     f"{notes}; machine CPU {p.machine_cpu:.0f}% of {cores}%")
        if not p.alive and p.died_log:
            lines.append(f"daemon died: {p.died_log}")
        print(f"  {p.key} {p.name:<23} {lines[0]}")
        for line in lines[1:]:
            print(f"  {'':<25} {line}")
    done = [p for p in phases if not p.error]
    in_time = sum(len(p.got) for p in done)
    late = sum(p.late for p in done)
    written = sum(p.written for p in done)
    missing = written - in_time - late
    died = ", ".join(p.key for p in done if not p.alive) or "none"
    print(f"\nlegitimate client over the run: {in_time:,}/{written:,} rows delivered in their phase"
          + (f", {late:,} late" if late else "")
          + (", nothing lost" if missing == 0 else f", {missing:,} NEVER DELIVERED")
          + f"; phases the daemon died in: {died}")
    sys.stdout.flush()


# --- main -------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="PostgreSQL server (superuser or CREATEDB); a scratch database is "
                        "created there and dropped (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="length of each phase in seconds (8)")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="inserts per second into the legitimate client's room (100)")
    parser.add_argument("--phases", default="a,b,c,d,e,f",
                        help="comma-separated abuses to run after the baseline: "
                        + ", ".join(f"{k} ({v})" for k, v in PHASES.items()) + " (all)")
    parser.add_argument("--drain", type=float, default=10.0,
                        help="at most this many seconds to wait for the legitimate client's last "
                        "deliveries after a phase (10; stops after 3 s without progress)")
    parser.add_argument("--attacker-procs", type=int, default=1,
                        help="processes the attacker's connections are spread over (1)")
    parser.add_argument("--attacker-nice", type=int, default=10,
                        help="niceness added to the attacker processes (10; 0: none)")
    args = parser.parse_args()
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not args.phases or set(args.phases) - set(PHASES):
        parser.error(f"--phases: comma-separated among {', '.join(PHASES)}")
    if args.seconds <= 0 or args.rate <= 0 or args.attacker_procs < 1 or args.attacker_nice < 0:
        parser.error("--seconds, --rate and --attacker-procs must be positive, "
                     "--attacker-nice at least 0")
    return args


def main() -> int:
    args = parse_args()
    import psycopg

    from daemon.auth import mint_token

    print(f"abuse bench: {os.cpu_count()} CPUs, {args.seconds:g} s per phase, "
          f"{args.rate:g} inserts/s into the legitimate client's room, phases 0,"
          f"{','.join(args.phases)}; daemon with default limits, {daemon_state()}")
    sys.stdout.flush()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="abuse-") as logs, scratch_database(args.dsn, "abuse") as db:
        cast = setup(db, args.phases)
        daemon = Daemon(db, free_port(), Path(logs) / "daemon.log")
        ready = ctx.Queue()
        control, child_end = ctx.Pipe()
        run = Run(control)
        phases = run.phases
        url = f"ws://127.0.0.1:{daemon.port}/ws?token=" + mint_token(SECRET, cast.legit,
                                                                      ttl=24 * 3600)
        legit = ctx.Process(target=legit_process, args=(url, cast.room, ready, child_end),
                            daemon=True)
        try:
            daemon.start()
            legit.start()
            problem = ready.get(timeout=60)
            if problem:
                raise RuntimeError(f"legitimate client: {problem}")
            time.sleep(0.5)
            with psycopg.connect(db, autocommit=True) as conn:
                conn.execute("SELECT 1")
                for key in ["0", *args.phases]:
                    phase = Phase(key, "baseline" if key == "0" else PHASES[key], n0=run.next_n)
                    try:
                        if not daemon.alive():
                            phase.restarted = True
                            daemon.start()
                            resumed(daemon)
                            run.collect(None)  # the dead phase's rows it gets now are late
                        run_phase(phase, daemon, cast, args, conn, run)
                    except Exception as exc:  # report it and go on with the next phase
                        phase.error = f"{type(exc).__name__}: {exc}"
                    phases.append(phase)
                    print(f"phase {key} ({phase.name}) done: {len(phase.got):,}/"
                          f"{phase.written:,} delivered, p99 {ms(phase.pct(0.99))} ms, daemon "
                          f"{'alive' if phase.alive else 'DIED'}", file=sys.stderr, flush=True)
            if daemon.alive():
                time.sleep(0.5)
                run.collect(None)  # rows still arriving after the last drain count as late
        finally:
            with contextlib.suppress(OSError):
                control.send("stop")
            legit.join(10)
            if legit.is_alive():
                legit.kill()
            daemon.stop()
    report(phases, args)
    return 0 if phases and all(p.alive and not p.error for p in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
