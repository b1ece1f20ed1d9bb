"""No database role but the owner can forge, rewrite or silence events (docs/design.md, "Trust
boundaries"; docs/topics/security.md, "Database roles").

Three roles, as in production: the owner (the test's superuser, runs setup), the application
(``setup_db.py --grant-app``) and the bridge (``--grant-bridge``; the daemon under test connects
as it), plus a role with no privilege at all. Each attack is run as the application role and as
the role without privilege against a real daemon; the subscriber must then receive exactly the
real events, in order, and nothing else, and the log and the room counters must hold exactly
what the real writes made.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from daemon.app import Bridge
from daemon.db import describe
from daemon.errors import DatabaseError, SchemaError
from daemon.roles import Grants
from daemon.schema import apply_schema, check_schema
from tests.support.fixtures import ROOT, conninfo_env, running_bridge
from tests.support.helpers import (
    connect,
    events,
    head,
    make_room,
    make_user,
    notify_trust,
    post,
    recv,
    send,
    subscribe,
)
from tests.support.procs import run_cli, until
from tests.support.trust import Roles, TrustDB, connected, setup_room

AsyncConn = psycopg.AsyncConnection[Any]


@pytest.fixture
async def bridge(trust_db: TrustDB) -> AsyncIterator[Bridge]:
    """The daemon, connected as the bridge role."""
    async with running_bridge(trust_db.bridge) as b:
        yield b


def forged_count(bridge: Bridge) -> float:
    """Payloads the daemon rejected: checked and failed, or shed unchecked past its budget."""
    return float(bridge.metrics.forged_notifies._value.get()) + float(
        bridge.metrics.shed_notifies._value.get())


async def room_log(owner: AsyncConn, room: str) -> list[tuple[int, str, str]]:
    cur = await owner.execute("SELECT seq, table_name, row_id FROM change_events "
                              "WHERE room_id = %s ORDER BY seq", [room])
    return [(int(s), str(t), str(r)) for s, t, r in await cur.fetchall()]


async def expect_exactly(ws: Any, app: AsyncConn, room: str, user: str, start: int,
                         owner: AsyncConn, n: int = 3) -> None:
    """Write ``n`` real messages; the subscriber gets exactly them, as seqs start+1.., and the
    room's log holds exactly what was really written."""
    ids = [await post(app, room, user, f"real {i}") for i in range(n)]
    got = await events(ws, n)
    assert [(e["seq"], e["id"], e["data"]["content"]) for e in got] == [
        (start + 1 + i, ids[i], f"real {i}") for i in range(n)]
    assert all(set(e) == {"type", "room", "seq", "table", "op", "id", "data", "ts"} for e in got)
    await send(ws, type="ping", ref="end")
    assert await recv(ws) == {"type": "pong", "ref": "end"}  # nothing else was queued before
    log = await room_log(owner, room)
    assert [seq for seq, _, _ in log] == list(range(1, len(log) + 1))
    assert log[-n:] == [(start + 1 + i, "messages", ids[i]) for i in range(n)]
    assert await head(owner, room) == start + n


# --- forged NOTIFY ----------------------------------------------------------------------------

@pytest.mark.slow
async def test_forged_notifies_change_nothing_a_subscriber_receives(
        trust_db: TrustDB, bridge: Bridge, attacker: str) -> None:
    """A forged event with the room's next seq (extra keys, markup), a forged membership DELETE,
    a pointer far ahead, a seq spray and a garbage signature: before the fix the first was
    delivered as sent and the real event with its seq dropped, the second kicked the subscriber,
    the pointer and the spray silenced the room."""
    user, room, ws, start = await setup_room(trust_db, bridge)
    forged_before = forged_count(bridge)
    async with (connected(trust_db.owner) as owner, connected(trust_db.app) as app,
                connected(trust_db.as_role(attacker)) as evil):
        channel, _ = await notify_trust(owner)
        frame = {"type": "event", "room": room, "seq": start + 1, "table": "messages",
                 "op": "INSERT", "id": "forged", "evil": True, "ts": "2026-01-01T00:00:00+00:00",
                 "data": {"content": "<img src=x onerror=alert(1)>", "user_id": user}}
        kick = dict(frame, table="channel_members", op="DELETE", data={"user_id": user,
                                                                       "channel_id": room})
        payloads = [json.dumps(frame), json.dumps(kick),
                    json.dumps({"room": room, "seq": start + 1000}),
                    *(json.dumps({"room": room, "seq": start + k}) for k in range(1, 40)),
                    *(json.dumps(dict(frame, seq=start + k)) for k in range(1, 40)),
                    "0" * 64 + json.dumps(frame), "f" * 64 + json.dumps(kick),
                    json.dumps({"access": "user", "user": user})]
        for payload in payloads:
            await evil.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        await expect_exactly(ws, app, room, user, start, owner)
    # each counted: checked, or shed past the budget (with the real payloads behind them)
    assert forged_count(bridge) - forged_before >= len(payloads)
    await ws.close()


async def test_a_replayed_signed_payload_is_not_delivered_twice(
        trust_db: TrustDB, bridge: Bridge, attacker: str) -> None:
    """Anyone may LISTEN and copy a real, signed payload; sending it again gains nothing."""
    user, room, ws, start = await setup_room(trust_db, bridge)
    async with (connected(trust_db.owner) as owner, connected(trust_db.app) as app,
                connected(trust_db.as_role(attacker)) as evil):
        channel, _ = await notify_trust(owner)
        await evil.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        await post(app, room, user, "copied")
        await events(ws, 1)
        copied = None
        async for note in evil.notifies(timeout=10):
            if room in note.payload:
                copied = note.payload
                break
        assert copied is not None
        for _ in range(3):
            await evil.execute("SELECT pg_notify(%s, %s)", (channel, copied))
        await expect_exactly(ws, app, room, user, start + 1, owner)
    await ws.close()


# --- forged or rewritten log ------------------------------------------------------------------

WRITES_OF_THE_LOG = [
    "INSERT INTO change_events (room_id, seq, table_name, op, row_id, payload) "
    "VALUES (%(room)s, %(seq)s, 'messages', 'INSERT', 'forged', '{}')",
    "UPDATE change_events SET payload = '{\"content\": \"rewritten\"}' WHERE room_id = %(room)s",
    "DELETE FROM change_events WHERE room_id = %(room)s",
    "UPDATE change_sequences SET last_seq = last_seq + 1000 WHERE room_id = %(room)s",
    "UPDATE change_sequences SET last_seq = last_seq - 2 WHERE room_id = %(room)s",
    "INSERT INTO change_sequences (room_id, last_seq) VALUES ('01HZZZZZZZZZZZZZZZZZZZZZZZ', 5)",
    "SELECT key FROM change_notify_key",
    "UPDATE change_notify_key SET key = '\\x00'",
    "DELETE FROM schema_migrations",
    "TRUNCATE change_events",
]


async def test_only_the_triggers_write_the_log(
        trust_db: TrustDB, bridge: Bridge, attacker: str) -> None:
    """Before, the application role needed INSERT/UPDATE on the log because the capture trigger
    ran with the writer's rights: it could insert an event for any room, rewrite a past
    payload, or move a counter (back by 2: every later write to the room failed)."""
    user, room, ws, start = await setup_room(trust_db, bridge)
    async with (connected(trust_db.owner) as owner, connected(trust_db.app) as app,
                connected(trust_db.as_role(attacker)) as evil):
        before = await room_log(owner, room)
        for statement in WRITES_OF_THE_LOG:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await evil.execute(statement, {"room": room, "seq": start + 1})
        assert await room_log(owner, room) == before
        await expect_exactly(ws, app, room, user, start, owner)
    await ws.close()


async def test_the_application_role_cannot_attach_the_capture_function_to_its_own_table(
        trust_db: TrustDB, bridge: Bridge, attacker: str) -> None:
    """The capture function runs as the owner; attached to a table of the attacker's, it would
    write any room's log and sign what it sends. Nobody but the owner may EXECUTE it."""
    async with connected(trust_db.as_role(attacker)) as evil:
        await evil.execute("CREATE TEMP TABLE bait (id varchar(26), channel_id varchar(26))")
        for function in ("pgbridge_capture('channel_id')", "pgbridge_user_gone()",
                         "pgbridge_member_joined()"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await evil.execute(f"CREATE TRIGGER bait_capture AFTER INSERT ON bait FOR EACH "
                                   f"ROW EXECUTE FUNCTION public.{function}")


# --- pg_temp ----------------------------------------------------------------------------------

async def test_temporary_tables_do_not_capture_or_redirect_events(
        trust_db: TrustDB, bridge: Bridge) -> None:
    """The capture functions' search_path is "public", pg_temp: a temporary change_events took
    the session's events (live delivery, nothing in the log), and a temporary messages table
    put a reaction into a room the writer is not in."""
    user, room, ws, start = await setup_room(trust_db, bridge)
    async with (connected(trust_db.owner) as owner, connected(trust_db.app) as app):
        other_user = await make_user(app)
        other_room = await make_room(app, other_user)
        message = await post(app, room, user, "react to me")
        [event] = await events(ws, 1)
        assert event["id"] == message
        other_before = await room_log(owner, other_room)
        await app.execute("CREATE TEMP TABLE change_events (room_id varchar(26), seq bigint, "
                          "table_name text, op text, row_id text, payload jsonb, "
                          "created_at timestamptz)")
        await app.execute("CREATE TEMP TABLE change_sequences (room_id varchar(26) PRIMARY KEY, "
                          "last_seq bigint)")
        await app.execute("CREATE TEMP TABLE change_notify_key (id boolean, key bytea, "
                          "ipad bytea, opad bytea)")
        await app.execute("INSERT INTO change_notify_key VALUES (true, '\\x00', '\\x00', "
                          "'\\x00')")
        await app.execute("CREATE TEMP TABLE messages (id varchar(26), channel_id varchar(26))")
        await app.execute("INSERT INTO pg_temp.messages VALUES (%s, %s)", (message, other_room))
        await app.execute("INSERT INTO public.reactions (message_id, user_id, emoji) "
                          "VALUES (%s, %s, '+1')", (message, user))
        [reaction] = await events(ws, 1)
        assert (reaction["seq"], reaction["table"], reaction["room"]) == (
            start + 2, "reactions", room)
        assert await room_log(owner, other_room) == other_before
        cur = await app.execute("SELECT count(*) FROM pg_temp.change_events")
        assert (await cur.fetchone() or (None,))[0] == 0
        await app.execute("DROP TABLE pg_temp.messages")  # or post() would write to it
        await expect_exactly(ws, app, room, user, start + 2, owner)
    await ws.close()


# --- the roles --------------------------------------------------------------------------------

async def test_the_bridge_role_runs_the_daemon_and_passes_the_schema_check(
        trust_db: TrustDB, bridge: Bridge) -> None:
    """Everything the daemon does (handshake, subscribe with replay, live events, acks,
    membership revocation) with only the --grant-bridge privileges."""
    await check_schema(trust_db.bridge)
    user, room, ws, start = await setup_room(trust_db, bridge)
    async with (connected(trust_db.owner) as owner, connected(trust_db.app) as app):
        await expect_exactly(ws, app, room, user, start, owner)
        await send(ws, type="ack", room=room, seq=start + 3)

        async def acked() -> bool:
            cur = await owner.execute("SELECT last_seq FROM sync_state WHERE user_id = %s "
                                      "AND room_id = %s", (user, room))
            return (await cur.fetchone() or (None,))[0] == start + 3

        await until(acked, "the ack in sync_state")
        ws2 = await connect(bridge.port, user)
        assert (await subscribe(ws2, room))["from"] == start + 3  # resumed from sync_state
        await app.execute("DELETE FROM channel_members WHERE channel_id = %s", [room])
        for sock in (ws, ws2):
            assert await recv(sock) == {"type": "unsubscribed", "room": room,
                                        "reason": "membership_revoked"}
        await ws2.close()
    await ws.close()


async def test_the_bridge_role_reads_no_personal_data_but_messages(trust_db: TrustDB) -> None:
    """The bridge reads messages (snapshots, daemon/snapshot.py; the log holds them anyway),
    and no other personal data; it writes no chat table."""
    async with connected(trust_db.bridge) as conn:
        await conn.execute("SELECT content FROM messages")
        for query in ("SELECT email FROM users",
                      "SELECT name FROM channels", "SELECT * FROM user_settings",
                      "INSERT INTO messages (channel_id, user_id, content) VALUES ('a','b','c')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await conn.execute(query)


async def test_a_daemon_role_without_the_bridge_grant_is_refused_in_one_line(
        trust_db: TrustDB, roles: Roles) -> None:
    with pytest.raises(DatabaseError) as refused:
        async with running_bridge(trust_db.nobody):
            pass
    message = str(refused.value)
    assert "change_notify_key" in message and f"--grant-bridge {roles.nobody}" in message
    assert "\n" not in message


async def test_a_bridge_role_granted_before_presence_is_refused_in_one_line(
        trust_db: TrustDB, roles: Roles) -> None:
    """A role granted by an older setup_db.py cannot call the presence functions: the daemon
    says how to fix it instead of failing to write presence for ever."""
    sync = "pgbridge_presence_sync(text, double precision, boolean, text[], double precision[])"
    async with connected(trust_db.owner) as owner:
        await owner.execute(sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM {}").format(
            sql.SQL(sync), sql.Identifier(roles.bridge)))
        try:
            with pytest.raises(DatabaseError) as refused:
                async with running_bridge(trust_db.bridge):
                    pass
        finally:
            await owner.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(
                sql.SQL(sync), sql.Identifier(roles.bridge)))
    message = str(refused.value)
    assert "presence" in message and f"--grant-bridge {roles.bridge}" in message
    assert refused.value.sqlstate == "42501" and "\n" not in message


async def test_the_bridge_role_cannot_write_presence_but_through_the_functions(
        trust_db: TrustDB) -> None:
    """The bridge role reads user_status and the presence tables; it writes them only through
    the presence functions (run as the owner). The application role calls none of them, and
    cannot make a user look online: 'online' is stored only when it is true."""
    async with connected(trust_db.bridge) as bridge, connected(trust_db.app) as app:
        for query in ("UPDATE user_status SET status = 'busy'",
                      "INSERT INTO presence_instances (instance_id, expires_at) "
                      "VALUES ('x', now())",
                      "DELETE FROM presence_sessions",
                      "SELECT pgbridge_presence_set('i', 'u', true, now())"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await bridge.execute(query)
        for query in ("SELECT pgbridge_presence_sync('i', 30, true, '{}', '{}')",
                      "SELECT pgbridge_presence_reap()",
                      "SELECT * FROM presence_sessions"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await app.execute(query)
        user = await make_user(app)
        await app.execute("INSERT INTO user_status (user_id, status) VALUES (%s, 'online')",
                          [user])
        cur = await app.execute("SELECT status FROM user_status WHERE user_id = %s", [user])
        assert (await cur.fetchone() or ("",))[0] == "offline"


# --- the channel name -------------------------------------------------------------------------

async def test_a_63_character_schema_name_gets_a_channel_that_works(
        trust_db: TrustDB) -> None:
    """pgbridge_<schema> is over 63 bytes from 55 characters on: every write failed."""
    schema = "s" * 63
    await apply_schema(trust_db.owner, schema=schema)
    async with connected(trust_db.owner) as owner, running_bridge(trust_db.owner,
                                                                  schema=schema) as b:
        channel, _ = await notify_trust(owner, schema)
        assert channel.startswith("pgbridge_") and len(channel.encode()) <= 63
        await owner.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        user = await make_user(owner)
        room = await make_room(owner, user)
        ws = await connect(b.port, user)
        start = int((await subscribe(ws, room))["from"])
        await expect_exactly(ws, owner, room, user, start, owner)
        await ws.close()


# --- key rotation -----------------------------------------------------------------------------

@pytest.mark.slow
async def test_a_rotated_key_loses_no_event(trust_db: TrustDB, create_database: Callable[[], str]
                                            ) -> None:
    """docs/topics/security.md: delete the key's row and run setup_db.py again. The key names
    the channels, so the triggers ring new ones, unheard until the daemon reads the key again
    (every 5 s) and LISTENs on them; the log fills what was rung meanwhile."""
    url = create_database()
    await apply_schema(url)
    async with connected(url) as owner, running_bridge(url) as b:
        user = await make_user(owner)
        room = await make_room(owner, user)
        ws = await connect(b.port, user)
        start = int((await subscribe(ws, room))["from"])
        old_channel, old_key = await notify_trust(owner)
        assert b.listener.channel == old_channel
        await owner.execute("DELETE FROM change_notify_key")
        await apply_schema(url)
        new_channel, new_key = await notify_trust(owner)
        assert new_key.fingerprint != old_key.fingerprint and new_channel != old_channel
        await expect_exactly(ws, owner, room, user, start, owner)

        async def switched() -> bool:
            return b.listener.channel == new_channel and b.listener.connected

        await until(switched, "the daemon on the new channel", timeout=15.0)
        await expect_exactly(ws, owner, room, user, start + 3, owner)
        await ws.close()


async def test_a_grant_leaves_exactly_the_role_s_privileges(trust_db: TrustDB,
                                                            roles: Roles) -> None:
    """A role given more by hand (here everything on the log) ends with exactly its set."""
    async with connected(trust_db.owner) as owner:
        await owner.execute(sql.SQL("GRANT ALL ON change_events, change_sequences TO {}").format(
            sql.Identifier(roles.app)))
    report = await apply_schema(trust_db.owner, grants=Grants(app=(roles.app,)))
    assert report.files == [] and report.warnings == []
    async with connected(trust_db.app) as app:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await app.execute("DELETE FROM change_events")


@pytest.mark.parametrize("who", ["missing", "owner"])
async def test_a_grant_to_a_missing_or_owning_role_is_refused(trust_db: TrustDB,
                                                             who: str) -> None:
    async with connected(trust_db.owner) as owner:
        cur = await owner.execute("SELECT current_user")
        current = str((await cur.fetchone() or ("",))[0])
    role = current if who == "owner" else "pgbridge_no_such_role"
    with pytest.raises(SchemaError) as refused:
        await apply_schema(trust_db.owner, grants=Grants(bridge=(role,)))
    assert ("does not exist" if who == "missing" else "roles of their own") in str(refused.value)


async def test_setup_db_grants_from_the_command_line(trust_db: TrustDB, roles: Roles,
                                                    tmp_path: Path) -> None:
    code, out, err = await run_cli(sys.executable, str(ROOT / "setup_db.py"), "--grant-app",
                                   roles.app, "--grant-bridge", roles.bridge,
                                   env=conninfo_env(trust_db.owner), cwd=tmp_path)
    assert code == 0, err
    assert out.splitlines() == [
        f"schema public at {describe(trust_db.owner)}: already up to date, nothing changed",
        f"granted role {roles.app} the application's privileges on schema public",
        f"granted role {roles.bridge} the bridge's privileges on schema public"]


# --- false presence (issue 25, attack 7) ------------------------------------------------------

async def test_false_presence_the_application_role_cannot_make_a_user_look_online_or_offline(
        trust_db: TrustDB) -> None:
    """``UPDATE user_status SET user_id = <a user who never connected>`` moved a connected
    user's 'online' row to that user (the truth trigger fired only on INSERT and UPDATE OF
    status): watchers saw them online, and the connected user, left without a row, offline.
    Every write the application role may make (INSERT; UPDATE of status, custom_status,
    last_seen, user_id; DELETE; DELETE then INSERT; upserts; a temporary presence_sessions) is
    made here against a real daemon, and a watcher's every presence frame is checked against
    the truth: who is connected, and the last_seen the bridge wrote. A fence (a custom_status
    written afterwards) shows that nothing false arrived before it: frames of one user in one
    room arrive in the order of the changes."""
    from tests.integration.test_presence import presence_of, until_frame, watch

    async with (connected(trust_db.owner) as owner, connected(trust_db.app) as app,
                running_bridge(trust_db.bridge, presence_grace=0.3) as bridge):
        watcher, online, never, other = [await make_user(app) for _ in range(4)]
        room = await make_room(app, watcher, online, never, other)
        online_ws = await connect(bridge.port, online)

        async def row(user: str) -> tuple[Any, ...] | None:
            cur = await owner.execute("SELECT status, last_seen, custom_status FROM user_status "
                                      "WHERE user_id = %s", [user])
            return await cur.fetchone()

        async def is_online() -> bool:
            return ((await row(online)) or ("",))[0] == "online"

        await until(is_online, "the connected user's row to say online")
        ws, snapshot = await watch(bridge.port, watcher, room)
        connected_users = {watcher, online}
        seen: dict[str, Any] = {f["user"]: f["last_seen"] for f in snapshot}
        assert seen[never] is None and seen[other] is None

        def truthful(frame: dict[str, Any]) -> None:
            user = frame["user"]
            if user == watcher and seen[user] is None:  # the bridge writes its coming online
                seen[user] = frame["last_seen"]
            assert frame["online"] is (user in connected_users), frame
            if frame["status"] in ("online", "offline"):
                assert frame["status"] == ("online" if frame["online"] else "offline"), frame
            assert frame["last_seen"] == seen[user], frame

        fences = 0

        async def fence(*users: str) -> None:
            nonlocal fences
            for user in users:
                fences += 1
                mark = f"fence {fences}"
                await app.execute("UPDATE user_status SET custom_status = %s WHERE user_id = %s",
                                  (mark, user))
                last, before = await until_frame(ws, presence_of(user, custom_status=mark))
                for frame in [*before, last]:
                    assert frame["type"] == "presence", frame
                    truthful(frame)

        users = {"online": online, "never": never, "other": other}
        # a row of a user who never connected: 'online' is stored as the truth, last_seen as
        # now() (the spec's default), not what the row says
        await app.execute("INSERT INTO user_status (user_id, status, last_seen) "
                          "VALUES (%(never)s, 'online', '2000-01-01')", users)
        status, last_seen, _ = await row(never) or ("", None, None)
        assert status == "offline" and last_seen.year > 2000
        frame, _ = await until_frame(ws, presence_of(never))
        seen[never] = frame["last_seen"]
        truthful(frame)
        await fence(never)

        refused = [
            "UPDATE user_status SET user_id = %(other)s WHERE user_id = %(online)s",  # the attack
            "UPDATE user_status SET user_id = %(other)s",
            "UPDATE user_status SET user_id = NULL WHERE user_id = %(online)s",
            "INSERT INTO user_status (user_id) VALUES (%(online)s) "
            "ON CONFLICT (user_id) DO UPDATE SET user_id = %(other)s",
        ]
        for statement in refused:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await app.execute(statement, users)
        stored = [
            "UPDATE user_status SET status = 'online' WHERE user_id = %(never)s",
            "UPDATE user_status SET status = 'offline' WHERE user_id = %(online)s",
            "UPDATE user_status SET last_seen = '2000-01-01'",
            "UPDATE user_status SET last_seen = now() + interval '1 day', status = 'online'",
            "UPDATE user_status SET custom_status = NULL",
            "INSERT INTO user_status (user_id, status, last_seen) VALUES (%(online)s, 'offline', "
            "'2000-01-01') ON CONFLICT (user_id) DO UPDATE SET status = EXCLUDED.status, "
            "last_seen = EXCLUDED.last_seen",
            "UPDATE user_status SET status = 'away' WHERE user_id = %(online)s",  # its own word
            "DELETE FROM user_status WHERE user_id = %(online)s",  # the row stays: truth again
            "DELETE FROM user_status",
        ]
        for statement in stored:
            await app.execute(statement, users)
            await fence(online, never)
        # DELETE then INSERT: the row never went, so the INSERT is refused
        with pytest.raises(psycopg.errors.UniqueViolation):
            async with app.transaction():
                await app.execute("DELETE FROM user_status WHERE user_id = %(online)s", users)
                await app.execute("INSERT INTO user_status (user_id, status) "
                                  "VALUES (%(online)s, 'offline')", users)
        # a temporary presence_sessions naming the user, and a temporary users table
        await app.execute("CREATE TEMP TABLE presence_sessions (instance_id text, user_id text)")
        await app.execute("INSERT INTO pg_temp.presence_sessions VALUES ('x', %(never)s)", users)
        await app.execute("CREATE TEMP TABLE users (id text)")
        await app.execute("UPDATE user_status SET status = 'online' WHERE user_id = %(never)s",
                          users)
        await app.execute("DELETE FROM user_status WHERE user_id = %(online)s", users)
        await app.execute("DROP TABLE pg_temp.presence_sessions, pg_temp.users")
        await fence(online, never)
        assert await row(other) is None
        assert [(await row(u) or ("",))[0] for u in (online, never)] == ["online", "offline"]

        # the bridge itself still writes through the guard: the user goes offline
        await online_ws.close()
        connected_users.discard(online)
        frame, before = await until_frame(ws, presence_of(online, online=False))
        assert frame["status"] == "offline" and frame["last_seen"] != seen[online]
        for earlier in before:
            assert earlier["type"] == "presence" and earlier["user"] != online, earlier
        seen[online] = frame["last_seen"]
        await fence(online)
        await ws.close()


# --- silent gap through sync_state (issue 25, attack 6) ---------------------------------------

async def stored_cursor(owner: AsyncConn, user: str, room: str) -> int | None:
    cur = await owner.execute("SELECT last_seq FROM sync_state WHERE user_id = %s AND room_id = %s "
                              "AND sync_type = 'events'", (user, room))
    row = await cur.fetchone()
    return None if row is None else int(row[0])


async def acked_through(ws: Any, owner: AsyncConn, user: str, room: str, seq: int) -> None:
    """Ack ``seq`` and wait until the bridge wrote it."""
    await send(ws, type="ack", room=room, seq=seq)

    async def written() -> bool:
        return await stored_cursor(owner, user, room) == seq

    await until(written, f"the ack of {seq} in sync_state")


async def test_silent_gap_through_sync_state_the_application_role_cannot_move_a_cursor(
        trust_db: TrustDB, bridge: Bridge) -> None:
    """Before, ``UPDATE sync_state SET last_seq = 9e18`` as the application role made a victim
    who resumes without ``since`` get ``subscribed from=9 head=9``: 5 events missed in silence.
    Every other way to the same end is tried too: the resume columns, the row's other columns
    (to another user or sync_type, so that the victim resumes from the head or someone else's
    cursor), DELETE, DELETE then INSERT, an upsert on the row's id, NULLs, a temporary
    sync_state. The victim then resumes exactly after what it acknowledged."""
    user, room, ws, start = await setup_room(trust_db, bridge)
    async with (connected(trust_db.owner) as owner, connected(trust_db.app) as app):
        await expect_exactly(ws, app, room, user, start, owner, n=4)
        await acked_through(ws, owner, user, room, start + 4)
        await ws.close()
        missed = [await post(app, room, user, f"while away {i}") for i in range(5)]
        other = await make_user(app)
        cur = await owner.execute("SELECT id FROM sync_state WHERE user_id = %s AND room_id = %s",
                                  (user, room))
        row_id = str((await cur.fetchone() or ("",))[0])
        args = {"user": user, "room": room, "other": other, "id": row_id, "far": 9 * 10**18}
        refused = [
            "UPDATE sync_state SET last_seq = %(far)s WHERE user_id = %(user)s",  # the attack
            "UPDATE sync_state SET last_seq = last_seq + 5",
            "UPDATE sync_state SET last_seq = NULL",
            "UPDATE sync_state SET room_id = NULL WHERE user_id = %(user)s",
            "UPDATE sync_state SET sync_type = 'full' WHERE user_id = %(user)s",
            "UPDATE sync_state SET user_id = %(other)s WHERE user_id = %(user)s",
            "UPDATE sync_state SET metadata = '{}', last_sync = now()",
            "DELETE FROM sync_state WHERE user_id = %(user)s",
            "DELETE FROM sync_state",
            "TRUNCATE sync_state",
            "INSERT INTO sync_state (user_id, room_id, sync_type, last_seq) "
            "VALUES (%(other)s, %(room)s, 'events', %(far)s)",
            "INSERT INTO sync_state (user_id, sync_type, last_seq) "
            "VALUES (%(user)s, 'events', %(far)s)",
            "INSERT INTO sync_state (id, user_id, sync_type) VALUES (%(id)s, %(other)s, 'full') "
            "ON CONFLICT (id) DO UPDATE SET user_id = EXCLUDED.user_id",
            "INSERT INTO sync_state (id, user_id, sync_type) VALUES (%(id)s, %(other)s, 'full') "
            "ON CONFLICT (id) DO UPDATE SET sync_type = 'incremental'",
        ]
        for statement in refused:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await app.execute(statement, args)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with app.transaction():  # DELETE then INSERT
                await app.execute("DELETE FROM sync_state WHERE id = %(id)s", args)
                await app.execute("INSERT INTO sync_state (user_id, sync_type) "
                                  "VALUES (%(user)s, 'events')", args)
        # The spec's rows stay the application's: a row without room_id, which no resume reads.
        await app.execute("INSERT INTO sync_state (user_id, sync_type, metadata) "
                          "VALUES (%(user)s, 'events', '{\"last_seq\": 9e18}')", args)
        await app.execute("UPDATE sync_state SET last_sync = now(), sync_type = 'full', "
                          "metadata = '{}' WHERE user_id = %(user)s AND room_id IS NULL", args)
        await app.execute("DELETE FROM sync_state WHERE user_id = %(user)s AND room_id IS NULL",
                          args)
        # a temporary sync_state is the attacker's session's alone
        await app.execute("CREATE TEMP TABLE sync_state (user_id varchar(26), room_id "
                          "varchar(26), sync_type text, last_seq bigint)")
        await app.execute("INSERT INTO pg_temp.sync_state VALUES (%(user)s, %(room)s, 'events', "
                          "%(far)s)", args)
        assert await stored_cursor(owner, user, room) == start + 4

        ws = await connect(bridge.port, user)
        resumed = await subscribe(ws, room)
        assert (resumed["from"], resumed["head"]) == (start + 4, start + 9)
        got = await events(ws, 5)
        assert [(e["seq"], e["id"]) for e in got] == [
            (start + 5 + i, missed[i]) for i in range(5)]
        await expect_exactly(ws, app, room, user, start + 9, owner)
        await app.execute("DROP TABLE pg_temp.sync_state")
        # cascades (as the owner) still clear a deleted room's resume rows
        await app.execute("DELETE FROM channels WHERE id = %s", [room])
        assert await stored_cursor(owner, user, room) is None
    await ws.close()


async def test_a_stored_cursor_ahead_of_the_head_is_refused_logged_and_replaced(
        trust_db: TrustDB, bridge: Bridge, caplog: pytest.LogCaptureFixture) -> None:
    """A cursor past the room's head was never written by a bridge (acks never pass what was
    delivered): here the owner (a superuser) writes one by hand, by UPDATE and by INSERT.
    Before, a client resuming without ``since`` started at the head and missed, in silence,
    everything after its real ack. Now the subscribe is refused with ``cursor_expired`` (the
    client resyncs and subscribes with ``since`` = head), the bridge logs ``cursor_ahead``, and
    the client's next ack replaces the cursor, so later resumes work again."""
    user, room, ws, start = await setup_room(trust_db, bridge)
    async with (connected(trust_db.owner) as owner, connected(trust_db.app) as app):
        await expect_exactly(ws, app, room, user, start, owner, n=2)
        await acked_through(ws, owner, user, room, start + 1)
        await ws.close()
        newcomer = await make_user(app)
        await app.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                          (room, newcomer))
        head_now = start + 3  # the membership is an event of the room too
        await owner.execute("UPDATE sync_state SET last_seq = %s WHERE user_id = %s "
                            "AND room_id = %s", (9 * 10**18, user, room))
        await owner.execute("INSERT INTO sync_state (user_id, room_id, sync_type, last_seq) "
                            "VALUES (%s, %s, 'events', %s)", (newcomer, room, head_now + 1000))
        for who, stored in ((user, 9 * 10**18), (newcomer, head_now + 1000)):
            ws = await connect(bridge.port, who)
            caplog.clear()
            await send(ws, type="subscribe", room=room, ref="resume")
            refused = await recv(ws)
            assert refused["type"] == "error", refused
            assert (refused["type"], refused["code"], refused["ref"], refused["room"]) == (
                "error", "cursor_expired", "resume", room), refused
            assert f"since={head_now}" in refused["message"]
            [record] = [r for r in caplog.records if getattr(r, "event", "") == "cursor_ahead"]
            assert (record.user, record.room, record.acked, record.head) == (  # type: ignore[attr-defined]
                who, room, stored, head_now)
            # the client resyncs and subscribes from the head; its next ack replaces the cursor
            assert (await subscribe(ws, room, since=head_now))["from"] == head_now
            await expect_exactly(ws, app, room, user, head_now, owner, n=1)
            head_now += 1
            await acked_through(ws, owner, who, room, head_now)
            await ws.close()
            ws = await connect(bridge.port, who)
            assert (await subscribe(ws, room))["from"] == head_now
            await ws.close()


async def test_an_application_role_granted_by_an_older_setup_db_cannot_write_resume_rows(
        trust_db: TrustDB, bridge: Bridge, roles: Roles) -> None:
    """A role granted before the resume columns were the bridge's holds UPDATE and DELETE on the
    whole of sync_state until --grant-app runs again; the trigger refuses it the resume rows
    meanwhile (it reads no log), and the grant then takes the columns away."""
    user, room, ws, start = await setup_room(trust_db, bridge)
    async with (connected(trust_db.owner) as owner, connected(trust_db.app) as app):
        await expect_exactly(ws, app, room, user, start, owner, n=1)
        await acked_through(ws, owner, user, room, start + 1)
        await owner.execute(sql.SQL("GRANT ALL ON sync_state TO {}").format(
            sql.Identifier(roles.app)))
        try:
            for statement in ("UPDATE sync_state SET last_seq = 9000000000000000000",
                              "DELETE FROM sync_state WHERE room_id = %(room)s",
                              "INSERT INTO sync_state (user_id, room_id, sync_type, last_seq) "
                              "VALUES (%(user)s, %(room)s, 'full', 1)"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    await app.execute(statement, {"room": room, "user": user})
        finally:
            await apply_schema(trust_db.owner, grants=Grants(app=(roles.app,)))
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
            await app.execute("UPDATE sync_state SET last_seq = 9000000000000000000")
        assert "permission denied" in str(refused.value)  # the column privilege, now
        assert await stored_cursor(owner, user, room) == start + 1
    await ws.close()
