"""The demo page's list of the user's rooms, from the feed (PROTOCOL.md, "One feed per user";
clients/js/demo.js), in a real headless Chromium against a real daemon and PostgreSQL
(tests/support/browser.py).

* Each room of the viewer is listed with a badge of the messages other users wrote that the
  viewer has not acknowledged ("99+" past what the bridge counts); the viewer's own messages
  and other users' rooms do not count.
* The badges follow new messages live, and a room joined or left while the page is open.
* Opening a room reads it: its badge clears, stays clear while messages arrive in it (shown in
  its timeline), and the ack reaches ``sync_state``: a reload counts from there.
* Under the page, client.js hands each event over once, through the feed or through the
  subscription that took its room over, across a reconnect.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from daemon.auth import mint_token
from tests.support.browser import async_chromium, run_async
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


async def page_until(driver: Any, script: str, what: str, timeout: float = 30.0) -> Any:
    """Poll ``script`` (a JavaScript expression) in the page until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while not (value := await page_value(driver, f"return {script};")):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.1)
    return value


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
    busy = await make_room(conn, viewer, bob)  # more than the bridge counts: "99+"
    await conn.execute("INSERT INTO messages (channel_id, user_id, content) "
                       "SELECT %s, %s, 'm' || g FROM generate_series(1, 120) AS g", (busy, bob))
    for room, user in ((a, alice), (a, bob), (a, viewer), (a, alice), (b, viewer), (b, alice),
                       (elsewhere, alice)):
        await post(conn, room, user, f"by {user}")
    async with running_bridge(db_url, demo=True) as bridge, async_chromium() as driver:
        token = mint_token(SECRET, viewer, ttl=3600)
        await asyncio.to_thread(driver.get, f"http://127.0.0.1:{bridge.port}/#token={token}")
        await shows(driver, {a: "3", b: "1", c: "", busy: "99+"},
                    "the viewer's rooms with their counts")

        # live: others' messages count, the viewer's own do not
        await post(conn, c, bob, "hello c")
        await post(conn, c, viewer, "mine")
        await post(conn, a, bob, "more a")
        await post(conn, c, bob, "again c")
        await shows(driver, {a: "4", b: "1", c: "2", busy: "99+"}, "the counts updated live")

        # opening a room reads it: the badge clears, and stays clear as messages arrive
        await page_value(driver, f"document.querySelector('#feed li[data-room=\"{a}\"] button')"
                                 ".click();")
        await shows(driver, {a: "", b: "1", c: "2", busy: "99+"}, "room a read once opened")
        await post(conn, a, alice, "while open")

        async def in_timeline() -> bool:
            return (await timeline(driver, a))[-1:] == ["while open"]

        await until(in_timeline, "the message in the open room's timeline", timeout=30)
        assert len(await timeline(driver, a)) == 6  # the whole history: 4 before, 2 since
        await shows(driver, {a: "", b: "1", c: "2", busy: "99+"}, "room a still read")

        # a room joined, and one left, while the page is open
        d = await make_room(conn, alice)
        await conn.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                           (d, viewer))
        await post(conn, d, alice, "welcome")
        await conn.execute("DELETE FROM channel_members WHERE channel_id = %s AND user_id = %s",
                           (b, viewer))
        await shows(driver, {a: "", c: "2", d: "1", busy: "99+"}, "room d joined, room b left")

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
        await shows(driver, {a: "", c: "2", d: "1", busy: "99+"},
                    "the same counts after a reload")
        assert await page_value(driver, "return document.querySelectorAll('.room').length") == 0


# --- client.js's feed with a subscription, in a page ----------------------------------------

START_FEED = """
const [[short, long], done] = arguments;
import('/client.js').then(({PgBridge}) => {
  const t = window.t = {got: [], answers: [], closes: []};
  const token = () => t.closes.includes(4001) ? long : short;
  t.bridge = new PgBridge('/ws', {token, backoff: {base: 100, cap: 1000}, ackInterval: 100});
  t.bridge.addEventListener('state', e => { if (e.detail.code) t.closes.push(e.detail.code); });
  t.feed = t.bridge.feed({
    onFeed: rooms => t.answers.push(Object.fromEntries([...rooms].map(([r, e]) => [r, {...e}]))),
    onEvent: e => t.got.push(['feed', e.room, e.seq]),
  });
  t.subscribe = room => {
    t.sub = t.bridge.subscribe(room, {onEvent: e => t.got.push(['sub', e.room, e.seq]),
                                      onSubscribed: f => { t.subscribed = f; }});
  };
  done(true);
}, err => done(String(err)));
"""


@pytest.mark.slow
async def test_a_page_gets_each_event_once_through_the_feed_or_its_subscription(
        db_url: str, conn: AsyncConn) -> None:
    """client.js against the daemon: the feed hands over the events of its rooms; a subscribe
    to one of them takes it over (its events reach the subscription only, from where the feed
    stopped) and its unsubscribe gives it back, with no gap and nothing twice; after a
    reconnect (the token expires: 4001) the feed is asked again and goes on."""
    viewer, alice = await make_user(conn), await make_user(conn)
    a, b = await make_room(conn, viewer, alice), await make_room(conn, viewer, alice)
    for _ in range(2):
        await post(conn, a, alice)
    tokens = [mint_token(SECRET, viewer, ttl=6), mint_token(SECRET, viewer, ttl=3600)]
    expires = time.monotonic() + 6
    async with running_bridge(db_url, demo=True) as bridge, async_chromium() as driver:
        # the demo page without a token opens no connection: a page of the bridge's origin
        await asyncio.to_thread(driver.get, f"http://127.0.0.1:{bridge.port}/")
        assert await run_async(driver, START_FEED, tokens) is True
        start = {room: await head(conn, room) for room in (a, b)}
        answer = await page_until(driver, "window.t.answers[0]", "the feed's answer")
        assert answer == {a: {"head": start[a], "acked": 0, "unread": 2},
                          b: {"head": start[b], "acked": 0, "unread": 0}}

        async def holds(phase: str) -> list[list[Any]]:
            """Every event since the answer reached the page once, in order per room."""
            n = sum([await head(conn, room) - start[room] for room in (a, b)])
            got: list[list[Any]] = await page_until(
                driver, f"window.t.got.length >= {n} && window.t.got", phase)
            for room in (a, b):
                seqs = [seq for _, r, seq in got if r == room]
                assert seqs == list(range(start[room] + 1, await head(conn, room) + 1)), (
                    phase, got)
            return got

        await post(conn, a, alice)
        await post(conn, b, alice)
        await holds("the feed's events")
        await page_value(driver, f"window.t.subscribe('{a}');")
        subscribed = await page_until(driver, "window.t.subscribed", "the subscription")
        assert subscribed["from"] == start[a] + 1  # after what the feed handed over
        for room in (a, b, a):
            await post(conn, room, alice)
        got = await holds("events while a subscription holds room a")
        assert [via for via, r, _ in got[2:] if r == a] == ["sub", "sub"]
        await page_value(driver, "window.t.sub.unsubscribe();")
        for room in (a, b):
            await post(conn, room, alice)
        got = await holds("room a given back to the feed")
        assert [via for via, r, _ in got if r == a][-1] == "feed"

        # the first token expires: the client reconnects and asks for the feed again
        await page_until(driver, "window.t.closes.includes(4001) && window.t.answers[1]",
                         "a second answer after 4001",
                         timeout=max(0.0, expires - time.monotonic()) + 20)
        for room in (a, b):
            await post(conn, room, alice)
        await holds("after the reconnect")
