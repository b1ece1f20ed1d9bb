"""Presence and typing across instances (PROTOCOL.md, "Presence and typing";
docs/topics/presence-and-typing.md): real bridges on one database, real clients over loopback.

Absence is shown with a fence, as in test_access.py: frames of one user in one room arrive in the
order of the changes, so once a later change's frame arrives, a frame that was never received
before it was never sent. Waits on time itself (a grace period passing) wait for the writer to
have acted on the deadline (:func:`grace_passed`), not for a clock.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from websockets.asyncio.client import ClientConnection

from daemon.app import Bridge
from tests.support.fixtures import running_bridge
from tests.support.helpers import (
    channels,
    connect,
    make_room,
    make_user,
    notify_trust,
    post,
    recv,
    send,
    subscribe,
)
from tests.support.procs import daemon_process, free_port, until

Conn = psycopg.AsyncConnection[Any]
Frame = dict[str, Any]

GRACE = 0.6  # seconds (PGBRIDGE_PRESENCE_GRACE) in these tests
LEASE = 1.5  # seconds (PGBRIDGE_PRESENCE_LEASE): a dead instance's users go within 2 s


def options(**extra: Any) -> dict[str, Any]:
    return {"presence_grace": GRACE, "presence_lease": LEASE} | extra


async def until_frame(ws: ClientConnection, wanted: Callable[[Frame], bool],
                      timeout: float = 10.0) -> tuple[Frame, list[Frame]]:
    """Receive until a frame ``wanted`` accepts; returns it and the frames before it."""
    before: list[Frame] = []
    deadline = time.monotonic() + timeout
    while True:
        frame = await recv(ws, max(0.1, deadline - time.monotonic()))
        if wanted(frame):
            return frame, before
        before.append(frame)


def presence_of(user: str, **fields: Any) -> Callable[[Frame], bool]:
    return lambda f: f["type"] == "presence" and f["user"] == user and all(
        f[k] == v for k, v in fields.items())


async def watch(port: int, user: str, room: str) -> tuple[ClientConnection, list[Frame]]:
    """``user`` connected and subscribed to ``room`` with presence; returns the socket and the
    snapshot (one frame per member)."""
    ws = await connect(port, user)
    await subscribe(ws, room, presence=True)
    # the snapshot follows `subscribed` at once; a ping's pong marks where it ended
    await send(ws, type="ping", ref="end-of-snapshot")
    snapshot: list[Frame] = []
    while (frame := await recv(ws)) != {"type": "pong", "ref": "end-of-snapshot"}:
        snapshot.append(frame)
    return ws, snapshot


async def grace_passed(*bridges: Bridge) -> None:
    """Every grace period running on these bridges has ended and was acted on."""
    async def done() -> bool:
        return all(b.presence.roster.next_due() is None and not b.presence.changes
                   for b in bridges)
    await until(done, "the grace periods to pass and their leaves to be written")


async def status_row(conn: Conn, user: str) -> tuple[str, datetime, str | None] | None:
    cur = await conn.execute("SELECT status, last_seen, custom_status FROM user_status "
                             "WHERE user_id = %s", [user])
    row = await cur.fetchone()
    return (str(row[0]), row[1], row[2]) if row else None


def transitions(bridge: Bridge) -> float:
    return float(bridge.metrics.presence_transitions._value.get())


@pytest.mark.slow
async def test_presence_across_two_instances_follows_the_last_connection(
        db_url: str, conn: Conn) -> None:
    watcher, user = await make_user(conn, "watcher"), await make_user(conn, "target")
    room = await make_room(conn, watcher, user)
    async with (running_bridge(db_url, **options()) as a,
                running_bridge(db_url, **options()) as b):
        ws, snapshot = await watch(a.port, watcher, room)
        assert sorted(f["user"] for f in snapshot) == sorted([watcher, user])
        target = next(f for f in snapshot if f["user"] == user)
        assert target == {"type": "presence", "room": room, "user": user, "status": "offline",
                          "online": False, "last_seen": None, "custom_status": None}

        first = await connect(a.port, user)
        online, _ = await until_frame(ws, presence_of(user, online=True))
        assert online["status"] == "online" and online["last_seen"] is not None
        second = await connect(b.port, user)  # the other instance: no transition
        await first.close()
        await grace_passed(a, b)
        row = await status_row(conn, user)
        assert row is not None and row[0] == "online", "one connection is still open on b"

        await second.close()
        closed_at = datetime.now().astimezone()
        offline, before = await until_frame(ws, presence_of(user, online=False))
        assert not [f for f in before if f["type"] == "presence" and f["user"] == user], \
            "nothing changed while a connection was open"
        assert offline["status"] == "offline"
        last_seen = datetime.fromisoformat(offline["last_seen"])
        assert abs((last_seen - closed_at).total_seconds()) < GRACE / 2, \
            "last_seen is when the last connection closed, not when the grace ended"
        row = await status_row(conn, user)
        assert row is not None and row[0] == "offline" and row[1] == last_seen
        await ws.close()


@pytest.mark.slow
async def test_a_reconnect_within_the_grace_period_is_never_seen_offline(
        db_url: str, conn: Conn) -> None:
    watcher, user = await make_user(conn, "watcher"), await make_user(conn, "target")
    room = await make_room(conn, watcher, user)
    async with (running_bridge(db_url, **options(presence_grace=3.0)) as a,
                running_bridge(db_url, **options(presence_grace=3.0)) as b):
        ws, _ = await watch(b.port, watcher, room)
        sock = await connect(a.port, user)
        await until_frame(ws, presence_of(user, online=True))

        async def both_written() -> bool:  # the watcher's join (b) and the target's (a)
            return transitions(a) + transitions(b) == 2

        await until(both_written, "both joins counted")
        for port in (a.port, a.port, b.port, a.port):  # dropped and back, on either instance
            await sock.close()
            sock = await connect(port, user)
        await grace_passed(a, b)
        assert transitions(a) + transitions(b) == 2, "a reconnect writes nothing"
        # Fence: a change made now arrives after anything the reconnects caused.
        await conn.execute("UPDATE user_status SET custom_status = 'fence' WHERE user_id = %s",
                           [user])
        fence, before = await until_frame(ws, presence_of(user, custom_status="fence"))
        assert fence["online"] is True
        assert not [f for f in before if f["type"] == "presence" and f["user"] == user], before
        await sock.close()
        await ws.close()


@pytest.mark.slow
async def test_a_killed_instance_s_users_go_offline_within_the_lease_bound(
        db_url: str, conn: Conn, tmp_path: Path) -> None:
    watcher, user, both = (await make_user(conn, "watcher"), await make_user(conn, "target"),
                           await make_user(conn, "both"))
    room = await make_room(conn, watcher, user, both)
    port = free_port()
    async with running_bridge(db_url, **options()) as survivor:
        ws, _ = await watch(survivor.port, watcher, room)
        on_survivor = await connect(survivor.port, both)
        async with daemon_process(db_url, port, tmp_path, PGBRIDGE_PRESENCE_GRACE=str(GRACE),
                                  PGBRIDGE_PRESENCE_LEASE=str(LEASE)) as doomed:
            doomed_socks = [await connect(port, user), await connect(port, both)]
            await until_frame(ws, presence_of(user, online=True))
            assert doomed.proc is not None
            os.kill(doomed.proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            await doomed.wait()
            bound = LEASE * 4 / 3
            offline, before = await until_frame(ws, presence_of(user, online=False),
                                                timeout=bound + 5.0)
            waited = time.monotonic() - killed
        assert waited < bound + 2.0, f"offline after {waited:.1f} s; documented bound {bound} s"
        assert datetime.fromisoformat(offline["last_seen"]) <= datetime.now().astimezone()
        assert not [f for f in before if f["type"] == "presence" and f["user"] == both], \
            "a user still connected to the survivor stays online"
        row = await status_row(conn, both)
        assert row is not None and row[0] == "online"
        for sock in (*doomed_socks, on_survivor, ws):
            await sock.close()
    cur = await conn.execute("SELECT count(*) FROM presence_sessions s JOIN users u "
                             "ON u.id = s.user_id WHERE u.id = ANY(%s)", [[user]])
    assert (await cur.fetchone() or (1,))[0] == 0


async def test_an_instance_whose_lease_was_expired_writes_its_users_again(
        db_url: str, conn: Conn) -> None:
    """A bridge cut off from the database for longer than its lease finds its users turned
    offline by another instance; its next renewal writes them online again."""
    watcher, user = await make_user(conn, "watcher"), await make_user(conn, "target")
    room = await make_room(conn, watcher, user)
    async with running_bridge(db_url, **options()) as a:
        ws, _ = await watch(a.port, watcher, room)
        sock = await connect(a.port, user)
        await until_frame(ws, presence_of(user, online=True))
        await conn.execute("UPDATE presence_instances SET expires_at = now() - interval '1 s' "
                           "WHERE instance_id = %s", [a.presence.instance])
        await conn.execute("SELECT pgbridge_presence_reap()")  # as another instance would
        await until_frame(ws, presence_of(user, online=False))
        await until_frame(ws, presence_of(user, online=True), timeout=LEASE + 5.0)
        await sock.close()
        await ws.close()


async def test_an_application_status_survives_connects_and_disconnects(
        db_url: str, conn: Conn) -> None:
    watcher, user = await make_user(conn, "watcher"), await make_user(conn, "target")
    room = await make_room(conn, watcher, user)
    async with running_bridge(db_url, **options()) as a:
        ws, _ = await watch(a.port, watcher, room)
        await conn.execute("INSERT INTO user_status (user_id, status, custom_status) "
                           "VALUES (%s, 'busy', 'in a meeting')", [user])
        await until_frame(ws, presence_of(user, status="busy", online=False,
                                          custom_status="in a meeting"))
        sock = await connect(a.port, user)
        await until_frame(ws, presence_of(user, status="busy", online=True,
                                          custom_status="in a meeting"))
        await sock.close()
        gone, _ = await until_frame(ws, presence_of(user, online=False))
        assert gone["status"] == "busy" and gone["custom_status"] == "in a meeting"
        row = await status_row(conn, user)
        assert row is not None and row[0] == "busy" and row[2] == "in a meeting"
        # Ending its own status, the application writes 'online' or 'offline': the database
        # stores what is true of the user's connections.
        await conn.execute("UPDATE user_status SET status = 'online' WHERE user_id = %s", [user])
        back, _ = await until_frame(ws, presence_of(user, status="offline"))
        assert back["online"] is False and back["custom_status"] == "in a meeting"
        await ws.close()


async def test_presence_reaches_only_watchers_who_asked_and_are_members(
        db_url: str, conn: Conn) -> None:
    watcher, plain, outsider, user = (await make_user(conn), await make_user(conn),
                                      await make_user(conn), await make_user(conn))
    room = await make_room(conn, watcher, plain, user)
    async with running_bridge(db_url, **options()) as a:
        ws, _ = await watch(a.port, watcher, room)
        quiet = await connect(a.port, plain)
        await subscribe(quiet, room)  # no presence: nothing new
        stranger = await connect(a.port, outsider)
        await send(stranger, type="subscribe", room=room, presence=True, ref="p")
        refused = await recv(stranger)
        assert refused["type"] == "error" and refused["code"] == "forbidden"
        await send(stranger, type="subscribe", room=room, presence="yes", ref="q")
        bad = await recv(stranger)
        assert bad["type"] == "error" and bad["code"] == "bad_request" and bad["ref"] == "q"
        sock = await connect(a.port, user)
        await until_frame(ws, presence_of(user, online=True))
        mid = await post(conn, room, user, "fence")
        frame = await recv(quiet)  # nothing of presence came before the event
        assert frame["type"] == "event" and frame["id"] == mid, frame
        await send(stranger, type="ping", ref="fence")
        assert await recv(stranger) == {"type": "pong", "ref": "fence"}
        for s in (ws, quiet, stranger, sock):
            await s.close()


async def test_a_member_who_joins_is_announced_to_watchers(db_url: str, conn: Conn) -> None:
    watcher, newcomer = await make_user(conn), await make_user(conn)
    room, elsewhere = await make_room(conn, watcher), await make_room(conn, newcomer)
    async with running_bridge(db_url, **options()) as a:
        ws, snapshot = await watch(a.port, watcher, room)
        assert [f["user"] for f in snapshot] == [watcher]
        sock = await connect(a.port, newcomer)
        await subscribe(sock, elsewhere)
        await until(lambda: _online(conn, newcomer), "the newcomer online")
        await conn.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                           (room, newcomer))
        joined, before = await until_frame(ws, presence_of(newcomer))
        assert joined["online"] is True
        assert [f["table"] for f in before if f["type"] == "event"] == ["channel_members"]
        await sock.close()
        await ws.close()


async def _online(conn: Conn, user: str) -> bool:
    row = await status_row(conn, user)
    return row is not None and row[0] == "online"


async def test_typing_crosses_instances_to_opted_in_members_only_and_is_never_replayed(
        db_url: str, conn: Conn) -> None:
    typist, watcher, plain, outsider, late = [await make_user(conn) for _ in range(5)]
    room = await make_room(conn, typist, watcher, plain, late)
    async with (running_bridge(db_url, **options()) as a,
                running_bridge(db_url, **options()) as b):
        ws, _ = await watch(b.port, watcher, room)
        mine, _ = await watch(a.port, typist, room)
        quiet = await connect(b.port, plain)
        await subscribe(quiet, room)
        sock = await connect(a.port, typist)
        await subscribe(sock, room)  # typing needs a subscription, not presence
        await send(sock, type="typing", room=room)
        frame, _ = await until_frame(ws, lambda f: f["type"] == "typing")
        assert frame == {"type": "typing", "room": room, "user": typist}

        stranger = await connect(a.port, outsider)
        await send(stranger, type="typing", room=room, ref="t")
        refused = await recv(stranger)
        assert (refused["type"], refused["code"], refused["ref"], refused["room"]) == (
            "error", "forbidden", "t", room)

        # A burst: about one a second gets through (a burst of 2), the rest is dropped
        # silently: no error, no close.
        for _ in range(6):
            await send(sock, type="typing", room=room)
        await send(sock, type="ping", ref="after")
        assert await recv(sock) == {"type": "pong", "ref": "after"}

        later = await connect(a.port, late)
        await subscribe(later, room, presence=True)
        mid = await post(conn, room, watcher, "fence")
        for who in (ws, quiet, later, mine):
            event, before = await until_frame(who, lambda f: f["type"] == "event")
            assert event["id"] == mid
            typed = [f for f in before if f["type"] == "typing"]
            if who is ws:
                assert 1 <= len(typed) <= 2, typed
            else:  # no presence, the typist's own watcher, or subscribed after the signals
                assert typed == [], typed
        for s in (ws, mine, quiet, sock, stranger, later):
            await s.close()


async def test_forged_and_stale_typing_signals_are_dropped(db_url: str, conn: Conn) -> None:
    """Any role may NOTIFY the typing channel: only payloads signed with the key derived from
    the schema's key count, and a genuine one recorded and replayed later is stale."""
    typist, watcher = await make_user(conn), await make_user(conn)
    room = await make_room(conn, typist, watcher)
    async with running_bridge(db_url, **options()) as a:
        ws, _ = await watch(a.port, watcher, room)
        _, channel = await channels(conn)
        _, key = await notify_trust(conn)
        forged_before = float(a.metrics.forged_notifies._value.get())
        text = json.dumps({"room": room, "user": typist, "at": round(time.time() * 1000)})
        stale = json.dumps({"room": room, "user": typist,
                            "at": round((time.time() - 60) * 1000)})
        for payload in (text, "0" * 64 + text, key.sign(text),  # the capture key: not typing's
                        key.derive("typing").sign(stale)):
            await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        await until(lambda: _counted(a, forged_before + 3), "three forgeries counted")
        await until(lambda: _stale(a, 1), "the stale signal counted")
        mid = await post(conn, room, typist, "fence")
        event, before = await until_frame(ws, lambda f: f["type"] == "event")
        assert event["id"] == mid and not [f for f in before if f["type"] == "typing"], before
        await ws.close()


async def _counted(bridge: Bridge, at_least: float) -> bool:
    return float(bridge.metrics.forged_notifies._value.get()) >= at_least


async def _stale(bridge: Bridge, at_least: float) -> bool:
    return float(bridge.metrics.typing.labels("stale")._value.get()) >= at_least


async def test_presence_keeps_flowing_after_the_listener_reconnects(
        db_url: str, conn: Conn) -> None:
    """Hints rung while the listener is away are lost; after a reconnect every watched room is
    read again, and later hints arrive on the new connection."""
    watcher, user = await make_user(conn), await make_user(conn)
    room = await make_room(conn, watcher, user)
    async with running_bridge(db_url, **options()) as a:
        ws, _ = await watch(a.port, watcher, room)
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE query LIKE '%%pgbridge_listen\"()%%' "
                           "AND datname = current_database() AND pid <> pg_backend_pid()")
        await conn.execute("INSERT INTO user_status (user_id, status) VALUES (%s, 'busy')",
                           [user])
        frame, _ = await until_frame(ws, presence_of(user, status="busy"))
        assert frame["online"] is False
        await ws.close()


def test_the_new_settings_are_read_and_checked() -> None:
    from daemon.errors import ConfigError
    from daemon.settings import DaemonSettings

    settings = DaemonSettings.from_env({"PGBRIDGE_PRESENCE_GRACE": "2s",
                                        "PGBRIDGE_PRESENCE_LEASE": "1m"})
    assert (settings.presence_grace, settings.presence_lease) == (2.0, 60.0)
    with pytest.raises(ConfigError, match="PGBRIDGE_PRESENCE_LEASE"):
        DaemonSettings.from_env({"PGBRIDGE_PRESENCE_LEASE": "0.5"})
