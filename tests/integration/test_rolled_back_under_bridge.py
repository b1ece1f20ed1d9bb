"""A bridge whose schema is rolled back under it (``setup_db.py --rollback`` while it runs,
docs/howto/rollback.md) stops with one line naming the rollback and exit 1, rather than
retrying for ever what can no longer work; its clients are closed with 1001 (going away) and
resume elsewhere. A statement that fails for another reason does not stop it.

Real PostgreSQL, ``python -m daemon`` as a subprocess, a real WebSocket client, the real
``setup_db.py --rollback``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import psycopg
import pytest
from websockets.exceptions import ConnectionClosed

from daemon.schema import apply_schema_sync
from tests.support.fixtures import ROOT, conninfo_env
from tests.support.helpers import connect as ws_connect
from tests.support.helpers import (
    events,
    make_room,
    make_user,
    post,
    recv,
    send,
    subscribe,
    subscribed_member,
)
from tests.support.procs import daemon_process, free_port, human_lines, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def db_url(fresh_db: str) -> str:
    """A database of this test's own with pgbridge applied (the session's shared one must not
    lose it)."""
    apply_schema_sync(fresh_db)
    return fresh_db


async def test_rollback_under_a_running_bridge_stops_it_with_one_line(db_url: str,
                                                                      tmp_path: Path) -> None:
    port = free_port()
    async with (daemon_process(db_url, port, tmp_path) as daemon,
                await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn):
        user, room, ws, _ = await subscribed_member(conn, port)
        await post(conn, room, user)
        await events(ws, 1)

        code, out, err = await run_cli(sys.executable, str(ROOT / "setup_db.py"), "--rollback",
                                       env=conninfo_env(db_url), cwd=tmp_path)
        assert code == 0, err
        assert "rolled back" in out, out

        assert await daemon.wait(timeout=30) == 1, daemon.tail()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001

    stderr = daemon.dump()
    lines = human_lines(stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith("pgbridge: error: schema public at "), lines
    assert "pgbridge was removed from it while the bridge ran (setup_db.py --rollback" in lines[0]
    assert "python setup_db.py" in lines[0]
    assert "Traceback" not in stderr
    assert not [r for r in daemon.records if "exception" in r or "incident" in r], stderr


async def test_a_bridge_stopping_for_a_rollback_does_not_write_into_what_is_left(
        db_url: str, tmp_path: Path) -> None:
    """An ack still buffered and the presence lease when the rollback stops the bridge: they
    belong to the install that is gone (or, rolled back and applied again, to the old log), so
    the stop neither saves the one nor hands over the other, and logs no failure of either."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        user = await make_user(conn)
        room = await make_room(conn, user)
    port = free_port()
    async with daemon_process(db_url, port, tmp_path, PGBRIDGE_ACK_FLUSH_INTERVAL="600",
                              PGBRIDGE_LOG_LEVEL="DEBUG") as daemon:
        ws = await ws_connect(port, user)
        await subscribe(ws, room)
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            await post(conn, room, user)
        (event,) = await events(ws, 1)
        await send(ws, type="ack", room=room, seq=event["seq"])
        await daemon.wait_event("ack")
        code, _, err = await run_cli(sys.executable, str(ROOT / "setup_db.py"), "--rollback",
                                     env=conninfo_env(db_url), cwd=tmp_path)
        assert code == 0, err
        assert await daemon.wait(timeout=30) == 1, daemon.tail()
    failed = [r for r in daemon.records
              if r["event"] in ("ack_flush_failed", "presence_retire_failed")]
    assert failed == [], failed


async def test_a_missing_object_that_is_not_a_rollback_does_not_stop_the_bridge(
        db_url: str, tmp_path: Path) -> None:
    """A table of pgbridge renamed by hand (presence_sessions) makes the presence writes fail
    with 42P01, which makes the bridge ask the catalog: pgbridge is still installed, so it keeps
    running, says what fails, and delivers."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        user = await make_user(conn)
        room = await make_room(conn, user)
        port = free_port()
        async with daemon_process(db_url, port, tmp_path, PGBRIDGE_LOG_LEVEL="DEBUG") as daemon:
            await conn.execute("ALTER TABLE presence_sessions RENAME TO presence_sessions_away")
            try:
                ws = await ws_connect(port, user)  # online: a presence write

                await daemon.wait_event("presence_write_failed")
                await daemon.wait_event("schema_present")
            finally:
                await conn.execute("ALTER TABLE presence_sessions_away RENAME TO "
                                   "presence_sessions")
            await subscribe(ws, room)
            await post(conn, room, user)
            await events(ws, 1)
            assert daemon.proc is not None and daemon.proc.returncode is None
            assert not human_lines(daemon.dump())
            await ws.close()


async def test_rollback_and_apply_again_under_a_running_bridge_is_not_missed(
        db_url: str, tmp_path: Path) -> None:
    """``setup_db.py --rollback && setup_db.py`` within a few seconds: the rooms' counters
    start again at 1 and the signing key is new, so the bridge's state (heads, cursors) no
    longer matches the schema. It must not carry on as if nothing happened, silently holding
    back the new events: it either stops (exit 1, as for a rollback) or delivers them."""
    port = free_port()
    async with (daemon_process(db_url, port, tmp_path) as daemon,
                await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn):
        user, room, ws, _ = await subscribed_member(conn, port)
        for _ in range(3):
            await post(conn, room, user)
        await events(ws, 3)
        env = conninfo_env(db_url)
        for args in (["--rollback"], []):
            code, _, err = await run_cli(sys.executable, str(ROOT / "setup_db.py"), *args,
                                         env=env, cwd=tmp_path)
            assert code == 0, err
        await post(conn, room, user)  # seq 1 of the new log
        frames = []
        try:
            async with asyncio.timeout(20):
                while not frames or frames[-1]["type"] != "event":
                    frames.append(await recv(ws, 20))
        except ConnectionClosed:
            assert await daemon.wait(timeout=30) == 1, daemon.tail()
            assert [line for line in human_lines(daemon.dump())
                    if line.startswith("pgbridge: error: schema public at ")], daemon.tail()
        except TimeoutError:
            raise AssertionError(f"neither stopped nor delivered: {frames}") from None
        else:
            assert frames[-1]["seq"] == 1, frames
