"""The daemon in-process against a real PostgreSQL, with real WebSocket clients on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import psycopg
import pytest
import websockets
from ulid import ULID
from websockets.exceptions import ConnectionClosed, InvalidStatus

from daemon.app import Bridge
from tests.support.fixtures import running_bridge
from tests.support.helpers import (
    SECRET,
    connect,
    events,
    head,
    make_room,
    make_user,
    post,
    recv,
    send,
    subscribe,
    subscribed_member,
    token,
)

Conn = psycopg.AsyncConnection[Any]


async def test_every_published_table_reaches_a_member(bridge: Bridge, conn: Conn) -> None:
    alice, bob = await make_user(conn, "alice"), await make_user(conn, "bob")
    room = await make_room(conn, alice)
    ws = await connect(bridge.port, alice)
    sub = await subscribe(ws, room)
    assert sub["from"] == sub["head"] == await head(conn, room)

    mid = await post(conn, room, alice, "hello")
    await conn.execute("UPDATE messages SET content = 'edited' WHERE id = %s", [mid])
    rid = str(ULID())
    await conn.execute("INSERT INTO reactions (id, message_id, user_id, emoji) "
                       "VALUES (%s, %s, %s, '+1')", (rid, mid, alice))
    fid = str(ULID())
    await conn.execute("INSERT INTO files (id, message_id, name, type, size, url) "
                       "VALUES (%s, %s, 'a.png', 'image/png', 3, 'https://x/a.png')", (fid, mid))
    await conn.execute("INSERT INTO message_reads (message_id, user_id) VALUES (%s, %s)",
                       (mid, alice))
    await conn.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                       (room, bob))
    await conn.execute("UPDATE channels SET description = 'topic' WHERE id = %s", [room])
    await conn.execute("DELETE FROM reactions WHERE id = %s", [rid])

    got = await events(ws, 8)
    expected = [
        ("messages", "INSERT", mid), ("messages", "UPDATE", mid), ("reactions", "INSERT", rid),
        ("files", "INSERT", fid), ("message_reads", "INSERT", f"{mid}:{alice}"),
        ("channel_members", "INSERT", f"{room}:{bob}"), ("channels", "UPDATE", room),
        ("reactions", "DELETE", rid),
    ]
    assert [(e["table"], e["op"], e["id"]) for e in got] == expected
    assert [e["seq"] for e in got] == list(range(sub["head"] + 1, sub["head"] + 9))
    assert all(e["room"] == room for e in got)
    assert got[0]["data"]["content"] == "hello" and got[1]["data"]["content"] == "edited"
    assert got[7]["data"]["emoji"] == "+1"  # DELETE carries the old row
    assert got[0]["ts"].endswith("+00:00")
    await ws.close()


async def test_concurrent_writers_each_seq_once_in_order(bridge: Bridge, conn: Conn,
                                                         db_url: str) -> None:
    user, room, ws, start = await subscribed_member(conn, bridge.port)

    async def writer(n: int) -> None:
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as c:
            for i in range(n):
                await post(c, room, user, f"m{i}")

    await asyncio.gather(*(writer(50) for _ in range(6)))
    got = await events(ws, 300)
    assert [e["seq"] for e in got] == list(range(start + 1, start + 301))
    await ws.close()


async def test_large_message_arrives_whole(bridge: Bridge, conn: Conn) -> None:
    user, room, ws, _ = await subscribed_member(conn, bridge.port)
    big = "x" * 100_000 + "é"
    await post(conn, room, user, big)
    await post(conn, room, user, "small after big")
    got = await events(ws, 2)
    assert got[0]["data"]["content"] == big
    assert got[1]["data"]["content"] == "small after big"
    await ws.close()


async def test_subscribe_since_replays_then_live_without_gap_or_duplicate(
        bridge: Bridge, conn: Conn, db_url: str) -> None:
    user = await make_user(conn)
    room = await make_room(conn, user)
    for i in range(40):
        await post(conn, room, user, f"old{i}")
    since = 5
    stop = asyncio.Event()

    async def keep_writing() -> int:
        n = 0
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as c:
            while not stop.is_set() and n < 200:
                await post(c, room, user, f"new{n}")
                n += 1
                await asyncio.sleep(0)
        return n

    writing = asyncio.create_task(keep_writing())
    ws = await connect(bridge.port, user)
    sub = await subscribe(ws, room, since=since)
    assert sub["from"] == since
    stop.set()
    await writing
    final = await head(conn, room)
    got = await events(ws, final - since)
    assert [e["seq"] for e in got] == list(range(since + 1, final + 1))
    await ws.close()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "malformed", "bad_signature", "expired",
                                  "unknown_user", "deleted_user", "no_exp", "exp_string",
                                  "exp_1e300", "exp_true", "nbf_string", "not_yet_valid",
                                  "unexpected_aud"])
async def test_bad_token_refused_at_handshake_with_401(bridge: Bridge, conn: Conn,
                                                       case: str) -> None:
    import jwt

    user = await make_user(conn)
    tokens = {
        "missing": None,
        "malformed": "not.a.jwt",
        "bad_signature": token(user, secret="another-secret-another-secret-another-secret"),
        "expired": token(user, ttl=-10),
        "unknown_user": token(str(ULID())),
        "deleted_user": token(user),
        "no_exp": jwt.encode({"sub": user}, SECRET, algorithm="HS256"),
        # PyJWT alone reads time claims with int(): these got in before
        "exp_string": jwt.encode({"sub": user, "exp": "9999999999"}, SECRET),
        "exp_1e300": jwt.encode({"sub": user, "exp": 1e300}, SECRET),
        "exp_true": jwt.encode({"sub": user, "exp": True}, SECRET),
        "nbf_string": jwt.encode({"sub": user, "exp": time.time() + 60, "nbf": "0"}, SECRET),
        "not_yet_valid": jwt.encode({"sub": user, "exp": time.time() + 60,
                                     "nbf": time.time() + 30}, SECRET),
        # minted for another service, and this bridge sets no PGBRIDGE_JWT_AUDIENCE
        "unexpected_aud": jwt.encode({"sub": user, "exp": time.time() + 60,
                                      "aud": "billing"}, SECRET),
    }
    if case == "deleted_user":
        await conn.execute("UPDATE users SET deleted_at = now() WHERE id = %s", [user])
    url = f"ws://127.0.0.1:{bridge.port}/ws"
    if tokens[case] is not None:
        url += f"?token={tokens[case]}"
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(url)
    assert refused.value.response.status_code == 401


async def test_audience_and_issuer_are_required_when_set(db_url: str, conn: Conn) -> None:
    import jwt

    user = await make_user(conn)

    def minted(**claims: object) -> str:
        return jwt.encode({"sub": user, "exp": time.time() + 60, **claims}, SECRET)

    async with running_bridge(db_url, jwt_audience="pgbridge",
                              jwt_issuer="https://auth.example") as bridge:
        url = f"ws://127.0.0.1:{bridge.port}/ws?token="
        good = minted(aud="pgbridge", iss="https://auth.example")
        async with websockets.connect(url + good) as ws:
            assert (await recv(ws))["user"] == user
            # refresh is held to the same rules
            await send(ws, type="refresh", token=minted(aud="billing",
                                                        iss="https://auth.example"), ref="r")
            frame = await recv(ws)
            assert (frame["type"], frame["code"], frame["ref"]) == ("error", "unauthorized", "r")
            assert "PGBRIDGE_JWT_AUDIENCE" in frame["message"]
        # a list that holds the audience is an audience (RFC 7519, 4.1.3)
        async with websockets.connect(url + minted(aud=["x", "pgbridge"],
                                                   iss="https://auth.example")) as ws:
            assert (await recv(ws))["user"] == user
        for bad in (minted(iss="https://auth.example"), minted(aud="pgbridge"),
                    minted(aud="billing", iss="https://auth.example"),
                    minted(aud="pgbridge", iss="https://evil.example")):
            with pytest.raises(InvalidStatus) as refused:
                await websockets.connect(url + bad)
            assert refused.value.response.status_code == 401


async def test_bearer_header_is_accepted(bridge: Bridge, conn: Conn) -> None:
    user = await make_user(conn)
    async with websockets.connect(f"ws://127.0.0.1:{bridge.port}/ws", additional_headers={
            "Authorization": f"Bearer {token(user)}"}) as ws:
        assert (await recv(ws))["user"] == user


async def test_non_member_forbidden_unknown_room_not_found(bridge: Bridge, conn: Conn) -> None:
    alice, mallory = await make_user(conn), await make_user(conn)
    room = await make_room(conn, alice)
    ws = await connect(bridge.port, mallory)
    await send(ws, type="subscribe", room=room, ref="r1")
    frame = await recv(ws)
    assert (frame["type"], frame["code"], frame["ref"], frame["room"]) == (
        "error", "forbidden", "r1", room)
    await send(ws, type="subscribe", room=str(ULID()), ref="r2")
    frame = await recv(ws)
    assert frame["type"] == "error" and frame["code"] == "not_found" and frame["ref"] == "r2"
    # nothing of the room leaks afterwards
    await post(conn, room, alice)
    await send(ws, type="ping", ref="p")
    assert await recv(ws) == {"type": "pong", "ref": "p"}
    await ws.close()


async def test_revoked_membership_ends_subscription_before_later_events(
        bridge: Bridge, conn: Conn) -> None:
    alice, bob = await make_user(conn), await make_user(conn)
    room = await make_room(conn, alice, bob)
    ws_bob = await connect(bridge.port, bob)
    ws_alice = await connect(bridge.port, alice)
    await subscribe(ws_bob, room)
    await subscribe(ws_alice, room)
    await post(conn, room, alice, "before")
    async with conn.transaction():  # revocation and a later message
        await conn.execute("DELETE FROM channel_members WHERE channel_id = %s AND user_id = %s",
                           (room, bob))
    await post(conn, room, alice, "after")
    assert (await recv(ws_bob))["data"]["content"] == "before"
    assert await recv(ws_bob) == {"type": "unsubscribed", "room": room,
                                  "reason": "membership_revoked"}
    got = await events(ws_alice, 3)
    assert [e["table"] for e in got] == ["messages", "channel_members", "messages"]
    # bob gets nothing more of the room, and cannot subscribe again
    await send(ws_bob, type="subscribe", room=room, ref="again")
    frame = await recv(ws_bob)
    assert frame["type"] == "error" and frame["code"] == "forbidden"
    await ws_bob.close()
    await ws_alice.close()


async def test_soft_deleted_room_ends_subscriptions(bridge: Bridge, conn: Conn) -> None:
    _, room, ws, _ = await subscribed_member(conn, bridge.port)
    await conn.execute("UPDATE channels SET deleted_at = now() WHERE id = %s", [room])
    frame = await recv(ws)
    assert frame["table"] == "channels" and frame["data"]["deleted_at"] is not None
    assert await recv(ws) == {"type": "unsubscribed", "room": room, "reason": "room_deleted"}
    await ws.close()


@pytest.mark.parametrize(("frame", "code"), [
    ("not json", "bad_request"),
    ("[1, 2]", "bad_request"),
    ('"text"', "bad_request"),
    ("{}", "bad_request"),
    ('{"type": "dance"}', "unknown_type"),
    ('{"type": "subscribe"}', "bad_request"),
    ('{"type": "subscribe", "room": 42}', "bad_request"),
    ('{"type": "subscribe", "room": "R", "since": "7"}', "bad_request"),
    ('{"type": "subscribe", "room": "R", "since": -1}', "bad_request"),
    ('{"type": "subscribe", "room": "R", "since": true}', "bad_request"),
    ('{"type": "ack", "room": "R"}', "bad_request"),
    ('{"type": "ack", "room": "R", "seq": 1.5}', "bad_request"),
    ('{"type": "ping", "ref": 7}', "bad_request"),
    ('{"type": "refresh"}', "bad_request"),
    (b"\x00binary", "bad_request"),
])
async def test_malformed_frame_gets_error_and_connection_keeps_working(
        bridge: Bridge, conn: Conn, frame: str | bytes, code: str) -> None:
    user = await make_user(conn)
    ws = await connect(bridge.port, user)
    await ws.send(frame)
    reply = await recv(ws)
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert reply["message"]
    await send(ws, type="ping", ref="still-there")
    assert await recv(ws) == {"type": "pong", "ref": "still-there"}
    await ws.close()


async def test_oversized_frame_closes_1009(bridge: Bridge, conn: Conn) -> None:
    user = await make_user(conn)
    ws = await connect(bridge.port, user)
    await ws.send(json.dumps({"type": "ping", "ref": "x" * (65 * 1024)}))
    with pytest.raises(ConnectionClosed):
        await recv(ws)
    assert ws.close_code == 1009


async def test_acks_land_in_sync_state_and_resume_without_since(bridge: Bridge,
                                                                conn: Conn) -> None:
    user, room, ws, start = await subscribed_member(conn, bridge.port)
    for i in range(5):
        await post(conn, room, user, f"m{i}")
    got = await events(ws, 5)
    await send(ws, type="ack", room=room, seq=got[2]["seq"])
    await send(ws, type="ack", room=room, seq=got[1]["seq"])  # never moves backwards
    await send(ws, type="ack", room=room, seq=got[-1]["seq"] + 100)  # not delivered yet
    assert (await recv(ws))["code"] == "bad_request"
    await ws.close()

    async def stored() -> int | None:
        cur = await conn.execute("SELECT last_seq FROM sync_state WHERE user_id = %s AND "
                                 "room_id = %s AND sync_type = 'events'", (user, room))
        row = await cur.fetchone()
        return row[0] if row else None

    for _ in range(200):
        if await stored() == start + 3:
            break
        await asyncio.sleep(0.02)
    assert await stored() == start + 3
    ws = await connect(bridge.port, user)
    sub = await subscribe(ws, room)  # no since: resumes from sync_state
    assert sub["from"] == start + 3
    assert [e["seq"] for e in await events(ws, 2)] == [start + 4, start + 5]
    await ws.close()


async def test_since_ahead_of_head_is_bad_request(bridge: Bridge, conn: Conn) -> None:
    user = await make_user(conn)
    room = await make_room(conn, user)
    ws = await connect(bridge.port, user)
    await send(ws, type="subscribe", room=room, since=10_000, ref="s")
    frame = await recv(ws)
    assert (frame["type"], frame["code"], frame["ref"]) == ("error", "bad_request", "s")
    await ws.close()


async def test_cursor_expired_after_pruning(db_url: str, conn: Conn) -> None:
    user = await make_user(conn)
    room = await make_room(conn, user)
    for i in range(5):
        await post(conn, room, user, f"m{i}")
    await conn.execute("UPDATE change_events SET created_at = now() - interval '2 days' "
                       "WHERE room_id = %s AND seq <= 3", [room])
    async with running_bridge(db_url, retention=86400.0) as bridge:
        for _ in range(200):  # the pruner runs at start-up
            cur = await conn.execute("SELECT min(seq) FROM change_events WHERE room_id = %s",
                                     [room])
            if (await cur.fetchone() or [0])[0] == 4:
                break
            await asyncio.sleep(0.02)
        ws = await connect(bridge.port, user)
        await send(ws, type="subscribe", room=room, since=1, ref="old")
        frame = await recv(ws)
        assert (frame["type"], frame["code"], frame["room"]) == ("error", "cursor_expired", room)
        sub = await subscribe(ws, room, since=3)  # the oldest still retained follows 3
        assert next(e["seq"] for e in await events(ws, sub["head"] - 3)) == 4
        await ws.close()


async def test_unsubscribe_stops_events(bridge: Bridge, conn: Conn) -> None:
    user, room, ws, _ = await subscribed_member(conn, bridge.port)
    await send(ws, type="unsubscribe", room=room, ref="u")
    assert await recv(ws) == {"type": "unsubscribed", "room": room, "reason": "client",
                              "ref": "u"}
    await post(conn, room, user)
    await send(ws, type="ping", ref="p")
    assert await recv(ws) == {"type": "pong", "ref": "p"}
    await ws.close()


@pytest.mark.slow
async def test_expired_token_closes_4001_and_refresh_extends(bridge: Bridge,
                                                            conn: Conn) -> None:
    user = await make_user(conn)
    ws = await websockets.connect(f"ws://127.0.0.1:{bridge.port}/ws?token={token(user, ttl=2)}")
    await recv(ws)
    await send(ws, type="refresh", token=token(await make_user(conn)), ref="other")
    assert (await recv(ws))["code"] == "unauthorized"  # another user's token
    await send(ws, type="refresh", token=token(user, ttl=3600))
    await send(ws, type="ping", ref="after-2s")
    await asyncio.sleep(2.5)  # past the first token's expiry: the connection must survive
    assert await recv(ws) == {"type": "pong", "ref": "after-2s"}

    short = await websockets.connect(
        f"ws://127.0.0.1:{bridge.port}/ws?token={token(user, ttl=1)}")
    await recv(short)
    with pytest.raises(ConnectionClosed):
        await recv(short, timeout=5)
    assert short.close_code == 4001
    await ws.close()


async def test_frame_rate_limit(db_url: str, conn: Conn) -> None:
    user = await make_user(conn)
    async with running_bridge(db_url, rate_limit=5.0, rate_burst=5) as bridge:
        ws = await connect(bridge.port, user)
        for i in range(8):
            await send(ws, type="ping", ref=str(i))
        replies = [await recv(ws) for _ in range(8)]
        assert [r["type"] for r in replies[:5]] == ["pong"] * 5
        assert {r.get("code") for r in replies[5:]} == {"rate_limited"}
        await ws.close()


async def test_healthz_and_metrics(bridge: Bridge) -> None:
    import urllib.request

    def get(path: str) -> tuple[int, bytes]:
        with urllib.request.urlopen(f"http://127.0.0.1:{bridge.port}{path}") as r:
            return r.status, r.read()

    status, body = await asyncio.to_thread(get, "/healthz")
    assert status == 200 and json.loads(body)["listener"] is True
    status, body = await asyncio.to_thread(get, "/metrics")
    assert status == 200 and b"pgbridge_events_total" in body
