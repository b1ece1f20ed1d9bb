"""A LISTEN connection that stays open but receives nothing (a black-holed network path, a
half-dead NAT entry) is detected by the NOTIFY round-trip probe and replaced; nothing is lost.

A real TCP proxy sits between the daemon and PostgreSQL; freezing it holds every byte the
server sends on the listener's connection, while the daemon's other connections keep working.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.support.fixtures import running_bridge
from tests.support.helpers import events, post, subscribed_member
from tests.support.proxy import FreezingProxy


@pytest.fixture
async def proxy(db_url: str) -> AsyncIterator[tuple[FreezingProxy, str]]:
    parts = conninfo_to_dict(db_url)
    p = FreezingProxy(parts)
    port = await p.start()
    yield p, make_conninfo(db_url, host="127.0.0.1", port=port)
    await p.close()


@pytest.mark.slow
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
