"""Change capture (sql/triggers/10_change_capture.sql) against a real PostgreSQL.

Every row change of a published table becomes exactly one ``change_events`` row with the room's
next seq, written in the writer's transaction, and one NOTIFY on a real LISTEN connection:
seqs are gap-free and in commit order per room, a rollback gives its number back, large rows are
logged whole and announced by ``{room, seq}`` only. The same holds in schema ``test``, with its
own NOTIFY channel and its own sequences.

"Nothing else was notified" is checked without waiting for a timeout: after the changes, the
writer sends a sentinel NOTIFY on the same channel, and since PostgreSQL delivers notifications
in commit order, everything the changes rang arrives before it.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql
from ulid import ULID

from daemon.schema import apply_schema_sync
from daemon.signing import NotifyKey
from tests.support.helpers import channels, notify_trust

AsyncConn = psycopg.AsyncConnection[Any]
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")
EVENT_COLUMNS = "room_id, seq, table_name, op, row_id, payload, created_at"


@pytest.fixture(scope="module")
def capture_db(create_database: Callable[[], str]) -> str:
    """A database with the schema applied in both ``public`` and ``test``."""
    url = create_database()
    apply_schema_sync(url, schema="public")
    apply_schema_sync(url, schema="test")
    return url


@pytest.fixture(params=["public", "test"])
def schema(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def connect(conninfo: str, schema: str) -> AsyncIterator[AsyncConn]:
    """A writer in ``schema``, in a time zone far from UTC (the frame's ts must be UTC
    whatever the writer's TimeZone)."""
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        await conn.execute("SET TimeZone TO 'Asia/Kathmandu'")
        yield conn


@asynccontextmanager
async def listening(conninfo: str, schema: str) -> AsyncIterator[AsyncConn]:
    """A LISTEN connection on the schema's channel (asked of the database, as the daemon does)."""
    async with connect(conninfo, schema) as conn:
        channel, _ = await notify_trust(conn, schema)
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        yield conn


def opened(payload: str, key: NotifyKey) -> str:
    """The JSON text of a payload the triggers sent, which must be signed with ``key`` and, whole,
    fit in a NOTIFY."""
    text = key.open(payload)
    assert text is not None, f"payload not signed with the schema's key: {payload[:200]!r}"
    assert len(payload.encode()) < 8000
    return text


async def drain(listener: AsyncConn, writer: AsyncConn, schema: str,
                timeout: float = 20.0) -> list[str]:
    """JSON texts of the (signed) payloads the listener got before a sentinel the writer sends
    now (commit order)."""
    token = f"sentinel-{uuid.uuid4().hex}"
    channel, key = await notify_trust(writer, schema)
    await writer.execute("SELECT pg_notify(%s, %s)", (channel, token))
    payloads: list[str] = []
    async with aclosing(listener.notifies(timeout=timeout)) as notes:
        async for note in notes:
            if note.payload == token:
                return payloads
            payloads.append(opened(note.payload, key))
    raise AssertionError(f"sentinel not received within {timeout} s; got {payloads}")


async def one(conn: AsyncConn, query: Any, params: Any = None) -> Any:
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


async def last_seq(conn: AsyncConn, room: str) -> int:
    cur = await conn.execute("SELECT last_seq FROM change_sequences WHERE room_id = %s", [room])
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def events_after(conn: AsyncConn, room: str, seq: int) -> list[tuple[Any, ...]]:
    cur = await conn.execute(f"SELECT {EVENT_COLUMNS} FROM change_events "
                             "WHERE room_id = %s AND seq > %s ORDER BY seq", (room, seq))
    return await cur.fetchall()


async def row_json(conn: AsyncConn, table: str, key: sql.SQL,
                   params: dict[str, str]) -> dict[str, Any] | None:
    """The row as JSON (what the trigger's to_jsonb sees), or None when it is gone."""
    query = sql.SQL("SELECT to_jsonb(t) FROM {} t WHERE ").format(sql.Identifier(table)) + key
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    return dict(row[0]) if row else None


def frame_of(event: tuple[Any, ...]) -> dict[str, Any]:
    """The protocol frame a NOTIFY should carry for a change_events row (ts checked apart)."""
    room, seq, table, op, row_id, payload, _ = event
    return {"type": "event", "room": room, "seq": seq, "table": table, "op": op, "id": row_id,
            "data": payload}


def check_frame(payload: str, event: tuple[Any, ...]) -> None:
    assert len(payload.encode()) < 8000
    frame = json.loads(payload)
    ts = frame.pop("ts")
    assert frame == frame_of(event)
    assert TS.match(ts), ts
    assert datetime.fromisoformat(ts) == event[6]
    assert datetime.fromisoformat(ts).utcoffset() == UTC.utcoffset(None)


async def new_user(conn: AsyncConn) -> str:
    uid = str(ULID())
    await conn.execute("INSERT INTO users (id, auth0_id, email, username) VALUES (%s, %s, %s, 'u')",
                       (uid, f"auth0|{uid}", f"{uid}@example.com"))
    return uid


async def new_room(conn: AsyncConn, *, reset: bool = False) -> str:
    """A new channel; with ``reset`` its own INSERT event is forgotten so the room's next event
    gets seq 1."""
    room = str(await one(conn, "INSERT INTO channels (name) VALUES ('room') RETURNING id"))
    if reset:
        await conn.execute("DELETE FROM change_events WHERE room_id = %s", [room])
        await conn.execute("DELETE FROM change_sequences WHERE room_id = %s", [room])
    return room


async def new_message(conn: AsyncConn, room: str, user: str, content: str = "m") -> str:
    return str(await one(conn, "INSERT INTO messages (channel_id, user_id, content) "
                               "VALUES (%s, %s, %s) RETURNING id", (room, user, content)))


# --- one event per row change --------------------------------------------------------------

# For each published table: how to insert, update and delete one row. Statements get the ids
# dict; ``key`` selects the row; ``id`` is the event's id for that row.
CASES: dict[str, dict[str, str]] = {
    "channels": {
        "insert": "INSERT INTO channels (id, name) VALUES (%(new)s, 'fresh')",
        "update": "UPDATE channels SET name = 'renamed' WHERE id = %(new)s",
        "delete": "DELETE FROM channels WHERE id = %(new)s",
        "key": "id = %(new)s", "id": "{new}", "room": "new", "changed": "name",
    },
    "messages": {
        "insert": "INSERT INTO messages (id, channel_id, user_id, content) "
                  "VALUES (%(new)s, %(room)s, %(user)s, 'hello')",
        "update": "UPDATE messages SET content = 'edited' WHERE id = %(new)s",
        "delete": "DELETE FROM messages WHERE id = %(new)s",
        "key": "id = %(new)s", "id": "{new}", "room": "room", "changed": "content",
    },
    "channel_members": {
        "insert": "INSERT INTO channel_members (channel_id, user_id) VALUES (%(room)s, %(other)s)",
        "update": "UPDATE channel_members SET role = 'admin' "
                  "WHERE channel_id = %(room)s AND user_id = %(other)s",
        "delete": "DELETE FROM channel_members WHERE channel_id = %(room)s AND user_id = %(other)s",
        "key": "channel_id = %(room)s AND user_id = %(other)s", "id": "{room}:{other}",
        "room": "room", "changed": "role",
    },
    "reactions": {
        "insert": "INSERT INTO reactions (id, message_id, user_id, emoji) "
                  "VALUES (%(new)s, %(message)s, %(other)s, ':+1:')",
        "update": "UPDATE reactions SET emoji = ':tada:' WHERE id = %(new)s",
        "delete": "DELETE FROM reactions WHERE id = %(new)s",
        "key": "id = %(new)s", "id": "{new}", "room": "room", "changed": "emoji",
    },
    "files": {
        "insert": "INSERT INTO files (id, message_id, name, type, size, url) "
                  "VALUES (%(new)s, %(message)s, 'a.png', 'image/png', 10, 'https://x.invalid')",
        "update": "UPDATE files SET name = 'b.png' WHERE id = %(new)s",
        "delete": "DELETE FROM files WHERE id = %(new)s",
        "key": "id = %(new)s", "id": "{new}", "room": "room", "changed": "name",
    },
    "message_reads": {
        "insert": "INSERT INTO message_reads (message_id, user_id) VALUES (%(message)s, %(other)s)",
        "update": "UPDATE message_reads SET read_at = read_at + interval '1 minute' "
                  "WHERE message_id = %(message)s AND user_id = %(other)s",
        "delete": "DELETE FROM message_reads WHERE message_id = %(message)s "
                  "AND user_id = %(other)s",
        "key": "message_id = %(message)s AND user_id = %(other)s", "id": "{message}:{other}",
        "room": "room", "changed": "read_at",
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("table", list(CASES))
async def test_each_row_change_of_a_published_table_is_one_event_and_one_notify(
        capture_db: str, schema: str, table: str) -> None:
    case = CASES[table]
    async with connect(capture_db, schema) as conn, listening(capture_db, schema) as listener:
        user, other = await new_user(conn), await new_user(conn)
        room = await new_room(conn)
        ids = {"user": user, "other": other, "room": room, "new": str(ULID())}
        ids["message"] = await new_message(conn, room, user)
        await drain(listener, conn, schema)
        event_room = ids[case["room"]]
        key = sql.SQL(case["key"])  # type: ignore[arg-type]
        previous: dict[str, Any] | None = None
        for op in ("INSERT", "UPDATE", "DELETE"):
            before = await last_seq(conn, event_room)
            await conn.execute(case[op.lower()], ids)  # type: ignore[arg-type]
            current = await row_json(conn, table, key, ids)
            # the new row for INSERT and UPDATE, the old (last seen) row for DELETE
            expected = previous if op == "DELETE" else current
            assert expected is not None and (current is None) == (op == "DELETE")
            events = await events_after(conn, event_room, before)
            assert len(events) == 1, (op, events)
            ev_room, seq, ev_table, ev_op, row_id, payload, _ = events[0]
            assert (ev_room, seq, ev_table, ev_op) == (event_room, before + 1, table, op)
            assert row_id == case["id"].format(**ids)
            assert payload == expected
            if op == "UPDATE":
                assert previous is not None
                assert payload[case["changed"]] != previous[case["changed"]]
            notes = await drain(listener, conn, schema)
            # a membership inserted also tells the feeds whose it is (sql/triggers/20_access.sql)
            hints = [n for n in notes if n.startswith('{"access"')]
            assert hints == ([f'{{"access" : "member", "user" : "{other}"}}']
                             if (table, op) == ("channel_members", "INSERT") else []), hints
            notes = [n for n in notes if n not in hints]
            assert len(notes) == 1, (op, notes)
            check_frame(notes[0], events[0])
            previous = expected


async def test_message_moved_to_another_room_is_deleted_there_and_updated_here(
        capture_db: str, schema: str) -> None:
    async with connect(capture_db, schema) as conn, listening(capture_db, schema) as listener:
        user = await new_user(conn)
        old_room, new_room_ = await new_room(conn), await new_room(conn)
        message = await new_message(conn, old_room, user)
        await drain(listener, conn, schema)
        old_before, new_before = await last_seq(conn, old_room), await last_seq(conn, new_room_)
        await conn.execute("UPDATE messages SET channel_id = %s WHERE id = %s",
                           (new_room_, message))
        [gone] = await events_after(conn, old_room, old_before)
        [moved] = await events_after(conn, new_room_, new_before)
        assert (gone[3], gone[4], gone[5]["channel_id"]) == ("DELETE", message, old_room)
        assert (moved[3], moved[4], moved[5]["channel_id"]) == ("UPDATE", message, new_room_)
        notes = await drain(listener, conn, schema)
        assert [json.loads(n)["room"] for n in notes] == [old_room, new_room_]


async def test_membership_given_to_another_user_is_deleted_for_the_old_user(
        capture_db: str, schema: str) -> None:
    async with connect(capture_db, schema) as conn, listening(capture_db, schema) as listener:
        room, other_room = await new_room(conn), await new_room(conn)
        old_user, new_user_ = await new_user(conn), await new_user(conn)
        await conn.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)",
                           (room, old_user))
        await drain(listener, conn, schema)
        before = await last_seq(conn, room)
        await conn.execute("UPDATE channel_members SET user_id = %s WHERE channel_id = %s "
                           "AND user_id = %s", (new_user_, room, old_user))
        gone, given = await events_after(conn, room, before)
        assert (gone[3], gone[4], gone[5]["user_id"]) == ("DELETE", f"{room}:{old_user}",
                                                          old_user)
        assert (given[3], given[4], given[5]["user_id"]) == ("UPDATE", f"{room}:{new_user_}",
                                                             new_user_)
        # moved to another room and user at once: DELETE in the old room, UPDATE in the new
        other_before = await last_seq(conn, other_room)
        await conn.execute("UPDATE channel_members SET channel_id = %s, user_id = %s "
                           "WHERE channel_id = %s", (other_room, old_user, room))
        [gone] = await events_after(conn, room, before + 2)
        [given] = await events_after(conn, other_room, other_before)
        assert (gone[3], gone[4]) == ("DELETE", f"{room}:{new_user_}")
        assert (given[3], given[4]) == ("UPDATE", f"{other_room}:{old_user}")
        notes = [json.loads(n) for n in await drain(listener, conn, schema)]
        # each membership moved to a user tells that user's feeds (sql/triggers/20_access.sql)
        assert [n for n in notes if "access" in n] == [
            {"access": "member", "user": new_user_}, {"access": "member", "user": old_user}]
        assert [(n["room"], n["op"]) for n in notes if "access" not in n] == [
            (room, "DELETE"), (room, "UPDATE"), (room, "DELETE"), (other_room, "UPDATE")]


async def test_user_deleted_soft_deleted_or_rekeyed_rings_a_hint_with_its_id_only(
        capture_db: str, schema: str) -> None:
    async with connect(capture_db, schema) as conn, listening(capture_db, schema) as listener:
        soft, hard, rekeyed = await new_user(conn), await new_user(conn), await new_user(conn)
        await drain(listener, conn, schema)
        await conn.execute("UPDATE users SET full_name = 'Y', deleted_at = NULL "
                           "WHERE id = ANY(%s)", [[soft, hard, rekeyed]])
        assert await drain(listener, conn, schema) == []  # no loss of access: no hint
        await conn.execute("UPDATE users SET deleted_at = now() WHERE id = %s", [soft])
        await conn.execute("UPDATE users SET deleted_at = now() WHERE id = %s", [soft])
        await conn.execute("UPDATE users SET deleted_at = NULL WHERE id = %s", [soft])
        await conn.execute("DELETE FROM users WHERE id = %s", [hard])
        await conn.execute("UPDATE users SET id = %s WHERE id = %s", ["R" + rekeyed[1:], rekeyed])
        notes = [json.loads(n) for n in await drain(listener, conn, schema)]
        assert notes == [{"access": "user", "user": u} for u in (soft, hard, rekeyed)]


async def test_private_tables_emit_nothing(capture_db: str, schema: str) -> None:
    async with connect(capture_db, schema) as conn, listening(capture_db, schema) as listener:
        room = await new_room(conn)
        await drain(listener, conn, schema)
        events_before = await one(conn, "SELECT count(*) FROM change_events")
        seqs_before = await one(conn, "SELECT coalesce(sum(last_seq), 0) FROM change_sequences")
        user = await new_user(conn)
        await conn.execute("UPDATE users SET full_name = 'X' WHERE id = %s", [user])
        await conn.execute("INSERT INTO user_settings (user_id) VALUES (%s)", [user])
        await conn.execute("UPDATE user_settings SET theme = 'dark' WHERE user_id = %s", [user])
        await conn.execute("INSERT INTO user_status (user_id) VALUES (%s)", [user])
        await conn.execute("UPDATE user_status SET status = 'online' WHERE user_id = %s", [user])
        await conn.execute("INSERT INTO sync_state (user_id, room_id, sync_type, last_seq) "
                           "VALUES (%s, %s, 'events', 1)", (user, room))
        await conn.execute("UPDATE sync_state SET last_seq = 2 WHERE user_id = %s", [user])
        # A file attached to no message belongs to no room: not published either.
        await conn.execute("INSERT INTO files (name, type, size, url) VALUES ('f', 't', 1, 'u')")
        await conn.execute("DELETE FROM files WHERE message_id IS NULL")
        for table in ("sync_state", "user_status", "user_settings", "users"):
            key = "id" if table == "users" else "user_id"
            await conn.execute(sql.SQL("DELETE FROM {} WHERE {} = %s").format(
                sql.Identifier(table), sql.Identifier(key)), [user])
        # user_status rings a presence hint with the user's id, and nothing else, when a row
        # appears or goes (the UPDATE to 'online' stores 'offline', true of a user with no
        # connection, and rings nothing: 40_presence.sql); the user's hard delete rings the
        # access hint (20_access.sql).
        notes = await drain(listener, conn, schema)
        assert [json.loads(n) for n in notes] == [{"presence": "user", "user": user}] * 2 + [
            {"access": "user", "user": user}]
        assert await one(conn, "SELECT count(*) FROM change_events") == events_before
        assert await one(conn, "SELECT coalesce(sum(last_seq), 0) FROM change_sequences") \
            == seqs_before


# --- ordering and gaps ------------------------------------------------------------------------

@pytest.mark.slow
async def test_concurrent_writers_in_one_room_get_seqs_1_to_n_in_commit_order(
        capture_db: str, schema: str) -> None:
    writers, per_writer = 8, 250
    total = writers * per_writer
    async with connect(capture_db, schema) as setup, listening(capture_db, schema) as listener:
        user = await new_user(setup)
        room = await new_room(setup, reset=True)
        await drain(listener, setup, schema)

        _, key = await notify_trust(setup, schema)

        async def collect() -> list[dict[str, Any]]:
            frames: list[dict[str, Any]] = []
            async with aclosing(listener.notifies(timeout=30)) as notes:
                async for note in notes:
                    frames.append(json.loads(opened(note.payload, key)))
                    if len(frames) == total:
                        break
            return frames

        async def write(n: int) -> list[str]:
            async with connect(capture_db, schema) as conn:
                return [await new_message(conn, room, user, f"w{n}-{i}")
                        for i in range(per_writer)]

        collector = asyncio.create_task(collect())
        try:
            written = await asyncio.gather(*(write(n) for n in range(writers)))
            frames = await collector
        finally:
            collector.cancel()  # a writer failed: do not wait for notifications

        assert len(frames) == total
        arrival = [f["seq"] for f in frames]  # NOTIFY arrival order is commit order
        assert arrival == list(range(1, total + 1))
        assert all(f["room"] == room and f["op"] == "INSERT" for f in frames)
        cur = await setup.execute("SELECT seq, row_id FROM change_events WHERE room_id = %s "
                                  "ORDER BY seq", [room])
        logged = await cur.fetchall()
        assert [s for s, _ in logged] == list(range(1, total + 1))
        assert [f["id"] for f in frames] == [r for _, r in logged]
        # Each writer's own (sequential) inserts got increasing seqs.
        seq_of = {r: s for s, r in logged}
        for ids in written:
            seqs = [seq_of[i] for i in ids]
            assert seqs == sorted(seqs) and len(seqs) == per_writer
        assert await last_seq(setup, room) == total


async def test_rolled_back_write_leaves_no_event_and_no_seq_hole(
        capture_db: str, schema: str) -> None:
    async with connect(capture_db, schema) as conn, listening(capture_db, schema) as listener:
        user = await new_user(conn)
        room = await new_room(conn, reset=True)
        await drain(listener, conn, schema)
        first = await new_message(conn, room, user, "kept 1")
        async with conn.transaction(force_rollback=True):
            await new_message(conn, room, user, "rolled back")
            assert await last_seq(conn, room) == 2  # taken inside the transaction...
        second = await new_message(conn, room, user, "kept 2")  # ...and given back
        events = await events_after(conn, room, 0)
        assert [(e[1], e[4]) for e in events] == [(1, first), (2, second)]
        notes = [json.loads(n) for n in await drain(listener, conn, schema)]
        assert [(n["seq"], n["data"]["content"]) for n in notes] == [(1, "kept 1"), (2, "kept 2")]


async def test_seq_given_back_by_a_rollback_goes_to_the_writer_waiting_for_it(
        capture_db: str, schema: str) -> None:
    async with connect(capture_db, schema) as a, connect(capture_db, schema) as b:
        user = await new_user(a)
        room = await new_room(a, reset=True)
        b_pid = b.info.backend_pid
        async with a.transaction(force_rollback=True):
            await new_message(a, room, user, "A, rolled back")  # holds seq 1 until it ends
            waiting = asyncio.create_task(new_message(b, room, user, "B"))
            async with connect(capture_db, schema) as watcher:
                for _ in range(1000):  # until B is blocked on A's lock (no event to await)
                    if a.info.backend_pid in await one(
                            watcher, "SELECT pg_blocking_pids(%s)", [b_pid]):
                        break
                    assert not waiting.done(), "B did not wait for A's seq"
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("B never blocked on A")
        message_b = await waiting
        events = await events_after(a, room, 0)
        assert [(e[1], e[4]) for e in events] == [(1, message_b)]


# --- payload size -----------------------------------------------------------------------------

async def test_large_message_is_logged_whole_and_announced_by_room_and_seq(
        capture_db: str, schema: str) -> None:
    content = "".join(f"{i:07d} " for i in range(12_500))  # 100 000 characters
    async with connect(capture_db, schema) as conn, listening(capture_db, schema) as listener:
        user = await new_user(conn)
        room = await new_room(conn)
        await drain(listener, conn, schema)
        before = await last_seq(conn, room)
        message = await new_message(conn, room, user, content)
        [event] = await events_after(conn, room, before)
        assert event[4] == message and event[5]["content"] == content
        assert len(event[5]["content"]) == 100_000
        [note] = await drain(listener, conn, schema)
        assert json.loads(note) == {"room": room, "seq": before + 1}


async def test_multibyte_message_over_8000_bytes_is_not_sent_in_notify(
        capture_db: str, schema: str) -> None:
    """3 000 characters but 9 000 bytes: the limit is in bytes (a character count would let
    pg_notify fail and take the writer's INSERT down with it)."""
    content = "€" * 3000
    async with connect(capture_db, schema) as conn, listening(capture_db, schema) as listener:
        user = await new_user(conn)
        room = await new_room(conn)
        await drain(listener, conn, schema)
        before = await last_seq(conn, room)
        await new_message(conn, room, user, content)
        [event] = await events_after(conn, room, before)
        assert event[5]["content"] == content
        [note] = await drain(listener, conn, schema)
        assert json.loads(note) == {"room": room, "seq": before + 1}


async def test_small_message_notify_carries_the_whole_event_frame(
        capture_db: str, schema: str) -> None:
    async with connect(capture_db, schema) as conn, listening(capture_db, schema) as listener:
        user = await new_user(conn)
        room = await new_room(conn)
        await drain(listener, conn, schema)
        before = await last_seq(conn, room)
        message = await new_message(conn, room, user, 'hi "there" ✓ \\ \n')
        [event] = await events_after(conn, room, before)
        [note] = await drain(listener, conn, schema)
        check_frame(note, event)
        frame = json.loads(note)
        assert frame["id"] == message and frame["data"]["content"] == 'hi "there" ✓ \\ \n'
        assert set(frame) == {"type", "room", "seq", "table", "op", "id", "data", "ts"}


# --- schemas ----------------------------------------------------------------------------------

async def test_each_schema_has_its_own_channel_and_sequences(capture_db: str) -> None:
    room = str(ULID())
    async with (connect(capture_db, "public") as pub, connect(capture_db, "test") as tst,
                listening(capture_db, "public") as pub_listener,
                listening(capture_db, "test") as tst_listener):
        await drain(pub_listener, pub, "public")
        await drain(tst_listener, tst, "test")
        for conn in (pub, tst):
            await conn.execute("INSERT INTO channels (id, name) VALUES (%s, 'same id')", [room])
        user = await new_user(tst)
        await new_message(tst, room, user, "only in test")
        assert await last_seq(pub, room) == 1
        assert await last_seq(tst, room) == 2
        pub_notes = [json.loads(n) for n in await drain(pub_listener, pub, "public")]
        tst_notes = [json.loads(n) for n in await drain(tst_listener, tst, "test")]
        assert [(n["table"], n["seq"]) for n in pub_notes] == [("channels", 1)]
        assert [(n["table"], n["seq"]) for n in tst_notes] == [("channels", 1), ("messages", 2)]
        names = [*await channels(pub, "test"), *await channels(pub, "public")]
        assert len(set(names)) == 4  # capture and typing of each schema: secret, all distinct
        assert all(re.fullmatch("pgbridge_[0-9a-f]{40}", name) for name in names), names


async def test_capture_logs_in_the_tables_schema_whatever_the_writers_search_path(
        capture_db: str) -> None:
    """A writer whose search_path is public, writing to test.* by qualified names: the events
    go to test.change_events and ring test's channel (the functions carry their search_path)."""
    async with (connect(capture_db, "public") as writer,
                listening(capture_db, "test") as tst_listener,
                listening(capture_db, "public") as pub_listener):
        await drain(tst_listener, writer, "test")
        await drain(pub_listener, writer, "public")
        uid = str(ULID())
        await writer.execute("INSERT INTO test.users (id, auth0_id, email, username) "
                             "VALUES (%s, %s, %s, 'u')", (uid, f"auth0|{uid}", f"{uid}@x.test"))
        room = str(await one(writer, "INSERT INTO test.channels (name) VALUES ('q') RETURNING id"))
        message = str(await one(writer, "INSERT INTO test.messages (channel_id, user_id, content) "
                                        "VALUES (%s, %s, 'q') RETURNING id", (room, uid)))
        await writer.execute("INSERT INTO test.reactions (message_id, user_id, emoji) "
                             "VALUES (%s, %s, ':)')", (message, uid))
        cur = await writer.execute("SELECT seq, table_name FROM test.change_events "
                                   "WHERE room_id = %s ORDER BY seq", [room])
        assert await cur.fetchall() == [(1, "channels"), (2, "messages"), (3, "reactions")]
        assert await one(writer, "SELECT count(*) FROM public.change_events "
                                 "WHERE room_id = %s", [room]) == 0
        notes = [json.loads(n) for n in await drain(tst_listener, writer, "test")]
        assert [(n["seq"], n["table"]) for n in notes] == [
            (1, "channels"), (2, "messages"), (3, "reactions")]
        assert await drain(pub_listener, writer, "public") == []
