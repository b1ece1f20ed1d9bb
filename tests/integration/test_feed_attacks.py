"""The feed (PROTOCOL.md, "One feed per user"; daemon/feed.py) under hostile clients, hostile
database roles and bad luck: a real daemon and PostgreSQL, real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import psycopg
import pytest
from websockets.asyncio.client import ClientConnection

from daemon.app import Bridge
from daemon.hub import Subscription
from daemon.schema import apply_schema
from tests.integration.test_feed import join, leave, open_feed
from tests.integration.test_presence import watch
from tests.support.fixtures import running_bridge
from tests.support.helpers import (
    connect,
    events,
    head,
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


async def taken_over(bridge: Bridge, conn: Conn) -> tuple[str, str, str, ClientConnection]:
    """A user and another member of a new room; the user's connection with a feed, and a
    ``subscribe`` (live, ``since`` = its head) that took the room over from it. Returns
    ``(user, other, room, ws)``."""
    me, other = await make_user(conn), await make_user(conn)
    room = await make_room(conn, me, other)
    ws = await connect(bridge.port, me)
    rooms = await open_feed(ws)
    await subscribe(ws, room, since=rooms[room]["head"])
    return me, other, room, ws


async def recheck_waiting(conn: Conn) -> None:
    """Until a feed's recheck waits for a lock on channel_members (held by the test)."""
    async def waiting() -> bool:
        cur = await conn.execute(_MEMBERS_WAITING)
        row = await cur.fetchone()
        return row is not None and int(row[0]) > 0
    await until(waiting, "the feed's recheck waiting for the memberships")


async def test_a_room_given_back_while_a_recheck_reads_memberships_has_no_gap(
        bridge: Bridge, conn: Conn, db_url: str) -> None:
    """An ``unsubscribe`` gives its room back while a recheck of the same feed (started by a
    membership hint) is reading the memberships: the feed must follow the room again after
    the last event that subscription sent, not from the head the recheck then reads (a gap)
    nor from the join event (events sent twice)."""
    me, other, room, ws = await taken_over(bridge, conn)
    await post(conn, room, other, "through the subscription")
    (last,) = await events(ws, 1)
    channel, key = await notify_trust(conn)
    async with await psycopg.AsyncConnection.connect(db_url) as holder:
        # the recheck's read of the memberships waits for this lock
        await holder.execute("LOCK TABLE channel_members IN ACCESS EXCLUSIVE MODE")
        hint = json.dumps({"access": "member", "user": me}, separators=(",", ":"))
        await conn.execute("SELECT pg_notify(%s, %s)", [channel, key.sign(hint)])
        await recheck_waiting(conn)
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


async def test_a_membership_moved_to_the_user_sends_nothing_from_before_it(
        bridge: Bridge, conn: Conn) -> None:
    """A user who left a room and is given a membership row later (``UPDATE channel_members
    SET user_id``, which the log records as an ``UPDATE``, not an ``INSERT``) is followed from
    that event: never from the user's earlier ``INSERT`` of the room, which would replay what
    was said while the user was not a member."""
    me, other, third = await make_user(conn), await make_user(conn), await make_user(conn)
    room = await make_room(conn, me, other)
    ws = await connect(bridge.port, me)
    await open_feed(ws)
    await leave(conn, room, me)
    assert await recv(ws) == {"type": "unsubscribed", "room": room,
                              "reason": "membership_revoked"}
    await post(conn, room, other, "said while you were away")
    await join(conn, room, third)
    await conn.execute("UPDATE channel_members SET user_id = %s WHERE channel_id = %s "
                       "AND user_id = %s", [me, room, third])
    first = await recv(ws)
    assert (first["room"], first["table"], first["op"], first["seq"]) == (
        room, "channel_members", "UPDATE", await head(conn, room)), first
    await post(conn, room, other, "said now")
    (event,) = await events(ws, 1)
    assert event["data"]["content"] == "said now"


async def test_a_membership_moved_into_another_room_is_followed_from_that_move(
        bridge: Bridge, conn: Conn) -> None:
    """``UPDATE channel_members SET channel_id`` gives the user a room: followed from that
    event (an ``UPDATE``), not from a later ``UPDATE`` of the row (its role)."""
    me, other = await make_user(conn), await make_user(conn)
    there, here = await make_room(conn, me, other), await make_room(conn, other)
    ws = await connect(bridge.port, me)
    await open_feed(ws)
    async with conn.transaction():  # moved, then touched again before the hint is read
        await conn.execute("UPDATE channel_members SET channel_id = %s WHERE channel_id = %s "
                           "AND user_id = %s", [here, there, me])
        moved_at = await head(conn, here)
        await conn.execute("UPDATE channel_members SET role = 'admin' WHERE channel_id = %s "
                           "AND user_id = %s", [here, me])
    got = [await recv(ws) for _ in range(3)]  # the end of one, the move and the role
    assert {"type": "unsubscribed", "room": there, "reason": "membership_revoked"} in got
    joined = [f for f in got if f["type"] == "event"]
    assert [(f["room"], f["table"], f["op"], f["seq"]) for f in joined] == [
        (here, "channel_members", "UPDATE", moved_at),
        (here, "channel_members", "UPDATE", moved_at + 1)], joined


async def test_a_room_given_back_after_the_user_left_and_came_back_starts_at_the_return(
        bridge: Bridge, conn: Conn, db_url: str) -> None:
    """An ``unsubscribe`` gives a room back; before the feed reads the membership, the user
    leaves the room, something is said, and the user is added again: the feed follows the
    room from the new join event, never from the subscription's cursor (which would replay
    what was said while the user was not a member)."""
    me, other, room, ws = await taken_over(bridge, conn)
    async with await psycopg.AsyncConnection.connect(db_url) as holder:
        await holder.execute("LOCK TABLE channel_members IN ACCESS EXCLUSIVE MODE")
        await send(ws, type="unsubscribe", room=room, ref="u")
        assert await recv(ws) == {"type": "unsubscribed", "room": room, "reason": "client",
                                  "ref": "u"}
        await recheck_waiting(conn)
        await leave(holder, room, me)
        await post(holder, room, other, "said while you were away")
        await join(holder, room, me)
        await holder.commit()
    first = await recv(ws)
    assert (first["room"], first["table"], first["op"], first["seq"]) == (
        room, "channel_members", "INSERT", await head(conn, room)), first
    await post(conn, room, other, "said now")
    (event,) = await events(ws, 1)
    assert event["data"]["content"] == "said now"


async def many_rooms(conn: Conn, n: int, *members: str) -> list[str]:
    cur = await conn.execute("INSERT INTO channels (id, name) SELECT gen_ulid(), 'r' || i "
                             "FROM generate_series(1, %s) AS i RETURNING id", [n])
    rooms = sorted(str(r) for (r,) in await cur.fetchall())
    await conn.execute("INSERT INTO channel_members (channel_id, user_id) "
                       "SELECT r, u FROM unnest(%s::varchar[]) AS r, unnest(%s::varchar[]) AS u",
                       [rooms, list(members)])
    return rooms


async def test_a_client_gone_while_its_feed_starts_leaves_nothing_tracked(
        bridge: Bridge, conn: Conn) -> None:
    """Clients that ask for a feed of 1,000 rooms and close at once, or never read: once they
    are gone, the hub tracks no room and counts no subscription."""
    me, other = await make_user(conn), await make_user(conn)
    await many_rooms(conn, 1000, me, other)
    for _ in range(5):
        ws = await connect(bridge.port, me)
        await send(ws, type="feed", ref="f")
        await ws.close()
    mute = await connect(bridge.port, me, max_queue=None)
    await send(mute, type="feed", ref="f")

    async def started() -> bool:
        return len(bridge.hub.rooms()) == 1000
    await until(started, "the mute client's feed registered")
    await mute.close()

    async def nothing_left() -> bool:
        return bridge.hub.rooms() == [] and len(bridge.feeds) == 0
    await until(nothing_left, "every feed's rooms left the hub")


async def test_subscribe_and_unsubscribe_in_a_loop_lose_nothing(
        bridge: Bridge, conn: Conn) -> None:
    """A client takes a feed room over and gives it back again and again while the room is
    written: every event of the room arrives, in order (at least once: a take-over may meet
    events of the feed in flight)."""
    me, other = await make_user(conn), await make_user(conn)
    room = await make_room(conn, me, other)
    ws = await connect(bridge.port, me)
    held = (await open_feed(ws))[room]["head"]
    seen: list[int] = []
    for i in range(15):
        await send(ws, type="subscribe", room=room, since=held, ref=f"s{i}")
        await post(conn, room, other, f"a{i}")
        await send(ws, type="unsubscribe", room=room, ref=f"u{i}")
        await post(conn, room, other, f"b{i}")
        want = await head(conn, room)
        while held < want:
            frame = await recv(ws)
            assert frame["type"] in {"event", "subscribed", "unsubscribed"}, frame
            if frame["type"] == "event":
                assert frame["seq"] <= held + 1, f"a gap: {held} then {frame['seq']}"
                held = max(held, frame["seq"])
                seen.append(frame["seq"])
    assert sorted(set(seen)) == list(range(seen[0], held + 1))


class Recorder:
    """A subscription's sink that keeps what it is sent (the feed's connection stands here:
    what is tested is the rooms' processor registering a feed's subscriptions)."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.frames: list[bytes | str] = []

    @property
    def correlation_id(self) -> str:
        return "recorder"

    def send(self, frame: bytes | str) -> None:
        self.frames.append(frame)

    def overflow(self, why: str) -> None:
        raise AssertionError(why)

    def subscription_ended(self, sub: Subscription) -> None:
        raise AssertionError(sub.room)


async def test_a_room_left_by_its_last_subscriber_while_a_feed_registers_is_tracked_again(
        bridge: Bridge, conn: Conn, db_url: str) -> None:
    """A feed's rooms are registered in one turn of the rooms' processor, after one read of
    the heads of the rooms nobody here followed yet. A room that someone else followed when
    that turn began, and whose last subscriber left during the read, was no longer tracked
    when the feed's subscription was added to it: a KeyError, and the whole feed failed with
    ``internal`` (logged as a crash of the listener)."""
    me, other = await make_user(conn), await make_user(conn)
    shared, fresh = await make_room(conn, me, other), await make_room(conn, me)
    await post(conn, shared, other, "before")
    theirs = await connect(bridge.port, other)
    await subscribe(theirs, shared)
    assert shared in bridge.hub.rooms()
    sink = Recorder(me)
    subs = [Subscription(sink, room, pending_limit=100, feed=True) for room in (shared, fresh)]
    async with await psycopg.AsyncConnection.connect(db_url) as holder:
        await holder.execute("LOCK TABLE change_sequences IN ACCESS EXCLUSIVE MODE")
        adding = asyncio.create_task(bridge.rooms.add_many(subs))

        async def reading_heads() -> bool:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE '%%FROM change_sequences%%'")
            row = await cur.fetchone()
            return row is not None and int(row[0]) > 0
        await until(reading_heads, "the feed's read of the heads waiting")
        await theirs.close()

        async def untracked() -> bool:
            return shared not in bridge.hub.rooms()
        await until(untracked, "the last subscriber of the shared room gone")
        await holder.rollback()
    lasts = await asyncio.wait_for(adding, 10)
    assert lasts == [await head(conn, shared), await head(conn, fresh)]
    assert bridge.hub.subscribers(shared) == bridge.hub.subscribers(fresh) == 1
    for sub in subs:
        bridge.hub.remove(sub)


async def test_a_bulk_insert_of_10000_memberships_is_followed_by_every_feed(
        bridge: Bridge, conn: Conn) -> None:
    """One statement adds 20 users with feeds to 500 rooms each: every feed follows each of
    its new rooms from its join event, once."""
    users = [await make_user(conn) for _ in range(20)]
    writer = await make_user(conn)
    rooms = await many_rooms(conn, 500, writer)
    feeds = [await connect(bridge.port, user, max_queue=None) for user in users]
    for ws in feeds:
        assert await open_feed(ws) == {}
    await conn.execute("INSERT INTO channel_members (channel_id, user_id) "
                       "SELECT r, u FROM unnest(%s::varchar[]) AS r, unnest(%s::varchar[]) AS u",
                       [rooms, users])
    cur = await conn.execute("SELECT split_part(row_id, ':', 2), room_id, seq, (SELECT "
                             "last_seq FROM change_sequences s WHERE s.room_id = e.room_id) "
                             "FROM change_events e WHERE table_name = 'channel_members' "
                             "AND room_id = ANY(%s) AND split_part(row_id, ':', 2) = ANY(%s)",
                             [rooms, users])
    want: dict[str, set[tuple[str, int]]] = {user: set() for user in users}
    for user, room, joined, last in await cur.fetchall():  # from the join to the head
        want[user] |= {(room, seq) for seq in range(joined, last + 1)}
    for user, ws in zip(users, feeds, strict=True):
        got = await events(ws, len(want[user]), timeout=60)
        assert sorted((e["room"], e["seq"]) for e in got) == sorted(want[user])
        firsts = {e["room"]: e for e in reversed(got)}
        assert {(e["table"], e["op"], e["data"]["user_id"]) for e in firsts.values()} == {
            ("channel_members", "INSERT", user)}, "each room starts with the user's join"
    await post(conn, rooms[0], writer, "to all")
    for ws in feeds:
        (event,) = await events(ws, 1)
        assert event["data"]["content"] == "to all"
        await send(ws, type="ping", ref="p")
        assert await recv(ws) == {"type": "pong", "ref": "p"}, "nothing twice"


async def test_a_user_removed_and_added_again_and_again_is_followed_once(
        bridge: Bridge, conn: Conn) -> None:
    """A membership deleted while the feed's subscription of the room was being registered
    (its DELETE buffered until the subscription went live) ended that subscription, which
    stayed in the hub: the room was then followed twice, and tracked after the client left."""
    me, other = await make_user(conn), await make_user(conn)
    room = await make_room(conn, me, other)
    ws = await connect(bridge.port, me)
    await open_feed(ws)
    for _ in range(30):
        await leave(conn, room, me)
        await join(conn, room, me)
    await post(conn, room, other, "last")
    got = []
    while not got or got[-1].get("data", {}).get("content") != "last":
        got.append(await recv(ws))
    seqs = [f["seq"] for f in got if f["type"] == "event"]
    assert len(seqs) == len(set(seqs)), "no event twice"
    await send(ws, type="ping", ref="p")
    assert await recv(ws) == {"type": "pong", "ref": "p"}, "nothing after the last event"
    assert bridge.hub.subscribers(room) == 1
    await ws.close()

    async def untracked() -> bool:
        return room not in bridge.hub.rooms()
    await until(untracked, "the room left the hub with its only client")


async def test_subscribes_racing_a_removal_leave_nothing_in_the_hub(
        bridge: Bridge, conn: Conn) -> None:
    """The same for a ``subscribe``: one ended by the membership's DELETE buffered while it
    replayed stayed in the hub after the client left."""
    me, other = await make_user(conn), await make_user(conn)
    room = await make_room(conn, me, other)
    ws = await connect(bridge.port, me, max_queue=None)
    for i in range(30):
        await send(ws, type="subscribe", room=room, ref=f"s{i}")
        await leave(conn, room, me)
        await join(conn, room, me)
    await send(ws, type="ping", ref="p")
    while await recv(ws) != {"type": "pong", "ref": "p"}:
        pass
    await ws.close()

    async def untracked() -> bool:
        return room not in bridge.hub.rooms()
    await until(untracked, "the room left the hub with its only client", timeout=5)


async def test_forged_membership_hints_cost_no_recheck_and_joins_still_follow(
        bridge: Bridge, conn: Conn) -> None:
    """Any role may NOTIFY on any channel it can name: unsigned membership hints, however
    many, are dropped; a real join after them is still followed from its join event."""
    me, other = await make_user(conn), await make_user(conn)
    ws = await connect(bridge.port, me)
    await open_feed(ws)
    channel, _ = await notify_trust(conn)
    forged = json.dumps({"access": "member", "user": me}, separators=(",", ":"))
    await conn.execute("SELECT pg_notify(%s, %s) FROM generate_series(1, 500) AS i",
                       [channel, forged])
    await conn.execute("SELECT pg_notify('pgbridge', %s)", [forged])
    room = await make_room(conn, other)
    await join(conn, room, me)
    joined = await recv(ws, 30)
    assert (joined["room"], joined["table"], joined["op"]) == (room, "channel_members", "INSERT")


async def test_rooms_deleted_while_followed_end_and_typing_goes_to_feed_rooms(
        bridge: Bridge, conn: Conn) -> None:
    """A feed room soft-deleted or deleted ends with ``room_deleted`` before any later event
    of it; ``typing`` in a room the feed follows reaches the room's presence subscribers; in a
    room it no longer follows, it is refused."""
    me, other = await make_user(conn), await make_user(conn)
    soft, hard, talk = (await make_room(conn, me, other), await make_room(conn, me, other),
                        await make_room(conn, me, other))
    ws = await connect(bridge.port, me)
    await open_feed(ws)
    watcher, _ = await watch(bridge.port, other, talk)
    await send(ws, type="typing", room=talk)

    async def typing_frame() -> dict[str, Any]:
        while (frame := await recv(watcher))["type"] != "typing":
            pass
        return frame
    assert await typing_frame() == {"type": "typing", "room": talk, "user": me}
    await conn.execute("UPDATE channels SET deleted_at = now() WHERE id = %s", [soft])
    await conn.execute("DELETE FROM channels WHERE id = %s", [hard])
    got = [await recv(ws) for _ in range(4)]  # each room: its channels event, then the end
    ends = [f for f in got if f["type"] == "unsubscribed"]
    assert sorted((f["room"], f["reason"]) for f in ends) == sorted(
        [(soft, "room_deleted"), (hard, "room_deleted")]), got
    await post(conn, soft, other, "in a deleted room")
    await send(ws, type="typing", room=soft, ref="t")
    refused = await recv(ws)
    assert (refused["type"], refused["code"], refused["ref"]) == ("error", "forbidden", "t")
    assert soft not in bridge.hub.rooms() and hard not in bridge.hub.rooms()


async def test_a_room_given_back_whose_follow_failed_keeps_its_cursor(
        fresh_db: str, caplog: pytest.LogCaptureFixture) -> None:
    """A room given back by an ``unsubscribe`` whose follow fails (the database failed while
    replaying what it missed) is tried again later from the same cursor, not found again as
    a join (from its join event: events the subscription sent came twice; without one in the
    log, from the head: a gap). On a database of its own: it renames a column of the log."""
    await apply_schema(fresh_db, schema="public")
    async with (await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) as conn,
                running_bridge(fresh_db) as bridge):
        _, other, room, ws = await taken_over(bridge, conn)
        await post(conn, room, other, "through the subscription")
        (last,) = await events(ws, 1)
        bridge.feeds.retry_delay = 2.0  # the failure is over before the second try
        async with await psycopg.AsyncConnection.connect(fresh_db) as holder:
            await holder.execute("LOCK TABLE channel_members IN ACCESS EXCLUSIVE MODE")
            await send(ws, type="unsubscribe", room=room, ref="u")
            assert (await recv(ws))["type"] == "unsubscribed"
            await recheck_waiting(conn)
            await post(holder, room, other, "missed while given back")
            # the replay of what the room missed fails: its reads name this column (and the
            # feed's own statements do not)
            await holder.execute("ALTER TABLE change_events RENAME COLUMN created_at TO gone")
            await holder.commit()

        async def failed() -> bool:
            return any(getattr(r, "event", None) == "feed_follow_failed"
                       for r in caplog.records)
        await until(failed, "the feed's follow of the room failed")
        await conn.execute("ALTER TABLE change_events RENAME COLUMN gone TO created_at")
        await post(conn, room, other, "after the failure")
        got = await events(ws, 2, timeout=30)
        assert [(e["seq"], e["data"].get("content", e["table"])) for e in got] == [
            (last["seq"] + 1, "missed while given back"), (last["seq"] + 2, "after the failure")]
