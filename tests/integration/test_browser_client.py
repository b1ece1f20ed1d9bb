"""The JavaScript client (clients/js/pgbridge.js) and the demo page, in a real headless Chromium
against a real daemon and PostgreSQL (tests/support/browser.py).

* The demo page shows inserted messages in commit order; an edit, a delete and a reaction change
  them; hostile content stays text.
* A page using client.js holds exactly seqs 1..N of a room, no hole and no duplicate, across a
  token that expires (4001), a SIGKILL of the daemon and its restart, and a close for being too
  slow (4008).
* The demo page lists the members online, with the application's status as text, and who is
  typing, from another instance.
* ``/client.js`` and its declarations are served with a content type and an ETag; the demo page
  only while the demo is on.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from daemon.auth import mint_token
from daemon.origins import parse_allowlist
from tests.support.browser import StaticServer, async_chromium, run_async
from tests.support.fixtures import running_bridge
from tests.support.helpers import SECRET, connect, head, make_room, make_user, post, send, subscribe
from tests.support.procs import DaemonProcess, free_port, until
from tests.support.proxy import PausingProxy

AsyncConn = psycopg.AsyncConnection[Any]


async def page_value(driver: Any, script: str) -> Any:
    return await asyncio.to_thread(driver.execute_script, script)


async def page_until(driver: Any, script: str, what: str, timeout: float = 30.0) -> Any:
    """Poll ``script`` (a JavaScript expression) in the page until it is truthy."""
    result: list[Any] = []

    async def holds() -> bool:
        value = await page_value(driver, f"return {script};")
        result[:] = [value]
        return bool(value)

    await until(holds, what, timeout=timeout, every=0.1)
    return result[0]


# --- the demo page --------------------------------------------------------------------------

TIMELINE = ("[...document.querySelectorAll('.timeline li[data-id]')].map(li => "
            "[li.dataset.id, li.querySelector('.content').textContent, li.className, "
            "li.querySelector('.edited').textContent, li.querySelector('.reactions').textContent])")


@pytest.mark.slow
async def test_the_demo_page_shows_a_live_timeline(db_url: str, conn: AsyncConn) -> None:
    user = await make_user(conn)
    room = await make_room(conn, user)
    async with running_bridge(db_url, demo=True) as bridge, async_chromium() as driver:
        token = mint_token(SECRET, user, ttl=3600)
        await asyncio.to_thread(
            driver.get, f"http://127.0.0.1:{bridge.port}/#token={token}&room={room}")
        await page_until(driver, "document.getElementById('state').textContent === 'open'",
                         "the demo page to connect")
        hostile = '<img src=x onerror="window.pwned = 1">'
        ids = [await post(conn, room, user, text) for text in ("first", "second", "third",
                                                                hostile)]
        rows = await page_until(driver, f"(t => t.length === 4 && t)({TIMELINE})",
                                "four messages on the page")
        assert [r[0] for r in rows] == ids  # commit order
        assert [r[1] for r in rows] == ["first", "second", "third", hostile]  # text, not HTML
        assert await page_value(driver, "return document.querySelectorAll('main img').length"
                                ) == 0
        await conn.execute("UPDATE messages SET content = 'second, edited' WHERE id = %s",
                           [ids[1]])
        await conn.execute("DELETE FROM messages WHERE id = %s", [ids[2]])
        await conn.execute("INSERT INTO reactions (message_id, user_id, emoji) VALUES "
                           "(%s, %s, '👍')", (ids[0], user))
        rows = await page_until(
            driver, f"(t => t[0][4] === '👍' && t)({TIMELINE})", "the edit, delete and reaction")
        assert rows[1][1:4] == ["second, edited", "", "(edited)"]
        assert rows[2][1:3] == ["message deleted", "deleted"]
        assert await page_value(driver, "return window.pwned === undefined")
        cursor = await page_value(
            driver, "return document.querySelector('.room').dataset.cursor")
        assert int(cursor) == await head(conn, room)


MEMBERS = ("[...document.querySelectorAll('.members li[data-user]')].map(li => "
           "[li.dataset.user, li.textContent])")


@pytest.mark.slow
async def test_the_demo_page_shows_who_is_online_and_typing(db_url: str,
                                                            conn: AsyncConn) -> None:
    """The page subscribes with presence: the viewer is listed online, then a member who
    connects (on another instance), with the status the application set (hostile text
    included, as text), and the member's typing signal; the member leaves the list when their
    last connection closed and the grace passed."""
    viewer, member = await make_user(conn), await make_user(conn)
    room = await make_room(conn, viewer, member)
    hostile = '<img src=x onerror="window.pwned = 1">'
    await conn.execute("INSERT INTO user_status (user_id, status, custom_status) "
                       "VALUES (%s, 'busy', %s)", (member, hostile))
    async with (running_bridge(db_url, demo=True, presence_grace=0.5) as bridge,
                running_bridge(db_url, presence_grace=0.5) as other,
                async_chromium() as driver):
        token = mint_token(SECRET, viewer, ttl=3600)
        await asyncio.to_thread(
            driver.get, f"http://127.0.0.1:{bridge.port}/#token={token}&room={room}")
        shown = await page_until(driver, f"(m => m.length === 1 && m)({MEMBERS})",
                                 "the viewer listed online")
        assert shown[0][0] == viewer
        ws = await connect(other.port, member)
        await subscribe(ws, room)
        shown = await page_until(driver, f"(m => m.length === 2 && m)({MEMBERS})",
                                 "the member listed online")
        assert [member, f"{member} (busy) — {hostile}"] in shown
        await send(ws, type="typing", room=room)
        line = await page_until(driver, "document.querySelector('.typing').textContent",
                                "the typing line")
        assert line == f"{member} is typing…"
        await ws.close()
        await page_until(driver, f"(m => m.length === 1 && m[0][0] === '{viewer}')({MEMBERS})",
                         "the member gone from the list")
        assert await page_value(driver, "return window.pwned === undefined")
        assert await page_value(driver, "return document.querySelectorAll('main img').length"
                                ) == 0


# --- lossless across faults -----------------------------------------------------------------

START_CLIENT = """
const [room, [short, long], done] = arguments;
import('/client.js').then(({PgBridge}) => {
  const t = window.t = {got: [], closes: [], errors: []};
  // the short-lived token until the server closed with 4001 (a refresh before its exp gets the
  // same token again, which the client does not send), then one that lasts
  const token = () => t.closes.includes(4001) ? long : short;
  t.bridge = new PgBridge('/ws', {token, backoff: {base: 100, cap: 1000}, ackInterval: 200});
  t.bridge.addEventListener('state', e => { if (e.detail.code) t.closes.push(e.detail.code); });
  t.bridge.addEventListener('error', e => t.errors.push(e.detail));
  t.bridge.subscribe(room, {since: 0, onEvent: ev => t.got.push(ev.seq)});
  done(true);
}, err => done(String(err)));
"""


@pytest.mark.slow
async def test_a_page_keeps_every_event_across_4001_sigkill_and_4008(
        create_database: Callable[[], str], tmp_path: Path) -> None:
    from daemon.schema import apply_schema
    from tests.support.fixtures import conninfo_env

    url = create_database()
    await apply_schema(url)
    port = free_port()
    env = conninfo_env(url) | {"PGBRIDGE_JWT_SECRET": SECRET, "PGBRIDGE_PORT": str(port),
                               "PGBRIDGE_PROBE_INTERVAL": "1", "PGBRIDGE_DEMO": "1",
                               "PGBRIDGE_QUEUE_SIZE": "50",
                               "PGBRIDGE_SEND_TIMEOUT": "1"}

    async def started() -> DaemonProcess:
        daemon = DaemonProcess(env, tmp_path)
        await daemon.start()
        await daemon.wait_healthy(port)
        return daemon

    daemon = await started()
    proxy = PausingProxy(port)  # the page and its WebSocket go through it
    page_port = await proxy.start()
    try:
        async with (await psycopg.AsyncConnection.connect(url, autocommit=True) as conn,
                    async_chromium() as driver):
            user = await make_user(conn)
            room = await make_room(conn, user)
            tokens = [mint_token(SECRET, user, ttl=6), mint_token(SECRET, user, ttl=3600)]
            expires = time.monotonic() + 6
            await asyncio.to_thread(driver.get, f"http://127.0.0.1:{page_port}/")
            assert await run_async(driver, START_CLIENT, room, tokens) is True

            async def holds_all(phase: str) -> None:
                n = await head(conn, room)
                got = await page_until(
                    driver, f"window.t.got.length >= {n} && window.t.got",
                    f"the page to hold seqs 1..{n} ({phase})")
                assert got == list(range(1, n + 1)), (phase, got)

            for i in range(10):
                await post(conn, room, user, f"before {i}")
            await holds_all("before the token expires")

            # 4001: the server closes when the first token expires; the client takes a new one
            await page_until(driver, "window.t.closes.includes(4001)", "a close with 4001",
                             timeout=max(0.0, expires - time.monotonic()) + 20)
            for i in range(10):
                await post(conn, room, user, f"after 4001 {i}")
            await holds_all("after 4001")

            # SIGKILL, writes while the daemon is down, restart on the same port
            await daemon.kill()
            for i in range(10):
                await post(conn, room, user, f"while down {i}")
            daemon = await started()
            await holds_all("after SIGKILL and restart")

            # 4008: the page's connection stops reading (the proxy pauses) while a burst
            # arrives; the bridge closes it as too slow, and the client resumes
            proxy.pause()
            await conn.execute(
                "INSERT INTO messages (channel_id, user_id, content) "
                "SELECT %s, %s, g || repeat('x', 1000) FROM generate_series(1, 1000) AS g",
                (room, user))

            async def closed_slow() -> bool:
                _, _, body = await get(port, "/metrics")
                return b"pgbridge_slow_client_closes_total 1.0" in body

            await until(closed_slow, "the bridge to close the page's connection as too slow")
            proxy.resume()
            await holds_all("after the burst")
            state = json.loads(await page_value(
                driver, "return JSON.stringify({closes: window.t.closes, errors: window.t.errors,"
                        " state: window.t.bridge.state})"))
            assert {4001, 4008} <= set(state["closes"]), state
            assert state["state"] == "open" and not any(e.get("fatal") for e in state["errors"])
            await page_value(driver, "window.t.bridge.close(); return true;")
    finally:
        await proxy.close()
        await daemon.kill()



CROSS_ORIGIN = """
const [bridgeOrigin, room, token, done] = arguments;
import(bridgeOrigin + '/client.js').then(({PgBridge}) => {
  const t = window.t = {got: [], states: []};
  t.bridge = new PgBridge(bridgeOrigin.replace('http', 'ws') + '/ws',
                          {token, backoff: {base: 100, cap: 500}});
  t.bridge.addEventListener('state', e => t.states.push(e.detail.state));
  t.bridge.subscribe(room, {since: 0, onEvent: ev => t.got.push(ev.seq)});
  done(true);
}, err => done(String(err)));
"""


@pytest.mark.slow
@pytest.mark.parametrize("allowed", [True, False])
async def test_a_page_of_another_origin_works_once_allowed(db_url: str, conn: AsyncConn,
                                                           allowed: bool) -> None:
    """The page imports client.js from the bridge (a CORS module import) and connects; the
    bridge admits it only when its origin is in PGBRIDGE_ALLOWED_ORIGINS."""
    user = await make_user(conn)
    room = await make_room(conn, user)
    page = "<!doctype html><meta charset=utf-8><title>app</title><p>app"
    with StaticServer({"/app.html": page}) as site:
        allowlist = parse_allowlist(site.origin if allowed else None)
        async with (running_bridge(db_url, allowed_origins=allowlist) as bridge,
                    async_chromium() as driver):
            await asyncio.to_thread(driver.get, site.url("/app.html"))
            origin = f"http://127.0.0.1:{bridge.port}"
            token = mint_token(SECRET, user, ttl=3600)
            assert await run_async(driver, CROSS_ORIGIN, origin, room, token) is True
            if allowed:
                n = await head(conn, room)
                got = await page_until(driver, f"window.t.got.length >= {n} && window.t.got",
                                       "the room's events on the other origin's page")
                assert got == list(range(1, n + 1))
            else:
                await page_until(driver, "window.t.states.filter(s => s === 'reconnecting')"
                                         ".length >= 2", "two refused attempts")
                assert "open" not in await page_value(driver, "return window.t.states")
                assert bridge.metrics.handshake_refusals.labels(
                    "forbidden_origin")._value.get() >= 2
            await page_value(driver, "window.t.bridge.close(); return true;")

# --- what is served -------------------------------------------------------------------------

async def get(port: int, path: str, *headers: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        extra = "".join(f"{h}\r\n" for h in headers)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head_, _, body = raw.partition(b"\r\n\r\n")
    lines = head_.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, body


@pytest.mark.parametrize("demo", [True, False])
async def test_the_client_is_served_with_an_etag_and_the_page_only_with_the_demo_on(
        db_url: str, conn: AsyncConn, demo: bool) -> None:
    user = await make_user(conn)
    async with running_bridge(db_url, demo=demo) as bridge:
        # what the client asks when an upgrade failed unseen: retry (426) or give up (401)
        good = mint_token(SECRET, user, ttl=60)
        assert (await get(bridge.port, f"/ws?token={good}"))[0] == 426
        assert (await get(bridge.port, f"/ws?token={good}x"))[0] == 401
        status, fields, body = await get(bridge.port, "/client.js")
        assert status == 200 and fields["content-type"] == "text/javascript; charset=utf-8"
        assert b"export class PgBridge" in body and fields["etag"].startswith('"')
        assert fields["cache-control"] == "no-cache"
        status, _, body = await get(bridge.port, "/client.js", f"If-None-Match: {fields['etag']}")
        assert (status, body) == (304, b"")
        status, fields, _ = await get(bridge.port, "/client.d.ts")
        assert status == 200 and fields["content-type"].startswith("application/typescript")
        status, fields, body = await get(bridge.port, "/")
        if demo:
            assert status == 200 and fields["content-type"] == "text/html; charset=utf-8"
            assert "script-src 'self'" in fields["content-security-policy"]
        else:
            assert status == 404
