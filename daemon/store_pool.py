"""How a statement of the daemon reaches the database: a psycopg_pool of autocommit connections
whose search_path is the bridge's schema (``PGBRIDGE_SCHEMA``), the timeouts that bound every
wait, one statement run with its retry on a lost connection (:meth:`Pooled._all`), and the
health check (:meth:`Pooled.ping`). Every statement is timed here, in one place, by the
purpose its caller names (``pgbridge_query_duration_seconds{purpose}``:
:data:`daemon.metrics.QueryPurpose`).

Why a module of its own: :class:`daemon.store.Store` is built on :class:`Pooled` and says what
is asked (its queries); how any statement is run, waited for, retried and translated into
:class:`~daemon.errors.DatabaseError` (SQLSTATE kept) is one concern of its own, the same for
every query. Log lines keep the logger ``daemon.store``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .db import describe, translate, translated
from .errors import DatabaseError
from .metrics import Metrics, QueryPurpose

log = logging.getLogger("daemon.store")  # the store's one logger name

__all__ = ["CONNECT_TIMEOUT", "POOL_RECONNECT", "POOL_WAIT", "SCHEMA_GONE", "STATEMENT_TIMEOUT",
           "Pooled"]

# Seconds a statement waits for a pooled connection. While the database is down every request
# fails after this wait (a subscribe gets `error` `internal` with its ref and room, a handshake
# 503): short enough that no client waits long in silence, long enough to ride over a busy pool.
POOL_WAIT = 5.0
# Seconds psycopg_pool keeps retrying, with its own backoff (1, 2, 4, ... s), to replace a lost
# connection before it gives up; the next request then starts a new attempt at once. Left at
# its default (5 min), the backoff grown during a long outage delayed the first connection for
# seconds after the server was back, and with it the listener's catch-up (bench/recovery.py).
POOL_RECONNECT = 2.0
# Seconds a new pooled connection may take to be established and configured (libpq
# connect_timeout, unless the conninfo sets its own, and the search_path statement), and
# seconds any statement of the daemon may run. A request lost on a path that black-holes packets
# is never answered, even once the path heals: a connection attempt or a statement waiting for
# it waited for ever, holding a pooled connection or one of the pool's three workers, and once
# they were all stuck so, every request failed after POOL_WAIT for good (the black-holed
# /healthz test of tests/integration/test_hostile_input.py failed about one run in four). A
# statement that overruns is cancelled; psycopg then closes the connection if the server does
# not confirm within 5 s, and the pool replaces it.
CONNECT_TIMEOUT = 5
STATEMENT_TIMEOUT = 30.0


# SQLSTATEs of a statement that names what is not there (undefined_table, undefined_function,
# undefined_column, invalid_schema_name): on a schema the daemon checked at start, they mean its
# objects were removed under it (setup_db.py --rollback, or by hand). A statement failing so
# sets :attr:`Pooled.schema_suspect`; the bridge then asks the catalog (:meth:`Pooled.installed`)
# and stops with one line if pgbridge is gone (daemon.app).
SCHEMA_GONE = frozenset({"42P01", "42883", "42703", "3F000"})


def _connection_lost(exc: psycopg.OperationalError) -> bool:
    """True for errors that mean the connection is gone rather than the statement failed."""
    return exc.sqlstate is None or exc.sqlstate.startswith(("08", "57P"))



class Pooled:
    """The pool of :class:`daemon.store.Store`, the one class built on it. ``conninfo`` from
    :func:`daemon.db.database`; ``schema`` from ``PGBRIDGE_SCHEMA``; ``max_size`` connections
    at most (``PGBRIDGE_POOL_SIZE``); ``metrics`` gets every statement's duration
    (``pgbridge_query_duration_seconds``)."""

    def __init__(self, conninfo: str, *, schema: str, metrics: Metrics,
                 max_size: int = 10) -> None:
        self.conninfo = conninfo
        self.schema = schema
        self.query_duration = metrics.query_duration
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]] = AsyncConnectionPool(
            conninfo, min_size=1, max_size=max_size, open=False, name="pgbridge",
            kwargs={"autocommit": True, **({} if "connect_timeout" in conninfo_to_dict(
                conninfo) else {"connect_timeout": CONNECT_TIMEOUT})},
            configure=self._configure, timeout=POOL_WAIT,
            reconnect_timeout=POOL_RECONNECT,
        )
        # set when a statement failed with a SQLSTATE of SCHEMA_GONE (here, or on the LISTEN
        # connection: :meth:`suspect`); whoever waits on it clears it
        self.schema_suspect = asyncio.Event()

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await conn.execute("SELECT set_config('search_path', %s, false)",
                               [sql.Identifier(self.schema).as_string(conn)])

    async def open(self) -> None:
        with translated(self.conninfo):
            try:
                await self.pool.open(wait=True, timeout=15.0)
            except PoolTimeout:  # the first connection never came: connect once to say why
                await (await psycopg.AsyncConnection.connect(self.conninfo)).close()
                raise

    async def close(self) -> None:
        await self.pool.close()

    def pool_stats(self) -> dict[str, int]:
        """The pool's statistics since it was created (``psycopg_pool``'s ``get_stats()``:
        ``requests_num``, ``requests_queued``, ``requests_wait_ms``, ``requests_errors``, ...,
        and now: ``pool_size``, ``pool_available``, ``requests_waiting``), for
        :meth:`daemon.metrics.Metrics.watch_pool`. A request that waits longer than
        ``POOL_WAIT`` seconds is one of ``requests_errors``."""
        return self.pool.get_stats()

    async def _all(self, query: str | sql.Composed, params: Sequence[Any] | Mapping[str, Any],
                   doing: str, *, purpose: QueryPurpose,
                   timeout: float = STATEMENT_TIMEOUT) -> list[tuple[Any, ...]]:
        """Run one statement on a pooled connection; ``doing`` says what for in an error,
        ``purpose`` labels its duration, ``timeout`` bounds each attempt's statement (seconds;
        the wait for a connection is bounded apart, by ``POOL_WAIT``). Every statement of this
        module is idempotent, so one that failed because its connection was broken (server
        restart, ``pg_terminate_backend``) is retried once on a fresh connection.

        Timed in ``pgbridge_query_duration_seconds{purpose}`` from the request for a pooled
        connection to the last row fetched, as the caller waits: the wait for a connection
        and a retry included, failed and timed out statements included (an exhausted pool then
        shows as slow queries of every purpose; ``pgbridge_pool_wait_seconds_total`` says how
        much of it was waiting)."""
        started = time.perf_counter()
        try:
            return await self._run(query, params, doing, timeout)
        except DatabaseError as exc:
            self.suspect(exc.sqlstate)
            raise
        finally:
            self.query_duration.labels(purpose).observe(time.perf_counter() - started)

    def suspect(self, sqlstate: str | None) -> None:
        """A statement failed with ``sqlstate``: if it is one of :data:`SCHEMA_GONE`, set
        :attr:`schema_suspect` (the schema may have been rolled back under the bridge)."""
        if sqlstate in SCHEMA_GONE:
            self.schema_suspect.set()

    async def installed(self) -> bool:
        """Whether pgbridge is (still) in the schema: its log, its ledger and its capture
        function exist. Asks the catalog only (``to_regclass``/``to_regprocedure`` answer NULL
        for what is missing, the schema included), so it fails only when the database cannot
        be asked. Raises :class:`DatabaseError`."""
        return await self.install_id() is not None

    async def install_id(self) -> int | None:
        """Which install of pgbridge the schema holds, as :meth:`installed` finds it: the OID
        of its log ``change_events`` (a new one once the schema was rolled back and applied
        again: the rooms' counters start again at 1), ``None`` when it is not installed.
        Raises :class:`DatabaseError`."""
        names = [sql.Identifier(self.schema, name).as_string(None) for name in
                 ("change_events", "schema_migrations")]
        capture = sql.Identifier(self.schema, "pgbridge_capture").as_string(None) + "()"
        rows = await self._all(
            "SELECT CASE WHEN to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL "
            "AND to_regprocedure(%s) IS NOT NULL THEN to_regclass(%s)::oid::bigint END",
            (*names, capture, names[0]), "checking that the schema is installed",
            purpose="schema_check")
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    async def _run(self, query: str | sql.Composed, params: Sequence[Any] | Mapping[str, Any],
                   doing: str, timeout: float) -> list[tuple[Any, ...]]:
        with translated(self.conninfo, doing=doing):
            for attempt in (1, 2):
                try:
                    async with self.pool.connection() as conn:
                        async with asyncio.timeout(timeout):
                            cur = await conn.execute(
                                query.encode() if isinstance(query, str) else query, params)
                            return await cur.fetchall()
                except psycopg.OperationalError as exc:
                    if attempt == 2 or not _connection_lost(exc):
                        raise
                    log.info("pooled connection lost while %s; retrying once", doing,
                             extra={"event": "pool_retry"})
                    await self.pool.check()  # one broken connection: the others may be too
                except PoolTimeout as exc:
                    raise DatabaseError(f"{describe(self.conninfo)}: no database connection "
                                        f"available while {doing}; is the server up?") from exc
                except TimeoutError as exc:
                    raise DatabaseError(f"{describe(self.conninfo)}: no answer within "
                                        f"{timeout:g} s while {doing}") from exc
        raise AssertionError("unreachable")

    async def ping(self, timeout: float) -> str | None:
        """``None`` when a pooled connection answers ``SELECT 1`` within ``timeout`` seconds,
        else why not in a few words that name no host (for /healthz; the log has details).
        Timed as ``pgbridge_query_duration_seconds{purpose="health"}``, the wait for a
        connection included."""
        started = time.perf_counter()
        try:
            return await self._ping(timeout)
        finally:
            self.query_duration.labels("health").observe(time.perf_counter() - started)

    async def _ping(self, timeout: float) -> str | None:
        try:
            async with asyncio.timeout(timeout):
                async with self.pool.connection(timeout=timeout) as conn:
                    await conn.execute("SELECT 1")
        except (TimeoutError, PoolTimeout):
            return f"no answer within {timeout:g} s"
        except psycopg.Error as exc:
            log.warning("health check failed: %s", translate(exc, self.conninfo).args[0],
                        extra={"event": "health_failed"})
            return f"error{f' (SQLSTATE {exc.sqlstate})' if exc.sqlstate else ''}"
        except Exception as exc:  # e.g. the pool is closing
            return f"error ({type(exc).__name__})"
        return None
