"""Test helpers: chat rows through plain SQL, tokens, and a protocol client over loopback."""

from __future__ import annotations

import asyncio
import json
import weakref
from collections import deque
from typing import Any

import psycopg
import psycopg.sql
import websockets
from ulid import ULID
from websockets.asyncio.client import ClientConnection

from daemon.auth import mint_token
from daemon.db import channels_query
from daemon.signing import NotifyKey

SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"


async def make_user(conn: psycopg.AsyncConnection[Any], name: str = "user") -> str:
    uid = str(ULID())
    await conn.execute(
        "INSERT INTO users (id, auth0_id, email, username) VALUES (%s, %s, %s, %s)",
        (uid, f"auth0|{uid}", f"{uid.lower()}@example.test", name))
    return uid


async def make_room(conn: psycopg.AsyncConnection[Any], *members: str, name: str = "room") -> str:
    room = str(ULID())
    await conn.execute("INSERT INTO channels (id, name) VALUES (%s, %s)", (room, name))
    for user in members:
        await conn.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                           (room, user))
    return room


async def post(conn: psycopg.AsyncConnection[Any], room: str, user: str,
               content: str = "hi") -> str:
    mid = str(ULID())
    await conn.execute(
        "INSERT INTO messages (id, channel_id, user_id, content) VALUES (%s, %s, %s, %s)",
        (mid, room, user, content))
    return mid


async def head(conn: psycopg.AsyncConnection[Any], room: str) -> int:
    cur = await conn.execute("SELECT last_seq FROM change_sequences WHERE room_id = %s", [room])
    row = await cur.fetchone()
    return int(row[0]) if row else 0


def token(user: str, ttl: float = 3600, secret: str = SECRET) -> str:
    return mint_token(secret, user, ttl=ttl)


async def connect(port: int, user: str, *, batch: int | None = None,
                  **kwargs: Any) -> ClientConnection:
    """Open a protocol connection as ``user`` (coalescing with ``?batch=`` when given) and
    consume its ``welcome``."""
    query = f"token={token(user)}" + (f"&batch={batch}" if batch is not None else "")
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws?{query}", max_size=2**24, **kwargs)
    welcome = await recv(ws)
    assert welcome["type"] == "welcome", welcome
    assert welcome.get("batch") == batch, welcome
    return ws


# frames of a coalesced message (PROTOCOL.md, "Coalesced messages") not yet taken by recv()
_unread: weakref.WeakKeyDictionary[ClientConnection, deque[dict[str, Any]]] = (
    weakref.WeakKeyDictionary())


def split_message(raw: str | bytes) -> list[dict[str, Any]]:
    """The frames of one message: one, or several joined by newlines (``?batch=``)."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    frames = [json.loads(part) for part in text.split("\n")]
    assert all(isinstance(frame, dict) for frame in frames), text[:200]
    return frames


async def recv(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    """The next frame, whether messages hold one frame or several."""
    unread = _unread.setdefault(ws, deque())
    if not unread:
        unread.extend(split_message(await asyncio.wait_for(ws.recv(), timeout)))
    return unread.popleft()


async def send(ws: ClientConnection, **frame: Any) -> None:
    await ws.send(json.dumps(frame))


async def subscribe(ws: ClientConnection, room: str, **extra: Any) -> dict[str, Any]:
    """Subscribe and return the ``subscribed`` frame (fails on anything else)."""
    await send(ws, type="subscribe", room=room, ref="s", **extra)
    frame = await recv(ws)
    assert frame["type"] == "subscribed", frame
    return frame


async def subscribed_member(conn: psycopg.AsyncConnection[Any],
                            port: int) -> tuple[str, str, ClientConnection, int]:
    """A new user, the only member of a new room, connected and subscribed to it (live only).
    Returns ``(user, room, ws, from)``."""
    user = await make_user(conn)
    room = await make_room(conn, user)
    ws = await connect(port, user)
    start = (await subscribe(ws, room))["from"]
    return user, room, ws, int(start)


async def events(ws: ClientConnection, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """The next ``n`` frames, which must all be events."""
    out = []
    for _ in range(n):
        frame = await recv(ws, timeout)
        assert frame["type"] == "event", frame
        out.append(frame)
    return out


async def notify_trust(conn: psycopg.AsyncConnection[Any],
                       schema: str = "public") -> tuple[str, NotifyKey]:
    """The (secret) capture channel of ``schema`` and the key its triggers sign with (read as
    the owner: what a test needs to listen like the daemon, or to forge like an attacker who
    has it)."""
    channel, _ = await channels(conn, schema)
    cur = await conn.execute(psycopg.sql.SQL("SELECT key FROM {}").format(
        psycopg.sql.Identifier(schema, "change_notify_key")))
    return channel, NotifyKey(bytes((await cur.fetchone() or (b"",))[0]))


async def channels(conn: psycopg.AsyncConnection[Any], schema: str = "public") -> tuple[str, str]:
    """``schema``'s secret channels ``(capture, typing)``, asked as the owner
    (``pgbridge_channels``; nobody else may)."""
    cur = await conn.execute(channels_query(schema))
    row = await cur.fetchone()
    assert row is not None
    return str(row[0]), str(row[1])
