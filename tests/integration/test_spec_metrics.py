"""The spec's metrics (spec 003, "Monitoring Requirements": queryDuration, triggerExecution,
indexUsage), scraped over HTTP from a real bridge after real traffic: subscribes, messages,
reactions, a member who joins. What they mean: docs/reference/metrics.md."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from websockets.asyncio.client import ClientConnection

from daemon.app import Bridge
from daemon.metrics import QUERY_PURPOSES
from tests.integration.test_metrics import Samples, scrape, value
from tests.support.helpers import (
    connect,
    make_room,
    make_user,
    post,
    recv,
    send,
    subscribe,
)
from tests.support.procs import until

Conn = psycopg.AsyncConnection[Any]


async def event_frames(ws: ClientConnection, n: int) -> list[dict[str, Any]]:
    """The next ``n`` event frames, skipping the presence frames between them."""
    out: list[dict[str, Any]] = []
    while len(out) < n:
        frame = await recv(ws, 20)
        if frame["type"] == "event":
            out.append(frame)
        else:
            assert frame["type"] == "presence", frame
    return out


async def react(conn: Conn, message: str, user: str, emoji: str) -> None:
    await conn.execute("INSERT INTO reactions (message_id, user_id, emoji) VALUES (%s, %s, %s)",
                       (message, user, emoji))


def purposes(m: Samples) -> dict[str, float]:
    return {dict(labels)["purpose"]: v for (name, labels), v in m.items()
            if name == "pgbridge_query_duration_seconds_count"}


async def test_query_duration_is_timed_by_purpose_for_what_the_bridge_ran(
        bridge: Bridge, conn: Conn) -> None:
    user = await make_user(conn)
    room = await make_room(conn, user)
    ws = await connect(bridge.port, user)  # user_check
    await subscribe(ws, room, presence=True)  # cursor_info, room_head, presence_read
    await post(conn, room, user, "x" * 20000)  # too large for a NOTIFY: read_events
    [event] = await event_frames(ws, 1)
    await send(ws, type="ack", room=room, seq=event["seq"])  # ack_flush

    async def flushed() -> bool:
        return purposes(await scrape(bridge)).get("ack_flush", 0) > 0

    await until(flushed, "the ack to be flushed")
    counts = purposes(await scrape(bridge))
    exercised = {"startup_check", "notify_key", "notify", "user_check", "cursor_info",
                 "room_head", "presence_read", "presence_write", "read_events", "ack_flush",
                 "prune", "index_stats"}
    assert {p for p, n in counts.items() if n > 0} >= exercised, counts
    assert set(counts) <= set(QUERY_PURPOSES)  # the label's values are the fixed set
    m = await scrape(bridge)
    seconds = value(m, "pgbridge_query_duration_seconds_sum", purpose="read_events")
    assert 0 < seconds < 10 * counts["read_events"], seconds
    await ws.close()


async def test_trigger_executions_count_each_published_change_once(bridge: Bridge,
                                                                    conn: Conn) -> None:
    """Two subscribers, each change counted once, whether its NOTIFY carried it or it was read
    from the log; changes written before the room was tracked are not this bridge's to see."""
    alice, bob = await make_user(conn), await make_user(conn)
    room = await make_room(conn, alice, bob)
    sockets = [await connect(bridge.port, alice), await connect(bridge.port, bob)]
    for ws in sockets:
        await subscribe(ws, room)
    before = await scrape(bridge)
    messages = [await post(conn, room, alice, f"m{i}") for i in range(3)]
    messages.append(await post(conn, room, bob, "y" * 20000))  # read from the log
    await react(conn, messages[0], bob, "+1")
    await react(conn, messages[1], alice, "tada")
    carol = await make_user(conn)
    await conn.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                       (room, carol))
    for ws in sockets:
        frames = await event_frames(ws, 7)
        assert [(f["table"], f["op"]) for f in frames] == (
            [("messages", "INSERT")] * 4 + [("reactions", "INSERT")] * 2
            + [("channel_members", "INSERT")])
    m = await scrape(bridge)

    def added(table: str, op: str) -> float:
        return (value(m, "pgbridge_trigger_executions_total", table=table, op=op)
                - value(before, "pgbridge_trigger_executions_total", table=table, op=op))

    assert added("messages", "INSERT") == len(messages) == 4
    assert added("reactions", "INSERT") == 2
    assert added("channel_members", "INSERT") == 1
    assert added("messages", "UPDATE") == added("messages", "DELETE") == 0
    # every published event, by its table and op: the two counters agree
    total = sum(v for (name, _), v in m.items() if name == "pgbridge_trigger_executions_total")
    assert total == value(m, "pgbridge_events_total")
    for ws in sockets:
        await ws.close()


@pytest.mark.slow
async def test_index_scans_are_read_from_the_server_statistics(bridge: Bridge,
                                                               conn: Conn) -> None:
    """Series for the chat tables' indexes, read from pg_stat_user_indexes by the bridge's
    periodic read (every 5 s), grow after queries that scan them."""

    def scans(m: Samples, table: str, index: str) -> float | None:
        return m.get(("pgbridge_index_scans_total", (("index", index), ("table", table))))

    async def listed() -> bool:
        return scans(await scrape(bridge), "messages", "messages_pkey") is not None

    await until(listed, "the first read of the index statistics")
    m = await scrape(bridge)
    for table, index in (("channel_members", "channel_members_pkey"),
                         ("messages", "messages_channel_created_idx"),
                         ("change_events", "change_events_pkey")):
        assert scans(m, table, index) is not None, (table, index)
    before = scans(m, "messages", "messages_pkey") or 0.0

    user = await make_user(conn)
    room = await make_room(conn, user)
    ids = [await post(conn, room, user, f"m{i}") for i in range(3)]
    await conn.execute("SET enable_seqscan = off")  # these few rows: an index scan all the same
    for mid in ids:
        cur = await conn.execute("SELECT content FROM messages WHERE id = %s", (mid,))
        assert await cur.fetchone() is not None
    await conn.execute("RESET enable_seqscan")
    if conn.info.server_version >= 150000:  # else the collector has them within 0.5 s
        await conn.execute("SELECT pg_stat_force_next_flush()")
        await conn.execute("SELECT 1")  # the flush happens at the end of a transaction

    async def counted() -> bool:
        now = scans(await scrape(bridge), "messages", "messages_pkey")
        return now is not None and now >= before + len(ids)

    await until(counted, "the scans to reach pgbridge_index_scans_total", timeout=30)
    assert (scans(await scrape(bridge), "messages", "messages_pkey") or 0) > 0
