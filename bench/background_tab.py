#!/usr/bin/env python3
"""Whether the JavaScript client stays connected, and loses nothing, in a browser tab hidden
for minutes (docs/benchmarks/background-tab.md). Not a test: it runs about 7 minutes.

    python -m bench.background_tab [--dsn DSN] [--hidden 420] [--every 10]
                                   [--quiet-from 240] [--quiet-until 390]

Browsers throttle the timers of hidden tabs: Chrome runs them at most once a second at once,
and, after 5 minutes hidden ("intensive wake-up throttling"), at most once a minute. The
client's liveness check (``pingInterval``: a ``ping`` after a silent interval, a reconnect
after a second one) and its acks run on timers; the server's WebSocket pings are answered by
the browser itself. ChromeDriver turns that throttling off (it starts Chromium with
``--disable-background-timer-throttling`` and ``--disable-backgrounding-occluded-windows``):
this script takes those two switches out again (``excludeSwitches``), so the hidden tab is
throttled as in a user's Chrome (a 100 ms timer chain then runs once a second, and after 5
minutes once a minute; headless Chromium 156 measured).

A page on its own origin (a static server of this process; ``PGBRIDGE_ALLOWED_ORIGINS``
admits it) imports ``/client.js`` from the daemon (a subprocess, default settings otherwise),
subscribes to a room and records every state change, error, event (with the time it arrived),
frame it sends (``ping``, ``ack``, … through a WebSocket subclass), the gaps of a 1-second timer
chain, and its ``visibilitychange``s. Headless Chromium (tests/support/browser.py's flags) opens
a second tab, which hides the first, for ``--hidden`` seconds, while this process posts a
message into the room every ``--every`` seconds (the message carries its commit time), except
from ``--quiet-from`` to ``--quiet-until`` seconds: a silence longer than the heartbeat while
the timers run once a minute, in which the client's liveness check must ``ping``. Then it
switches back and reads the record.

Reported: how long the tab was hidden (from its own ``visibilitychange``s), the longest timer
gap while hidden (throttling in effect), state changes, errors and reconnections, and the
messages: posted, received, missing, received twice, out of order, and the delay from commit
to arrival while hidden (p50, max). The database is ``--dsn``, else the embedded PostgreSQL; a
scratch database is created and dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from bench.common import SECRET, clean_env, free_port, process, scratch_database, server_conninfo
from daemon.auth import mint_token
from daemon.schema import apply_schema_sync
from tests.support.browser import CHROMIUM_FLAGS, StaticServer, browser_paths

PAGE = """<!doctype html><meta charset="utf-8"><title>pgbridge in a background tab</title>
<body><script type="module">
const q = new URLSearchParams(location.hash.slice(1));
const t = window.t = {visibility: [[document.visibilityState, Date.now()]], states: [],
                      errors: [], events: [], gaps: [], reconnects: 0};
document.addEventListener("visibilitychange",
  () => t.visibility.push([document.visibilityState, Date.now()]));
let last = Date.now();
(function tick() {  // a chain of 1-second timers, as Chrome's throttling sees them
  const now = Date.now();
  t.gaps.push([now, now - last]);
  last = now;
  setTimeout(tick, 1000);
})();
const {PgBridge} = await import(q.get("bridge") + "/client.js");
t.sent = [];
class CountingWebSocket extends WebSocket {  // the frames the client sends, when
  send(data) { t.sent.push([JSON.parse(data).type, Date.now()]); super.send(data); }
}
t.bridge = new PgBridge(q.get("bridge") + "/ws", {token: q.get("token"),
                                                   WebSocket: CountingWebSocket});
t.bridge.addEventListener("state", (e) => t.states.push([e.detail.state, e.detail.code,
                                                         Date.now()]));
t.bridge.addEventListener("error", (e) => t.errors.push([e.detail, Date.now()]));
t.bridge.addEventListener("reconnect", () => { t.reconnects += 1; });
t.sub = t.bridge.subscribe(q.get("room"), {
  onSubscribed: (f) => { t.subscribed = (t.subscribed ?? 0) + 1; t.from ??= f.from; },
  onEvent: (e) => t.events.push([e.seq, e.data.content, Date.now()]),
});
</script>"""
OTHER = "<!doctype html><title>another tab</title><p>another tab</p>"


@contextlib.contextmanager
def throttled_chromium() -> Iterator[Any]:
    """Headless Chromium as tests/support/browser.py starts it, but with the background-tab
    throttling of a user's Chrome (ChromeDriver's two switches that turn it off left out)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium_path, driver_path = browser_paths()
    profile = tempfile.mkdtemp(prefix="pgbridge-bench-chromium-")
    options = Options()
    options.binary_location = chromium_path
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.add_experimental_option("excludeSwitches", [
        "disable-background-timer-throttling", "disable-backgrounding-occluded-windows"])
    service = Service(executable_path=driver_path, log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_script_timeout(60)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver: Any, script: str, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return {script};")
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"background_tab: timed out waiting for {what}")


def setup(db: str) -> tuple[str, str, str]:
    """(reader, writer, room): two users, members of one room."""
    apply_schema_sync(db, schema="public")
    with psycopg.connect(db, autocommit=True) as conn:
        reader, writer, room = (str(row[0]) for row in conn.execute(
            "WITH u AS (INSERT INTO users (auth0_id, email, username) VALUES "
            "('bench|r', 'r@bench.test', 'reader'), ('bench|w', 'w@bench.test', 'writer') "
            "RETURNING id), c AS (INSERT INTO channels (name) VALUES ('background') "
            "RETURNING id) SELECT id FROM u UNION ALL SELECT id FROM c").fetchall())
        for user in (reader, writer):
            conn.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                         (room, user))
    return reader, writer, room


def report(t: dict[str, Any], posted: list[tuple[int, str]], hidden_ms: tuple[int, int]) -> str:
    start, end = hidden_ms
    lines = []
    vis = t["visibility"]
    hidden_spans = [(a[1], b[1]) for a, b in itertools.pairwise(vis)
                    if a[0] == "hidden" and b[0] == "visible"]
    longest = max((b - a for a, b in hidden_spans), default=0)
    lines.append(f"tab hidden (its own visibilitychange): {longest / 1000:.1f} s in "
                 f"{len(hidden_spans)} span(s); visibility log {[v[0] for v in vis]}")
    gaps = [g for at, g in t["gaps"] if start <= at <= end]
    late = [g for at, g in t["gaps"] if start + 300_000 <= at <= end]
    lines.append(f"1-second timer while hidden: {len(gaps)} ticks, longest gap "
                 f"{max(gaps, default=0) / 1000:.1f} s; after 5 min hidden: {len(late)} ticks, "
                 f"longest gap {max(late, default=0) / 1000:.1f} s")
    states = [(s, c) for s, c, _at in t["states"]]
    lines.append(f"states: {states}; reconnects: {t['reconnects']}; subscribed "
                 f"{t.get('subscribed')} time(s)")
    lines.append(f"errors: {[e[0] for e in t['errors']]}")
    sent: dict[str, list[int]] = {}
    for kind, at in t["sent"]:
        if start <= at <= end:
            sent.setdefault(kind, []).append(at)
    lines.append("sent while hidden: " + ", ".join(
        f"{kind} x{len(times)} (at {', '.join(f'{(a - start) / 1000:.0f}' for a in times)} s)"
        for kind, times in sorted(sent.items())))
    got = [seq for seq, _content, _at in t["events"]]
    contents = [content for _seq, content, _at in t["events"]]
    want = [content for _n, content in posted]
    missing = [c for c in want if c not in contents]
    twice = len(contents) - len(set(contents))
    in_order = got == sorted(got) and len(set(got)) == len(got)
    lines.append(f"messages: posted {len(want)}, received {len(contents)}, missing "
                 f"{len(missing)}, received twice {twice}, seqs in order {in_order}")
    delays = [at - json.loads(content)["t"] for _seq, content, at in t["events"]
              if start <= json.loads(content)["t"] <= end]
    if delays:
        lines.append(f"commit to arrival while hidden: p50 {statistics.median(delays):.0f} ms, "
                     f"max {max(delays):.0f} ms ({len(delays)} messages)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", help="a PostgreSQL server (default: the embedded one)")
    parser.add_argument("--hidden", type=float, default=420.0, help="seconds hidden (420)")
    parser.add_argument("--every", type=float, default=10.0,
                        help="seconds between two messages posted while hidden (10)")
    parser.add_argument("--quiet-from", type=float, default=240.0,
                        help="no message from this second of the hidden time (240) ...")
    parser.add_argument("--quiet-until", type=float, default=390.0,
                        help="... until this one (390)")
    args = parser.parse_args()
    data_dir = Path(tempfile.gettempdir()) / "pgbridge-bench-background"
    with (server_conninfo(args.dsn, data_dir) as server,
          scratch_database(server, "background") as db,
          StaticServer({"/page.html": PAGE, "/other.html": OTHER}) as site):
        reader, writer, room = setup(db)
        port = free_port()
        env = clean_env() | {"DATABASE_URL": db, "PGBRIDGE_JWT_SECRET": SECRET,
                             "PGBRIDGE_PORT": str(port), "PGBRIDGE_ALLOWED_ORIGINS": site.origin}
        log = Path(tempfile.gettempdir()) / "pgbridge-bench-background.log"
        with (process([sys.executable, "-m", "daemon"], env, port, "pgbridge", log),
              throttled_chromium() as driver,
              psycopg.connect(db, autocommit=True) as conn):
            token = mint_token(SECRET, reader, ttl=3600)
            bridge = f"http://127.0.0.1:{port}"
            driver.get(site.url(f"/page.html#bridge={bridge}&token={token}&room={room}"))
            wait_for(driver, "window.t && t.subscribed === 1", "the page to subscribe")
            first = driver.current_window_handle
            driver.switch_to.new_window("tab")
            driver.get(site.url("/other.html"))
            hidden_at = int(time.time() * 1000)
            print(f"page subscribed; tab hidden for {args.hidden:g} s, a message every "
                  f"{args.every:g} s but from {args.quiet_from:g} s to {args.quiet_until:g} s",
                  flush=True)
            posted: list[tuple[int, str]] = []
            n = 0
            while (elapsed := time.time() - hidden_at / 1000) < args.hidden:
                if not args.quiet_from <= elapsed < args.quiet_until:
                    n += 1
                    content = json.dumps({"n": n, "t": int(time.time() * 1000)})
                    conn.execute("INSERT INTO messages (channel_id, user_id, content) "
                                 "VALUES (%s, %s, %s)", (room, writer, content))
                    posted.append((n, content))
                time.sleep(args.every)
            shown_at = int(time.time() * 1000)
            driver.close()
            driver.switch_to.window(first)
            wait_for(driver, f"t.events.length >= {len(posted)}", "every message", timeout=120)
            t = driver.execute_script(
                "return {visibility: t.visibility, states: t.states, errors: t.errors, "
                "events: t.events, gaps: t.gaps, reconnects: t.reconnects, "
                "subscribed: t.subscribed, sent: t.sent}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: "
          f"{os.cpu_count()} cores, {platform.system()} {platform.release()} "
          f"{platform.machine()}; Chromium {driver.capabilities.get('browserVersion')}")
    print(report(t, posted, (hidden_at, shown_at)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
