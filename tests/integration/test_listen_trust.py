"""LISTEN is not a secret channel, and NOTIFY floods (issue 25, attacks 4 and 5; docs/design.md,
"Trust boundaries"; docs/topics/security.md, "Secret channels", "NOTIFY floods").

Any role that can connect may LISTEN on any channel it can name, with no privilege check, and
NOTIFY on it. Before, the channels were named after the schema ('pgbridge', 'pgbridge.typing'):
a role that may not SELECT messages heard every message row and every typing signal's room and
user. Now every channel is derived from the schema's secret key. Each attack runs against a real
daemon (connected as the ``--grant-bridge`` role) and a real PostgreSQL, as the ``--grant-app``
role and as a role with no grant at all; the flood also as the bridge role, which can name the
channels.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
import websockets
from psycopg import sql
from psycopg.conninfo import make_conninfo

from daemon.app import Bridge
from daemon.errors import DatabaseError, SchemaError
from daemon.roles import Grants
from daemon.schema import apply_schema, check_schema
from tests.support.fixtures import ROOT, running_bridge
from tests.support.helpers import (
    channels,
    connect,
    events,
    make_room,
    make_user,
    post,
    recv,
    send,
    subscribe,
)
from tests.support.procs import until
from tests.support.trust import Roles, TrustDB, connected, setup_room

# What a role without the key can derive or guess: the channels of every version before, for
# the public schema and for --test, and the typing channels beside them.
OLD_NAMES = ("pgbridge", "pgbridge.typing", "pgbridge_public", "pgbridge_public.typing",
             "pgbridge_test", "pgbridge_test.typing")
SECRET = "SECRET-PLAN: launch at dawn"
# the functions that name the channels (sql/triggers/10_change_capture.sql, "Secret channels")
CHANNEL_CALLS = ("SELECT * FROM public.pgbridge_channels()",
                 "SELECT * FROM public.pgbridge_listen()",
                 "SELECT public.pgbridge_channel('\\x00', '\\x00', 'capture', 'public')")


@pytest.fixture
async def bridge(trust_db: TrustDB) -> AsyncIterator[Bridge]:
    """The daemon, connected as the bridge role."""
    async with running_bridge(trust_db.bridge) as b:
        yield b


def counted(bridge: Bridge, name: str) -> float:
    return bridge.metrics.registry.get_sample_value(name) or 0.0


def quoted_names(texts: list[str | None]) -> set[str]:
    """Every quoted identifier or string literal in ``texts``: a channel the attacker could
    have read in another session's query."""
    return {name for text in texts if text
            for name in re.findall(r"\"([^\"]{1,63})\"|'([^']{1,63})'", text) for name in name
            if name}


async def probed(bridge: Bridge) -> None:
    """Wait for the daemon's next probe round trip (a NOTIFY on its capture channel)."""
    before = bridge.listener.probed_at

    async def came() -> bool:
        return bridge.listener.probed_at != before

    await until(came, "a probe round trip")


@pytest.mark.slow
async def test_no_grant_role_hears_nothing_by_listening(
        trust_db: TrustDB, bridge: Bridge, attacker: str) -> None:
    """The attacker LISTENs on every name it can derive or guess (the old ones, whatever
    another session's query shows it) while a message, a typing signal, a presence hint, a
    user hint, the doorbell's notice and the daemon's probes flow, and hears nothing of them:
    a fence NOTIFY sent after all of them (NOTIFY is delivered in commit order) is the only
    notification it gets. It may not call the functions that name the channels either."""
    typist, room, ws, _ = await setup_room(trust_db, bridge)
    fence = f"fence_{uuid.uuid4().hex}"
    async with (connected(trust_db.owner) as owner, connected(trust_db.app) as app,
                connected(trust_db.as_role(attacker)) as evil):
        secret_names = set(await channels(owner))
        for call in CHANNEL_CALLS:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await evil.execute(call)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await evil.execute("SELECT key FROM change_notify_key")
        await probed(bridge)  # the daemon's statements have run: what do they show?
        cur = await evil.execute("SELECT query FROM pg_stat_activity "
                                 "WHERE pid <> pg_backend_pid()")
        visible = [query for (query,) in await cur.fetchall()]
        guesses = set(OLD_NAMES) | quoted_names(visible)
        assert not guesses & secret_names
        for name in (*guesses, fence):
            await evil.execute(sql.SQL("LISTEN {}").format(sql.Identifier(name)))

        watcher = await make_user(app)
        await app.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                          (room, watcher))
        assert (await events(ws, 1))[0]["table"] == "channel_members"
        watching = await connect(bridge.port, watcher)
        await subscribe(watching, room, presence=True)
        message = await post(app, room, typist, SECRET)
        await send(ws, type="typing", room=room)
        await app.execute("INSERT INTO user_status (user_id, status, custom_status) "
                          "VALUES (%s, 'busy', %s) ON CONFLICT (user_id) DO UPDATE "
                          "SET status = 'busy', custom_status = EXCLUDED.custom_status",
                          (typist, SECRET))
        seen: list[dict[str, Any]] = []
        deadline = asyncio.get_running_loop().time() + 30
        while not ({"event", "typing"} <= {f["type"] for f in seen}
                   and any(f["type"] == "presence" and f.get("custom_status") == SECRET
                           for f in seen)):
            try:
                seen.append(await recv(watching, 1))
            except TimeoutError:
                assert asyncio.get_running_loop().time() < deadline, seen
                if "typing" not in {f["type"] for f in seen}:
                    # typing is ephemeral: a signal relayed before the watcher's presence
                    # snapshot was sent is dropped for it (a loaded machine): type again
                    await send(ws, type="typing", room=room)
        assert any(f["type"] == "event" and f["id"] == message for f in seen)
        gone = await make_user(app)  # a user hint
        await app.execute("UPDATE users SET deleted_at = now() WHERE id = %s", [gone])
        await owner.execute("SELECT pgbridge_doorbell(1)")  # the quiet notice
        await probed(bridge)
        await owner.execute("SELECT pg_notify(%s, 'fence')", [fence])
        heard = []
        async for note in evil.notifies(timeout=10):
            heard.append((note.channel, note.payload))
            if note.channel == fence:
                break
        assert heard == [(fence, "fence")]
    await ws.close()
    await watching.close()


@pytest.mark.slow
async def test_the_daemon_s_statements_name_no_channel(trust_db: TrustDB,
                                                       bridge: Bridge) -> None:
    """pg_stat_activity shows a session's last statement to its own role, superusers and
    pg_read_all_stats: the bridge LISTENs through pgbridge_listen() and NOTIFYs with bound
    parameters, so even the owner (a superuser here) finds no channel name in any of them."""
    _, room, ws, _ = await setup_room(trust_db, bridge)
    await send(ws, type="typing", room=room)
    await probed(bridge)
    async with connected(trust_db.owner) as owner:
        names = set(await channels(owner))
        cur = await owner.execute("SELECT query FROM pg_stat_activity "
                                  "WHERE usename = current_user AND pid <> pg_backend_pid() "
                                  "OR usename <> current_user")
        queries = [query for (query,) in await cur.fetchall() if query]
    assert any("pgbridge_listen" in q for q in queries)  # the daemon's listener is there
    assert not [q for q in queries if any(name in q for name in names)]
    await ws.close()


async def test_only_the_bridge_role_may_name_the_channels(trust_db: TrustDB,
                                                          roles: Roles) -> None:
    """PUBLIC may EXECUTE a function unless revoked: none of the channel functions is, and the
    bridge role may call pgbridge_listen() only."""
    async with connected(trust_db.owner) as owner:
        capture, typing = await channels(owner)
    for who in ("app", "nobody"):
        async with connected(trust_db.as_role(who)) as conn:
            for call in CHANNEL_CALLS:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    await conn.execute(call)
    async with connected(trust_db.bridge) as conn:
        cur = await conn.execute("SELECT * FROM public.pgbridge_listen()")
        assert await cur.fetchone() == (capture, typing)
        cur = await conn.execute("SELECT pg_listening_channels() ORDER BY 1")
        assert sorted(r[0] for r in await cur.fetchall()) == sorted((capture, typing))
        for call in (CHANNEL_CALLS[0], CHANNEL_CALLS[2]):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await conn.execute(call)


def daemon_cpu() -> float:
    """CPU seconds of this process, user and system (the daemon runs in it; the test's own
    share while it waits is a few polls of a counter)."""
    return time.process_time()


FLOOD = 100_000  # forged NOTIFYs, sent by one statement in well under a second


@pytest.mark.slow
async def test_a_forged_flood_costs_bounded_cpu_and_real_events_still_arrive(
        trust_db: TrustDB, bridge: Bridge) -> None:
    """The bridge role can name the capture channel (it calls pgbridge_listen) and floods it
    with payloads that fail their signature check. Before, each was checked (1.6 s of CPU for
    300,000, real events 1.4 s late; here 8-9.5 us of CPU each); now at most REJECT_LIMIT per
    REJECT_WINDOW are, the rest are dropped unchecked and the log is read instead: the CPU per
    forged payload is about what receiving it costs (3.5-4.2 us here), and a real event sent
    behind the flood still arrives, once."""
    user, room, ws, start = await setup_room(trust_db, bridge)
    async with connected(trust_db.app) as app, connected(trust_db.bridge) as evil:
        cur = await evil.execute("SELECT capture FROM public.pgbridge_listen()")
        channel = str((await cur.fetchone() or ("",))[0])
        await evil.execute("UNLISTEN *")
        forged = json.dumps({"room": room, "seq": start + 1})
        before = counted(bridge, "pgbridge_forged_notifies_total") + counted(
            bridge, "pgbridge_shed_notifies_total")
        cpu = daemon_cpu()
        sent = time.monotonic()
        await evil.execute("SELECT pg_notify(%s, %s || n) FROM generate_series(1, %s) n",
                           (channel, "0" * 64 + forged, FLOOD))
        message = await post(app, room, user, "behind the flood")
        [event] = await events(ws, 1)
        late = time.monotonic() - sent
        assert (event["seq"], event["id"]) == (start + 1, message)

        async def all_counted() -> bool:
            return counted(bridge, "pgbridge_forged_notifies_total") + counted(
                bridge, "pgbridge_shed_notifies_total") - before >= FLOOD

        await until(all_counted, "every forged payload counted", timeout=60.0)
        cpu = daemon_cpu() - cpu
        checked = counted(bridge, "pgbridge_forged_notifies_total")
        print(f"\nforged flood of {FLOOD}: {cpu:.3f} s CPU ({cpu / FLOOD * 1e6:.2f} us each), "
              f"real event {late:.3f} s after the flood was sent, "
              f"{checked:.0f} checked in all, "
              f"{counted(bridge, 'pgbridge_shed_notifies_total'):.0f} shed")
        windows = (time.monotonic() - sent) / bridge.listener.rejects.window + 1
        # the bound on the CPU spent: at most REJECT_LIMIT payloads checked per window (the CPU
        # figure printed above is docs/topics/security.md's, not asserted: it moves with the
        # machine's load)
        assert checked <= windows * bridge.listener.rejects.limit
        await send(ws, type="ping", ref="end")
        assert await recv(ws) == {"type": "pong", "ref": "end"}  # nothing more, no duplicate
        post_id = await post(app, room, user, "after")
        [after] = await events(ws, 1)
        assert (after["seq"], after["id"]) == (start + 2, post_id)
    await ws.close()


async def test_a_no_grant_flood_on_every_guessable_name_reaches_no_daemon(
        trust_db: TrustDB, bridge: Bridge, attacker: str) -> None:
    """A role that cannot name the channels floods every name it can guess: the daemon hears
    none of it (nothing counted), and a real event sent behind it arrives."""
    user, room, ws, start = await setup_room(trust_db, bridge)
    async with (connected(trust_db.app) as app,
                connected(trust_db.as_role(attacker)) as evil):
        forged = "0" * 64 + json.dumps({"room": room, "seq": start + 1})
        before = (counted(bridge, "pgbridge_forged_notifies_total"),
                  counted(bridge, "pgbridge_shed_notifies_total"))
        heard = bridge.listener.heard_at
        for name in OLD_NAMES:
            await evil.execute("SELECT pg_notify(%s, %s || n) FROM generate_series(1, 10000) n",
                               (name, forged))
        message = await post(app, room, user, "behind the flood")
        [event] = await events(ws, 1)  # delivered in commit order: after the flood
        assert (event["seq"], event["id"]) == (start + 1, message)
        assert (counted(bridge, "pgbridge_forged_notifies_total"),
                counted(bridge, "pgbridge_shed_notifies_total")) == before
        assert bridge.listener.heard_at >= heard
    await ws.close()


async def test_a_shed_window_loses_no_hint(trust_db: TrustDB, bridge: Bridge) -> None:
    """While forged payloads are shed, a user deleted meanwhile loses the room before any later
    event is sent to them (the check of every connected user after the window), and events
    are read from the log."""
    user, room, ws, _ = await setup_room(trust_db, bridge)
    async with (connected(trust_db.app) as app, connected(trust_db.bridge) as evil):
        cur = await evil.execute("SELECT capture FROM public.pgbridge_listen()")
        channel = str((await cur.fetchone() or ("",))[0])
        await evil.execute("UNLISTEN *")
        other = await make_user(app)
        await app.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                          (room, other))
        assert (await events(ws, 1))[0]["table"] == "channel_members"
        victim = await connect(bridge.port, other)
        await subscribe(victim, room)
        shed = counted(bridge, "pgbridge_shed_notifies_total")
        flood = 2 * bridge.listener.rejects.limit + 1000
        await evil.execute("SELECT pg_notify(%s, 'x' || n) FROM generate_series(1, %s) n",
                           (channel, flood))
        await app.execute("UPDATE users SET deleted_at = now() WHERE id = %s", [other])
        await post(app, room, user, "after the deletion")
        [event] = await events(ws, 1)
        assert event["data"]["content"] == "after the deletion"
        assert counted(bridge, "pgbridge_shed_notifies_total") - shed >= (
            flood - 2 * bridge.listener.rejects.limit)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:  # closed before anything written after the deletion was sent
                frame = await recv(victim)
                assert frame["type"] != "event", frame
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4003
    await ws.close()



BEFORE = ROOT / "tests" / "data" / "before_secret_channels"  # the trigger files of 5864261


async def test_setup_db_moves_an_install_from_before_onto_the_secret_channels(
        create_database: Callable[[], str], roles: Roles) -> None:
    """An install made by the version before (its trigger files: channels 'pgbridge' and
    'pgbridge.typing', callable by anyone) leaks to a no-grant role; running setup_db.py again
    drops the old channel functions, rings only the secret channels, and the daemon (restarted
    on the new version) delivers."""
    url = create_database()
    grants = Grants(app=(roles.app,), bridge=(roles.bridge,))
    await apply_schema(url, grants=grants)
    app_url, nobody_url = (make_conninfo(url, user=r) for r in (roles.app, roles.nobody))
    try:
        async with connected(url) as owner:  # back to the version before
            for function in ("pgbridge_listen()", "pgbridge_channels()",
                             "pgbridge_channel(bytea, bytea, text, text)",
                             "pgbridge_member_joined() CASCADE"):  # and the feed's triggers
                await owner.execute(f"DROP FUNCTION public.{function}")
            await owner.execute("SET search_path TO public, pg_temp")
            for name in sorted(p.name for p in BEFORE.iterdir()):
                await owner.execute((BEFORE / name).read_text().encode())
        async with connected(app_url) as app, connected(nobody_url) as evil:
            user = await make_user(app)
            room = await make_room(app, user)
            await evil.execute("LISTEN pgbridge")
            await post(app, room, user, SECRET)
            leaked = [n.payload async for n in evil.notifies(timeout=10, stop_after=1)]
            assert SECRET in leaked[0]  # what attack 4 was

            report = await apply_schema(url, grants=grants)  # python setup_db.py
            assert {"triggers/10_change_capture.sql", "triggers/40_presence.sql"} <= set(
                report.files)
            async with connected(url) as owner:
                cur = await owner.execute(
                    "SELECT to_regprocedure('pgbridge_listen_channel(text)'), "
                    "to_regprocedure('pgbridge_typing_channel(text)')")
                assert await cur.fetchone() == (None, None)
            await check_schema(url)
            fence = f"fence_{uuid.uuid4().hex}"
            await evil.execute(sql.SQL("LISTEN {}").format(sql.Identifier(fence)))
            bridge_url = make_conninfo(url, user=roles.bridge)
            async with running_bridge(bridge_url) as b:
                ws = await connect(b.port, user)
                start = int((await subscribe(ws, room))["from"])
                message = await post(app, room, user, SECRET)
                [event] = await events(ws, 1)
                assert (event["seq"], event["id"]) == (start + 1, message)
                await ws.close()
            await app.execute("SELECT pg_notify(%s, 'fence')", [fence])
            heard = [n.channel async for n in evil.notifies(timeout=10, stop_after=1)]
            assert heard == [fence]
    finally:
        async with connected(url) as owner:
            await owner.execute(sql.SQL("DROP OWNED BY {}, {}, {}").format(
                *map(sql.Identifier, (roles.app, roles.bridge, roles.nobody))))


async def test_a_bridge_role_granted_before_the_secret_channels_is_refused_in_one_line(
        trust_db: TrustDB, roles: Roles) -> None:
    """A role granted by an older setup_db.py may not call pgbridge_listen(): the daemon says how
    to fix it instead of retrying a LISTEN that fails for ever."""
    listen = sql.SQL("FUNCTION public.pgbridge_listen()")
    async with connected(trust_db.owner) as owner:
        await owner.execute(sql.SQL("REVOKE EXECUTE ON {} FROM {}").format(
            listen, sql.Identifier(roles.bridge)))
        try:
            with pytest.raises(DatabaseError) as refused:
                async with running_bridge(trust_db.bridge):
                    pass
        finally:
            await owner.execute(sql.SQL("GRANT EXECUTE ON {} TO {}").format(
                listen, sql.Identifier(roles.bridge)))
    message = str(refused.value)
    assert "pgbridge_listen" in message and f"--grant-bridge {roles.bridge}" in message
    assert refused.value.sqlstate == "42501" and "\n" not in message


async def test_a_channel_function_open_to_public_fails_the_check_and_setup_db_closes_it(
        trust_db: TrustDB, roles: Roles) -> None:
    """A GRANT to PUBLIC by hand would let any role name the channels: the daemon's start-up
    check (and setup_db.py --verify) refuses the schema, and setup_db.py revokes it again."""
    async with connected(trust_db.owner) as owner:
        await owner.execute("GRANT EXECUTE ON FUNCTION pgbridge_channels() TO PUBLIC")
        with pytest.raises(SchemaError, match="pgbridge_channels names the secret NOTIFY"):
            await check_schema(trust_db.owner)
        await apply_schema(trust_db.owner, grants=Grants(app=(roles.app,),
                                                         bridge=(roles.bridge,)))
        await check_schema(trust_db.owner)
    async with connected(trust_db.nobody) as evil:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await evil.execute(CHANNEL_CALLS[0])
