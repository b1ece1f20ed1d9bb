"""Access follows every change of the data (docs/topics/authorization.md; PROTOCOL.md, "Losing
access"): a subscriber that loses a room receives no event committed after the change, writes
in the same transaction included, a member who keeps it receives everything, and a deleted
user's sockets close with 4003.

Every test ends on a fence: a message to another room, received by a third connection. The
listener publishes in commit order, so once the fence arrives every earlier event was offered
to every subscriber; a ping answered by the victim's pong then shows what its socket got.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from daemon.app import Bridge
from tests.support.fixtures import bridge_behind_proxy, running_bridge
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
    token,
)

Conn = psycopg.AsyncConnection[Any]

CLOSE_USER_GONE = 4003


@dataclass
class Cast:
    victim: str  # loses access
    watcher: str  # a member of the room who keeps it (unless the room itself goes)
    third: str  # a user who is not a member
    witness: str  # the only member of fence_room
    room: str
    other_room: str
    fence_room: str  # a room of the witness only


@dataclass(frozen=True)
class Change:
    sql: str
    params: Callable[[Cast], tuple[str, ...]]
    ends: str  # "membership_revoked", "room_deleted", "room" (either of the two), "closed"
    watcher_keeps: bool = True
    room_survives: bool = True  # the transaction can go on writing to the room


CHANGES = {
    "membership_deleted": Change(
        "DELETE FROM channel_members WHERE channel_id = %s AND user_id = %s",
        lambda c: (c.room, c.victim), "membership_revoked"),
    "membership_given_to_another_user": Change(
        "UPDATE channel_members SET user_id = %s WHERE channel_id = %s AND user_id = %s",
        lambda c: (c.third, c.room, c.victim), "membership_revoked"),
    "membership_moved_to_another_room": Change(
        "UPDATE channel_members SET channel_id = %s WHERE channel_id = %s AND user_id = %s",
        lambda c: (c.other_room, c.room, c.victim), "membership_revoked"),
    "room_soft_deleted": Change(
        "UPDATE channels SET deleted_at = now() WHERE id = %s", lambda c: (c.room,),
        "room_deleted", watcher_keeps=False),
    "room_deleted": Change(
        "DELETE FROM channels WHERE id = %s", lambda c: (c.room,), "room",
        watcher_keeps=False, room_survives=False),
    "user_soft_deleted": Change(
        "UPDATE users SET deleted_at = now() WHERE id = %s", lambda c: (c.victim,), "closed"),
    "user_deleted": Change(
        "DELETE FROM users WHERE id = %s", lambda c: (c.victim,), "closed"),
}


async def cast_of(conn: Conn) -> Cast:
    victim, watcher, third, witness = [await make_user(conn, n)
                                       for n in ("victim", "watcher", "third", "witness")]
    return Cast(victim=victim, watcher=watcher, third=third, witness=witness,
                room=await make_room(conn, victim, watcher),
                other_room=await make_room(conn, watcher),
                fence_room=await make_room(conn, witness, name=witness))


async def fence(conn: Conn, cast: Cast, witness_ws: ClientConnection) -> None:
    """Return once everything committed before now was offered to every subscriber."""
    await post(conn, cast.fence_room, cast.watcher, "fence")
    [frame] = await events(witness_ws, 1)
    assert frame["data"]["content"] == "fence"


async def frames_until_pong(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every frame the socket got before the answer to a ping sent now (it must stay open)."""
    await send(ws, type="ping", ref="fence")
    got = []
    while (frame := await recv(ws)) != {"type": "pong", "ref": "fence"}:
        got.append(frame)
    return got


async def frames_until_closed(ws: ClientConnection,
                              timeout: float = 10.0) -> tuple[list[dict[str, Any]], int | None]:
    """Every frame until the server closes the socket, and the close code."""
    got = []
    try:
        while True:
            got.append(await recv(ws, timeout))
    except ConnectionClosed as exc:
        return got, exc.rcvd.code if exc.rcvd is not None else None


def contents(frames: list[dict[str, Any]]) -> list[str]:
    """The messages posted, in the order received."""
    return [f["data"]["content"] for f in frames
            if f["type"] == "event" and f["table"] == "messages" and f["op"] == "INSERT"]


async def witness_of(bridge: Bridge, cast: Cast) -> ClientConnection:
    ws = await connect(bridge.port, cast.witness)
    await subscribe(ws, cast.fence_room)
    return ws


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHANGES))
async def test_losing_access_ends_it_before_any_later_event(
        bridge: Bridge, conn: Conn, name: str) -> None:
    change = CHANGES[name]
    cast = await cast_of(conn)
    witness = await witness_of(bridge, cast)
    victim, watcher = await connect(bridge.port, cast.victim), await connect(bridge.port,
                                                                             cast.watcher)
    start = (await subscribe(watcher, cast.room))["from"]
    await subscribe(victim, cast.room)
    await post(conn, cast.room, cast.watcher, "before")
    async with conn.transaction():
        await conn.execute(change.sql, change.params(cast))
        if change.room_survives:
            await post(conn, cast.room, cast.watcher, "same transaction")
    if change.room_survives:
        await post(conn, cast.room, cast.watcher, "after")
    await fence(conn, cast, witness)

    if change.ends == "closed":
        got, code = await frames_until_closed(victim)
        assert code == CLOSE_USER_GONE, (code, got)
        # and the deleted user cannot come back
        with pytest.raises(InvalidStatus) as refused:
            await connect(bridge.port, cast.victim)
        assert refused.value.response.status_code == 401
    else:
        got = await frames_until_pong(victim)
        ends = {"membership_revoked", "room_deleted"} if change.ends == "room" \
            else {change.ends}
        assert got[-1]["type"] == "unsubscribed" and got[-1]["reason"] in ends, got
        await victim.close()
    assert contents(got) == ["before"], got

    watched = await frames_until_pong(watcher)
    if change.watcher_keeps:
        assert contents(watched) == ["before", "same transaction", "after"]
        seqs = [f["seq"] for f in watched if f["type"] == "event"]
        assert seqs == list(range(start + 1, start + 1 + len(seqs))), seqs
        await watcher.close()
    else:
        assert contents(watched) == ["before"]
        assert watched[-1]["type"] == "unsubscribed", watched
    await witness.close()


async def test_membership_given_to_another_user_reaches_the_new_member(
        bridge: Bridge, conn: Conn) -> None:
    cast = await cast_of(conn)
    newcomer = await connect(bridge.port, cast.third)
    await conn.execute("UPDATE channel_members SET user_id = %s WHERE channel_id = %s "
                       "AND user_id = %s", (cast.third, cast.room, cast.victim))
    await subscribe(newcomer, cast.room)
    await post(conn, cast.room, cast.watcher, "welcome aboard")
    assert contents(await events(newcomer, 1)) == ["welcome aboard"]
    await newcomer.close()


async def test_forged_user_hint_closes_no_live_user(bridge: Bridge, conn: Conn) -> None:
    """A role that can name the channel may NOTIFY on it: a hint is checked against users, so
    a live user stays."""
    cast = await cast_of(conn)
    witness = await witness_of(bridge, cast)
    ws = await connect(bridge.port, cast.victim)
    await subscribe(ws, cast.room)
    channel, _ = await notify_trust(conn)
    for _ in range(50):
        await conn.execute("SELECT pg_notify(%s, %s)",
                           [channel, f'{{"access": "user", "user": "{cast.victim}"}}'])
    await conn.execute("SELECT pg_notify(%s, %s)",
                       [channel, f' {{"access":"user","user":"{cast.victim}"}}'])  # past the prefix
    await post(conn, cast.room, cast.watcher, "still here")
    await fence(conn, cast, witness)
    assert contents(await frames_until_pong(ws)) == ["still here"]
    await ws.close()
    await witness.close()


async def bypassing_triggers(conn_url: str, statement: str, params: tuple[str, ...]) -> None:
    """Run ``statement`` with every trigger off for its session (superuser only), as a bulk
    load or a logical replica would: no event, no hint; only the periodic check sees it."""
    async with await psycopg.AsyncConnection.connect(conn_url, autocommit=True) as raw:
        await raw.execute("SET session_replication_role = replica")
        await raw.execute(statement, params)


async def test_periodic_check_closes_a_user_deleted_behind_the_triggers(
        db_url: str, conn: Conn) -> None:
    interval = 0.3
    async with running_bridge(db_url, access_check_interval=interval) as bridge:
        cast = await cast_of(conn)
        victim = await connect(bridge.port, cast.victim)
        await subscribe(victim, cast.room)
        await bypassing_triggers(db_url, "UPDATE users SET deleted_at = now() WHERE id = %s",
                                 (cast.victim,))
        loop = asyncio.get_running_loop()
        started = loop.time()
        got, code = await frames_until_closed(victim, timeout=interval + 5.0)
        assert code == CLOSE_USER_GONE and got == []
        assert loop.time() - started < interval + 5.0


async def test_periodic_check_ends_a_membership_deleted_behind_the_triggers(
        db_url: str, conn: Conn) -> None:
    async with running_bridge(db_url, access_check_interval=0.3) as bridge:
        cast = await cast_of(conn)
        victim = await connect(bridge.port, cast.victim)
        await subscribe(victim, cast.room)
        await bypassing_triggers(
            db_url, "DELETE FROM channel_members WHERE channel_id = %s AND user_id = %s",
            (cast.room, cast.victim))
        assert await recv(victim) == {"type": "unsubscribed", "room": cast.room,
                                      "reason": "membership_revoked"}
        revoked = bridge.metrics.registry.get_sample_value(
            "pgbridge_access_revocations_total", {"reason": "periodic_check"})
        assert revoked == 1
        await victim.close()


async def test_refresh_of_a_deleted_user_is_refused_and_closes_4003(
        db_url: str, conn: Conn) -> None:
    # the periodic check is far away and the triggers are bypassed: only refresh can tell
    async with running_bridge(db_url, access_check_interval=3600) as bridge:
        cast = await cast_of(conn)
        victim = await connect(bridge.port, cast.victim)
        await bypassing_triggers(db_url, "UPDATE users SET deleted_at = now() WHERE id = %s",
                                 (cast.victim,))
        await send(victim, type="refresh", token=token(cast.victim), ref="r")
        got, code = await frames_until_closed(victim)
        assert code == CLOSE_USER_GONE
        assert [(f["type"], f.get("code"), f.get("ref")) for f in got] == [
            ("error", "unauthorized", "r")]


async def test_user_deleted_while_the_listener_was_away_is_closed_before_the_catch_up(
        db_url: str, conn: Conn) -> None:
    """The hint of a deletion committed while the listener was disconnected is lost; the
    catch-up after the reconnect checks every connected user before it publishes."""
    async with bridge_behind_proxy(db_url) as (bridge, proxy):
        cast = await cast_of(conn)
        victim = await connect(bridge.port, cast.victim)
        watcher = await connect(bridge.port, cast.watcher)
        await subscribe(victim, cast.room)
        await subscribe(watcher, cast.room)
        proxy.refuse()  # the database is gone for the bridge alone
        async with conn.transaction():
            await conn.execute("UPDATE users SET deleted_at = now() WHERE id = %s",
                               [cast.victim])
            await post(conn, cast.room, cast.watcher, "while away")
        proxy.resume()
        assert contents(await events(watcher, 1, timeout=30.0)) == ["while away"]
        got, code = await frames_until_closed(victim)
        assert code == CLOSE_USER_GONE and contents(got) == [], got
        await watcher.close()
