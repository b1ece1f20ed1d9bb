"""Cross-site WebSocket hijacking: a page of another site that got hold of a token must not
open a connection from a browser (``PGBRIDGE_ALLOWED_ORIGINS``, :mod:`daemon.origins`).

Without the check, any page could connect with a token it obtained, and the bridge could not
tell it from the chat application. Each test runs a real bridge; the last one a real headless
Chromium, whose ``Origin`` header no client library can get wrong for us."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import psycopg
import pytest
import websockets
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from daemon.app import Bridge
from daemon.origins import parse_allowlist, parse_public_origins
from tests.support.browser import StaticServer, async_chromium, browser_paths, run_async
from tests.support.fixtures import running_bridge
from tests.support.helpers import make_user, recv, token

Conn = psycopg.AsyncConnection[Any]


def refusals(bridge: Bridge, reason: str = "forbidden_origin") -> float:
    value = bridge.metrics.registry.get_sample_value(
        "pgbridge_handshake_refusals_total", {"reason": reason})
    return value or 0.0


async def handshake(port: int, user: str, origin: str | None = None,
                    headers: list[tuple[str, str]] | None = None,
                    host: str | None = None) -> tuple[int, dict[str, Any]]:
    """Open ``/ws`` as ``user`` with this ``Origin`` (``None``: none sent) and extra headers,
    over TCP to 127.0.0.1:``port`` whatever ``host`` (the ``Host`` header, default
    ``127.0.0.1:<port>``) names. Returns ``(101, welcome)`` when admitted (then closes), else
    the refusal's status and JSON body."""
    try:
        ws = await websockets.connect(f"ws://{host or f'127.0.0.1:{port}'}/ws?token={token(user)}",
                                      host="127.0.0.1", port=port,
                                      origin=None if origin is None else Origin(origin),
                                      additional_headers=headers, open_timeout=10)
    except InvalidStatus as refused:
        return refused.response.status_code, json.loads(refused.response.body or b"{}")
    try:
        return 101, await recv(ws)
    finally:
        await ws.close()


async def test_default_admits_non_browsers_and_the_own_origin_only(bridge: Bridge,
                                                                  conn: Conn) -> None:
    """With PGBRIDGE_ALLOWED_ORIGINS unset, a page of any other origin is refused with 403
    before the upgrade: ``null`` (sandboxed frames), ``file://`` pages, and the same machine
    under another name (``localhost`` is not ``127.0.0.1`` to a browser)."""
    user = await make_user(conn)
    port = bridge.port
    for origin in (None, f"http://127.0.0.1:{port}"):
        status, welcome = await handshake(port, user, origin)
        assert (status, welcome["type"], welcome["user"]) == (101, "welcome", user), origin
    assert refusals(bridge) == 0
    refused = ("https://evil.example", "null", "file://", f"http://localhost:{port}",
               "http://127.0.0.1:1")  # the bridge's host, another port
    for n, origin in enumerate(refused, 1):
        status, body = await handshake(port, user, origin)
        assert (status, body["error"]) == (403, "forbidden_origin"), (origin, body)
        assert refusals(bridge) == n
    assert refusals(bridge, "unauthorized") == 0


async def test_forbidden_origin_is_refused_before_the_token_is_looked_at(
        bridge: Bridge, conn: Conn) -> None:
    """The Origin is checked first: a foreign page learns nothing about a token (missing or
    invalid: the same 403 as a valid one), and no database round trip is spent on it."""
    port = bridge.port
    for url in (f"ws://127.0.0.1:{port}/ws", f"ws://127.0.0.1:{port}/ws?token=not.a.jwt"):
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(url, origin=Origin("https://evil.example"))
        assert refused.value.response.status_code == 403
        assert json.loads(refused.value.response.body or b"")["error"] == "forbidden_origin"
    assert refusals(bridge) == 2
    assert refusals(bridge, "unauthorized") == 0


async def test_origin_or_host_given_twice_is_a_bad_request(bridge: Bridge, conn: Conn) -> None:
    """Two ``Origin`` (or two ``Host``) headers: which one would the check be about? An allowed
    value next to a foreign one must not get in."""
    user = await make_user(conn)
    own = f"http://127.0.0.1:{bridge.port}"
    status, body = await handshake(bridge.port, user, None,
                                   [("Origin", own), ("Origin", "https://evil.example")])
    assert (status, body["error"]) == (400, "bad_request"), body
    # websockets sends Host 127.0.0.1:<port> itself: this one is a second Host header
    status, body = await handshake(bridge.port, user, "https://evil.example",
                                   [("Host", "evil.example")])
    assert (status, body["error"]) == (400, "bad_request"), body
    assert refusals(bridge) == 0


async def test_allowlist_admits_its_origins_and_subdomains(db_url: str, conn: Conn) -> None:
    user = await make_user(conn)
    allowlist = parse_allowlist("https://app.example, https://*.example.org")
    async with running_bridge(db_url, allowed_origins=allowlist) as bridge:
        expected = {
            "https://app.example": 101,
            "https://app.example:443": 101,
            "https://a.example.org": 101,
            "https://a.b.example.org": 101,
            f"http://127.0.0.1:{bridge.port}": 101,  # the own origin is still admitted
            "https://example.org": 403,  # the apex is not a subdomain
            "https://evilexample.org": 403,
            "http://app.example": 403,  # another scheme
            "https://app.example:8443": 403,  # another port
            "http://a.example.org": 403,
            "null": 403,
        }
        seen = {origin: (await handshake(bridge.port, user, origin))[0] for origin in expected}
        assert seen == expected
        assert refusals(bridge) == sum(1 for status in expected.values() if status == 403)


async def test_dns_rebinding_is_refused_and_loopback_or_the_public_origin_admitted(
        db_url: str, conn: Conn) -> None:
    """Issue 25 (8): a page of ``attacker.example:PORT`` whose name was rebound to the bridge's
    address sends ``Origin`` = ``Host`` = ``attacker.example:PORT``; before, the two agreeing
    made it the bridge's own origin. Now a name is the bridge's own only when
    ``PGBRIDGE_PUBLIC_ORIGIN`` names it; loopback and IP literals stay its own."""
    user = await make_user(conn)
    for public in ("", "https://chat.example.com"):
        async with running_bridge(db_url,
                                  public_origins=parse_public_origins(public)) as bridge:
            port = bridge.port
            rebound = f"attacker.example:{port}"
            status, body = await handshake(port, user, f"http://{rebound}", host=rebound)
            assert (status, body["error"]) == (403, "forbidden_origin"), body
            assert "PGBRIDGE_PUBLIC_ORIGIN" in body["message"]
            for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
                status, welcome = await handshake(port, user, f"http://{host}", host=host)
                assert (status, welcome["user"]) == (101, user), host
            status, body = await handshake(port, user, "https://chat.example.com",
                                           host="chat.example.com")
            assert status == (101 if public else 403), body
            assert refusals(bridge) == (1 if public else 2)


async def test_any_origin_admits_every_page_null_included(db_url: str, conn: Conn) -> None:
    user = await make_user(conn)
    async with running_bridge(db_url, allowed_origins=parse_allowlist("*")) as bridge:
        for origin in ("https://evil.example", "null", "file://", None):
            status, welcome = await handshake(bridge.port, user, origin)
            assert (status, welcome["user"]) == (101, user), origin
        assert refusals(bridge) == 0


# --- a real browser ----------------------------------------------------------------------------

OPEN_WEBSOCKET = """
const url = arguments[0], done = arguments[arguments.length - 1];
let finished = false;
const finish = (value) => { if (!finished) { finished = true; done(value); } };
let ws;
try { ws = new WebSocket(url); } catch (e) { finish("thrown:" + e); return; }
ws.onmessage = (e) => { finish(String(e.data)); ws.close(1000); };
ws.onclose = (e) => finish("closed:" + e.code);
"""

PAGE = "<!doctype html><meta charset=utf-8><title>{name}</title><p>{name}</p>"


@pytest.mark.slow
async def test_browser_page_of_another_origin_cannot_connect(db_url: str, conn: Conn) -> None:
    """Chromium on page A (allowlisted) gets the welcome; the same script with the same valid
    token on page B (another port, so another origin) gets no connection, and the bridge
    counted the refusal as ``forbidden_origin``: the Origin check is what stopped it."""
    browser_paths()  # skip (or fail under CI=true) before starting anything
    user = await make_user(conn)
    with (StaticServer({"/a.html": PAGE.format(name="A")}) as site_a,
          StaticServer({"/b.html": PAGE.format(name="B")}) as site_b):
        allowlist = parse_allowlist(site_a.origin)
        async with (running_bridge(db_url, allowed_origins=allowlist) as bridge,
                    async_chromium() as driver):
            url = f"ws://127.0.0.1:{bridge.port}/ws?token={token(user)}"
            results: dict[str, tuple[str, float]] = {}
            for name, site in (("A", site_a), ("B", site_b)):
                await asyncio.to_thread(driver.get, site.url(f"/{name.lower()}.html"))
                assert await run_async(driver, "arguments[0](location.origin)") == site.origin
                before = refusals(bridge)
                outcome = await run_async(driver, OPEN_WEBSOCKET, url)
                results[name] = (outcome, refusals(bridge) - before)
            assert results["A"][0].startswith("{"), results
            welcome = json.loads(results["A"][0])
            assert (welcome["type"], welcome["user"]) == ("welcome", user), results
            assert results["A"][1] == 0
            assert results["B"] == ("closed:1006", 1.0), results
            assert refusals(bridge, "unauthorized") == 0
    assert "/a.html" in site_a.requests and "/b.html" in site_b.requests

