"""The React hooks (clients/js/react.js) on a page built with Vite (tests/support/react_app/),
with React 18 and with React 19, in a real headless Chromium against a real daemon and
PostgreSQL (tests/support/browser.py).

* ``useRoom`` shows the room's last messages (its snapshot), then a message posted, an edit, a
  soft delete and a delete; across a restart of the daemon, a message posted while it was down
  appears once.
* ``usePresence`` shows the viewer and another member online; ``useTypists`` shows the other
  member typing, and its ``typing()`` reaches the other member.
* Three hooks of one room under StrictMode (a development build: every effect mounts, unmounts
  and mounts again) make one ``subscribe``, and the server holds one subscription; unmounting
  them ends it on the server. A ``usePresence`` mounted after ``useRoom`` subscribes again with
  presence, from the seq held; another room replaces the first; a forbidden room is an error.
* A message moved into the room takes its place by ``created_at``; an edit of one older than
  the snapshot stays out. React logs no warning.

The page is built once per module into a temporary directory: ``npm ci`` of the app's
package-lock.json (npm is ``PGBRIDGE_NPM``, default ``npm`` on PATH; without it the test skips,
and fails under ``CI=true``), then ``vite build`` with ``REACT=18`` and ``REACT=19``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest

from daemon.auth import mint_token
from daemon.origins import parse_allowlist
from tests.integration.test_js_client import node
from tests.support.browser import async_chromium, browser_paths
from tests.support.fixtures import ROOT, running_bridge
from tests.support.helpers import SECRET, connect, make_room, make_user, post, recv, send, subscribe
from tests.support.procs import free_port, until

AsyncConn = psycopg.AsyncConnection[Any]
APP = ROOT / "tests" / "support" / "react_app"
APP_FILES = ("package.json", "package-lock.json", ".npmrc", "vite.config.js", "index.html", "src")
REACTS = ("18", "19")


def npm() -> str:
    path = os.environ.get("PGBRIDGE_NPM") or shutil.which("npm")
    if not path:
        reason = "the React hooks' test needs npm (PGBRIDGE_NPM, or npm on PATH)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so it may not be skipped")
        pytest.skip(reason)
    return path


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test page built for each React version: ``<dir>/18/index.html``, ``<dir>/19/…``."""
    browser_paths()  # no browser: skip (or fail) before building
    node_path, npm_path = node(), npm()
    work = tmp_path_factory.mktemp("react-app")
    for name in APP_FILES:
        source = APP / name
        if source.is_dir():
            shutil.copytree(source, work / name)
        else:
            shutil.copy2(source, work / name)
    run(npm_path, "ci", "--no-audit", "--no-fund", "--ignore-scripts", cwd=work)
    for react in REACTS:
        env = os.environ | {"REACT": react, "OUT_DIR": str(work / "dist" / react),
                            "PGBRIDGE_CLIENT_JS": str(ROOT / "clients" / "js")}
        run(node_path, str(work / "node_modules" / "vite" / "bin" / "vite.js"), "build",
            cwd=work, env=env)
    return work / "dist"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@functools.cache
def _handler(directory: str) -> type[SimpleHTTPRequestHandler]:
    return type("Handler", (_Quiet,), {"__init__": functools.partialmethod(
        _Quiet.__init__, directory=directory)})


class Site:
    """The built pages, served on 127.0.0.1 with their content types (a module script must be
    JavaScript) from a thread; ``origin`` is theirs."""

    def __init__(self, directory: Path) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(str(directory)))
        self.origin = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> Site:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()


@pytest.fixture(scope="module")
def site(pages: Path) -> Iterator[Site]:
    with Site(pages) as s:
        yield s


async def page_value(driver: Any, script: str) -> Any:
    return await asyncio.to_thread(driver.execute_script, script)


async def page_until(driver: Any, script: str, what: str, timeout: float = 30.0) -> Any:
    """Poll ``script`` (a JavaScript expression) in the page until it is truthy; its value."""
    result: list[Any] = []

    async def holds() -> bool:
        result[:] = [await page_value(driver, f"return {script};")]
        return bool(result[0])

    await until(holds, what, timeout=timeout, every=0.1)
    return result[0]


ROWS = "[...document.querySelectorAll('#room li')].map(li => [li.dataset.id, li.textContent])"
STATUS = "document.querySelector('#room')?.dataset.status"


async def shows(driver: Any, want: list[tuple[str, str]], what: str,
                timeout: float = 30.0) -> None:
    """Wait until useRoom's list is ``want`` exactly: ``(id, content)`` in order."""
    rows = [list(row) for row in want]
    deadline = time.monotonic() + timeout
    while (seen := await page_value(driver, f"return {ROWS};")) != rows:
        if time.monotonic() > deadline:
            page = await page_value(driver, f"return {{status: {STATUS}, subscribes: "
                                            "app.subscribes, errors: app.errors}")
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}: the page shows "
                        f"{seen}, not {rows} ({page})")
        await asyncio.sleep(0.1)


def subscriptions(bridge: Any) -> float:
    return float(bridge.metrics.subscriptions._value.get())


@pytest.mark.slow
@pytest.mark.parametrize("react", REACTS)
async def test_the_hooks_keep_a_room_current_in_chromium(react: str, site: Site, db_url: str,
                                                         conn: AsyncConn) -> None:
    viewer, peer = await make_user(conn, "viewer"), await make_user(conn, "peer")
    room = await make_room(conn, viewer, peer)
    ids = [await post(conn, room, peer, f"m{i}") for i in range(1, 6)]
    port = free_port()
    options: dict[str, Any] = {"port": port, "allowed_origins": parse_allowlist(site.origin)}
    url = (f"{site.origin}/{react}/index.html#ws=ws://127.0.0.1:{port}/ws"
           f"&token={mint_token(SECRET, viewer, ttl=3600)}&room={room}")
    async with async_chromium() as driver:
        async with running_bridge(db_url, **options) as bridge:
            await asyncio.to_thread(driver.get, url)
            await page_until(driver, f"{STATUS} === 'live'", "useRoom live")
            # the snapshot: the 3 most recent messages, oldest first
            await shows(driver, [(ids[2], "m3"), (ids[3], "m4"), (ids[4], "m5")], "the snapshot")
            app = await page_value(driver, "return {react: app.react, mounts: app.mounts, "
                                           "subscribes: app.subscribes}")
            assert app["react"].split(".")[0] == react
            assert app["mounts"] == 2, "not a StrictMode development build"
            # three hooks, mounted twice by StrictMode: one subscribe, one subscription
            assert app["subscribes"] == [{"room": room, "snapshot": 3, "since": None,
                                          "presence": True}]
            assert subscriptions(bridge) == 1

            # live: a new message, an edit, a soft delete, a delete
            ids.append(await post(conn, room, peer, "m6"))
            await shows(driver, [(ids[2], "m3"), (ids[3], "m4"), (ids[4], "m5"), (ids[5], "m6")],
                        "the message posted")
            await conn.execute("UPDATE messages SET content = 'm4 edited' WHERE id = %s",
                               [ids[3]])
            await conn.execute("UPDATE messages SET deleted_at = now() WHERE id = %s", [ids[4]])
            await conn.execute("DELETE FROM messages WHERE id = %s", [ids[2]])
            await shows(driver, [(ids[3], "m4 edited"), (ids[5], "m6")],
                        "the edit, the soft delete and the delete")
            ops = await page_value(driver, "return app.events.map(e => e[2])")
            assert ops == ["INSERT", "UPDATE", "UPDATE", "DELETE"]  # useRoom's onEvent

            # presence: the viewer, then the peer, online
            await page_until(driver, f"document.querySelector('#members li[data-user=\"{viewer}\"]"
                                     "')?.dataset.online === 'true'", "the viewer online")
            ws = await connect(port, peer)
            await subscribe(ws, room, presence=True)
            await page_until(driver, f"document.querySelector('#members li[data-user=\"{peer}\"]"
                                     "')?.dataset.online === 'true'", "the peer online")

            # typing, both ways (a signal relayed before the page's presence snapshot can be
            # dropped: repeated while typing, as a typist does, at most once a second)
            async def peer_typing_shown() -> bool:
                await send(ws, type="typing", room=room)
                return bool(await page_value(
                    driver, f"return document.querySelector('#typists').textContent === '{peer}'"))

            await until(peer_typing_shown, "the peer typing on the page", every=1.1)
            composer = await asyncio.to_thread(driver.find_element, "id", "composer")
            await asyncio.to_thread(composer.send_keys, "h")
            async with asyncio.timeout(20):
                while (frame := await recv(ws))["type"] != "typing":
                    pass
            assert (frame["room"], frame["user"]) == (room, viewer)
            await ws.close()

        # the daemon stops; a message posted while it is down appears once after its restart
        await page_until(driver, f"{STATUS} === 'reconnecting'", "useRoom reconnecting")
        ids.append(await post(conn, room, peer, "m7"))
        async with running_bridge(db_url, **options) as bridge:
            await page_until(driver, f"{STATUS} === 'live'", "useRoom live again")
            await shows(driver, [(ids[3], "m4 edited"), (ids[5], "m6"), (ids[6], "m7")],
                        "the message posted while the daemon was down")
            seqs = await page_value(driver, "return app.events.map(e => e[0])")
            assert seqs == sorted(set(seqs)) and len(seqs) == 5, seqs
            # resumed by the client: the hooks subscribed once
            assert len(await page_value(driver, "return app.subscribes")) == 1
            assert subscriptions(bridge) == 1

            # unmounted: the subscription ends on the server; the bridge stays open
            await page_value(driver, "app.show([])")

            async def unsubscribed() -> bool:
                return subscriptions(bridge) == 0

            await until(unsubscribed, "the subscription to end on the server")
            state = await page_value(driver, "return {state: app.bridge.state, fatal: "
                                             "app.errors.filter(e => e.fatal), warnings: "
                                             "app.warnings}")
            assert state == {"state": "open", "fatal": [], "warnings": []}
            await page_value(driver, "app.bridge.close()")


@pytest.mark.slow
@pytest.mark.parametrize("react", REACTS)
async def test_a_hook_mounted_later_or_another_room_moves_the_shared_subscription(
        react: str, site: Site, db_url: str, conn: AsyncConn) -> None:
    """useRoom alone subscribes without presence; a usePresence mounted later makes the room
    subscribe again with presence, resuming after the seq held (the messages stay, none is
    lost or repeated); a message moved into the room takes its place by created_at, an edit
    of one older than the snapshot stays out; a new room replaces the old on the server; a
    room the user may not read is the hooks' error ``forbidden``."""
    viewer, peer = await make_user(conn, "viewer"), await make_user(conn, "peer")
    room, other = await make_room(conn, viewer, peer), await make_room(conn, viewer)
    closed = await make_room(conn, peer)
    ids = [await post(conn, room, peer, f"m{i}") for i in range(1, 5)]
    theirs = await post(conn, other, viewer, "elsewhere")
    moved = await post(conn, other, viewer, "moved")
    async with (running_bridge(db_url, allowed_origins=parse_allowlist(site.origin)) as bridge,
                async_chromium() as driver):
        await asyncio.to_thread(driver.get, (
            f"{site.origin}/{react}/index.html#ws=ws://127.0.0.1:{bridge.port}/ws"
            f"&token={mint_token(SECRET, viewer, ttl=3600)}&room={room}&parts=room"))
        await page_until(driver, f"{STATUS} === 'live'", "useRoom live")
        await shows(driver, [(ids[1], "m2"), (ids[2], "m3"), (ids[3], "m4")], "the snapshot")
        ids.append(await post(conn, room, peer, "m5"))
        await shows(driver, [(ids[1], "m2"), (ids[2], "m3"), (ids[3], "m4"), (ids[4], "m5")],
                    "the message posted")

        await page_value(driver, "app.show(['room', 'members'])")
        await page_until(driver, f"document.querySelector('#members li[data-user=\"{viewer}\"]"
                                 "')?.dataset.online === 'true'", "the viewer online")
        ids.append(await post(conn, room, peer, "m6"))
        await shows(driver, [(ids[1], "m2"), (ids[2], "m3"), (ids[3], "m4"), (ids[4], "m5"),
                             (ids[5], "m6")], "the message posted after the resubscribe")
        seqs = await page_value(driver, "return app.events.map(e => e[0])")
        assert seqs == sorted(set(seqs)) and len(seqs) == 2, seqs
        subscribes = await page_value(driver, "return app.subscribes")
        assert subscribes == [
            {"room": room, "snapshot": 3, "since": None, "presence": False},
            {"room": room, "snapshot": None, "since": seqs[0], "presence": True}]
        assert subscriptions(bridge) == 1

        # an edit of a message older than the snapshot stays out; a message moved into the
        # room from another comes in at its place by created_at
        await conn.execute("UPDATE messages SET content = 'm1 edited' WHERE id = %s", [ids[0]])
        await conn.execute("UPDATE messages SET channel_id = %s WHERE id = %s", (room, moved))
        await shows(driver, [(ids[1], "m2"), (ids[2], "m3"), (ids[3], "m4"), (moved, "moved"),
                             (ids[4], "m5"), (ids[5], "m6")], "the message moved in")

        await page_value(driver, f"app.setRoom('{other}')")
        await shows(driver, [(theirs, "elsewhere")], "the other room's snapshot")
        assert subscriptions(bridge) == 1

        await page_value(driver, f"app.setRoom('{closed}')")
        await page_until(driver, f"{STATUS} === 'error'", "the room refused")
        assert await page_value(driver, "return document.querySelector('#room').dataset.error"
                                ) == "forbidden"
        assert await page_value(driver, "return document.querySelector('#members').dataset"
                                ".status") == "error"
        assert subscriptions(bridge) == 0
        assert await page_value(driver, "return app.warnings") == []
        await page_value(driver, "app.bridge.close()")
