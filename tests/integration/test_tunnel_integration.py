"""setup_db.py and the daemon as real processes, reaching PostgreSQL only through a real SSH
tunnel (tests/support/sshd.py) to ``db.internal:5432`` as the bastion sees it.

The SSH server runs in this test's event loop, so everything here is async (subprocesses,
database access): a blocking call would stop the loop that carries the tunnel. The test's own
reads and writes go to PostgreSQL directly, never through the tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncssh
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from websockets.asyncio.client import ClientConnection

from daemon.errors import EXIT_TUNNEL
from daemon.schema import apply_schema_sync
from tests.support.fixtures import DB_HOST, DB_PORT, ROOT, conninfo_env, dbname_of
from tests.support.helpers import (
    SECRET,
    connect,
    head,
    make_room,
    make_user,
    post,
    recv,
    send,
    subscribe,
)
from tests.support.procs import DaemonProcess
from tests.support.sshd import TestSSHServer

WAIT = 20.0  # seconds; only reached when a test is failing
SCHEMA_TABLES = {
    "users", "channels", "messages", "channel_members", "reactions", "files", "user_settings",
    "user_status", "message_reads", "sync_state", "change_sequences", "change_events",
    "change_notify_key", "schema_migrations", "schema_files", "schema_extensions",
    "presence_instances", "presence_sessions",
}

Conn = psycopg.AsyncConnection[Any]


def tunnel_env(conninfo: str, sshd: TestSSHServer, **extra: str) -> dict[str, str]:
    """The spec's POSTGRES_* and SSH_* variables for the database of ``conninfo`` behind the
    bastion ``sshd`` (no DATABASE_URL)."""
    parts = conninfo_to_dict(conninfo)
    env = conninfo_env(conninfo)
    del env["DATABASE_URL"]
    env.update({
        "POSTGRES_HOST": DB_HOST,
        "POSTGRES_PORT": str(DB_PORT),
        "POSTGRES_DB": dbname_of(conninfo),
        "POSTGRES_USER": str(parts.get("user") or "postgres"),
        "SSH_HOST": "127.0.0.1",
        "SSH_PORT": str(sshd.port),
        "SSH_USER": sshd.user,
        "SSH_KEY_PATH": str(sshd.client_key_path),
        "SSH_KNOWN_HOSTS": str(sshd.known_hosts_path),
    })
    if parts.get("password"):
        env["POSTGRES_PASSWORD"] = str(parts["password"])
    env.update(extra)
    return env


async def tables_of(conninfo: str) -> set[str]:
    """Tables of schema public, read directly (not through the tunnel)."""
    async with await psycopg.AsyncConnection.connect(conninfo) as conn:
        cur = await conn.execute("SELECT table_name FROM information_schema.tables "
                                 "WHERE table_schema = 'public'")
        return {row[0] for row in await cur.fetchall()}


async def run_setup_db(env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "setup_db.py"), env=env, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# --------------------------------------------------------------------------- setup_db.py


@pytest.mark.slow
async def test_setup_db_applies_schema_through_tunnel(
    sshd: TestSSHServer, create_database: Callable[[], str], tmp_path: Path
) -> None:
    db = create_database()
    # A known_hosts entry for this server's address with another key: refused, nothing done.
    impostor = asyncssh.generate_private_key("ssh-ed25519")
    wrong = sshd.write_known_hosts(tmp_path / "wrong_known_hosts", key=impostor)
    code, out, err = await run_setup_db(tunnel_env(db, sshd, SSH_KNOWN_HOSTS=str(wrong)),
                                        tmp_path)
    assert code == EXIT_TUNNEL, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("setup_db.py: error: SSH host key of 127.0.0.1:"), err
    assert "CHANGED" in lines[0] and str(wrong) in lines[0]
    assert "Traceback" not in err and out == ""
    assert sshd.logins == 0 and sshd.forward_requests == []
    assert await tables_of(db) == set()

    code, out, err = await run_setup_db(tunnel_env(db, sshd), tmp_path)
    assert code == 0, (code, out, err)
    assert "applied sql/schema.sql" in out
    assert "Traceback" not in err
    assert await tables_of(db) == SCHEMA_TABLES
    async with await psycopg.AsyncConnection.connect(db) as conn:
        cur = await conn.execute("SELECT count(*) FROM pg_trigger t JOIN pg_class c "
                                 "ON c.oid = t.tgrelid WHERE c.relname = 'messages' "
                                 "AND NOT t.tgisinternal")
        row = await cur.fetchone()
    assert row is not None and row[0] > 0, "no change-capture trigger on messages"
    assert sshd.logins == 1
    assert (DB_HOST, DB_PORT) in sshd.forward_requests
    async with asyncio.timeout(WAIT):  # the one-shot tunnel is closed when setup_db exits
        await sshd.idle.wait()


# --------------------------------------------------------------------------- the daemon


async def http_get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                     .encode())
        await writer.drain()
        async with asyncio.timeout(WAIT):
            response = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    status_line, _, body = response.partition(b"\r\n\r\n")
    status = int(status_line.split(b" ", 2)[1])
    return status, json.loads(body)


class Collector:
    """Reads every frame of one subscribed connection; ``seqs`` are the events' seqs."""

    def __init__(self, ws: ClientConnection, room: str) -> None:
        self.ws, self.room = ws, room
        self.seqs: list[int] = []
        self.others: list[dict[str, Any]] = []
        self.pongs = 0
        self._changed = asyncio.Condition()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            frame = await recv(self.ws, timeout=3600)
            if frame["type"] == "event" and frame["room"] == self.room:
                self.seqs.append(frame["seq"])
            elif frame["type"] == "pong":
                self.pongs += 1
            else:
                self.others.append(frame)
            async with self._changed:
                self._changed.notify_all()

    async def wait(self, ok: Callable[[], bool], what: str) -> None:
        try:
            async with asyncio.timeout(WAIT), self._changed:
                while not ok():
                    if self.task.done():
                        self.task.result()
                        pytest.fail(f"client stopped reading before {what}")
                    assert not self.others, self.others
                    await self._changed.wait()
        except TimeoutError:
            last = self.seqs[-1] if self.seqs else None
            pytest.fail(f"no {what} within {WAIT:g} s: the client has {len(self.seqs)} events, "
                        f"the last is seq {last}")

    async def wait_seq(self, seq: int) -> None:
        await self.wait(lambda: bool(self.seqs) and self.seqs[-1] >= seq, f"seq {seq}")

    async def barrier(self) -> None:
        """Ping and wait for the pong: everything the daemon sent before it has been read."""
        expected = self.pongs + 1
        await send(self.ws, type="ping", ref="barrier")
        await self.wait(lambda: self.pongs >= expected, "the pong")


class Writer:
    """Posts messages to ``room`` directly on the database, one transaction each, until
    stopped; ``written`` counts the committed ones."""

    def __init__(self, conn: Conn, room: str, user: str) -> None:
        self.conn, self.room, self.user = conn, room, user
        self.written = 0
        self._stop = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            await post(self.conn, self.room, self.user, f"m{self.written + 1}")
            self.written += 1
            # pacing only (a steady stream, not a burst that would exceed the client's queue)
            await asyncio.sleep(0.005)

    async def stop(self) -> int:
        self._stop.set()
        await self.task
        return self.written


@pytest.mark.slow
async def test_daemon_through_tunnel_delivers_events_and_survives_ssh_cut(
    sshd: TestSSHServer, create_database: Callable[[], str], tmp_path: Path,
    unused_tcp_port: int,
) -> None:
    """Two SSH cuts: the client gets every seq of the room exactly once, in order.

    The first cut comes in the middle of a stream of writes, and more rows are written while
    the tunnel is down. Before the second cut the stream has ended and the client holds
    everything; rows written while the tunnel is down can then only reach the client through
    the listener's catch-up from change_events after it reconnects (no later NOTIFY of the
    room rings the bell)."""
    db = create_database()
    await asyncio.to_thread(apply_schema_sync, db, schema="public")
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn, \
            await psycopg.AsyncConnection.connect(db, autocommit=True) as side:
        alice = await make_user(side, "alice")
        bob = await make_user(side, "bob")
        room = await make_room(side, alice, bob)

        env = tunnel_env(db, sshd, PGBRIDGE_JWT_SECRET=SECRET, PGBRIDGE_PORT=str(unused_tcp_port),
                         PGBRIDGE_HOST="127.0.0.1", PGBRIDGE_PROBE_INTERVAL="1",
                         PGBRIDGE_DATA_DIR=str(tmp_path / "unused-data-dir"),
                         SSH_RETRY_DELAY="0.4")  # reopen after 0.2-0.4 s
        daemon = DaemonProcess(env, tmp_path, tmp_path / "daemon.log")
        await daemon.start()
        writer: Writer | None = None
        try:
            await daemon.wait_event("ready", timeout=30)
            status, health = await http_get(unused_tcp_port, "/healthz")
            assert status == 200 and health["listener"] is True, health
            assert sshd.logins == 1 and len(sshd.live) == 1
            assert (DB_HOST, DB_PORT) in sshd.forward_requests

            ws = await connect(unused_tcp_port, alice)
            subscribed = await subscribe(ws, room)
            base = subscribed["head"]  # the room's own rows (channel, members) came first
            assert subscribed["from"] == base and base > 0, subscribed
            client = Collector(ws, room)

            writer = Writer(conn, room, bob)
            await client.wait_seq(base + 20)  # live through the tunnel
            for cut in (1, 2):
                if cut == 2:  # the stream ends, and the client holds all of it
                    await writer.stop()
                    await client.wait_seq(await head(side, room))
                assert sshd.cut() == 1, "the daemon's one SSH connection"
                await daemon.wait_event("tunnel_down", cut)
                for n in range(5):
                    await post(side, room, alice, f"while down {cut}.{n}")
                assert not sshd.live, "the tunnel came back before the writes while down"
                await daemon.wait_event("tunnel_reopened", cut)
                await daemon.wait_event("listener_connected", cut + 1)
                # the listener reconnects as soon as the tunnel is back, not at the end of
                # its backoff (which a cut long enough would have grown to its cap)
                reopened = daemon.with_event("tunnel_reopened")[cut - 1]["ts"]
                listening = daemon.with_event("listener_connected")[cut]["ts"]
                healed = (datetime.fromisoformat(listening)
                          - datetime.fromisoformat(reopened)).total_seconds()
                assert 0 <= healed < 0.5, f"LISTEN {healed:.3f} s after the tunnel reopened"
                if cut == 1:
                    # caught up from the log, then live again for a while: 250 more writes of
                    # the paced writer take over 1.25 s, longer than the listener's delay
                    # before it retries a failed log read, so no retry left over from this
                    # recovery can stand in for the catch-up of the second one
                    await client.wait_seq(await head(side, room) + 250)
            final = await head(side, room)
            assert final == base + writer.written + 10
            writer = None
            await client.wait_seq(final)
            await client.barrier()

            expected = list(range(base + 1, final + 1))
            anomaly = next((i for i, (got, want)
                            in enumerate(zip(client.seqs, expected, strict=False))
                            if got != want), None)
            assert client.seqs == expected, (
                f"{len(client.seqs)} events for seqs {base + 1}..{final}; first anomaly at "
                f"index {anomaly}")
            assert not client.others, client.others
            assert sshd.logins == 3
            assert daemon.count("log_hole") == 0, daemon.with_event("log_hole")
            status, health = await http_get(unused_tcp_port, "/healthz")
            assert status == 200, health
            assert health["database"] is True and health["listener"] is True, health
            await ws.close()
            client.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await client.task

            assert await daemon.stop() == 0
            assert daemon.count("tunnel_closed") == 1
        except BaseException:
            print(f"--- daemon log ({daemon.log_path}) ---\n{daemon.dump()}")
            raise
        finally:
            if writer is not None:
                await writer.stop()
            await daemon.kill()
