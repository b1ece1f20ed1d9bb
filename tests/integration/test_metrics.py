"""Metrics that answer "is it slow, and where", scraped from real bridges over HTTP
(``GET /metrics``): each moves when it should. And the deploy files that use them (alert
rules, dashboard) parse and name only metrics a bridge exports.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import urllib.request
from typing import Any

import psycopg
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from psycopg_pool import PoolTimeout

from daemon.app import Bridge
from daemon.connection import close_code_sent
from daemon.metrics import CLOSE_CODES
from tests.support.fixtures import ROOT, bridge_behind_proxy, running_bridge
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
    subscribed_member,
    token,
)
from tests.support.procs import until

Conn = psycopg.AsyncConnection[Any]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(bridge: Bridge) -> Samples:
    """Every sample of ``GET /metrics``, by name and sorted labels."""

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{bridge.port}/metrics",
                                    timeout=5) as r:
            assert r.status == 200
            return str(r.read().decode())

    text = await asyncio.to_thread(get)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# --- the close code, from websockets' protocol state ----------------------------------------------


def test_close_code_sent_counts_only_closes_this_side_started() -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.frames import Close

    slow, bye = Close(4008, "too slow"), Close(1000, "bye")
    assert close_code_sent(ConnectionClosed(None, None)) is None  # no close frame at all
    assert close_code_sent(ConnectionClosed(None, slow)) == 4008
    # we sent first, then the client answered
    assert close_code_sent(ConnectionClosed(bye, slow, rcvd_then_sent=False)) == 4008
    # the client closed; we echoed
    assert close_code_sent(ConnectionClosed(bye, bye, rcvd_then_sent=True)) is None


# --- deliveries and latency -------------------------------------------------------------------


async def test_replayed_deliveries_are_counted_and_timed(bridge: Bridge, conn: Conn) -> None:
    """A client that received 3 replayed events left pgbridge_deliveries_total at 0 and
    nothing else counted them."""
    user = await make_user(conn)
    room = await make_room(conn, user)
    start = await head(conn, room)
    for i in range(3):
        await post(conn, room, user, f"old {i}")
    ws = await connect(bridge.port, user)
    await subscribe(ws, room, since=start)
    assert [e["seq"] for e in await events(ws, 3)] == [start + 1, start + 2, start + 3]
    m = await scrape(bridge)
    assert value(m, "pgbridge_replayed_deliveries_total") == 3
    assert value(m, "pgbridge_deliveries_total") == 0  # live deliveries: same meaning as before
    assert value(m, "pgbridge_commit_to_send_seconds_count", kind="replay") == 3
    assert value(m, "pgbridge_commit_to_send_seconds_count", kind="live") == 0
    assert value(m, "pgbridge_log_read_seconds_count", purpose="replay") == 1
    await ws.close()


async def test_live_latency_is_observed_once_per_event_not_per_client(bridge: Bridge,
                                                                      conn: Conn) -> None:
    users = [await make_user(conn) for _ in range(3)]
    room = await make_room(conn, *users)
    sockets = [await connect(bridge.port, user) for user in users]
    for ws in sockets:
        await subscribe(ws, room)
    before = await scrape(bridge)
    await post(conn, room, users[0], "one")
    await post(conn, room, users[0], "two")
    for ws in sockets:
        await events(ws, 2)
    m = await scrape(bridge)
    count = value(m, "pgbridge_commit_to_send_seconds_count", kind="live")
    assert count - value(before, "pgbridge_commit_to_send_seconds_count", kind="live") == 2
    assert value(m, "pgbridge_deliveries_total") - value(
        before, "pgbridge_deliveries_total") == 6
    total = value(m, "pgbridge_commit_to_send_seconds_sum", kind="live")
    assert 0 < total < 10, total  # seconds from capture to send, same clock here
    for ws in sockets:
        await ws.close()


# --- log reads and the listener ---------------------------------------------------------------


async def test_log_reads_are_timed_by_purpose_and_catch_up_leaves_no_room_behind(
        bridge: Bridge, conn: Conn) -> None:
    user, room, ws, start = await subscribed_member(conn, bridge.port)
    # too large for a NOTIFY: the listener reads it from the log (a gap fill)
    await post(conn, room, user, "x" * 20000)
    assert [e["seq"] for e in await events(ws, 1)] == [start + 1]
    m = await scrape(bridge)
    assert value(m, "pgbridge_log_read_seconds_count", purpose="gap_fill") >= 1
    catch_ups = value(m, "pgbridge_log_read_seconds_count", purpose="catch_up")

    bridge.listener.reconnect()  # the listener reconnects and catches every tracked room up
    await post(conn, room, user, "after the reconnect")
    assert [e["seq"] for e in await events(ws, 1)] == [start + 2]

    async def caught_up() -> bool:
        m = await scrape(bridge)
        return value(m, "pgbridge_log_read_seconds_count", purpose="catch_up") > catch_ups

    await until(caught_up, "a catch-up read after the reconnect")
    m = await scrape(bridge)
    assert value(m, "pgbridge_listener_rooms_behind") == 0
    assert value(m, "pgbridge_listener_connected") == 1
    assert value(m, "pgbridge_listener_reconnects_total") >= 1
    await ws.close()


@pytest.mark.slow
async def test_listener_lag_grows_while_deaf_and_falls_when_it_hears_again(db_url: str) -> None:
    async with bridge_behind_proxy(db_url, probe_interval=0.2) as (bridge, proxy):
        m = await scrape(bridge)
        # a probe every 0.2 s (timeout 2 s) keeps both small
        assert value(m, "pgbridge_listener_lag_seconds") < 2.5
        assert value(m, "pgbridge_listener_probe_age_seconds") < 2.5

        proxy.freeze_new_listeners = True
        proxy.freeze_listeners()

        async def lagging() -> bool:
            m = await scrape(bridge)
            return (value(m, "pgbridge_listener_lag_seconds") > 3
                    and value(m, "pgbridge_listener_probe_age_seconds") > 3)

        await until(lagging, "the lag gauges to pass 3 s while the listener is deaf")

        proxy.freeze_new_listeners = False
        proxy.resume()

        async def hearing() -> bool:
            m = await scrape(bridge)
            return value(m, "pgbridge_listener_probe_age_seconds") < 1

        await until(hearing, "the probe age to fall once the listener hears again", timeout=30)
        assert value(await scrape(bridge), "pgbridge_listener_lag_seconds") < 1


# --- closes -----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_closes_are_counted_by_code(db_url: str, conn: Conn) -> None:
    """4008 (too slow), 4001 (token expired) and 1001 (shutdown), each with its own code; a
    close the client starts is not the bridge's."""
    user = await make_user(conn)
    room = await make_room(conn, user)
    async with running_bridge(db_url, queue_size=4, send_buffer=4096,
                              send_timeout=1.0) as bridge:
        m = await scrape(bridge)
        assert all(value(m, "pgbridge_closes_total", code=code) == 0 for code in CLOSE_CODES)

        # a client that stops reading: 4008
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", bridge.port))
        slow = await websockets.connect(
            f"ws://127.0.0.1:{bridge.port}/ws?token={token(user)}", sock=sock, max_queue=1,
            max_size=2**24, compression=None, ping_interval=None)
        assert json.loads(await slow.recv())["type"] == "welcome"
        await send(slow, type="subscribe", room=room, ref="s")
        assert json.loads(await slow.recv())["type"] == "subscribed"
        for i in range(100):
            await post(conn, room, user, f"{i} " + "x" * 6000)

        async def slow_closed() -> bool:
            return value(await scrape(bridge), "pgbridge_slow_client_closes_total") == 1

        await until(slow_closed, "the slow client to be closed")
        slow.transport.abort()  # it never reads the close frame

        async def counted_4008() -> bool:
            return value(await scrape(bridge), "pgbridge_closes_total", code="4008") == 1

        await until(counted_4008, "the 4008 close to be counted")

        # a token that expires: 4001
        expiring = await websockets.connect(
            f"ws://127.0.0.1:{bridge.port}/ws?token={token(user, ttl=2)}")
        assert (await recv(expiring))["type"] == "welcome"
        await asyncio.wait_for(expiring.wait_closed(), 10)
        assert expiring.close_code == 4001

        # a client that closes: not counted
        gone = await connect(bridge.port, user)
        await gone.close()
        # a client still connected at shutdown: 1001
        last = await connect(bridge.port, user)
    await asyncio.wait_for(last.wait_closed(), 10)
    assert last.close_code == 1001
    m = await scrape_registry(bridge)
    assert value(m, "pgbridge_closes_total", code="4001") == 1
    assert value(m, "pgbridge_closes_total", code="1001") == 1
    assert value(m, "pgbridge_closes_total", code="4008") == 1
    assert sum(v for (name, _), v in m.items() if name == "pgbridge_closes_total") == 3


async def scrape_registry(bridge: Bridge) -> Samples:
    """The samples of a bridge that no longer serves HTTP (read from its registry)."""
    text = bridge.metrics.render().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# --- the pool ---------------------------------------------------------------------------------


async def test_pool_waits_and_timeouts_are_exported(db_url: str) -> None:
    async with running_bridge(db_url, pool_size=2) as bridge:
        m = await scrape(bridge)
        assert value(m, "pgbridge_pool_max_connections") == 2
        assert value(m, "pgbridge_pool_requests_total") > 0
        pool = bridge.store.pool
        held = [await pool.getconn(), await pool.getconn()]  # the pool is exhausted
        try:
            waiting = asyncio.create_task(bridge.store.ping(3.0))

            async def queued() -> bool:
                return value(await scrape(bridge), "pgbridge_pool_waiting_requests") >= 1

            await until(queued, "a request waiting for a connection")
            with pytest.raises(PoolTimeout):
                await pool.getconn(timeout=0.3)
            m = await scrape(bridge)
            assert value(m, "pgbridge_pool_queued_requests_total") >= 2
            assert value(m, "pgbridge_pool_request_errors_total") >= 1
            assert value(m, "pgbridge_pool_wait_seconds_total") >= 0.25
            assert value(m, "pgbridge_pool_idle_connections") == 0
        finally:
            for c in held:
                await pool.putconn(c)
        assert await waiting is None  # it got a connection once one was returned


# --- deploy/ ------------------------------------------------------------------------------

SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum",
                                                             "_created"),
            "gauge": ("",)}


async def exported_names(bridge: Bridge) -> set[str]:
    """Every name a query may use: the families ``GET /metrics`` declares (labelled ones
    without a sample yet included) and their samples' names."""

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{bridge.port}/metrics",
                                    timeout=5) as r:
            return str(r.read().decode())

    names = set()
    for family in text_string_to_metric_families(await asyncio.to_thread(get)):
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names



def broker_names() -> set[str]:
    """The names a bridge with a broker (``PGBRIDGE_BROKER``) exports besides the others."""
    from daemon.broker import STATES
    from daemon.metrics import Metrics

    metrics = Metrics()
    metrics.export_broker(states=STATES, state=lambda: "leader", up=lambda: True,
                          lag=lambda: 0.0)
    names = set()
    for family in text_string_to_metric_families(metrics.render().decode()):
        if family.name.startswith("pgbridge_broker"):
            names.add(family.name)
            names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


async def test_alert_rules_and_dashboard_parse_and_use_exported_metrics(bridge: Bridge,
                                                                        conn: Conn) -> None:
    user, room, ws, _ = await subscribed_member(conn, bridge.port)
    await post(conn, room, user)
    await events(ws, 1)
    exported = await exported_names(bridge) | broker_names()

    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs, "the dashboard has no queries"

    rules_text = (ROOT / "deploy" / "prometheus-alerts.yml").read_text()
    try:
        import yaml
    except ImportError:  # not a dependency: the names are still checked below
        pass
    else:
        rules = yaml.safe_load(rules_text)
        alerts = [rule for group in rules["groups"] for rule in group["rules"]]
        assert {"alert", "expr", "labels", "annotations"} <= set(alerts[0])
        exprs += [rule["expr"] for rule in alerts]

    used = set(re.findall(r"\bpgbridge_[a-z_]+\b", "\n".join(exprs) + rules_text))
    unknown = sorted(used - exported)
    assert not unknown, f"not exported by the bridge: {unknown}"
    await ws.close()


def test_docs_list_every_metric() -> None:
    """docs/reference/metrics.md: every metric the bridge defines is listed."""
    from daemon.metrics import Metrics

    section = (ROOT / "docs" / "reference" / "metrics.md").read_text()
    from daemon.broker import STATES

    metrics = Metrics()
    metrics.watch_pool(dict)
    metrics.export_broker(states=STATES, state=lambda: "leader", up=lambda: True,
                          lag=lambda: 0.0)
    names = {m.name for m in metrics.registry.collect()}
    missing = sorted(n for n in names if n not in section)
    assert not missing, missing

