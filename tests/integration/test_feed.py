"""One feed per user (PROTOCOL.md, "One feed per user"; daemon/feed.py): a real daemon and
PostgreSQL, real WebSocket clients."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from ulid import ULID
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from daemon.app import Bridge
from daemon.feed import UNREAD_MAX
from tests.integration.test_access import bypassing_triggers
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
    subscribe,
)
from tests.support.procs import until

Conn = psycopg.AsyncConnection[Any]
Row = dict[str, Any]


async def open_feed(ws: ClientConnection, ref: str = "f") -> dict[str, Row]:
    """Send ``feed``; its rooms, by room."""
    await send(ws, type="feed", ref=ref)
    frame = await recv(ws, 30)
    assert frame["type"] == "feed" and frame["ref"] == ref, frame
    rooms = [r["room"] for r in frame["rooms"]]
    assert rooms == sorted(rooms), "rooms are listed in room order"
    return {r["room"]: r for r in frame["rooms"]}


async def acked(conn: Conn, user: str, room: str) -> int | None:
    cur = await conn.execute("SELECT last_seq FROM sync_state WHERE user_id = %s AND room_id = %s "
                             "AND sync_type = 'events'", [user, room])
    row = await cur.fetchone()
    return None if row is None else int(row[0])


async def join(conn: Conn, room: str, user: str) -> None:
    await conn.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                       [room, user])


async def leave(conn: Conn, room: str, user: str) -> None:
    await conn.execute("DELETE FROM channel_members WHERE channel_id = %s AND user_id = %s",
                       [room, user])


async def test_a_feed_lists_every_room_with_head_acked_and_unread_then_their_events(
        bridge: Bridge, conn: Conn) -> None:
    me, other = await make_user(conn), await make_user(conn)
    quiet = await make_room(conn, me)
    busy = await make_room(conn, me, other)
    await make_room(conn, other)  # not mine: not in the feed
    gone = await make_room(conn, me)
    await conn.execute("UPDATE channels SET deleted_at = now() WHERE id = %s", [gone])
    await post(conn, busy, me, "mine: never unread")
    theirs = [await post(conn, busy, other, f"theirs {i}") for i in range(3)]
    await conn.execute("UPDATE messages SET deleted_at = now() WHERE id = %s", [theirs[0]])
    ws = await connect(bridge.port, me)
    rooms = await open_feed(ws)
    assert set(rooms) == {quiet, busy}
    assert rooms[quiet] == {"room": quiet, "head": await head(conn, quiet), "acked": 0,
                            "unread": 0}
    assert rooms[busy] == {"room": busy, "head": await head(conn, busy), "acked": 0,
                           "unread": 2}
    # then the events after each head, of every room
    await post(conn, quiet, other, "in quiet")  # not a member: the event is still the room's
    await post(conn, busy, other, "in busy")
    first, second = await events(ws, 2)
    assert (first["room"], first["seq"]) == (quiet, rooms[quiet]["head"] + 1)
    assert (second["room"], second["seq"]) == (busy, rooms[busy]["head"] + 1)
    assert second["data"]["content"] == "in busy"


async def test_acks_through_the_feed_move_acked_and_unread(bridge: Bridge, conn: Conn) -> None:
    me, other = await make_user(conn), await make_user(conn)
    room = await make_room(conn, me, other)
    for i in range(4):
        await post(conn, room, other, f"m{i}")
    ws = await connect(bridge.port, me)
    before = (await open_feed(ws))[room]
    assert before["unread"] == 4 and before["acked"] == 0
    later = [await post(conn, room, other, f"later {i}") for i in range(2)]
    evs = await events(ws, 2)
    assert [e["id"] for e in evs] == later
    read_upto = evs[0]["seq"]  # the first of the two read
    await send(ws, type="ack", room=room, seq=read_upto)

    async def recorded() -> bool:
        return await acked(conn, me, room) == read_upto
    await until(recorded, "the feed's ack in sync_state")
    again = await connect(bridge.port, me)
    after = (await open_feed(again))[room]
    assert after == {"room": room, "head": evs[1]["seq"], "acked": read_upto, "unread": 1}
    # an ack past what the feed delivered is refused, as on a subscription
    await send(ws, type="ack", room=room, seq=evs[1]["seq"] + 5, ref="a")
    refused = await recv(ws)
    assert refused["type"] == "error" and refused["code"] == "bad_request", refused


async def test_unread_is_counted_up_to_its_cap(bridge: Bridge, conn: Conn) -> None:
    """UNREAD_MAX per room, however many more there are."""
    me, other = await make_user(conn), await make_user(conn)
    room = await make_room(conn, me, other)
    await conn.execute(
        "INSERT INTO messages (id, channel_id, user_id, content) "
        "SELECT gen_ulid(), %s, %s, 'bulk' FROM generate_series(1, %s)",
        [room, other, UNREAD_MAX + 5])
    ws = await connect(bridge.port, me)
    assert (await open_feed(ws))[room]["unread"] == UNREAD_MAX


async def test_a_feed_of_1000_rooms_follows_a_join_and_a_leave(bridge: Bridge,
                                                              conn: Conn) -> None:
    """1,000 rooms (ten times PGBRIDGE_MAX_SUBSCRIPTIONS): all listed, all live; a room joined
    later starts with the join event; a room left ends with membership_revoked before any
    later event of it."""
    me, other = await make_user(conn), await make_user(conn)
    cur = await conn.execute(
        "INSERT INTO channels (id, name) SELECT gen_ulid(), 'r' || i "
        "FROM generate_series(1, 1000) AS i RETURNING id")
    mine = sorted(str(r) for (r,) in await cur.fetchall())
    await conn.execute(
        "INSERT INTO channel_members (channel_id, user_id) "
        "SELECT r, u FROM unnest(%s::varchar[]) AS r, unnest(%s::varchar[]) AS u",
        [mine, [me, other]])
    assert bridge.settings.max_subscriptions < len(mine)
    ws = await connect(bridge.port, me)
    rooms = await open_feed(ws)
    assert sorted(rooms) == mine
    for room in (mine[0], mine[499], mine[-1]):
        await post(conn, room, other, f"to {room}")
        (event,) = await events(ws, 1)
        assert (event["room"], event["seq"]) == (room, rooms[room]["head"] + 1)
    # a room joined later: its first frame is the join event
    new = await make_room(conn, other)
    await post(conn, new, other, "before the join: not sent")
    await join(conn, new, me)
    joined = await recv(ws)
    assert joined["type"] == "event" and joined["room"] == new, joined
    assert (joined["table"], joined["op"]) == ("channel_members", "INSERT")
    assert joined["data"]["user_id"] == me and joined["seq"] == await head(conn, new)
    await post(conn, new, other, "after the join")
    (event,) = await events(ws, 1)
    assert event["room"] == new and event["data"]["content"] == "after the join"
    # a room left: unsubscribed before any later event of it
    left = mine[1]
    await leave(conn, left, me)
    await post(conn, left, other, "after the leave: not sent")
    await post(conn, mine[2], other, "still followed")
    ended = await recv(ws)
    assert ended == {"type": "unsubscribed", "room": left, "reason": "membership_revoked"}
    (event,) = await events(ws, 1)
    assert event["room"] == mine[2] and event["data"]["content"] == "still followed"


async def test_a_join_is_followed_while_writers_do_not_ring(db_url: str, conn: Conn) -> None:
    """With the doorbell off, the capture triggers send no NOTIFY and the bridge polls the
    rooms it follows; the membership hint is still sent, so a join in a room nobody here
    follows is found."""
    me, other = await make_user(conn), await make_user(conn)
    async with running_bridge(db_url, doorbell="off") as bridge:
        ws = await connect(bridge.port, me)
        assert await open_feed(ws) == {}
        room = await make_room(conn, other)
        await join(conn, room, me)
        joined = await recv(ws)
        assert (joined["room"], joined["table"], joined["data"]["user_id"]) == (
            room, "channel_members", me)
        await post(conn, room, other, "polled")
        (event,) = await events(ws, 1)
        assert event["data"]["content"] == "polled"


async def test_leaving_and_joining_again_follows_the_room_again(bridge: Bridge,
                                                                conn: Conn) -> None:
    me, other = await make_user(conn), await make_user(conn)
    room = await make_room(conn, me, other)
    ws = await connect(bridge.port, me)
    await open_feed(ws)
    async with conn.transaction():  # left and back in one go: the hint comes before the DELETE
        await leave(conn, room, me)  # event reaches the feed's subscription
        await join(conn, room, me)
    ended = await recv(ws)
    assert ended == {"type": "unsubscribed", "room": room, "reason": "membership_revoked"}
    rejoined = await recv(ws)
    assert (rejoined["table"], rejoined["op"], rejoined["seq"]) == (
        "channel_members", "INSERT", await head(conn, room))
    await post(conn, room, other, "back")
    (event,) = await events(ws, 1)
    assert event["data"]["content"] == "back"


async def test_a_subscribe_takes_a_room_over_and_its_unsubscribe_gives_it_back(
        bridge: Bridge, conn: Conn) -> None:
    me, other = await make_user(conn), await make_user(conn)
    room, elsewhere = await make_room(conn, me, other), await make_room(conn, me, other)
    ws = await connect(bridge.port, me)
    rooms = await open_feed(ws)
    started = await subscribe(ws, room, since=rooms[room]["head"])
    assert started["from"] == rooms[room]["head"]
    await post(conn, room, other, "once")
    await post(conn, elsewhere, other, "marker")
    got = {e["data"]["content"]: e for e in await events(ws, 2)}  # rooms may interleave
    assert set(got) == {"once", "marker"}
    await post(conn, room, other, "twice")
    (twice,) = await events(ws, 1)
    assert twice["data"]["content"] == "twice" and twice["seq"] == got["once"]["seq"] + 1, (
        "each event of the room comes once, through the subscription")
    await send(ws, type="unsubscribe", room=room, ref="u")
    assert await recv(ws) == {"type": "unsubscribed", "room": room, "reason": "client",
                              "ref": "u"}
    await post(conn, room, other, "back in the feed")
    (event,) = await events(ws, 1)
    assert event["room"] == room and event["data"]["content"] == "back in the feed"
    assert event["seq"] == twice["seq"] + 1


async def test_bad_feed_requests_are_refused(db_url: str, conn: Conn) -> None:
    me, other = await make_user(conn), await make_user(conn)
    rooms = [await make_room(conn, me) for _ in range(3)]
    async with running_bridge(db_url, feed_max_rooms=3) as bridge:
        ws = await connect(bridge.port, me)
        assert set(await open_feed(ws)) == set(rooms)
        await send(ws, type="feed", ref="again")
        frame = await recv(ws)
        assert (frame["type"], frame["code"], frame["ref"]) == ("error", "bad_request", "again")
        await send(ws, type="unsubscribe", room=rooms[0], ref="u")
        frame = await recv(ws)
        assert (frame["type"], frame["code"], frame["room"]) == ("error", "bad_request",
                                                                 rooms[0])
        await make_room(conn, me)  # a fourth: over PGBRIDGE_FEED_MAX_ROOMS
        crowded = await connect(bridge.port, me)
        await send(crowded, type="feed", ref="f")
        frame = await recv(crowded)
        assert (frame["type"], frame["code"], frame["ref"]) == ("error", "rate_limited", "f")
        # a deleted user's feed: the connection closes with 4003 (deleted behind the triggers:
        # their hint would close the connection before the feed is read)
        doomed = await connect(bridge.port, other)
        await bypassing_triggers(db_url, "UPDATE users SET deleted_at = now() WHERE id = %s",
                                 (other,))
        await send(doomed, type="feed", ref="f")
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await recv(doomed)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4003


async def test_hints_for_users_without_a_feed_cost_nothing_and_ids_stay_exact(
        bridge: Bridge, conn: Conn) -> None:
    """A membership of another user never reaches this user's feed."""
    me, other = await make_user(conn), await make_user(conn)
    ws = await connect(bridge.port, me)
    await open_feed(ws)
    theirs = await make_room(conn, other)
    await join(conn, theirs, await make_user(conn))
    mine = str(ULID())
    await conn.execute("INSERT INTO channels (id, name) VALUES (%s, 'mine')", [mine])
    await join(conn, mine, me)
    joined = await recv(ws)
    assert joined["room"] == mine, "the other users' joins were not followed"


async def test_a_restored_room_is_followed_from_its_restore_not_from_its_old_join(
        bridge: Bridge, conn: Conn) -> None:
    """A room soft-deleted and then restored is followed again from the event that restored
    it (its members are hinted); its events from before the deletion (the old join included)
    are not replayed."""
    me, other = await make_user(conn), await make_user(conn)
    room = await make_room(conn, me, other)
    await post(conn, room, other, "before the deletion")
    ws = await connect(bridge.port, me)
    await open_feed(ws)
    await conn.execute("UPDATE channels SET deleted_at = now() WHERE id = %s", [room])
    (deleted,) = await events(ws, 1)
    assert deleted["table"] == "channels"
    assert await recv(ws) == {"type": "unsubscribed", "room": room, "reason": "room_deleted"}
    await conn.execute("UPDATE channels SET deleted_at = NULL WHERE id = %s", [room])
    restored_at = await head(conn, room)
    (restored,) = await events(ws, 1)
    assert (restored["room"], restored["seq"], restored["table"], restored["op"]) == (
        room, restored_at, "channels", "UPDATE")
    assert restored["data"]["deleted_at"] is None
    await post(conn, room, other, "after the restore")
    (event,) = await events(ws, 1)
    assert event["data"]["content"] == "after the restore"
    assert event["seq"] == restored_at + 1


async def test_rooms_joined_past_the_limit_are_refused_once_and_not_followed(
        db_url: str, conn: Conn) -> None:
    """PGBRIDGE_FEED_MAX_ROOMS bounds the rooms joined after the start too: each room past it
    is named once in an error frame, and its events never come (an application role that
    adds memberships without end cannot grow one connection's feed without end)."""
    me, other = await make_user(conn), await make_user(conn)
    rooms = [await make_room(conn, me, other) for _ in range(2)]
    async with running_bridge(db_url, feed_max_rooms=2) as bridge:
        ws = await connect(bridge.port, me)
        assert set(await open_feed(ws)) == set(rooms)
        extra = await make_room(conn, other)
        await join(conn, extra, me)
        refused = await recv(ws)
        assert (refused["type"], refused["code"], refused["room"]) == (
            "error", "rate_limited", extra), refused
        await join(conn, await make_room(conn, other), me)  # a hint: the memberships again
        second = await recv(ws)
        assert second["type"] == "error" and second["room"] != extra, "named once"
        await post(conn, extra, other, "not followed")
        await post(conn, rooms[0], other, "followed")
        (event,) = await events(ws, 1)
        assert event["room"] == rooms[0] and event["data"]["content"] == "followed"
