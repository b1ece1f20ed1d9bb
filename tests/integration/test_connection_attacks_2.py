"""More attacks on the connection layer (daemon/connection.py), each against a real bridge on a
real PostgreSQL over loopback, with raw sockets. Each test states a guarantee of the module's
docstring (or of the heartbeat's) and fails while the bridge breaks it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from websockets.frames import Opcode
from websockets.protocol import State

from daemon.app import Bridge
from daemon.connection import EARLY_LIMIT, Connection
from daemon.server import WRITE_LIMIT
from tests.integration.test_connection_attacks import client_frame, upgrade
from tests.support.fixtures import running_bridge
from tests.support.helpers import make_user
from tests.support.procs import until

Conn = psycopg.AsyncConnection[Any]

PING = client_frame(Opcode.PING, b"x" * 125)  # the largest ping: a 127-byte pong each


@contextlib.asynccontextmanager
async def deaf_socket(port: int, *, rcvbuf: int = 4096) -> AsyncIterator[
        tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A TCP connection to the bridge whose receive buffer is small: a client that reads
    nothing is backed up after a few KiB."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def the_connection(bridge: Bridge) -> Connection:
    """The only TCP connection of ``bridge`` (the test's attacker)."""
    async def one() -> bool:
        return len(bridge.server.connections) == 1

    await until(one, "the attacker's connection", timeout=10)
    return next(iter(bridge.server.connections))


# --- early bytes: at most EARLY_LIMIT held while the request is answered -------------------

@pytest.mark.slow
async def test_bytes_read_with_the_request_beyond_early_limit_stop_reading(
        db_url: str, conn: Conn) -> None:
    """Docstring: "What the client sends after [the request] waits, unparsed, until the upgrade
    is answered: up to EARLY_LIMIT bytes, past which the connection stops reading". The
    handshake is held (the test takes every slot of the gate, as a flood of upgrades would);
    the attacker sends its request and 10 MiB of pings in one write. Once the connection
    stopped reading it must hold at most EARLY_LIMIT bytes (plus at most one read). It holds
    the read that carried the request (128 KiB, 2x EARLY_LIMIT, and reading is not paused
    then) plus the next read."""
    async with running_bridge(db_url) as bridge:
        user = await make_user(conn)
        turns = bridge.server.gate.turns
        for _ in range(4):  # HANDSHAKES_PER_TURN: the handshake waits for the gate
            await turns.acquire()
        try:
            async with deaf_socket(bridge.port) as (_, writer):
                writer.write(upgrade(user) + client_frame(Opcode.PING) * (10 * 2**20 // 6))
                attacker = await the_connection(bridge)

                async def stopped_reading() -> bool:
                    return not attacker.transport.is_reading()

                await until(stopped_reading, "the connection to stop reading", timeout=10)
                held = len(attacker._unparsed or b"")
                assert attacker._handshake is not None  # still being answered
                assert held <= EARLY_LIMIT, f"{held} bytes held after the request"
        finally:
            for _ in range(4):
                turns.release()


async def test_a_single_read_past_early_limit_pauses_reading(db_url: str, conn: Conn) -> None:
    """The same, smaller: the request and 1.5 x EARLY_LIMIT bytes in one write (one read on
    loopback). The connection holds more than EARLY_LIMIT while its request is answered, so it
    must not be reading; it is, until the next read comes."""
    async with running_bridge(db_url) as bridge:
        user = await make_user(conn)
        turns = bridge.server.gate.turns
        for _ in range(4):
            await turns.acquire()
        try:
            async with deaf_socket(bridge.port) as (_, writer):
                writer.write(upgrade(user) + b"\x00" * (3 * EARLY_LIMIT // 2))
                attacker = await the_connection(bridge)

                async def read_them() -> bool:  # held, or dropped once past the limit
                    return attacker._overflowed or len(attacker._unparsed or b"") > EARLY_LIMIT

                await until(read_them, "the bytes after the request to be read", timeout=10)
                assert attacker._handshake is not None
                assert len(attacker._unparsed or b"") <= EARLY_LIMIT
                assert not attacker.transport.is_reading(), (
                    f"{len(attacker._unparsed or b'')} bytes held after the request, "
                    "still reading")
        finally:
            for _ in range(4):
                turns.release()


# --- pongs to a client that reads nothing ------------------------------------------------------

@pytest.mark.slow
async def test_pings_after_the_bridge_closed_do_not_grow_its_buffer_without_bound(
        db_url: str, conn: Conn) -> None:
    """A client that reads nothing sends pings. The rate limit closes it (1008) after a few
    hundred: from then on (CLOSING, up to CLOSE_TIMEOUT = 10 s) the bridge still reads its
    frames and websockets still answers every ping with a pong, written to the transport
    whatever its buffer holds: no rate limit (the client is closing), no backpressure. 8 MiB
    of pings leave about 8 MB of pongs in the bridge's memory for this one connection (about
    20 MB/s of a loopback client; 10 s of it is 200 MB). Bounded: the connection's write
    buffer stays within a few times its high-water mark."""
    async with running_bridge(db_url) as bridge:
        user = await make_user(conn)
        async with deaf_socket(bridge.port) as (reader, writer):
            writer.write(upgrade(user))
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            attacker = await the_connection(bridge)
            batch = PING * 512  # 67 KiB
            sent = 0
            with contextlib.suppress(TimeoutError):  # pushed back: the bridge stopped reading
                while sent < 8 * 2**20:
                    writer.write(batch)
                    sent += len(batch)
                    async with asyncio.timeout(2):
                        await writer.drain()

            async def idle() -> bool:  # the bridge parsed what it read, or stopped reading
                return attacker._lost or attacker._unparsed is None or \
                    not attacker.transport.is_reading()

            await until(idle, "the bridge to parse what it read", timeout=20)
            assert attacker.protocol.state is State.CLOSING  # closed by the rate limit
            buffered = attacker.transport.get_write_buffer_size()
            assert buffered <= 4 * WRITE_LIMIT, (
                f"{buffered} bytes of pongs buffered for a client that reads nothing")


@pytest.mark.slow
async def test_a_client_backed_up_by_pongs_is_still_pinged_and_closed(
        db_url: str, conn: Conn) -> None:
    """heartbeat.py: "behind: its send timeout acts, not a ping". A client that reads nothing
    sends pings (within the rate limit: rate_burst is raised so that the test is quick; at the
    default 50/s it takes about 30 s) until the pongs fill its socket: the connection is backed
    up. The send timeout acts only on frames queued by its Client, and pongs are not queued:
    nothing acts. The heartbeat skips it at every beat, so it is never pinged, never timed
    out, and stays open for ever with its pongs in memory. It must be closed (keepalive
    timeout 1011, or 4008) within a few heartbeat rounds."""
    async with running_bridge(db_url, heartbeat=1.0, send_buffer=4096,
                              rate_burst=10_000) as bridge:
        user = await make_user(conn)
        heartbeat = bridge.server.heartbeat
        for _ in range(3):  # until the pongs back it up before its first ping (almost always)
            async with deaf_socket(bridge.port) as (reader, writer):
                # 640 KiB of pongs: more than the kernel's buffers hold (sent after the 101:
                # more than EARLY_LIMIT before it is refused)
                writer.write(upgrade(user))
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                writer.write(PING * 5000)
                attacker = await the_connection(bridge)

                async def backed_up(attacker: Connection = attacker) -> bool:
                    return attacker.backed_up()

                await until(backed_up, "the pongs to back the connection up", timeout=10)
                if attacker.awaiting_pong:  # pinged just before: it will time out; again
                    continue
                target = heartbeat.beats + 3 * 20  # three rounds

                async def ended_or_three_rounds(attacker: Connection = attacker,
                                                target: int = target) -> bool:
                    return not attacker.open or heartbeat.beats >= target

                await until(ended_or_three_rounds, "three heartbeat rounds", timeout=20)
                assert not attacker.open, (
                    f"a client that reads nothing is still open after 3 heartbeat rounds, "
                    f"{attacker.transport.get_write_buffer_size()} bytes waiting, never pinged")
                return
        raise AssertionError("the connection was pinged before it was backed up, 3 times")


# --- a refused request: its answer must reach the client -------------------------------------

KEY_HEADERS = (b"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


@pytest.mark.slow
async def test_a_refused_request_with_a_long_tail_still_gets_its_answer(bridge: Bridge) -> None:
    """Docstring: "A 101 is followed by those bytes' frames; any other answer by the end of the
    connection, the waiting bytes unread". A client that sends its frames with its request
    (allowed: they wait for the 101) and is refused (here 401; as well 429, 503 with its
    Retry-After) must read that answer. With more than EARLY_LIMIT bytes after the request,
    the connection stopped reading; the answer is written and the socket closed with those
    bytes unread in the kernel, so the kernel resets the connection (RST, not FIN) and the
    client gets ECONNRESET instead of its 401."""
    request = b"GET /ws?token=bad HTTP/1.1\r\n" + KEY_HEADERS + b"\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    try:
        writer.write(request + client_frame(Opcode.PING) * (300_000 // 6))
        answer = b""
        async with asyncio.timeout(10):
            while chunk := await reader.read(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:100]
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# --- a connection forgotten by every shared part -----------------------------------------------

async def test_a_closed_subscriber_is_not_kept_by_the_listener(bridge: Bridge, conn: Conn) -> None:
    """Docstring: "a connection forgotten by every shared part when it starts ending". A
    client subscribes to a room and closes. Once the bridge forgot it (no connection left), no
    Connection object may remain: the listener's processing task still holds the last
    ``_Track`` it took from its queue (its subscription, whose sink is the Client, whose ``ws``
    is the Connection) until the next item arrives, on a quiet bridge for ever."""
    from tests.support.helpers import connect, make_room, subscribe

    user = await make_user(conn)
    room = await make_room(conn, user)
    ws = await connect(bridge.port, user)
    await subscribe(ws, room)
    await ws.close()

    async def forgotten() -> bool:
        return not bridge.server.connections and not bridge.server.clients

    await until(forgotten, "the bridge to forget the connection", timeout=10)
    gc.collect()
    kept = [o for o in gc.get_objects() if type(o) is Connection and o._endpoint is bridge.server]
    assert kept == [], f"{len(kept)} Connection object(s) kept after the connection ended"


# --- what the client sends is never a 500, nor an ERROR in the log -----------------------------

@pytest.mark.parametrize("request_head", [
    b"GET //[/ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET http://[x]/ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /client.js HTTP/1.1\r\nHost: 127.0.0.1\r\nIf-None-Match: a\r\n"
    b"If-None-Match: b\r\n\r\n",
], ids=["unbalanced-bracket", "bracketed-non-ip", "two-if-none-match"])
async def test_what_the_client_sends_is_a_4xx_not_a_500_and_an_error(
        bridge: Bridge, caplog: pytest.LogCaptureFixture, request_head: bytes) -> None:
    """handshake.py: "answers every refusal with a 4xx ..., never a 500 for what the client
    sent". A request target whose authority has an unbalanced bracket (``//[/ws``), or a
    bracketed host that is no IP address, makes ``urlsplit`` raise ValueError outside the
    ``try`` of ``_target``; two ``If-None-Match`` headers on a served asset make
    ``Headers.get`` raise MultipleValuesError. Each time the client gets a 500, and each such
    request logs a traceback at ERROR (not throttled: any client floods the log)."""
    caplog.set_level(logging.INFO)
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    try:
        writer.write(request_head)
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    # two If-None-Match lines are one list (RFC 9110, 5.3): neither tag matches, so 200
    assert answer[:12] in (b"HTTP/1.1 400", b"HTTP/1.1 404", b"HTTP/1.1 200"), answer[:200]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
