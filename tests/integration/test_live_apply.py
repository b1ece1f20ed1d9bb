"""setup_db.py on a live database (daemon/schema.py): an unchanged schema is not touched, and
what must change waits for its locks at most ``lock_timeout`` at a time, retrying, so writers
are never queued behind it for longer. ``bench/live_apply.py`` measures the writers' latency.

Before: every run re-ran every ``CREATE INDEX IF NOT EXISTS`` (SHARE lock) and ``CREATE OR
REPLACE TRIGGER`` (SHARE ROW EXCLUSIVE) in one transaction with no lock timeout, so behind any
open write transaction it waited, and every writer queued behind it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest

from daemon.errors import DatabaseError
from daemon.schema import apply_schema, verify_schema
from tests.support.helpers import make_user
from tests.support.procs import until

AsyncConn = psycopg.AsyncConnection[Any]
WRITTEN = "users, channels, messages, channel_members, reactions, files, message_reads"


@pytest.fixture
async def live_db(create_database: Callable[[], str]) -> str:
    url = create_database()
    await apply_schema(url)
    return url


@asynccontextmanager
async def open_writer(conninfo: str, tables: str = WRITTEN) -> AsyncIterator[AsyncConn]:
    """A transaction holding what writers of ``tables`` hold (ROW EXCLUSIVE) until the block
    ends: a slow request, a batch job."""
    async with await psycopg.AsyncConnection.connect(conninfo) as conn:
        await conn.execute(f"LOCK TABLE {tables} IN ROW EXCLUSIVE MODE")
        try:
            yield conn
        finally:
            await conn.rollback()


async def drop_trigger(conninfo: str) -> None:
    """Something for the next run to repair (the catalog check finds it)."""
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute("DROP TRIGGER users_access_delete ON users")


async def test_an_unchanged_schema_is_reapplied_behind_an_open_writer_without_waiting(
        live_db: str) -> None:
    """With no retry allowed (max_wait=0), a run that needed any table lock would fail."""
    async with open_writer(live_db):
        for _ in range(10):
            report = await apply_schema(live_db, lock_timeout=0.05, max_wait=0)
            assert (report.files, report.applied, report.attempts) == ([], [], 1)


async def test_writers_keep_writing_while_setup_runs_ten_times(live_db: str) -> None:
    """Writers insert continuously and a long write transaction stays open while the schema is
    applied ten times: every run and every insert succeeds."""
    stop = asyncio.Event()
    inserted = 0

    async def write() -> None:
        nonlocal inserted
        async with await psycopg.AsyncConnection.connect(live_db, autocommit=True) as conn:
            while not stop.is_set():
                await make_user(conn)
                inserted += 1

    async with open_writer(live_db):
        writers = [asyncio.create_task(write()) for _ in range(3)]
        try:
            await until(lambda: asyncio.sleep(0, inserted > 0), "the writers to start")
            for _ in range(10):
                report = await apply_schema(live_db, lock_timeout=0.2, max_wait=0)
                assert report.files == [] and report.attempts == 1
        finally:
            stop.set()
            await asyncio.gather(*writers)
    assert inserted > 0


async def test_a_change_behind_a_long_transaction_retries_until_it_ends(
        live_db: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    await drop_trigger(live_db)
    async with open_writer(live_db, "users") as holder:
        applying = asyncio.create_task(apply_schema(live_db, lock_timeout=0.1, max_wait=60))

        async def retried() -> bool:
            return any(getattr(r, "event", None) == "schema_lock_retry" for r in caplog.records)

        await until(retried, "a retry after the lock timeout")
        assert not applying.done()
        # the writers were let through: a write to the table the run waits for goes in now
        async with await psycopg.AsyncConnection.connect(live_db, autocommit=True) as conn:
            await asyncio.wait_for(make_user(conn), 10)
        await holder.rollback()
    report = await asyncio.wait_for(applying, 30)
    assert report.attempts >= 2 and "triggers/20_access.sql" in report.files
    assert await verify_schema(live_db) == []


async def test_a_change_behind_a_transaction_that_never_ends_fails_in_one_line(
        live_db: str) -> None:
    await drop_trigger(live_db)
    async with open_writer(live_db, "users"):
        with pytest.raises(DatabaseError) as failed:
            await apply_schema(live_db, lock_timeout=0.1, max_wait=0.5)
    message = str(failed.value)
    assert failed.value.sqlstate == "55P03" and "\n" not in message
    assert "long transaction" in message and "pg_stat_activity" in message
    problems = await verify_schema(live_db)  # rolled back: still to repair
    assert problems == ["trigger users_access_delete on public.users is missing or disabled"]
