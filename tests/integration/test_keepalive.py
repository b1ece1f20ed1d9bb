"""Keepalive from one task (daemon/heartbeat.py): every connection is pinged every
``PGBRIDGE_HEARTBEAT`` seconds; one that answers no ping is closed with 1011, as websockets'
own per-connection keepalive did."""

from __future__ import annotations

import asyncio
import base64
import os
from typing import Any

import psycopg
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.frames import Frame, Opcode

from tests.support.fixtures import running_bridge
from tests.support.helpers import make_user, recv, send, token
from tests.support.procs import until

Conn = psycopg.AsyncConnection[Any]
HEARTBEAT = 0.5


class CountingPings(ClientConnection):
    """A client connection that counts the pings it received (websockets answers them)."""

    pings = 0

    def process_event(self, event: Any) -> None:
        if isinstance(event, Frame) and event.opcode is Opcode.PING:
            self.pings += 1
        super().process_event(event)


@pytest.mark.slow
async def test_an_idle_client_is_pinged_every_heartbeat_and_stays(db_url: str,
                                                                  conn: Conn) -> None:
    user = await make_user(conn)
    async with running_bridge(db_url, heartbeat=HEARTBEAT) as bridge:
        ws = await websockets.connect(f"ws://127.0.0.1:{bridge.port}/ws?token={token(user)}",
                                      ping_interval=None, create_connection=CountingPings)
        assert isinstance(ws, CountingPings)
        assert (await recv(ws))["type"] == "welcome"

        async def pinged_thrice() -> bool:
            return ws.pings >= 3

        await until(pinged_thrice, "three pings", timeout=10 * HEARTBEAT)
        await send(ws, type="ping", ref="still")
        assert (await recv(ws)) == {"type": "pong", "ref": "still"}
        assert bridge.metrics.registry.get_sample_value(
            "pgbridge_closes_total", {"code": "1011"}) == 0
        await ws.close()


@pytest.mark.slow
async def test_a_client_that_answers_no_ping_is_closed_with_1011(db_url: str,
                                                                conn: Conn) -> None:
    user = await make_user(conn)
    async with running_bridge(db_url, heartbeat=HEARTBEAT) as bridge:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(f"GET /ws?token={token(user)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}"
                     "\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        # From here on the client answers nothing. The bridge pings it, and one heartbeat
        # later sends a close frame with 1011 and ends its side of the stream (EOF): all of
        # that is readable without answering (it then waits for a close frame that never
        # comes, as for a peer that is gone, until websockets' close timeout).
        sent = await asyncio.wait_for(reader.read(), 10 * HEARTBEAT)
        assert sent.startswith(b"\x81")  # the welcome (a text frame)
        assert b"\x89\x04" in sent  # a ping (4 random bytes)
        assert sent.endswith(b"\x88\x18\x03\xf3keepalive ping timeout")  # close 1011
        writer.close()
