"""Multi-room transactions (sql/triggers/30_room_lock_order.sql) against a real PostgreSQL.

Every captured change holds its room's counter (change_sequences) until commit, so transactions
that write to several rooms deadlock (SQLSTATE 40P01) when they take the counters in opposite
orders. The BEFORE DELETE trigger on users takes a user's rooms in room_id order before the
cascade; pgbridge_lock_rooms does the same for an application's bulk transaction. Seqs stay
1..n per room, without a gap.

The interleavings that would deadlock are forced, not left to timing: a test transaction holds
a room, so that a deletion or a move stops between two rooms, and the next one is started only
once the first waits. That a backend waits for a lock is observed with pg_blocking_pids, asked
again after each answer (a lock wait has no event to await; nothing sleeps). deadlock_timeout
is lowered for the writers so that a deadlock, in the control case, is found in milliseconds.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql
from ulid import ULID

from daemon.schema import apply_schema_sync

AsyncConn = psycopg.AsyncConnection[Any]


@pytest.fixture(scope="module")
def lock_db(create_database: Callable[[], str]) -> str:
    """A database of this module's own (one test disables the trigger for a while)."""
    url = create_database()
    apply_schema_sync(url, schema="public")
    return url


@asynccontextmanager
async def connect(conninfo: str) -> AsyncIterator[AsyncConn]:
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute("SET deadlock_timeout = '50ms'")
        yield conn


async def one(conn: AsyncConn, query: Any, params: Any = None) -> Any:
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


async def new_users(conn: AsyncConn, n: int) -> list[str]:
    ids = [str(ULID()) for _ in range(n)]
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO users (id, auth0_id, email, username) VALUES (%s, %s, %s, 'u')",
            [(u, f"auth0|{u}", f"{u}@example.com") for u in ids])
    return ids


async def new_rooms(conn: AsyncConn, n: int) -> list[str]:
    """``n`` new rooms, in room_id order."""
    ids = sorted(str(ULID()) for _ in range(n))
    async with conn.cursor() as cur:
        await cur.executemany("INSERT INTO channels (id, name) VALUES (%s, 'room')",
                              [(r,) for r in ids])
    return ids


async def join(conn: AsyncConn, user: str, rooms: list[str]) -> None:
    """Memberships inserted in the order given: the user's cascade meets them in that order."""
    async with conn.cursor() as cur:
        await cur.executemany("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                              [(r, user) for r in rooms])


async def blocked(watcher: AsyncConn, conn: AsyncConn, task: asyncio.Task[Any],
                  timeout: float = 10.0) -> set[int]:
    """Wait until ``conn``'s backend waits for a lock; the pids it waits for."""
    pid = conn.info.backend_pid
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if task.done():
            task.result()
            raise AssertionError("finished without waiting for a lock")
        pids = await one(watcher, "SELECT pg_blocking_pids(%s)", [pid])
        if pids:
            return set(pids)
    raise AssertionError(f"backend {pid} did not wait for a lock within {timeout} s")


async def assert_gap_free(conn: AsyncConn, rooms: list[str]) -> None:
    """Every room's events have seqs 1..n, n being its counter."""
    cur = await conn.execute(
        "SELECT r, coalesce((SELECT array_agg(seq ORDER BY seq) FROM change_events "
        "WHERE room_id = r), '{}'), (SELECT last_seq FROM change_sequences WHERE room_id = r) "
        "FROM unnest(%s::text[]) AS r", [rooms])
    for room, seqs, last in await cur.fetchall():
        assert seqs == list(range(1, len(seqs) + 1)), (room, seqs)
        assert last == len(seqs), (room, last, len(seqs))


@pytest.fixture
def lock_trigger(lock_db: str) -> Iterator[Callable[[bool], None]]:
    """Switch users_lock_rooms off or on; on again after the test."""
    def switch(enabled: bool) -> None:
        with psycopg.connect(lock_db, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER TABLE users {} TRIGGER users_lock_rooms").format(
                sql.SQL("ENABLE" if enabled else "DISABLE")))

    yield switch
    switch(True)


# --- pgbridge_lock_rooms ------------------------------------------------------------------------

async def test_lock_rooms_creates_counters_at_0_so_the_first_event_still_gets_seq_1(
        lock_db: str) -> None:
    async with connect(lock_db) as conn, connect(lock_db) as other:
        [user] = await new_users(conn, 1)
        [old] = await new_rooms(conn, 1)
        new, gone = str(ULID()), str(ULID())
        counter = "SELECT xmin::text, ctid::text, last_seq FROM change_sequences WHERE room_id = %s"
        before = await one(conn, counter, [old])
        async with conn.transaction():
            await conn.execute("SELECT pgbridge_lock_rooms(%s)", [[new, old, None, new]])
            # held until commit: a writer in either room waits (here: gives up at once)
            await other.execute("SET lock_timeout = '1ms'")
            for room in (old, new):
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    await other.execute("INSERT INTO channels (id, name) VALUES (%s, 'x') "
                                        "ON CONFLICT (id) DO UPDATE SET name = 'y'", [room])
            await other.execute("RESET lock_timeout")
        assert await one(conn, "SELECT last_seq FROM change_sequences WHERE room_id = %s",
                         [new]) == 0
        # an existing counter is locked, not rewritten
        assert await one(conn, counter, [old]) == before
        async with conn.transaction(force_rollback=True):
            await conn.execute("SELECT pgbridge_lock_rooms(%s)", [[gone]])
        assert await one(conn, "SELECT count(*) FROM change_sequences WHERE room_id = %s",
                         [gone]) == 0
        await conn.execute("INSERT INTO channels (id, name) VALUES (%s, 'late')", [new])
        await conn.execute("INSERT INTO messages (channel_id, user_id, content) "
                           "VALUES (%s, %s, 'm')", (new, user))
        cur = await conn.execute("SELECT seq, table_name FROM change_events WHERE room_id = %s "
                                 "ORDER BY seq", [new])
        assert await cur.fetchall() == [(1, "channels"), (2, "messages")]
        await conn.execute("SELECT pgbridge_lock_rooms('{}')")  # nothing to lock: fine
        await assert_gap_free(conn, [old, new])


async def test_lock_rooms_takes_the_rooms_in_room_id_order_whatever_the_order_given(
        lock_db: str) -> None:
    async with (connect(lock_db) as holder, connect(lock_db) as locker,
                connect(lock_db) as prober, connect(lock_db) as watcher):
        a, b, c = await new_rooms(watcher, 3)
        async with holder.transaction():
            await holder.execute("SELECT pgbridge_lock_rooms(%s)", [[a]])
            await locker.execute("BEGIN")
            task = asyncio.create_task(
                locker.execute("SELECT pgbridge_lock_rooms(%s)", [[c, b, a]]))
            assert await blocked(watcher, locker, task) == {holder.info.backend_pid}
            # waiting for a, the first room, it holds neither b nor c
            await prober.execute("SET lock_timeout = '1ms'")
            async with prober.transaction(force_rollback=True):
                await prober.execute("SELECT pgbridge_lock_rooms(%s)", [[b, c]])
        await task
        await locker.execute("COMMIT")


# --- hard deletes -------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("ordered", [True, False], ids=["trigger", "control-no-trigger"])
@pytest.mark.parametrize("via", ["reactions", "message_reads"])
async def test_deletions_of_users_sharing_rooms_met_in_opposite_orders(
        lock_db: str, lock_trigger: Callable[[bool], None], ordered: bool, via: str) -> None:
    """Rooms a < b < c. User 1 joined a then c, and has a reaction (or a read) on a message of
    b; user 2 joined b then c, and has one on a message of a. A hard delete's cascade removes
    the memberships, then the reactions, then the reads, and their events are written after
    that, in the same order: deletion 1 writes a, c, b; deletion 2 b, c, a. A writer holds c,
    so each deletion stops at c holding its first room.

    Without the trigger (control) when c is let go, whichever deletion gets it then waits for
    the room the other one holds: one is aborted with 40P01. With it, deletion 1 takes a and b
    before it waits for c, and deletion 2 waits for deletion 1 before writing anything."""
    lock_trigger(ordered)
    async with (connect(lock_db) as setup, connect(lock_db) as writer,
                connect(lock_db) as first, connect(lock_db) as second):
        a, b, c = await new_rooms(setup, 3)
        author, u1, u2 = await new_users(setup, 3)
        await join(setup, u1, [a, c])
        await join(setup, u2, [b, c])
        for user, room in ((u1, b), (u2, a)):
            message = await one(setup, "INSERT INTO messages (channel_id, user_id, content) "
                                       "VALUES (%s, %s, 'm') RETURNING id", (room, author))
            if via == "reactions":
                await setup.execute("INSERT INTO reactions (message_id, user_id, emoji) "
                                    "VALUES (%s, %s, ':)')", (message, user))
            else:
                await setup.execute("INSERT INTO message_reads (message_id, user_id) "
                                    "VALUES (%s, %s)", (message, user))
        async with writer.transaction():
            await writer.execute("INSERT INTO messages (channel_id, user_id, content) "
                                 "VALUES (%s, %s, 'w')", (c, author))
            d1 = asyncio.create_task(first.execute("DELETE FROM users WHERE id = %s", [u1]))
            assert await blocked(setup, first, d1) == {writer.info.backend_pid}
            d2 = asyncio.create_task(second.execute("DELETE FROM users WHERE id = %s", [u2]))
            waits_for = await blocked(setup, second, d2)
        outcomes = await asyncio.gather(d1, d2, return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if ordered:
            assert waits_for == {first.info.backend_pid}
            assert errors == []
            assert await one(setup, "SELECT count(*) FROM users WHERE id = ANY(%s)",
                             [[u1, u2]]) == 0
            # deletion 1's events, then deletion 2's, in every room
            cur = await setup.execute(
                "SELECT room_id, array_agg(payload ->> 'user_id' ORDER BY seq) FROM "
                "change_events WHERE room_id = ANY(%s) AND op = 'DELETE' GROUP BY room_id",
                [[a, b, c]])
            assert dict(await cur.fetchall()) == {a: [u1, u2], b: [u1, u2], c: [u1, u2]}
        else:
            assert waits_for <= {writer.info.backend_pid, first.info.backend_pid}
            assert len(errors) == 1 and isinstance(errors[0], psycopg.errors.DeadlockDetected)
            assert errors[0].sqlstate == "40P01"
        await assert_gap_free(setup, [a, b, c])


@pytest.mark.slow
async def test_concurrent_hard_deletes_of_users_sharing_rooms_never_deadlock(
        lock_db: str) -> None:
    """24 users, each in 4 of the same 6 rooms (joined in random orders) and with reactions and
    reads on messages of any room, deleted one per transaction by 8 connections at once."""
    rng = random.Random(13)
    n_users, n_rooms, n_joined, n_conns = 24, 6, 4, 8
    async with connect(lock_db) as setup:
        rooms = await new_rooms(setup, n_rooms)
        [author] = await new_users(setup, 1)
        messages: list[str] = []
        for room in rooms:
            for _ in range(3):
                messages.append(str(await one(
                    setup, "INSERT INTO messages (channel_id, user_id, content) "
                           "VALUES (%s, %s, 'm') RETURNING id", (room, author))))
        users = await new_users(setup, n_users)
        for user in users:
            await join(setup, user, rng.sample(rooms, n_joined))
            async with setup.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO reactions (message_id, user_id, emoji) VALUES (%s, %s, ':)')",
                    [(m, user) for m in rng.sample(messages, 3)])
                await cur.executemany(
                    "INSERT INTO message_reads (message_id, user_id) VALUES (%s, %s)",
                    [(m, user) for m in rng.sample(messages, 3)])

        queue = list(users)
        deadlocks: list[str] = []

        async def worker() -> None:
            async with connect(lock_db) as conn:
                while queue:
                    user = queue.pop()
                    try:
                        await conn.execute("DELETE FROM users WHERE id = %s", [user])
                    except psycopg.errors.DeadlockDetected:
                        deadlocks.append(user)

        await asyncio.gather(*(worker() for _ in range(n_conns)))
        assert deadlocks == []
        assert await one(setup, "SELECT count(*) FROM users WHERE id = ANY(%s)", [users]) == 0
        await assert_gap_free(setup, rooms)
        # one DELETE event per membership, reaction and read removed, in the room it was in
        cur = await setup.execute(
            "SELECT room_id, count(*) FROM change_events WHERE room_id = ANY(%s) "
            "AND op = 'DELETE' GROUP BY room_id", [rooms])
        deleted = dict(await cur.fetchall())
        assert sum(deleted.values()) == n_users * (n_joined + 3 + 3)


async def test_the_trigger_needs_no_privilege_of_the_deleting_role(
        lock_db: str, pg_server_conninfo: str) -> None:
    """A role allowed to DELETE FROM users, and nothing else, hard-deletes a user in two rooms
    (the trigger runs as its owner), but may not call pgbridge_lock_rooms itself: EXECUTE is
    granted to the application role by setup_db.py, not to PUBLIC."""
    role = f"pgbridge_r_{uuid.uuid4().hex[:10]}"
    async with connect(pg_server_conninfo) as admin:
        await admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        async with connect(lock_db) as setup:
            await setup.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}; GRANT SELECT, "
                                        "DELETE ON users TO {}").format(sql.Identifier(role),
                                                                       sql.Identifier(role)))
            rooms = await new_rooms(setup, 2)
            [user] = await new_users(setup, 1)
            await join(setup, user, rooms[::-1])
            before = await one(setup, "SELECT sum(last_seq) FROM change_sequences "
                                      "WHERE room_id = ANY(%s)", [rooms])
            async with await psycopg.AsyncConnection.connect(
                    lock_db, user=role, autocommit=True) as app:
                await app.execute("DELETE FROM users WHERE id = %s", [user])
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    await app.execute("SELECT pgbridge_lock_rooms(%s)", [rooms])
            assert await one(setup, "SELECT sum(last_seq) FROM change_sequences "
                                    "WHERE room_id = ANY(%s)", [rooms]) == before + 2
            await assert_gap_free(setup, rooms)
    finally:
        async with connect(lock_db) as setup:
            await setup.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        async with connect(pg_server_conninfo) as admin:
            await admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


# --- bulk moves -------------------------------------------------------------------------------

async def test_lock_rooms_first_keeps_opposite_bulk_moves_from_deadlocking(lock_db: str) -> None:
    """Move 1 (a -> b) and move 2 (b -> a) each start with pgbridge_lock_rooms, naming the rooms
    in their own order, while another transaction holds room a: both wait for it, move 1 first,
    and neither holds b (taken in the order given, move 2 would hold b: when a is let go, move 1
    gets it and waits for b, move 2 waits for a, a deadlock). Then the moves run one after the
    other. (The holder only locks a: had it written to a, the counter would be a new row
    version when it commits, and which move takes it first would be left to chance.)"""
    async with (connect(lock_db) as setup, connect(lock_db) as holder,
                connect(lock_db) as one_way, connect(lock_db) as other_way):
        a, b = await new_rooms(setup, 2)
        [author] = await new_users(setup, 1)
        for room in (a, b):
            for _ in range(3):
                await setup.execute("INSERT INTO messages (channel_id, user_id, content) "
                                    "VALUES (%s, %s, 'm')", (room, author))
        heads = [int(await one(setup, "SELECT last_seq FROM change_sequences WHERE room_id = %s",
                               [r])) for r in (a, b)]

        async def move(conn: AsyncConn, src: str, dst: str) -> None:
            async with conn.transaction():
                await conn.execute("SELECT pgbridge_lock_rooms(%s)", [[src, dst]])
                await conn.execute("UPDATE messages SET channel_id = %s WHERE channel_id = %s",
                                   (dst, src))

        async with holder.transaction():
            await holder.execute("SELECT pgbridge_lock_rooms(%s)", [[a]])
            m1 = asyncio.create_task(move(one_way, a, b))
            assert await blocked(setup, one_way, m1) == {holder.info.backend_pid}
            m2 = asyncio.create_task(move(other_way, b, a))
            # behind move 1 in the queue for a (then move 1 blocks it; taking the rooms in the
            # order given, it would hold b by now)
            assert await blocked(setup, other_way, m2) <= {holder.info.backend_pid,
                                                           one_way.info.backend_pid}
        await asyncio.gather(m1, m2)  # a DeadlockDetected fails the test
        assert await one(setup, "SELECT count(*) FROM messages WHERE channel_id = %s", [a]) == 6
        await assert_gap_free(setup, [a, b])
        # move 1's events, then move 2's: a moved row is a DELETE in its old room and an UPDATE
        # in its new one
        ops = [await one(setup, "SELECT array_agg(op ORDER BY seq) FROM change_events "
                                "WHERE room_id = %s AND seq > %s", (room, head))
               for room, head in zip((a, b), heads, strict=True)]
        assert ops == [["DELETE"] * 3 + ["UPDATE"] * 6, ["UPDATE"] * 3 + ["DELETE"] * 6]


async def test_concurrent_opposite_bulk_moves_with_lock_rooms_never_deadlock(
        lock_db: str) -> None:
    pairs, rounds = 6, 3
    async with connect(lock_db) as setup:
        rooms = await new_rooms(setup, 2 * pairs)
        [author] = await new_users(setup, 1)
        async with setup.cursor() as cur:
            await cur.executemany("INSERT INTO messages (channel_id, user_id, content) "
                                  "VALUES (%s, %s, 'm')",
                                  [(r, author) for r in rooms for _ in range(5)])
        conns = [await psycopg.AsyncConnection.connect(lock_db, autocommit=True)
                 for _ in range(2 * pairs)]
        try:
            for conn in conns:
                await conn.execute("SET deadlock_timeout = '50ms'")

            async def move(conn: AsyncConn, src: str, dst: str) -> None:
                async with conn.transaction():
                    await conn.execute("SELECT pgbridge_lock_rooms(%s)", [[src, dst]])
                    await conn.execute("UPDATE messages SET channel_id = %s "
                                       "WHERE channel_id = %s", (dst, src))

            for _ in range(rounds):
                moves = []
                for i in range(pairs):
                    a, b = rooms[2 * i], rooms[2 * i + 1]
                    moves += [move(conns[2 * i], a, b), move(conns[2 * i + 1], b, a)]
                await asyncio.gather(*moves)  # a DeadlockDetected fails the test
                # refill: every room back to 5 messages, for the next round
                await setup.execute(
                    "UPDATE messages m SET channel_id = t.room FROM (SELECT id, "
                    "(%s::text[])[(row_number() OVER (ORDER BY id) - 1) / 5 + 1] AS room "
                    "FROM messages WHERE user_id = %s) t WHERE m.id = t.id "
                    "AND m.channel_id <> t.room", (rooms, author))
        finally:
            for conn in conns:
                await conn.close()
        await assert_gap_free(setup, rooms)
