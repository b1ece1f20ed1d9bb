"""A LISTEN connection that stays open but receives nothing (a black-holed network path, a
half-dead NAT entry) is detected by the NOTIFY round-trip probe and replaced; nothing is lost.

A real TCP proxy sits between the daemon and PostgreSQL; freezing it holds every byte the
server sends on the listener's connection, while the daemon's other connections keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.conftest import running_bridge
from tests.helpers import events, post, subscribed_member


class FreezingProxy:
    """TCP proxy to the test PostgreSQL; :meth:`freeze_listeners` black-holes the server→client
    direction of the connections that have sent a LISTEN so far."""

    def __init__(self, upstream: dict[str, Any]) -> None:
        self.upstream = upstream
        self.listener_connections = 0
        self.new_listener = asyncio.Event()
        self.freeze_new_listeners = False  # also black-hole LISTEN connections made from now
        self._listeners: list[dict[str, bool]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host = str(self.upstream.get("host") or "localhost")
        port = int(self.upstream.get("port") or 5432)
        if host.startswith("/"):
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(host, port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await self._open_upstream()
        state = {"listener": False, "frozen": False}

        async def client_to_server() -> None:
            while data := await reader.read(65536):
                if b"LISTEN " in data and not state["listener"]:
                    state["listener"] = True
                    state["frozen"] = self.freeze_new_listeners
                    self.listener_connections += 1
                    self._listeners.append(state)
                    self.new_listener.set()
                up_writer.write(data)
                await up_writer.drain()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                if state["frozen"]:
                    continue  # black hole: the bytes never arrive
                writer.write(data)
                await writer.drain()

        pumps = [asyncio.create_task(client_to_server()), asyncio.create_task(server_to_client())]
        with contextlib.suppress(Exception):
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        for w in (writer, up_writer):
            w.close()

    def freeze_listeners(self) -> None:
        for state in self._listeners:
            state["frozen"] = True
        self.new_listener.clear()

    async def start(self) -> int:
        def spawn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            task = asyncio.create_task(self._handle(r, w))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self.server = await asyncio.start_server(spawn, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def proxy(db_url: str) -> AsyncIterator[tuple[FreezingProxy, str]]:
    parts = conninfo_to_dict(db_url)
    p = FreezingProxy(parts)
    port = await p.start()
    yield p, make_conninfo(db_url, host="127.0.0.1", port=port)
    await p.close()


async def test_deaf_listener_is_replaced_after_its_probe_fails(
        proxy: tuple[FreezingProxy, str], conn: psycopg.AsyncConnection[Any]) -> None:
    freezer, via_proxy = proxy
    async with running_bridge(via_proxy, probe_interval=0.5) as bridge:
        user, room, ws, start = await subscribed_member(conn, bridge.port)
        await post(conn, room, user, "before")
        assert [e["seq"] for e in await events(ws, 1)] == [start + 1]
        assert freezer.listener_connections == 1

        freezer.freeze_listeners()  # the listener now hears nothing, its socket still open
        await post(conn, room, user, "while deaf")
        # the probe fails and a new LISTEN connection comes
        await asyncio.wait_for(freezer.new_listener.wait(), 20)
        got = await events(ws, 1, timeout=20)
        assert got[0]["seq"] == start + 2 and got[0]["data"]["content"] == "while deaf"
        assert (bridge.metrics.registry.get_sample_value("pgbridge_listener_reconnects_total")
                or 0) >= 1
        await post(conn, room, user, "after")
        assert [e["seq"] for e in await events(ws, 1)] == [start + 3]
        await ws.close()


@pytest.mark.slow  # waits out a connect timeout (about 10 s)
async def test_listener_reconnect_that_hangs_in_listen_is_retried(
        proxy: tuple[FreezingProxy, str], conn: psycopg.AsyncConnection[Any]) -> None:
    freezer, via_proxy = proxy
    async with running_bridge(via_proxy, probe_interval=0.5) as bridge:
        user, room, ws, start = await subscribed_member(conn, bridge.port)
        freezer.freeze_new_listeners = True  # reconnects get no answer to their LISTEN
        freezer.freeze_listeners()
        await post(conn, room, user, "while deaf")
        await asyncio.wait_for(freezer.new_listener.wait(), 20)  # first reconnect: hangs
        freezer.new_listener.clear()
        freezer.freeze_new_listeners = False
        await asyncio.wait_for(freezer.new_listener.wait(), 20)  # it timed out and retried
        got = await events(ws, 1, timeout=20)
        assert got[0]["seq"] == start + 1
        await ws.close()
