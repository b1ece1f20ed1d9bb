"""The feed (PROTOCOL.md, "One feed per user"; daemon/feed.py) under hostile clients, hostile
database roles and bad luck: a real daemon and PostgreSQL, real WebSocket clients."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from daemon.app import Bridge
from tests.integration.test_feed import join, open_feed
from tests.support.helpers import (
    connect,
    events,
    make_room,
    make_user,
    notify_trust,
    post,
    recv,
    send,
    subscribe,
)
from tests.support.procs import until

Conn = psycopg.AsyncConnection[Any]

_MEMBERS_WAITING = """
    SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND wait_event_type = 'Lock'
      AND query LIKE '%%SELECT m.user_id, m.channel_id FROM channel_members m%%'
"""


async def test_a_room_given_back_while_a_recheck_reads_memberships_has_no_gap(
        bridge: Bridge, conn: Conn, db_url: str) -> None:
    """An ``unsubscribe`` gives its room back while a recheck of the same feed (started by a
    membership hint) is reading the memberships: the feed must follow the room again after
    the last event that subscription sent, not from the head the recheck then reads (a gap)
    nor from the join event (events sent twice)."""
    me, other = await make_user(conn), await make_user(conn)
    room = await make_room(conn, me, other)
    ws = await connect(bridge.port, me)
    rooms = await open_feed(ws)
    await subscribe(ws, room, since=rooms[room]["head"])
    await post(conn, room, other, "through the subscription")
    (last,) = await events(ws, 1)
    channel, key = await notify_trust(conn)
    async with await psycopg.AsyncConnection.connect(db_url) as holder:
        # the recheck's read of the memberships waits for this lock
        await holder.execute("LOCK TABLE channel_members IN ACCESS EXCLUSIVE MODE")
        hint = json.dumps({"access": "member", "user": me}, separators=(",", ":"))
        await conn.execute("SELECT pg_notify(%s, %s)", [channel, key.sign(hint)])

        async def waiting() -> bool:
            cur = await conn.execute(_MEMBERS_WAITING)
            row = await cur.fetchone()
            return row is not None and int(row[0]) > 0
        await until(waiting, "the feed's recheck waiting for the memberships")
        await send(ws, type="unsubscribe", room=room, ref="u")
        assert await recv(ws) == {"type": "unsubscribed", "room": room, "reason": "client",
                                  "ref": "u"}
        # committed with the lock's release, before the recheck reads the room's head
        await post(holder, room, other, "after the unsubscribe")
        await holder.commit()
    await post(conn, room, other, "later")
    got = await events(ws, 2)
    assert [(e["seq"], e["data"].get("content", e["table"])) for e in got] == [
        (last["seq"] + 1, "after the unsubscribe"), (last["seq"] + 2, "later")], (
        "the room comes back to the feed after the last event its subscription sent")
