"""Coalesced messages (PROTOCOL.md, "Coalesced messages"): a client that connects with
``?batch=MS`` receives the frames pending for it together, newline-separated in one message,
held at most MS milliseconds; a client that does not ask gets one frame per message, as ever."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from pathlib import Path
from typing import Any

import psycopg
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from daemon.app import Bridge
from daemon.outbox import BATCH_BYTES
from tests.support.fixtures import running_bridge
from tests.support.helpers import (
    connect,
    events,
    head,
    make_room,
    make_user,
    post,
    send,
    split_message,
    subscribe,
    token,
)
from tests.support.procs import daemon_process, free_port

Conn = psycopg.AsyncConnection[Any]

# newlines, a line separator and a lone surrogate's escape: none may split a coalesced message
AWKWARD = "line one\nline two\r\n\u2028 \\n \"quoted\" \\ud800 end"


async def messages_until(ws: websockets.ClientConnection, room: str,
                         last: int) -> list[list[dict[str, Any]]]:
    """Raw messages, each split into its frames, until the event ``last`` of ``room``."""
    got: list[list[dict[str, Any]]] = []
    while True:
        raw = await asyncio.wait_for(ws.recv(), 20)
        assert isinstance(raw, str)  # text frames only
        assert len(raw.encode()) <= BATCH_BYTES
        frames = split_message(raw)
        got.append(frames)
        if any(f.get("type") == "event" and f["room"] == room and f["seq"] == last
               for f in frames):
            return got


@pytest.mark.slow
async def test_a_replay_reaches_a_coalescing_client_in_few_messages_in_order(
        bridge: Bridge, conn: Conn) -> None:
    user = await make_user(conn)
    room = await make_room(conn, user)
    for i in range(300):
        await post(conn, room, user, f"{i} {AWKWARD}")
    last = await head(conn, room)
    ws = await connect(bridge.port, user, batch=0)
    await send(ws, type="subscribe", room=room, since=0, ref="s")
    got = await messages_until(ws, room, last)
    frames = [frame for message in got for frame in message]
    assert frames[0]["type"] == "subscribed"
    replayed = [f for f in frames if f["type"] == "event"]
    assert [f["seq"] for f in replayed] == list(range(1, last + 1))
    assert all(f["data"]["content"].endswith(AWKWARD) for f in replayed[-300:])
    # 300+ frames of about 600 bytes: a handful of 64 KiB messages, not one message a frame
    assert len(got) <= 10, [len(m) for m in got]
    await ws.close()


async def test_a_burst_committed_together_goes_out_together(bridge: Bridge,
                                                            conn: Conn) -> None:
    """``batch=0`` never waits, yet events that arrive in one burst (one transaction's
    NOTIFYs) leave in a few messages."""
    user = await make_user(conn)
    room = await make_room(conn, user)
    ws = await connect(bridge.port, user, batch=0)
    start = (await subscribe(ws, room))["from"]
    async with conn.transaction():
        for i in range(100):
            await post(conn, room, user, f"burst {i}")
    got = await messages_until(ws, room, start + 100)
    seqs = [f["seq"] for message in got for f in message]
    assert seqs == list(range(start + 1, start + 101))
    assert len(got) < 50, [len(m) for m in got]
    await ws.close()


async def test_a_client_that_does_not_ask_gets_one_frame_per_message(bridge: Bridge,
                                                                     conn: Conn) -> None:
    user = await make_user(conn)
    room = await make_room(conn, user)
    ws = await websockets.connect(f"ws://127.0.0.1:{bridge.port}/ws?token={token(user)}")
    welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome" and "batch" not in welcome
    await send(ws, type="subscribe", room=room, ref="s")
    start = json.loads(await ws.recv())["from"]
    async with conn.transaction():
        for i in range(30):
            await post(conn, room, user, f"{i} {AWKWARD}")
    for seq in range(start + 1, start + 31):
        frame = json.loads(await asyncio.wait_for(ws.recv(), 20))
        assert frame["seq"] == seq
    await ws.close()


@pytest.mark.slow
async def test_frames_wait_at_most_the_batch_and_those_ready_meanwhile_join_them(
        bridge: Bridge, conn: Conn) -> None:
    user = await make_user(conn)
    loop = asyncio.get_running_loop()
    opened = loop.time()
    ws = await connect(bridge.port, user, batch=1000)
    assert loop.time() - opened < 0.9  # the welcome is not held
    sent = loop.time()
    await send(ws, type="ping", ref="a")
    await send(ws, type="ping", ref="b")
    message = split_message(await asyncio.wait_for(ws.recv(), 10))
    waited = loop.time() - sent
    assert [(f["type"], f["ref"]) for f in message] == [("pong", "a"), ("pong", "b")]
    assert 0.95 <= waited < 5, waited
    await ws.close()


async def test_live_events_and_a_coalescing_subscriber_beside_a_plain_one(
        bridge: Bridge, conn: Conn) -> None:
    """Both kinds of client in one room get every event once, in order."""
    alice, bob = await make_user(conn, "alice"), await make_user(conn, "bob")
    room = await make_room(conn, alice, bob)
    plain = await connect(bridge.port, alice)
    batched = await connect(bridge.port, bob, batch=20)
    start = (await subscribe(plain, room))["from"]
    assert (await subscribe(batched, room))["from"] == start
    for i in range(40):
        await post(conn, room, alice, f"{i} {AWKWARD}")
    for ws in (plain, batched):
        assert [e["seq"] for e in await events(ws, 40)] == list(range(start + 1, start + 41))
    await plain.close()
    await batched.close()


@pytest.mark.slow
@pytest.mark.parametrize("query", ["batch=fast", "batch=1001", "batch=-1", "batch=1.5",
                                   "batch=%EF%BC%91", "batch=00000", "batch=1&batch=2"])
async def test_a_malformed_batch_is_refused_with_400(bridge: Bridge, conn: Conn,
                                                     query: str) -> None:
    user = await make_user(conn)
    url = f"ws://127.0.0.1:{bridge.port}/ws?token={urllib.parse.quote(token(user))}&{query}"
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(url)
    response = refused.value.response
    assert response.status_code == 400
    assert b"batch must be given once" in response.body
    await recv_nothing_left(bridge)


async def recv_nothing_left(bridge: Bridge) -> None:
    """A refused upgrade leaves no connection behind."""
    assert bridge.metrics.registry.get_sample_value("pgbridge_connections") == 0


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_the_daemon_runs_on_the_event_loop_asked_for(db_url: str, conn: Conn,
                                                           tmp_path: Path, loop: str) -> None:
    """``PGBRIDGE_EVENT_LOOP`` (docs/topics/fan-out-cost.md, "uvloop"): events flow, coalesced
    or not, on either loop."""
    user = await make_user(conn)
    room = await make_room(conn, user)
    port = free_port()
    async with daemon_process(db_url, port, tmp_path, PGBRIDGE_EVENT_LOOP=loop) as daemon:
        await daemon.wait_event("ready")
        assert f"event loop {loop}" in daemon.with_event("ready")[0]["message"]
        plain, batched = await connect(port, user), await connect(port, user, batch=0)
        start = (await subscribe(plain, room))["from"]
        await subscribe(batched, room)
        async with conn.transaction():
            for i in range(20):
                await post(conn, room, user, f"{i} {AWKWARD}")
        for ws in (plain, batched):
            assert [e["seq"] for e in await events(ws, 20)] == list(range(start + 1, start + 21))
            await ws.close()


@pytest.mark.slow
async def test_a_long_wait_never_overflows_the_queue_of_a_client_that_reads(
        db_url: str, conn: Conn) -> None:
    """Frames held by ``batch=1000`` count in PGBRIDGE_QUEUE_SIZE: half a queue waiting is sent
    at once, so a burst larger than the queue reaches a client that reads, without 4008."""
    user = await make_user(conn)
    room = await make_room(conn, user)
    async with running_bridge(db_url, queue_size=8) as bridge:
        ws = await connect(bridge.port, user, batch=1000)
        start = (await subscribe(ws, room))["from"]
        async with conn.transaction():
            for i in range(50):
                await post(conn, room, user, f"burst {i}")
        assert [e["seq"] for e in await events(ws, 50)] == list(range(start + 1, start + 51))
        assert bridge.metrics.registry.get_sample_value(
            "pgbridge_slow_client_closes_total") == 0
        await ws.close()
