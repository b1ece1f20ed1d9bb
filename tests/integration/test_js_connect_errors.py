"""In a real headless Chromium, a page whose bridge cannot be reached sees why: the `error`
event ``connect_failed`` (not fatal) for each attempt, its ``cause`` told by the client's
handshake probe (a browser says nothing about a failed WebSocket): ``unreachable`` when nothing
answers, ``http`` (no ``status``: hidden from the page) when a bridge answers a page of an
origin it does not allow; either way the client goes on retrying."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.support.browser import StaticServer, async_chromium, run_async
from tests.support.fixtures import running_bridge
from tests.support.procs import free_port, until

START = """
const [clientUrl, bridgeUrl, done] = arguments;
import(clientUrl).then(({PgBridge}) => {
  const t = window.t = {errors: [], states: []};
  t.bridge = new PgBridge(bridgeUrl, {token: 'a.b.c', backoff: {base: 100, cap: 300}});
  t.bridge.addEventListener('state', e => t.states.push(e.detail.state));
  t.bridge.addEventListener('error', e => t.errors.push(e.detail));
  done(true);
}, err => done(String(err)));
"""


async def errors(driver: Any, n: int) -> list[dict[str, Any]]:
    async def enough() -> bool:
        return bool(await asyncio.to_thread(
            driver.execute_script, f"return window.t.errors.length >= {n}"))

    await until(enough, f"{n} error events in the page", timeout=30, every=0.1)
    found: list[dict[str, Any]] = await asyncio.to_thread(
        driver.execute_script, "window.t.bridge.close(); return window.t.errors")
    return found


@pytest.mark.slow
@pytest.mark.parametrize("target", ["nothing", "refused_origin"])
async def test_a_page_sees_why_it_cannot_connect(db_url: str, target: str) -> None:
    page = "<!doctype html><meta charset=utf-8><title>app</title><p>app"
    # the bridge serves the client to the page, and, for refused_origin, is the one it dials
    # (its origin is not allowed); for nothing, the page dials a port nobody listens on
    with StaticServer({"/app.html": page}) as site:
        async with running_bridge(db_url) as bridge, async_chromium() as driver:
            await asyncio.to_thread(driver.get, site.url("/app.html"))
            port = bridge.port if target == "refused_origin" else free_port()
            assert await run_async(driver, START, f"http://127.0.0.1:{bridge.port}/client.js",
                                   f"ws://127.0.0.1:{port}/ws") is True
            found = await errors(driver, 2)
    cause = "unreachable" if target == "nothing" else "http"
    assert [(e["code"], e["cause"], e["fatal"], e["attempt"]) for e in found[:2]] == [
        ("connect_failed", cause, False, 0), ("connect_failed", cause, False, 1)], found
    assert all("status" not in e for e in found), found
    assert "token" not in found[0]["message"]
