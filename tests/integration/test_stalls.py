"""No stalls: a fault heals within a stated bound, and no client is left waiting in silence
(docs/topics/faults.md).

The database link is broken through a proxy that only the bridge uses, so the test's own
connection keeps writing while the bridge sees the database go away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import psycopg
import pytest
import websockets

from daemon.app import Bridge
from tests.support.fixtures import bridge_behind_proxy, running_bridge
from tests.support.helpers import (
    connect,
    events,
    head,
    make_room,
    make_user,
    post,
    recv,
    send,
    subscribe,
    token,
)
from tests.support.procs import PGBRIDGE, run_cli, until
from tests.support.proxy import FreezingProxy

Conn = psycopg.AsyncConnection[Any]

# What the bridge sends at each step of a subscribe (daemon/client.py, Client._subscribe).
SUBSCRIBE_STEPS = {
    "membership_check": b"AS room_exists",  # Store.cursor_info
    "room_head": b"\x00SELECT last_seq FROM change_sequences",  # Rooms._on_track
    "replay": b"AND e.seq <= ",  # Store.read_events, after `subscribed`
}
ERROR_BOUND = 30.0  # seconds: pool wait (POOL_WAIT, 5 s) and one retry, loosely


async def small_buffered_client(port: int, user: str,
                                batch: int | None = None) -> websockets.ClientConnection:
    """A client of ``user`` whose socket receives into 4 KiB and which buffers one message:
    the bridge's socket fills as soon as the client reads slowly, or not at all. Coalescing
    with ``?batch=`` when given. Its ``welcome`` is consumed."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return await connect(port, user, batch=batch, sock=sock, max_queue=1, compression=None,
                         ping_interval=None)


@pytest.mark.slow
@pytest.mark.parametrize("outage", ["brief", "until_answered"])
@pytest.mark.parametrize("step", list(SUBSCRIBE_STEPS))
async def test_subscribe_with_the_database_link_broken_at_each_step_completes_or_fails_cleanly(
        proxied_bridge: tuple[Bridge, FreezingProxy], conn: Conn, step: str,
        outage: str) -> None:
    """A subscribe whose database link breaks either completes once the database is back, or
    ends with an ``error`` naming its ``ref`` and ``room`` and leaves nothing registered, so
    the client subscribes again and misses nothing. Before, an error without them (or a
    subscription registered but never live after a failed replay) left the client waiting."""
    bridge, proxy = proxied_bridge
    user = await make_user(conn)
    room = await make_room(conn, user)
    for i in range(3):
        await post(conn, room, user, f"old {i}")  # something to replay with since=0
    total = await head(conn, room)
    ws = await connect(bridge.port, user)
    proxy.refuse_on(SUBSCRIBE_STEPS[step])
    await send(ws, type="subscribe", room=room, since=0, ref="s")
    await asyncio.wait_for(proxy.tripped.wait(), 10)
    if outage == "brief":
        proxy.resume()

    seqs: list[int] = []
    failed = False
    while len(seqs) < total:
        frame = await recv(ws, timeout=ERROR_BOUND)
        if frame["type"] == "event":
            seqs.append(frame["seq"])
        elif frame["type"] == "error":
            assert (frame["code"], frame["ref"], frame["room"]) == ("internal", "s", room), frame
            failed = True
            break
        else:
            assert frame["type"] == "subscribed", frame
    # while the database is still refused, nothing can have completed
    assert failed or outage == "brief", seqs
    if failed:
        assert bridge.hub.subscribers(room) == 0  # nothing left registered
        proxy.resume()
        frame = await retry_subscribe(ws, room, since=seqs[-1] if seqs else 0)
        assert frame["type"] == "subscribed", frame
        while len(seqs) < total:
            seqs += [e["seq"] for e in await events(ws, 1)]
    assert seqs == list(range(1, total + 1))
    assert bridge.hub.subscribers(room) == 1
    await post(conn, room, user, "live")
    assert [e["seq"] for e in await events(ws, 1, timeout=ERROR_BOUND)] == [total + 1]
    await ws.close()


async def retry_subscribe(ws: Any, room: str, *, since: int) -> dict[str, Any]:
    """Subscribe again as a client does after an ``internal`` error: until it is answered by
    anything but another ``internal`` error (the pool may still be reconnecting)."""
    for _ in range(20):
        await send(ws, type="subscribe", room=room, since=since, ref="again")
        frame = await recv(ws, timeout=ERROR_BOUND)
        if frame["type"] != "error" or frame["code"] != "internal":
            return frame
        await asyncio.sleep(0.2)  # a client's retry delay, not a wait for an event
    raise AssertionError("subscribe kept failing after the database came back")


@pytest.mark.slow
async def test_events_flow_within_a_second_of_the_database_coming_back(
        proxied_bridge: tuple[Bridge, FreezingProxy], conn: Conn,
        caplog: pytest.LogCaptureFixture) -> None:
    """After a long outage the listener's backoff had grown to 10 s: events resumed seconds
    after the server accepted connections again. Its wait is now capped at 1 s."""
    caplog.set_level(logging.WARNING, logger="daemon.listener")
    bridge, proxy = proxied_bridge
    user = await make_user(conn)
    room = await make_room(conn, user)
    ws = await connect(bridge.port, user)
    await subscribe(ws, room)
    proxy.refuse()
    await asyncio.sleep(8.0)  # the outage itself: long enough for any backoff to grow
    await post(conn, room, user, "written during the outage")
    loop = asyncio.get_running_loop()
    back = loop.time()
    proxy.resume()
    [event] = await events(ws, 1, timeout=20.0)
    healed = loop.time() - back
    assert event["data"]["content"] == "written during the outage"
    # every wait between two attempts was at most 1 s, however long the outage ...
    waits = [float(r.args[-1]) for r in caplog.records  # type: ignore[index, arg-type]
             if getattr(r, "event", None) == "listener_lost"]
    assert len(waits) >= 5 and max(waits) <= 1.0, waits
    # ... so events flowed within 1 s, plus a connect, LISTEN and catch-up (loose for CI)
    assert healed < 3.0, f"events flowed {healed:.2f} s after the database came back"
    await ws.close()


async def test_events_flow_within_a_second_of_the_listener_being_killed(
        bridge: Bridge, conn: Conn) -> None:
    """``pg_terminate_backend`` of the LISTEN backend: the listener reconnects (its first wait
    is 50-100 ms), catches up and delivers what was committed meanwhile."""
    user = await make_user(conn)
    room = await make_room(conn, user)
    ws = await connect(bridge.port, user)
    await subscribe(ws, room)
    cur = await conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = "
                             "current_database() AND query LIKE '%%pgbridge_listen\"()%%' "
                             "AND pid <> pg_backend_pid()")
    [(pid,)] = await cur.fetchall()
    loop = asyncio.get_running_loop()
    async with conn.transaction():  # the kill is over before the write commits
        await conn.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
        killed = loop.time()
        await post(conn, room, user, "after the kill")
    [event] = await events(ws, 1, timeout=20.0)
    healed = loop.time() - killed
    assert event["data"]["content"] == "after the kill"
    assert healed < 2.0, f"events flowed {healed:.2f} s after the listener was killed"
    await ws.close()


@pytest.mark.slow
async def test_tail_subscribes_again_after_a_transient_error(
        db_url: str, conn: Conn, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``pgbridge tail`` exited 1 on ``error`` ``internal``; it now tries again with backoff
    and prints every event once."""
    caplog.set_level(logging.ERROR, logger="daemon.client")
    user = await make_user(conn)
    room = await make_room(conn, user)
    base = await head(conn, room)
    ids = [await post(conn, room, user, f"m{i}") for i in range(3)]
    async with bridge_behind_proxy(db_url) as (bridge, proxy):
        proxy.refuse_on(SUBSCRIBE_STEPS["membership_check"])
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PGBRIDGE_", "POSTGRES_", "SSH_")) and k != "DATABASE_URL"}
        tail = asyncio.create_task(run_cli(
            str(PGBRIDGE), "tail", room, "--since", str(base), "--count", "3",
            "--url", f"ws://127.0.0.1:{bridge.port}/ws", "--token", token(user), env=env,
            cwd=tmp_path))

        async def answered_with_an_error() -> bool:
            if tail.done():
                pytest.fail(f"pgbridge tail ended early: {tail.result()}")
            return any(getattr(r, "event", None) == "request_failed" for r in caplog.records)

        await until(answered_with_an_error, "the subscribe to fail", timeout=ERROR_BOUND)
        proxy.resume()
        code, out, err = await tail
    assert code == 0, err
    assert "subscribe failed (internal); trying again" in err
    assert [json.loads(line)["id"] for line in out.splitlines()] == ids


@pytest.mark.slow
@pytest.mark.parametrize("client_end", ["half_close", "close"])
async def test_client_gone_during_a_slow_handshake_is_no_internal_error(
        proxied_bridge: tuple[Bridge, FreezingProxy], conn: Conn,
        caplog: pytest.LogCaptureFixture, client_end: str) -> None:
    """While the database was down, a handshake waited for the pool; a client that went away
    meanwhile made websockets log an error with a traceback ("opening handshake failed", or
    "unexpected internal error" on ``assert not self.eof_sent``). It is logged at INFO now."""
    caplog.set_level(logging.INFO)
    bridge, proxy = proxied_bridge
    user = await make_user(conn)
    proxy.refuse()  # live_user waits for the pool until the client is gone
    _, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    writer.write(
        f"GET /ws?token={token(user)} HTTP/1.1\r\nHost: 127.0.0.1:{bridge.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .encode())
    await writer.drain()
    if client_end == "half_close":
        writer.write_eof()
    else:
        writer.close()
        await writer.wait_closed()

    async def abandoned() -> bool:
        return bridge.metrics.registry.get_sample_value(
            "pgbridge_handshake_refusals_total", {"reason": "client_gone"}) == 1

    await until(abandoned, "the handshake to be given up", timeout=ERROR_BOUND)
    writer.close()
    proxy.resume()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [(r.name, r.getMessage()) for r in errors]


@pytest.mark.slow
@pytest.mark.parametrize("batch", [None, 0])
async def test_client_that_stops_reading_is_closed_4008_within_the_send_timeout(
        db_url: str, conn: Conn, caplog: pytest.LogCaptureFixture, batch: int | None) -> None:
    """A client that stopped reading was closed 18 s later, once 3.6 MB had piled up in
    auto-tuned kernel buffers and then its 1,000-frame queue. Now the kernel holds at most
    PGBRIDGE_SEND_BUFFER bytes, and a frame that waits PGBRIDGE_SEND_TIMEOUT seconds for the
    socket closes it with 4008, with far fewer than 1,000 frames queued."""
    caplog.set_level(logging.WARNING, logger="daemon.client")
    user = await make_user(conn)
    room = await make_room(conn, user)
    async with running_bridge(db_url, send_timeout=1.0) as bridge:
        slow = await small_buffered_client(bridge.port, user, batch)
        await send(slow, type="subscribe", room=room, ref="s")
        assert (await recv(slow))["type"] == "subscribed"
        # from here on the client reads nothing
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(200):  # 1.2 MB: far more than the buffers, far fewer than 1,000 frames
            await post(conn, room, user, f"{i} " + "x" * 6000)

        async def closed_4008() -> bool:
            return bridge.metrics.registry.get_sample_value(
                "pgbridge_slow_client_closes_total") == 1

        await until(closed_4008, "the client to be closed with 4008", timeout=20.0)
        noticed = loop.time() - started
        reasons = [r.getMessage() for r in caplog.records
                   if getattr(r, "event", None) == "slow_client"]
        assert len(reasons) == 1 and "accepted nothing for 1 s" in reasons[0], reasons
        assert noticed < 10.0, f"noticed after {noticed:.1f} s"
        slow.transport.abort()


@pytest.mark.parametrize("batch", [None, 0])
async def test_a_replay_longer_than_the_queue_is_paced_not_closed(db_url: str, conn: Conn,
                                                                  batch: int | None) -> None:
    """Replay read pages of 500 events whatever PGBRIDGE_QUEUE_SIZE was: with a small queue, a
    client that was only catching up (reading, at the pace of its socket) was closed with 4008.
    Pages are now at most half the queue, and wait for room in it."""
    user = await make_user(conn)
    room = await make_room(conn, user)
    for i in range(120):
        await post(conn, room, user, f"{i} " + "x" * 2000)
    last = await head(conn, room)
    async with running_bridge(db_url, queue_size=8, send_buffer=4096) as bridge:
        ws = await small_buffered_client(bridge.port, user, batch)
        await send(ws, type="subscribe", room=room, since=0, ref="s")
        assert (await recv(ws))["type"] == "subscribed"
        seqs = [frame["seq"] for frame in await events(ws, last)]
        assert seqs == list(range(1, last + 1))
        assert bridge.metrics.registry.get_sample_value(
            "pgbridge_slow_client_closes_total") == 0
        await ws.close()
