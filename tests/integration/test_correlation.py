"""Correlation ids in the daemon's log (issue 31; spec 003, "Monitoring Requirements",
``LogFormat.correlationId``; docs/reference/logs.md): every line about one WebSocket connection
carries the id its ``welcome`` told the client, from the accept to the close, whatever task or
callback wrote it; lines about an event carry ``room`` and ``seq``, lines about a request its
``ref``; an incident met by a connection names both ids; a ``setup_db.py`` run names its
database sessions after its id.

The end-to-end test runs the daemon as a subprocess at ``PGBRIDGE_LOG_LEVEL=DEBUG`` (its JSON
lines on stderr), on both event loops; the incident tests run it in-process, the log captured
with the :class:`~daemon.logs.CorrelationFilter` that ``configure`` installs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from daemon.app import Bridge
from daemon.logs import CorrelationFilter
from daemon.outgoing import OutgoingQueue
from daemon.schema import _LOCK
from tests.support.fixtures import ROOT, conninfo_env
from tests.support.helpers import events, make_room, make_user, post, recv, send, token
from tests.support.procs import daemon_process, free_port, until

Conn = psycopg.AsyncConnection[Any]

HEX16 = re.compile(r"[0-9a-f]{16}")


async def _connect(port: int, user: str) -> tuple[ClientConnection, str]:
    """A connection as ``user`` and the correlation id its ``welcome`` gave."""
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws?token={token(user)}")
    welcome = await recv(ws)
    assert welcome["type"] == "welcome", welcome
    assert HEX16.fullmatch(welcome["correlation_id"]), welcome
    return ws, str(welcome["correlation_id"])


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_subscribe_event_close_log_carries_one_correlation_id_end_to_end(
        db_url: str, conn: Conn, tmp_path: Path, loop: str) -> None:
    alice, bob = await make_user(conn, "alice"), await make_user(conn, "bob")
    room = await make_room(conn, alice, bob)
    port = free_port()
    async with daemon_process(db_url, port, tmp_path, PGBRIDGE_LOG_LEVEL="DEBUG",
                              PGBRIDGE_EVENT_LOOP=loop) as daemon:
        # a refused handshake: its refusal and its accept carry one id of their own
        with pytest.raises(InvalidStatus):
            await websockets.connect(f"ws://127.0.0.1:{port}/ws?token={token(alice, ttl=-60)}")
        await daemon.wait_event("handshake_refused")
        refused = daemon.with_event("handshake_refused")[0]
        assert HEX16.fullmatch(refused["correlation_id"] or ""), refused
        assert any(r["event"] == "connection_accepted" for r in daemon.records
                   if r["correlation_id"] == refused["correlation_id"])

        first, first_id = await _connect(port, alice)
        second, second_id = await _connect(port, bob)
        assert first_id != second_id
        await send(first, type="subscribe", room=room, ref="sub-first")
        start = (await recv(first))["from"]
        await send(second, type="subscribe", room=room, ref="sub-second")
        assert (await recv(second))["type"] == "subscribed"
        await post(conn, room, alice, "hello")
        (got,) = await events(first, 1)
        assert got["seq"] == start + 1 and (await events(second, 1))[0]["seq"] == start + 1
        await send(first, type="ack", room=room, seq=got["seq"], ref="ack-first")
        await send(first, type="ping", ref="after-ack")
        assert (await recv(first))["type"] == "pong"
        await first.close()
        await second.close()

        async def both_closed() -> bool:
            return {r["correlation_id"] for r in daemon.with_event("connection_closed")} >= {
                first_id, second_id}

        await until(both_closed, "both connections' connection_closed lines", timeout=20)

    records = daemon.records
    mine = [r for r in records if r.get("correlation_id") == first_id]
    by_event = {r["event"]: r for r in mine}
    assert {"connection_accepted", "connection_open", "subscribed", "event_sent", "ack",
            "connection_closed"} <= set(by_event), [r["event"] for r in mine]
    assert (by_event["subscribed"]["ref"], by_event["subscribed"]["room"]) == ("sub-first", room)
    assert (by_event["event_sent"]["room"], by_event["event_sent"]["seq"]) == (room, got["seq"])
    assert (by_event["ack"]["seq"], by_event["ack"]["ref"]) == (got["seq"], "ack-first")
    assert by_event["connection_closed"]["user"] == alice
    published = [r for r in records if r["event"] == "event_published"]
    assert [(r["room"], r["seq"], r["correlation_id"]) for r in published] == [
        (room, got["seq"], None)]  # about the event, not about a connection

    # No line about either connection lacks its id, or carries the other's: each user has
    # one connection, and its number names it in the connection layer's lines.
    number = {first_id: re.search(r"connection (\d+) ", by_event["connection_open"]["message"]),
              second_id: re.search(r"connection (\d+) ", next(
                  r["message"] for r in records if r["event"] == "connection_open"
                  and r["correlation_id"] == second_id))}
    for cid, user in ((first_id, alice), (second_id, bob)):
        match = number[cid]
        assert match is not None
        about = [r for r in records if user in json.dumps(r)
                 or f"connection {match[1]} " in r["message"]]
        assert len(about) >= 5  # accepted, open, subscribed, event_sent, closed
        assert [r for r in about if r["correlation_id"] != cid] == [], cid
    assert not [r for r in records if r["correlation_id"] == second_id and alice in json.dumps(r)]
    # daemon-wide lines have none
    assert all(r["correlation_id"] is None for r in records
               if r["event"] in ("ready", "listener_connected", "shutdown"))


async def test_an_incident_of_a_request_names_its_connection_s_correlation_id(
        bridge: Bridge, conn: Conn, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """An incident id is a correlation id too: the request's incident line carries both, the
    incident id in ``incident`` and the connection's in ``correlation_id``."""
    caplog.set_level(logging.DEBUG)
    caplog.handler.addFilter(CorrelationFilter())
    user = await make_user(conn)
    room = await make_room(conn, user)
    ws, cid = await _connect(bridge.port, user)

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(bridge.store, "cursor_info", broken)
    await send(ws, type="subscribe", room=room, ref="boom")
    reply = await recv(ws)
    incident = reply["message"].split("incident ")[1].split(")")[0]
    (line,) = [r for r in caplog.records if getattr(r, "incident", None) == incident]
    assert HEX16.fullmatch(incident) and incident != cid
    assert line.correlation_id == cid  # type: ignore[attr-defined]
    assert "'boom'" in line.getMessage()  # the request's ref
    opened = [r for r in caplog.records if getattr(r, "event", None) == "connection_open"]
    assert [r.correlation_id for r in opened] == [cid]  # type: ignore[attr-defined]
    await ws.close()


async def test_a_bug_met_by_the_fan_out_is_logged_under_the_connection_it_ended(
        bridge: Bridge, conn: Conn, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The fan-out (a task shared by every connection) calls into one connection; the bug it
    meets there is logged with that connection's id, not with none or another's."""
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(CorrelationFilter())
    user, other = await make_user(conn), await make_user(conn)
    room = await make_room(conn, user)
    bystander, bystander_id = await _connect(bridge.port, other)
    ws, cid = await _connect(bridge.port, user)
    await send(ws, type="subscribe", room=room, ref="s")
    assert (await recv(ws))["type"] == "subscribed"

    def broken(self: OutgoingQueue, frame: bytes | str) -> None:
        raise RuntimeError("a bug in the fan-out")

    monkeypatch.setattr(OutgoingQueue, "send", broken)
    await post(conn, room, user)
    with pytest.raises(ConnectionClosed) as closed:
        await recv(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    incident = closed.value.rcvd.reason.split("incident ")[1].rstrip(")")
    (line,) = [r for r in caplog.records if getattr(r, "incident", None) == incident]
    assert line.correlation_id == cid != bystander_id  # type: ignore[attr-defined]
    await bystander.close()


@pytest.mark.slow
async def test_a_setup_run_names_its_sessions_and_its_lines_after_one_id(
        fresh_db: str, tmp_path: Path) -> None:
    """Observed while the run waits for the advisory lock this test holds: the run's first line
    names its id, and pg_stat_activity shows its session as ``pgbridge setup <id>``."""
    async with await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) as holder:
        await holder.execute("SELECT pg_advisory_lock(%s, %s)", _LOCK)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "setup_db.py"), env=conninfo_env(fresh_db), cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None and proc.stdout is not None
        try:
            first = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            match = re.fullmatch(r"run ([0-9a-f]{16}): waiting for session (\d+) to finish "
                                 r"applying the schema \(it holds the advisory lock\)\n", first)
            assert match is not None, first
            run, pid = match[1], int(match[2])
            cur = await holder.execute("SELECT pg_backend_pid()")
            assert pid == (await cur.fetchone() or (0,))[0]

            async def waiting() -> bool:
                cur = await holder.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                    "AND wait_event_type = 'Lock' AND datname = current_database()",
                    [f"pgbridge setup {run}"])
                return (await cur.fetchone() or (0,))[0] == 1

            await until(waiting, "the run's session waiting on the lock", timeout=20)
        finally:
            await holder.execute("SELECT pg_advisory_unlock(%s, %s)", _LOCK)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert "applying sql/schema.sql to schema public" in err.decode()
    assert run not in err.decode(), "only the run's first line names it"
    assert out.decode().startswith("schema public at ")
