"""Review of issue 26: a closed, subscribed and slow client (queue, writer, expiry timer,
OutgoingQueue <-> Client on_close) is freed without the cycle collector."""

from __future__ import annotations

import gc
from typing import Any

import psycopg

from daemon.client import Client
from daemon.connection import Connection
from daemon.outgoing import OutgoingQueue
from tests.support.fixtures import running_bridge
from tests.support.helpers import connect, make_room, make_user, post, subscribe
from tests.support.procs import until

Conn = psycopg.AsyncConnection[Any]


async def test_closed_subscribed_clients_are_freed_without_the_cycle_collector(
        db_url: str, conn: Conn) -> None:
    user = await make_user(conn)
    room = await make_room(conn, user)
    async with running_bridge(db_url) as bridge:
        gc.collect()
        gc.disable()
        try:
            for i in range(5):
                ws = await connect(bridge.port, user)
                await subscribe(ws, room)
                for _ in range(3):
                    await post(conn, room, user)
                await ws.close()

            def alive() -> list[str]:
                return [type(o).__name__ for o in gc.get_objects()
                        if type(o) in (Connection, Client, OutgoingQueue)]

            async def none_left() -> bool:
                return alive() == []

            await until(none_left, "closed clients to be freed", timeout=10)
        finally:
            gc.enable()
