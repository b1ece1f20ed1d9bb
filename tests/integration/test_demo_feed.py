"""The demo page's list of the user's rooms, from the feed (PROTOCOL.md, "One feed per user";
clients/js/demo.js), in a real headless Chromium against a real daemon and PostgreSQL
(tests/support/browser.py).

* Each room of the viewer is listed with a badge of the messages other users wrote that the
  viewer has not acknowledged; the viewer's own messages and other users' rooms do not count.
* The badges follow new messages live, and a room joined or left while the page is open.
* Opening a room reads it: its badge clears, stays clear while messages arrive in it (shown in
  its timeline), and the ack reaches ``sync_state``: a reload counts from there.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from daemon.auth import mint_token
from tests.support.browser import async_chromium
from tests.support.fixtures import running_bridge
from tests.support.helpers import SECRET, head, make_room, make_user, post
from tests.support.procs import until

AsyncConn = psycopg.AsyncConnection[Any]

# room id -> the text of its badge ("" when nothing is unread), as the page shows them
INBOX = ("Object.fromEntries([...document.querySelectorAll('#feed li[data-room]')].map(li => "
         "[li.dataset.room, li.querySelector('.badge').textContent]))")


async def page_value(driver: Any, script: str) -> Any:
    return await asyncio.to_thread(driver.execute_script, script)


async def shows(driver: Any, want: dict[str, str], what: str, timeout: float = 30.0) -> None:
    """Wait until the list of rooms is ``want`` exactly (room -> badge text)."""
    deadline = time.monotonic() + timeout
    while (seen := await page_value(driver, f"return {INBOX};")) != want:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}: the page shows "
                        f"{seen}, not {want}")
        await asyncio.sleep(0.1)


async def timeline(driver: Any, room: str) -> list[str]:
    return list(await page_value(driver, (
        f"return [...document.querySelectorAll('.room[data-room=\"{room}\"] .timeline "
        "li[data-id]')].map(li => li.querySelector('.content').textContent);")))


@pytest.mark.slow
async def test_the_demo_page_counts_unread_messages_per_room_live(db_url: str,
                                                                  conn: AsyncConn) -> None:
    viewer, alice, bob = [await make_user(conn, n) for n in ("viewer", "alice", "bob")]
    a = await make_room(conn, viewer, alice, bob)
    b = await make_room(conn, viewer, alice)
    c = await make_room(conn, viewer, bob)
    elsewhere = await make_room(conn, alice, bob)
    for room, user in ((a, alice), (a, bob), (a, viewer), (a, alice), (b, viewer), (b, alice),
                       (elsewhere, alice)):
        await post(conn, room, user, f"by {user}")
    async with running_bridge(db_url, demo=True) as bridge, async_chromium() as driver:
        token = mint_token(SECRET, viewer, ttl=3600)
        await asyncio.to_thread(driver.get, f"http://127.0.0.1:{bridge.port}/#token={token}")
        await shows(driver, {a: "3", b: "1", c: ""}, "the viewer's rooms with their counts")

        # live: others' messages count, the viewer's own do not
        await post(conn, c, bob, "hello c")
        await post(conn, c, viewer, "mine")
        await post(conn, a, bob, "more a")
        await post(conn, c, bob, "again c")
        await shows(driver, {a: "4", b: "1", c: "2"}, "the counts updated live")

        # opening a room reads it: the badge clears, and stays clear as messages arrive
        await page_value(driver, f"document.querySelector('#feed li[data-room=\"{a}\"] button')"
                                 ".click();")
        await shows(driver, {a: "", b: "1", c: "2"}, "room a read once opened")
        await post(conn, a, alice, "while open")

        async def in_timeline() -> bool:
            return (await timeline(driver, a))[-1:] == ["while open"]

        await until(in_timeline, "the message in the open room's timeline", timeout=30)
        assert len(await timeline(driver, a)) == 6  # the whole history: 4 before, 2 since
        await shows(driver, {a: "", b: "1", c: "2"}, "room a still read")

        # a room joined, and one left, while the page is open
        d = await make_room(conn, alice)
        await conn.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                           (d, viewer))
        await post(conn, d, alice, "welcome")
        await conn.execute("DELETE FROM channel_members WHERE channel_id = %s AND user_id = %s",
                           (b, viewer))
        await shows(driver, {a: "", c: "2", d: "1"}, "room d joined, room b left")

        # the ack reached the bridge's sync_state: a reload counts from there
        want = await head(conn, a)

        async def acked() -> bool:
            cur = await conn.execute(
                "SELECT last_seq FROM sync_state WHERE user_id = %s AND room_id = %s "
                "AND sync_type = 'events'", (viewer, a))
            row = await cur.fetchone()
            return row is not None and row[0] == want

        await until(acked, "the open room's ack in sync_state")
        await asyncio.to_thread(driver.refresh)
        await shows(driver, {a: "", c: "2", d: "1"}, "the same counts after a reload")
        assert await page_value(driver, "return document.querySelectorAll('.room').length") == 0
