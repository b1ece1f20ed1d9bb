"""The write receipt, ``pgbridge_receipt()`` (sql/triggers/10_change_capture.sql;
docs/howto/optimistic-send.md): inside the writer's transaction, exactly the events that
transaction has produced so far, with the seqs the bridges then deliver; savepoints honoured;
never another transaction's events, whatever the application role sets; bounded on a bulk
transaction; removed by the rollback.

Real PostgreSQL, the three roles of a production set-up (tests/support/trust.py), and for the
seq check the daemon connected as the bridge role with a real WebSocket client.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg import errors
from ulid import ULID

from daemon.app import Bridge
from tests.integration.test_js_client import node
from tests.support.fixtures import ROOT, conninfo_env, running_bridge
from tests.support.helpers import events, make_room, make_user, post, token
from tests.support.trust import Roles, TrustDB, connected, setup_room

AsyncConn = psycopg.AsyncConnection[Any]
Receipt = list[tuple[str, int, str, str, str]]


@pytest.fixture
async def bridge(trust_db: TrustDB) -> AsyncIterator[Bridge]:
    """The daemon, connected as the bridge role."""
    async with running_bridge(trust_db.bridge) as b:
        yield b


async def receipt(conn: AsyncConn) -> Receipt:
    cur = await conn.execute("SELECT * FROM pgbridge_receipt()")
    return [(r[0], int(r[1]), r[2], r[3], r[4]) for r in await cur.fetchall()]


async def logged(owner: AsyncConn, *rooms: str) -> Receipt:
    """The log of ``rooms`` as the owner reads it, in seq order per room."""
    cur = await owner.execute(
        "SELECT room_id, seq, table_name, op, row_id FROM change_events "
        "WHERE room_id = ANY(%s) ORDER BY created_at, room_id, seq", [list(rooms)])
    return [(r[0], int(r[1]), r[2], r[3], r[4]) for r in await cur.fetchall()]


async def room_with_user(trust_db: TrustDB) -> tuple[str, str]:
    async with connected(trust_db.app) as app:
        user = await make_user(app)
        return user, await make_room(app, user)


async def test_receipt_gives_the_seq_the_subscriber_then_receives(
        trust_db: TrustDB, bridge: Bridge) -> None:
    user, room, ws, start = await setup_room(trust_db, bridge)
    async with connected(trust_db.app) as app:
        async with app.transaction():
            mid = await post(app, room, user, "optimistic")
            got = await receipt(app)
    assert got == [(room, start + 1, "messages", "INSERT", mid)]
    (event,) = await events(ws, 1)
    assert (event["room"], event["seq"], event["table"], event["op"], event["id"]) == got[0]
    await ws.close()


@pytest.mark.slow
async def test_the_js_client_confirms_the_optimistic_id_with_the_receipt_s_seq(
        trust_db: TrustDB, bridge: Bridge) -> None:
    """clients/js/pgbridge.js in Node (tests/support/optimistic_send.mjs) against the daemon:
    sub.pending(id) resolves with the INSERT of the id the writer chose, its seq the one
    pgbridge_receipt() gave the writer; an id never written times out."""
    user, room = await room_with_user(trust_db)
    mid = str(ULID())
    proc = await asyncio.create_subprocess_exec(
        node(), "--experimental-websocket", str(ROOT / "tests/support/optimistic_send.mjs"),
        f"ws://127.0.0.1:{bridge.port}/ws", token(user), room, mid,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.strip() == b"subscribed", (line, await proc.stderr.read() if proc.stderr
                                               else b"")
        async with connected(trust_db.app) as app:
            async with app.transaction():
                await app.execute("INSERT INTO messages (id, channel_id, user_id, content) "
                                  "VALUES (%s, %s, %s, 'optimistic')", [mid, room, user])
                (got,) = await receipt(app)
        outcomes = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))
                    for _ in range(2)]
        assert sorted(outcomes, key=lambda o: str(o["id"])) == [
            {"id": mid, "seq": got[1], "op": "INSERT"},
            {"id": f"{mid}-never", "error": "timeout"}]
        assert got[:3] == (room, got[1], "messages")
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_receipt_lists_multi_row_multi_room_events_in_capture_order(
        trust_db: TrustDB) -> None:
    user, room_a = await room_with_user(trust_db)
    async with connected(trust_db.app) as app, connected(trust_db.owner) as owner:
        room_b = await make_room(app, user)
        async with app.transaction():
            m1 = await post(app, room_a, user)
            m2 = await post(app, room_b, user)
            await app.execute("INSERT INTO reactions (id, message_id, user_id, emoji) "
                              "VALUES (%s, %s, %s, 'x')", [str(ULID()), m2, user])
            # a row moved to another room: DELETE in the old room, then UPDATE in the new one
            await app.execute("UPDATE messages SET channel_id = %s WHERE id = %s", [room_b, m1])
            got = await receipt(app)
        assert [(r[0], r[3], r[4]) for r in got] == [
            (room_a, "INSERT", m1), (room_b, "INSERT", m2), (room_b, "INSERT", got[2][4]),
            (room_a, "DELETE", m1), (room_b, "UPDATE", m1)]
        assert [r[2] for r in got] == ["messages", "messages", "reactions", "messages",
                                       "messages"]
        # exactly the log's rows of this transaction (the rooms' creation came before it)
        assert sorted(got) == sorted(r for r in await logged(owner, room_a, room_b)
                                     if r[4] in (m1, m2, got[2][4]))


async def test_receipt_is_empty_without_events_and_holds_no_earlier_transaction(
        trust_db: TrustDB) -> None:
    user, room = await room_with_user(trust_db)
    async with connected(trust_db.app) as app:
        async with app.transaction():
            assert await receipt(app) == []
            # a write to a table that is not published produces no event
            await app.execute("INSERT INTO user_status (user_id) VALUES (%s)", [user])
            assert await receipt(app) == []
            mid = await post(app, room, user)
            assert [r[4] for r in await receipt(app)] == [mid]
        assert await receipt(app) == []  # autocommit, after the commit
        async with app.transaction():
            assert await receipt(app) == []
            second = await post(app, room, user)
            assert [r[4] for r in await receipt(app)] == [second]
        with pytest.raises(errors.CheckViolation):
            async with app.transaction():
                await post(app, room, user)
                await app.execute("UPDATE channel_members SET role = 'nope' WHERE user_id = %s",
                                  [user])
        async with app.transaction():  # a rolled-back transaction leaves nothing either
            assert await receipt(app) == []


async def test_receipt_drops_rolled_back_savepoints_and_keeps_released_ones_nested(
        trust_db: TrustDB) -> None:
    user, room = await room_with_user(trust_db)
    async with connected(trust_db.app) as app, connected(trust_db.owner) as owner:
        async with app.transaction():
            a = await post(app, room, user, "a")
            async with app.transaction():  # SAVEPOINT ... RELEASE
                b = await post(app, room, user, "b")
                with pytest.raises(errors.RaiseException):
                    async with app.transaction():  # SAVEPOINT ... ROLLBACK TO
                        await post(app, room, user, "c")
                        async with app.transaction():  # released into the rolled-back one
                            await post(app, room, user, "c2")
                        await app.execute("DO $$ BEGIN RAISE EXCEPTION 'no'; END $$")
                d = await post(app, room, user, "d")
            with pytest.raises(errors.RaiseException):
                async with app.transaction():
                    await post(app, room, user, "e")
                    await app.execute("DO $$ BEGIN RAISE EXCEPTION 'no'; END $$")
            got = await receipt(app)
        assert [r[4] for r in got] == [a, b, d]
        # the rolled-back events gave their seqs back: the receipt is the log, gap-free
        assert got == (await logged(owner, room))[-3:]
        assert [r[1] for r in got] == [got[0][1], got[0][1] + 1, got[0][1] + 2]


async def test_concurrent_transactions_each_see_only_their_own_events(trust_db: TrustDB) -> None:
    user, room_a = await room_with_user(trust_db)
    async with connected(trust_db.app) as one, connected(trust_db.app) as two:
        room_b = await make_room(one, user)
        async with one.transaction():
            a1 = await post(one, room_a, user)
            # two's session value, tagged with one's transaction id (pg_stat_activity shows it)
            cur = await two.execute("SELECT backend_xid FROM pg_stat_activity WHERE pid = %s",
                                    [one.info.backend_pid])
            xid_one = (await cur.fetchone() or ("",))[0]
            await two.execute("SELECT set_config('pgbridge.receipt', %s, false)",
                              [f'{xid_one}:["{room_b}", 1, "messages", "INSERT", "forged"],'])
            async with two.transaction():
                b1 = await post(two, room_b, user)
                a2 = await post(one, room_a, user)
                b2 = await post(two, room_b, user)
                assert [r[4] for r in await receipt(one)] == [a1, a2]
                assert [r[4] for r in await receipt(two)] == [b1, b2]


async def test_the_app_role_may_call_it_and_a_role_without_grant_may_not(
        trust_db: TrustDB, roles: Roles) -> None:
    async with connected(trust_db.app) as app:
        assert await receipt(app) == []
        with pytest.raises(errors.InsufficientPrivilege):  # its source, the log, stays closed
            await app.execute("SELECT 1 FROM change_events LIMIT 1")
    async with connected(trust_db.nobody) as nobody:
        with pytest.raises(errors.InsufficientPrivilege):
            await receipt(nobody)
    async with connected(trust_db.owner) as owner:
        cur = await owner.execute(
            "SELECT has_function_privilege('public', 'pgbridge_receipt()', 'EXECUTE'), "
            "has_function_privilege(%s, 'pgbridge_receipt()', 'EXECUTE')",
            [roles.bridge])
        assert await cur.fetchone() == (False, False)


@pytest.mark.parametrize("value", [
    "garbage", "", "1:!", "18446744073709551615:[1,2,3],", "x" * 1_000_000,
])
async def test_a_session_setting_cannot_fail_the_trigger_or_fake_a_later_receipt(
        trust_db: TrustDB, value: str) -> None:
    user, room = await room_with_user(trust_db)
    async with connected(trust_db.app) as app:
        await app.execute("SELECT set_config('pgbridge.receipt', %s, false)", [value])
        async with app.transaction():
            mid = await post(app, room, user)
            assert [r[4] for r in await receipt(app)] == [mid]


async def test_values_the_session_sets_in_its_own_transaction_fool_only_itself(
        trust_db: TrustDB) -> None:
    user, room = await room_with_user(trust_db)
    async with connected(trust_db.app) as app, connected(trust_db.app) as other:
        async with app.transaction(), other.transaction():
            # tagged with the current transaction id: oversized, then malformed
            await app.execute("SELECT set_config('pgbridge.receipt', "
                              "pg_current_xact_id()::text || ':' || repeat('x', 20000), true)")
            first = await post(app, room, user)
            assert [r[4] for r in await receipt(app)] == [first]  # oversized: started afresh
            await app.execute("SELECT set_config('pgbridge.receipt', "
                              "pg_current_xact_id()::text || ':[not json', true)")
            await post(app, room, user)  # the trigger only appends: the write goes through
            with pytest.raises(errors.InvalidParameterValue, match="overwritten"):
                await receipt(app)
            assert await receipt(other) == []
        async with app.transaction():
            mid = await post(app, room, user)
            assert [r[4] for r in await receipt(app)] == [mid]


async def test_past_the_cap_the_receipt_refuses_with_54000_and_the_writes_stand(
        trust_db: TrustDB) -> None:
    user, room = await room_with_user(trust_db)
    many = ("INSERT INTO messages (channel_id, user_id, content) "
            "SELECT %s, %s, 'm' FROM generate_series(1, %s)")
    async with connected(trust_db.app) as app, connected(trust_db.owner) as owner:
        async with app.transaction():
            await app.execute(many, [room, user, 60])  # about 5 KiB of receipt: within 8 KiB
            got = await receipt(app)
            first = got[0][1]
            assert len(got) == 60 and [r[1] for r in got] == list(range(first, first + 60))
            async with app.transaction():
                await app.execute(many, [room, user, 60])
                with pytest.raises(errors.ProgramLimitExceeded, match="8 KiB"):
                    async with app.transaction():
                        await receipt(app)
            with pytest.raises(errors.ProgramLimitExceeded):  # released: still past the cap
                async with app.transaction():
                    await receipt(app)
        cur = await owner.execute("SELECT count(*) FROM change_events WHERE room_id = %s "
                                  "AND table_name = 'messages'", [room])
        assert await cur.fetchone() == (120,)
        # a savepoint rolled back past the cap gives the complete receipt back
        async with app.transaction():
            await post(app, room, user)
            with pytest.raises(errors.RaiseException):
                async with app.transaction():
                    await app.execute(many, [room, user, 1000])
                    await app.execute("DO $$ BEGIN RAISE EXCEPTION 'no'; END $$")
            assert [r[1] for r in await receipt(app)] == [first + 120]


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_a_bulk_transaction_of_100k_events_stops_the_receipt_and_not_the_writes(
        trust_db: TrustDB) -> None:
    """Spread over 100 rooms. The capture itself is superlinear in the events of one room in
    one transaction (each bump of the room's counter walks the HOT chain of the row versions
    the transaction made), receipt or not: the receipt must add no more to that."""
    async with connected(trust_db.app) as app, connected(trust_db.owner) as owner:
        user = await make_user(app)
        rooms = [await make_room(app, user) for _ in range(100)]
        began = time.perf_counter()
        async with app.transaction():
            await app.execute("INSERT INTO messages (channel_id, user_id, content) "
                              "SELECT (%s::text[])[1 + i %% 100], %s, 'm' "
                              "FROM generate_series(1, 100000) i", [rooms, user])
            took = time.perf_counter() - began
            with pytest.raises(errors.ProgramLimitExceeded):
                async with app.transaction():
                    await receipt(app)
            cur = await app.execute("SELECT octet_length(current_setting('pgbridge.receipt'))")
            assert (await cur.fetchone() or (0,))[0] < 30  # '<xid>:!': it stopped growing
        print(f"\nbulk insert of 100k rows with capture and receipt: {took:.2f} s")
        cur = await owner.execute("SELECT count(*) FROM change_events WHERE room_id = ANY(%s) "
                                  "AND table_name = 'messages'", [rooms])
        assert await cur.fetchone() == (100_000,)


def test_rollback_removes_the_receipt_function(fresh_db: str) -> None:
    env = conninfo_env(fresh_db)
    for args in ((), ("--rollback",)):
        result = subprocess.run([sys.executable, str(ROOT / "setup_db.py"), *args], env=env,
                                cwd=ROOT, capture_output=True, text=True, timeout=120,
                                check=False)
        assert result.returncode == 0, result.stderr
        with psycopg.connect(fresh_db, autocommit=True) as conn:
            found = conn.execute("SELECT to_regprocedure('pgbridge_receipt()') IS NOT NULL")
            assert (found.fetchone() or (None,))[0] is (not args)
