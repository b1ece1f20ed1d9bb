"""Snapshot then live (PROTOCOL.md, "Snapshot then live"; daemon/snapshot.py): a real daemon and
PostgreSQL, real WebSocket clients, concurrent writers."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from ulid import ULID
from websockets.asyncio.client import ClientConnection

from daemon.app import Bridge
from tests.support.fixtures import running_bridge
from tests.support.helpers import (
    connect,
    events,
    head,
    make_room,
    make_user,
    post,
    recv,
    send,
    token,
)
from tests.support.procs import tail_subscribed, until

Conn = psycopg.AsyncConnection[Any]
Row = dict[str, Any]


async def rows(conn: Conn, room: str) -> list[Row]:
    """The room's live messages as ``to_jsonb`` of each row, oldest first."""
    cur = await conn.execute("SELECT to_jsonb(m) FROM messages m WHERE channel_id = %s AND "
                             "deleted_at IS NULL ORDER BY created_at, id", [room])
    return [row for (row,) in await cur.fetchall()]


async def snapshot_subscribe(ws: ClientConnection, room: str, n: int,
                             ref: str = "s") -> tuple[Row, Row]:
    """Subscribe with ``"snapshot": n``; the ``subscribed`` and ``snapshot`` frames."""
    await send(ws, type="subscribe", room=room, snapshot=n, ref=ref)
    first = await recv(ws)
    assert first["type"] == "subscribed", first
    second = await recv(ws)
    assert second["type"] == "snapshot", second
    return first, second


async def test_a_snapshot_is_the_n_most_recent_live_messages_edited_oldest_first(
        bridge: Bridge, conn: Conn) -> None:
    user = await make_user(conn)
    room = await make_room(conn, user)
    ids = [await post(conn, room, user, f"m{i}") for i in range(5)]
    await conn.execute("UPDATE messages SET content = 'edited' WHERE id = %s", [ids[1]])
    await conn.execute("UPDATE messages SET deleted_at = now() WHERE id = %s", [ids[3]])
    ws = await connect(bridge.port, user)
    subscribed, snap = await snapshot_subscribe(ws, room, 3)
    seq = await head(conn, room)
    assert subscribed == {"type": "subscribed", "room": room, "from": seq, "head": seq,
                          "ref": "s"}
    assert snap["seq"] == seq and snap["room"] == room and snap["ref"] == "s"
    assert snap["truncated"] is False
    live = await rows(conn, room)
    assert [m["id"] for m in live] == [ids[0], ids[1], ids[2], ids[4]]
    assert snap["messages"] == live[-3:]
    assert snap["messages"][0]["content"] == "edited"
    later = await post(conn, room, user, "after")
    (event,) = await events(ws, 1)
    assert (event["seq"], event["op"], event["id"]) == (seq + 1, "INSERT", later)
    # shaped like an event's data: the same keys and values
    assert set(event["data"]) == set(snap["messages"][0])
    await ws.close()


async def test_a_snapshot_of_a_room_without_events_is_empty_at_seq_0(
        bridge: Bridge, conn: Conn, db_url: str) -> None:
    user = await make_user(conn)
    room = str(ULID())
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as c:
        await c.execute("SET session_replication_role = replica")  # no trigger: no event
        await c.execute("INSERT INTO channels (id, name) VALUES (%s, 'quiet')", [room])
        await c.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                        (room, user))
    assert await head(conn, room) == 0
    ws = await connect(bridge.port, user)
    subscribed, snap = await snapshot_subscribe(ws, room, 10)
    assert subscribed["from"] == 0 and snap["seq"] == 0 and snap["messages"] == []
    mid = await post(conn, room, user)
    (event,) = await events(ws, 1)
    assert (event["seq"], event["id"]) == (1, mid)
    await ws.close()


def apply(state: dict[str, Row], event: Row) -> None:
    """Apply a messages event to ``state`` (id -> row of the live messages)."""
    data = event["data"]
    if event["op"] == "DELETE" or data.get("deleted_at") is not None:
        state.pop(event["id"], None)
    else:
        state[event["id"]] = data


async def test_every_message_once_under_concurrent_writers(conn: Conn, db_url: str) -> None:
    """Writers insert, edit and soft-delete messages while clients subscribe with a snapshot:
    each client's snapshot is the room's state exactly as of its seq (as the log says it), no
    message in it arrives again as an INSERT, and snapshot plus events give the final state.
    A snapshot read in two statements fails this."""
    user = await make_user(conn)
    room = await make_room(conn, user)
    for i in range(20):
        await post(conn, room, user, f"seed {i}")
    stop = threading.Event()
    # Writes the writers may still do: each subscribe lets 40 more go, so the writes overlap
    # every snapshot read, yet the events in flight stay bounded. Unbounded writers outran the
    # fan-out to 40 clients on a loaded 2-core CI machine and a subscribe waited over 10 s.
    budget = threading.Semaphore(0)

    def writer(n: int) -> None:
        """Commits while the budget lasts, in a thread of its own (not waiting for this event
        loop); at most about 80 live messages of its own, so the room stays under the
        snapshot's N."""
        rng = random.Random(n)
        mine: list[str] = []
        with psycopg.connect(db_url, autocommit=True) as c:
            while not stop.is_set():
                if not budget.acquire(timeout=0.05):
                    continue
                roll = rng.random()
                if mine and roll < 0.3:
                    c.execute("UPDATE messages SET content = content || '+' WHERE id = %s",
                              [rng.choice(mine)])
                elif mine and (roll < 0.45 or len(mine) > 80):
                    c.execute("UPDATE messages SET deleted_at = now() WHERE id = %s",
                              [mine.pop(rng.randrange(len(mine)))])
                else:
                    mine.append(str(ULID()))
                    c.execute("INSERT INTO messages (id, channel_id, user_id, content) "
                              "VALUES (%s, %s, %s, %s)", (mine[-1], room, user, f"w{n}"))

    async def exchange(bridge: Bridge, clients: list[tuple[Row, ClientConnection]]) -> None:
        writers = [asyncio.create_task(asyncio.to_thread(writer, n)) for n in range(4)]
        try:
            for _ in range(40):
                budget.release(40)
                # read nothing until the writers stop: the client buffers every frame
                # (max_queue=None), or the bridge would close it as too slow (4008) first
                ws = await connect(bridge.port, user, max_queue=None)
                _, snap = await snapshot_subscribe(ws, room, 1000)
                clients.append((snap, ws))
        finally:
            stop.set()
            await asyncio.gather(*writers)
        await check(clients)

    async def check(clients: list[tuple[Row, ClientConnection]]) -> None:
        final = await head(conn, room)
        cur = await conn.execute("SELECT seq, op, row_id, payload FROM change_events WHERE "
                                 "room_id = %s AND table_name = 'messages' ORDER BY seq", [room])
        log = [{"seq": s, "op": o, "id": i, "data": d} for s, o, i, d in await cur.fetchall()]
        assert len(log) > 200, "the writers barely wrote: the test proves nothing"
        seqs = {snap["seq"] for snap, _ in clients}
        assert len(seqs) > 20, "the snapshots did not interleave with the writers"
        expected_final = {m["id"]: m for m in await rows(conn, room)}
        for snap, ws in clients:
            at_seq: dict[str, Row] = {}
            for event in log:
                if event["seq"] <= snap["seq"]:
                    apply(at_seq, event)
            held = {m["id"]: m for m in snap["messages"]}
            assert len(held) == len(snap["messages"])
            assert held == at_seq, f"the snapshot at seq {snap['seq']} is not the state then"
            state = dict(held)
            last = snap["seq"]
            while last < final:
                frame = await recv(ws, 20)
                assert frame["type"] == "event" and frame["seq"] == last + 1, frame
                last = frame["seq"]
                if frame["table"] == "messages":
                    if frame["op"] == "INSERT":
                        assert frame["id"] not in held, "a snapshot's message came again"
                        assert frame["id"] not in state
                    apply(state, frame)
            assert state == expected_final
            await ws.close()

    clients: list[tuple[Row, ClientConnection]] = []
    async with running_bridge(db_url, max_connections_per_user=100) as bridge:
        try:
            await exchange(bridge, clients)
        finally:
            for _, ws in clients:
                await ws.close()


async def test_bad_snapshot_requests_are_refused_with_their_ref(bridge: Bridge,
                                                                conn: Conn) -> None:
    user, other = await make_user(conn), await make_user(conn)
    room = await make_room(conn, user)
    theirs = await make_room(conn, other)
    gone = await make_room(conn, user)
    await conn.execute("UPDATE channels SET deleted_at = now() WHERE id = %s", [gone])
    ws = await connect(bridge.port, user)
    for value in (0, -1, 1001, "3", 2.5, True, None, [3]):
        await ws.send(json.dumps({"type": "subscribe", "room": room, "snapshot": value,
                                  "ref": "r"}))
        if value is None:  # a null field is an absent one: a plain subscribe
            assert (await recv(ws))["type"] == "subscribed"
            await send(ws, type="unsubscribe", room=room)
            assert (await recv(ws))["type"] == "unsubscribed"
            continue
        frame = await recv(ws)
        assert (frame["type"], frame["code"], frame["ref"], frame["room"]) == (
            "error", "bad_request", "r", room), (value, frame)
        assert "snapshot" in frame["message"]
    await send(ws, type="subscribe", room=room, snapshot=3, since=0, ref="r")
    frame = await recv(ws)
    assert (frame["code"], frame["ref"]) == ("bad_request", "r")
    assert "since" in frame["message"]
    for target, code in ((theirs, "forbidden"), (gone, "forbidden"),
                         ("01JD3V6Z7W2Q4X8Y9A0B1C2D3E", "not_found")):
        await send(ws, type="subscribe", room=target, snapshot=3, ref="r")
        frame = await recv(ws)
        assert (frame["type"], frame["code"], frame["ref"], frame["room"]) == (
            "error", code, "r", target), frame
    # the connection is still usable
    _, snap = await snapshot_subscribe(ws, room, 1)
    assert snap["messages"] == []
    await ws.close()


async def test_a_deleted_user_gets_no_snapshot(bridge: Bridge, conn: Conn) -> None:
    user = await make_user(conn)
    room = await make_room(conn, user)
    await post(conn, room, user, "secret")
    ws = await connect(bridge.port, user)
    await conn.execute("UPDATE users SET deleted_at = now() WHERE id = %s", [user])
    await send(ws, type="subscribe", room=room, snapshot=5, ref="r")
    while True:  # the deletion's hint may close the connection first
        try:
            frame = await recv(ws)
        except Exception:  # closed with 4003
            assert ws.close_code == 4003
            break
        assert frame["type"] == "error" and frame["code"] == "forbidden", frame
        break


async def test_a_snapshot_over_the_byte_limit_keeps_the_most_recent_that_fit(
        db_url: str, conn: Conn) -> None:
    user = await make_user(conn)
    room, other = await make_room(conn, user), await make_room(conn, user)
    for i in range(10):
        await post(conn, room, user, f"{i}" * 1000)
    async with running_bridge(db_url, snapshot_max_bytes=4096) as bridge:
        ws = await connect(bridge.port, user)
        await send(ws, type="subscribe", room=other, ref="o")
        assert (await recv(ws))["type"] == "subscribed"
        _, snap = await snapshot_subscribe(ws, room, 10)
        assert snap["truncated"] is True
        live = await rows(conn, room)
        kept = snap["messages"]
        assert 0 < len(kept) < 10 and kept == live[-len(kept):]
        assert len(json.dumps(kept)) <= 4096 + 2 * len(kept)
        # one message larger than the limit: none fits
        await post(conn, room, user, "x" * 5000)
        (event,) = await events(ws, 1)
        assert event["data"]["content"] == "x" * 5000  # live events are not limited
        ws2 = await connect(bridge.port, user)
        _, snap = await snapshot_subscribe(ws2, room, 10)
        assert snap["truncated"] is True and snap["messages"] == []
        # the connection's other room is unaffected
        mid = await post(conn, other, user)
        (event,) = await events(ws, 1)
        assert (event["room"], event["id"]) == (other, mid)
        await ws.close()
        await ws2.close()


async def test_a_snapshot_frame_holds_no_raw_newline_when_coalesced(bridge: Bridge,
                                                                    conn: Conn) -> None:
    user = await make_user(conn)
    room = await make_room(conn, user)
    for i in range(3):
        await post(conn, room, user, f"line {i}\nnext")
    ws = await connect(bridge.port, user, batch=0)
    _, snap = await snapshot_subscribe(ws, room, 3)
    assert [m["content"] for m in snap["messages"]] == [f"line {i}\nnext" for i in range(3)]
    await ws.close()


async def test_pgbridge_tail_prints_the_snapshot_then_the_events(
        bridge: Bridge, conn: Conn, tmp_path: Path) -> None:
    user = await make_user(conn)
    room = await make_room(conn, user)
    before = [await post(conn, room, user, f"before {i}") for i in range(5)]
    tail = await tail_subscribed(bridge, room, token(user), "--snapshot", "3", "--count", "2",
                                 cwd=tmp_path)
    after = [await post(conn, room, user, f"after {i}") for i in range(2)]
    code, out, err = await tail
    assert code == 0, err
    frames = [json.loads(line) for line in out.splitlines()]
    assert [f["type"] for f in frames] == ["snapshot", "event", "event"], out
    assert [m["id"] for m in frames[0]["messages"]] == before[-3:]
    assert [f["id"] for f in frames[1:]] == after
    assert frames[1]["seq"] == frames[0]["seq"] + 1


async def test_a_connection_that_does_not_read_holds_at_most_one_unsent_snapshot(
        bridge: Bridge, conn: Conn) -> None:
    """The queue counts frames, not bytes: each snapshot frame waits until nothing else is
    queued, so the subscribes with snapshots of a client that stops reading wait too, rather
    than pile megabytes up in the daemon; once it reads, every one is answered."""
    user = await make_user(conn)
    rooms = [await make_room(conn, user) for _ in range(6)]
    for room in rooms:
        await conn.execute(
            "INSERT INTO messages (channel_id, user_id, content) "
            "SELECT %s, %s, repeat('x', 9000) FROM generate_series(1, 100)", (room, user))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client reads nothing more
    sock.connect(("127.0.0.1", bridge.port))
    ws = await connect(bridge.port, user, sock=sock, max_queue=1)
    for i, room in enumerate(rooms):
        await send(ws, type="subscribe", room=room, snapshot=100, ref=f"s{i}")

    async def first_two() -> bool:
        return all(bridge.hub.subscribers(room) == 1 for room in rooms[:2])

    await until(first_two, "the first subscribes to be answered")
    # nothing to await for what must not happen: give the daemon time to go wrong
    await asyncio.sleep(0.5)
    assert sum(bridge.hub.subscribers(room) for room in rooms) <= 3
    got = {}
    while len(got) < len(rooms):
        frame = await recv(ws, 20)
        if frame["type"] == "snapshot":
            got[frame["room"]] = frame
    assert all(len(got[room]["messages"]) == 100 for room in rooms)
    await ws.close()


@pytest.mark.slow
async def test_the_database_serializes_no_message_that_cannot_fit_the_byte_limit(
        conn: Conn) -> None:
    """The snapshot statement's cost is bounded by PGBRIDGE_SNAPSHOT_MAX_BYTES, not by N times
    the rows' size: 300 messages of 1 MiB each, none of which fits 1 MB, are left out without
    being read whole or turned into JSON (before: 1.5 s of database time per subscribe, a
    member's cheap way to load the database)."""
    from daemon.snapshot import _SNAPSHOT
    user = await make_user(conn)
    room = await make_room(conn, user)
    await conn.execute(
        "INSERT INTO messages (id, channel_id, user_id, content) "
        "SELECT lpad(g::text, 26, '0'), %s, %s, repeat(md5(g::text), 32768) "
        "FROM generate_series(1, 300) g", [room, user])
    start = asyncio.get_running_loop().time()
    cur = await conn.execute(_SNAPSHOT, {"user": user, "room": room, "n": 300,
                                         "max_bytes": 1_000_000})
    row = await cur.fetchone()
    elapsed = asyncio.get_running_loop().time() - start
    assert row is not None and row[1] is True
    assert (row[3], row[4]) == (None, 300)  # none kept, all 300 left out
    assert elapsed < 0.4, f"{elapsed:.2f} s for a snapshot that keeps nothing"
