#!/usr/bin/env python3
"""How fast pgbridge heals: for each kind of fault, the time from "the fault is over" to
"events flow again" (docs/topics/faults.md).

    python -m bench.recovery [--rounds 3] [--outages 10,30] [--no-ssh] [--daemon-root DIR]
                             [--slow-only]

One run: a private embedded PostgreSQL (it is stopped and started, so never the machine's own
server), the daemon as a subprocess (``python -m daemon``, default settings), a writer that
commits a message every 20 ms over its own connection (reconnecting every 50 ms while the
server is down), and one subscriber that reconnects every 50 ms and resumes with ``since``.
The client's own backoff is kept out of the figures on purpose: they are the daemon's.

Faults, each ``--rounds`` times:

* ``listener killed``: ``pg_terminate_backend`` of the daemon's LISTEN backend; over when the
  statement returns;
* ``PostgreSQL restart``: the server stopped and started at once; over when it accepts
  connections again;
* ``PostgreSQL down N s``: stopped for ``N`` seconds (``--outages``), then started;
* ``SSH cut``: the daemon reaches the database through a real SSH server (asyncssh, from
  tests/support/sshd.py) whose connections are all aborted; over when the daemon logs
  ``tunnel_reopened``;
* ``daemon SIGKILL`` / ``daemon SIGTERM``: the daemon killed and started again; over when the
  new process logs ``ready``.

Then a client that stops reading while 6 KB messages keep coming every 20 ms: the time until
the daemon closes it with 4008 (its ``slow_client`` log line), and how much was sent meanwhile.

"Events flow again" is when the subscriber receives the first message committed after the
fault was over: the figure is that moment minus the end of the fault (so it includes up to one
20 ms write interval, and the writer's own reconnect after a PostgreSQL outage). A round whose
events do not flow within 30 s is reported as such. The baseline, measured in the same run with no fault, is the median
commit-to-receipt latency. ``--daemon-root`` runs the daemon from another checkout (an older
commit, to compare); the schema is always the one of this checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import websockets
from psycopg.conninfo import conninfo_to_dict

from bench.common import ROOT, clean_env, free_port
from daemon.auth import mint_token

SECRET = "bench-recovery-secret-0123456789-0123456789"
WRITE_EVERY = 0.02  # seconds between two commits of the writer
RETRY_EVERY = 0.05  # seconds between two reconnects of the writer and the subscriber
GOAL = 1.0  # seconds from the end of a fault to events flowing (issue 14)
HEAL_WAIT = 30.0  # seconds to wait for events to flow again before calling a round "stalled"


@dataclass
class Traffic:
    """Commits and receipts, by message content; wall-clock seconds."""

    commits: dict[str, float] = field(default_factory=dict)
    receipts: dict[str, float] = field(default_factory=dict)
    received: asyncio.Event = field(default_factory=asyncio.Event)  # set at every receipt
    stop: bool = False

    async def healed(self, over: float, timeout: float) -> float | None:
        """:meth:`heal`, once known (``None`` after ``timeout`` seconds)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while (seconds := self.heal(over)) is None:
                    self.received.clear()
                    await self.received.wait()
                return seconds
        return None

    def heal(self, over: float) -> float | None:
        """Seconds from ``over`` to the receipt of the first message committed after it."""
        first = min(((t, c) for c, t in self.commits.items() if t >= over), default=None)
        if first is None or first[1] not in self.receipts:
            return None  # nothing committed since, or not received (yet)
        return self.receipts[first[1]] - over

    def latencies(self, since: float) -> list[float]:
        return [self.receipts[c] - t for c, t in self.commits.items()
                if t >= since and c in self.receipts]


async def write(db: str, room: str, user: str, traffic: Traffic, *, pad: int = 0) -> None:
    n = 0
    while not traffic.stop:
        try:
            async with await psycopg.AsyncConnection.connect(db, autocommit=True,
                                                             connect_timeout=2) as conn:
                while not traffic.stop:
                    content = f"m{n}" + " " * pad
                    await conn.execute("INSERT INTO messages (channel_id, user_id, content) "
                                       "VALUES (%s, %s, %s)", (room, user, content))
                    traffic.commits[content] = time.time()
                    n += 1
                    await asyncio.sleep(WRITE_EVERY)
        except (psycopg.Error, OSError):
            await asyncio.sleep(RETRY_EVERY)


def subscribe_frame(room: str, since: int | None) -> str:
    frame: dict[str, Any] = {"type": "subscribe", "room": room, "ref": "r"}
    if since is not None:
        frame["since"] = since
    return json.dumps(frame)


async def subscribe(url: str, room: str, traffic: Traffic) -> None:
    last: int | None = None
    while not traffic.stop:
        try:
            async with websockets.connect(url, open_timeout=5, max_size=2**24) as ws:
                await ws.send(subscribe_frame(room, last))
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame["type"] == "event":
                        if last is not None and frame["seq"] <= last:
                            continue
                        last = frame["seq"]
                        if frame["table"] == "messages" and frame["op"] == "INSERT":
                            traffic.receipts.setdefault(frame["data"]["content"], time.time())
                            traffic.received.set()
                    elif frame["type"] == "subscribed" and last is None:
                        last = frame["from"]
                    elif frame["type"] == "error":
                        await asyncio.sleep(RETRY_EVERY)
                        await ws.send(subscribe_frame(room, last))
        except (OSError, websockets.exceptions.WebSocketException, TimeoutError):
            await asyncio.sleep(RETRY_EVERY)


class Daemon:
    """``python -m daemon`` as a subprocess; its JSON log lines are kept to read events."""

    def __init__(self, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.env, self.cwd, self.log = env, cwd, log
        self.proc: asyncio.subprocess.Process | None = None
        self.records: list[dict[str, Any]] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> float:
        """Start; return the wall time of its ``ready`` log line."""
        before = len(self.records)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon", env=self.env, cwd=self.cwd,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        self._reader = asyncio.create_task(self._read(self.proc))
        return await self.event("ready", after=before, timeout=60)

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        with self.log.open("a") as out:
            async for raw in proc.stderr:
                line = raw.decode(errors="replace")
                out.write(line)
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict):
                        self.records.append(record)

    async def event(self, name: str, *, after: int, timeout: float = 60) -> float:
        """Wall time of the first ``name`` log line after record ``after``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.records[after:]:
                if record.get("event") == name:
                    return datetime.fromisoformat(record["ts"]).timestamp()
            if self.proc is not None and self.proc.returncode is not None:
                raise RuntimeError(f"the daemon exited ({self.proc.returncode}); see {self.log}")
            await asyncio.sleep(0.01)
        raise RuntimeError(f"the daemon did not log {name!r} within {timeout:g} s; see {self.log}")

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
            await self.proc.wait()
        if self._reader is not None:
            await self._reader


SLOW_PAD = 6000  # bytes of each message while a client stops reading


async def slow_consumer(env: dict[str, str], port: int, db: str, room: str, user: str,
                        daemon_root: Path, work: Path) -> tuple[float | None, int]:
    """Seconds from the moment a subscriber stops reading to its 4008 (the daemon's
    ``slow_client`` log line), and the bytes of the messages committed meanwhile."""
    env = {**env, "PGBRIDGE_PORT": str(port)}
    daemon = Daemon(env, daemon_root, work / "daemon-slow.log")
    await daemon.start()
    traffic = Traffic()
    url = f"ws://127.0.0.1:{port}/ws?token={mint_token(SECRET, user, ttl=86400)}"
    try:
        # the client library reads at most 16 frames ahead (max_queue), then the socket fills
        async with websockets.connect(url, max_size=2**24, max_queue=16) as ws:
            await ws.send(subscribe_frame(room, None))
            while json.loads(await ws.recv())["type"] != "subscribed":
                pass
            before = len(daemon.records)
            stopped = time.time()  # from here on, nothing is read
            writer = asyncio.create_task(write(db, room, user, traffic, pad=SLOW_PAD))
            try:
                closed = await daemon.event("slow_client", after=before, timeout=120)
            except RuntimeError:
                closed = None
            traffic.stop = True
            await writer
        sent = sum(SLOW_PAD for t in traffic.commits.values()
                   if closed is None or t <= closed)
        return (closed - stopped if closed is not None else None), sent
    finally:
        await daemon.stop()


async def listener_pid(db: str) -> int:
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        for _ in range(500):
            cur = await conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = "
                                     "current_database() AND pid <> pg_backend_pid() "
                                     "AND query LIKE '%%pgbridge_listen\"()%%'")
            row = await cur.fetchone()
            if row is not None:
                return int(row[0])
            await asyncio.sleep(0.01)
    raise RuntimeError("no LISTEN backend")


async def settle(seconds: float = 1.5) -> None:
    """Let traffic flow normally, so that every fault starts from a steady state."""
    await asyncio.sleep(seconds)


async def run(args: argparse.Namespace) -> int:
    from daemon.embedded import start_embedded
    from daemon.schema import apply_schema_sync

    work = Path(tempfile.mkdtemp(prefix="pgbridge-recovery-"))
    server = start_embedded(work / "data")
    pg = server.handle
    db = server.uri
    await asyncio.to_thread(apply_schema_sync, db, schema="public")
    with psycopg.connect(db, autocommit=True) as conn:
        [(user,)] = conn.execute("INSERT INTO users (auth0_id, email, username) VALUES "
                                 "('b|1', 'b@bench.invalid', 'bench') RETURNING id").fetchall()
        [(room,)] = conn.execute("INSERT INTO channels (name) VALUES ('bench') RETURNING id"
                                 ).fetchall()
        conn.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                     (room, user))
    results: dict[str, list[float | None]] = {}
    daemon_root = args.daemon_root or ROOT
    print(f"daemon from {daemon_root}; PostgreSQL {db}; logs in {work}", flush=True)

    async def phase(env: dict[str, str], port: int, faults: list[tuple[str, Any]]) -> float:
        traffic = Traffic()
        daemon = Daemon(env, daemon_root, work / "daemon.log")
        await daemon.start()
        url = f"ws://127.0.0.1:{port}/ws?token={mint_token(SECRET, user, ttl=86400)}"
        tasks = [asyncio.create_task(write(db, room, user, traffic)),
                 asyncio.create_task(subscribe(url, room, traffic))]
        await settle(3.0)
        baseline = statistics.median(traffic.latencies(time.time() - 2.0) or [float("nan")])
        for name, inject in faults:
            for _ in range(args.rounds):
                over = await inject(daemon)
                results.setdefault(name, []).append(await traffic.healed(over, HEAL_WAIT))
                print(f"  {name}: {fmt(results[name][-1])}", flush=True)
                await settle()
        traffic.stop = True
        await daemon.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return baseline

    async def kill_listener(_: Daemon) -> float:
        pid = await listener_pid(db)
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
            await conn.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
        return time.time()

    def outage(seconds: float) -> Any:
        async def inject(_: Daemon) -> float:
            await asyncio.to_thread(pg.stop)
            await asyncio.sleep(seconds)
            await asyncio.to_thread(pg.start)
            return time.time()
        return inject

    def restart_daemon(sig: int) -> Any:
        async def inject(daemon: Daemon) -> float:
            await daemon.stop(sig)
            return await daemon.start()
        return inject

    port = free_port()
    env = {**clean_env(), "DATABASE_URL": db, "PGBRIDGE_JWT_SECRET": SECRET,
           "PGBRIDGE_PORT": str(port), "PGBRIDGE_DATA_DIR": str(work / "unused")}
    faults: list[tuple[str, Any]] = [("listener killed", kill_listener),
                                     ("PostgreSQL restart", outage(0))]
    faults += [(f"PostgreSQL down {s:g} s", outage(s)) for s in args.outages]
    faults += [("daemon SIGKILL, restarted", restart_daemon(signal.SIGKILL)),
               ("daemon SIGTERM, restarted", restart_daemon(signal.SIGTERM))]
    baseline = float("nan")
    if not args.slow_only:
        print("direct connection:", flush=True)
        baseline = await phase(env, port, faults)

    if not args.no_ssh and not args.slow_only:
        from tests.support.sshd import TestSSHServer, postgres_target

        sshd = TestSSHServer(work, {("db.internal", 5432): postgres_target(db)})
        await sshd.start()
        parts = conninfo_to_dict(db)
        port = free_port()
        ssh_env = {**clean_env(), "POSTGRES_HOST": "db.internal", "POSTGRES_PORT": "5432",
                   "POSTGRES_DB": str(parts.get("dbname") or "postgres"),
                   "POSTGRES_USER": str(parts.get("user") or "postgres"),
                   "SSH_HOST": "127.0.0.1", "SSH_PORT": str(sshd.port), "SSH_USER": sshd.user,
                   "SSH_KEY_PATH": str(sshd.client_key_path),
                   "SSH_KNOWN_HOSTS": str(sshd.known_hosts_path),
                   "PGBRIDGE_JWT_SECRET": SECRET, "PGBRIDGE_PORT": str(port),
                   "PGBRIDGE_DATA_DIR": str(work / "unused")}

        async def cut(daemon: Daemon) -> float:
            before = len(daemon.records)
            sshd.cut()
            return await daemon.event("tunnel_reopened", after=before)

        print("through an SSH tunnel:", flush=True)
        await phase(ssh_env, port, [("SSH cut", cut)])
        await sshd.stop()
    print("a client that stops reading:", flush=True)
    slow = await slow_consumer(env, free_port(), db, room, user, daemon_root, work)
    server.stop()

    if results:
        print(f"\nbaseline (no fault): commit-to-receipt median {baseline * 1000:.1f} ms")
        print(f"{'fault':32} {'rounds':>6} {'median':>9} {'worst':>9}  goal <= {GOAL:g} s")
    worst_all = 0.0
    for name, values in results.items():
        ok = [v for v in values if v is not None]
        worst = max(ok) if len(ok) == len(values) else float("inf")
        worst_all = max(worst_all, worst)
        median = statistics.median(ok) if ok else float("inf")
        print(f"{name:32} {len(values):>6} {fmt(median):>9} {fmt(worst):>9}  "
              f"{'ok' if worst <= GOAL else 'ABOVE GOAL'}")
    seconds, sent = slow
    print(f"\na client that stops reading (messages of {SLOW_PAD / 1000:g} KB every "
          f"{WRITE_EVERY * 1000:g} ms): closed with 4008 after "
          f"{fmt(seconds)}, {sent / 1e6:.1f} MB sent meanwhile")
    return 0


def fmt(seconds: float | None) -> str:
    if seconds is None or seconds == float("inf"):
        return f"> {HEAL_WAIT:g} s"
    return f"{seconds:.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="times each fault is injected (3)")
    parser.add_argument("--outages", default="10",
                        help="comma-separated seconds PostgreSQL stays down (10)")
    parser.add_argument("--no-ssh", action="store_true", help="leave out the SSH cut")
    parser.add_argument("--daemon-root", help="run the daemon from this checkout instead")
    parser.add_argument("--slow-only", action="store_true",
                        help="measure only the client that stops reading")
    args = parser.parse_args()
    args.outages = [float(s) for s in args.outages.split(",") if s.strip()]
    args.daemon_root = Path(args.daemon_root).resolve() if args.daemon_root else None
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
