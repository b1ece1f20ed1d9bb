"""Spec 003's programmatic usage in Python: set the database up and get a pool, in one call.

The spec's TypeScript (spec 003, "Usage Documentation", 3. Programmatic Usage) opens the tunnel
(``SSHTunnel.initializeFromEnv()``, ``tunnel.connect()``), then calls ``setupDatabase(isTest)``
for a pool. Here that is one async context manager, which also closes what it opened::

    from daemon import setup_database

    async with setup_database(test=True) as pool:   # schema "test"; public is untouched
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO users ...")  # lands in test.users

:func:`setup_database` reads the settings as ``setup_db.py`` does (the environment, ``.env``,
``.env.local``), opens the SSH tunnel when ``SSH_HOST`` is set (:func:`daemon.db.database`, the
same code as the CLI and the daemon), applies the schema (:func:`daemon.schema.apply_schema`,
idempotent), and yields a :class:`psycopg_pool.AsyncConnectionPool` whose connections resolve
unqualified names in the chosen schema. The how-to is docs/howto/programmatic-setup.md.

Errors are the project's (:mod:`daemon.errors`): :class:`~daemon.errors.TunnelError` with
``reason`` and the spec's ``code`` (``ECONNREFUSED``, ``ENOTFOUND``, ``ENOENT``),
:class:`~daemon.errors.DatabaseError` with ``sqlstate``, :class:`~daemon.errors.ConfigError`
naming the variable. Whatever fails at entry, nothing is left open: no pool, no tunnel.

How the schema is chosen, per connection: the libpq startup parameter ``options`` carries
``-c search_path="<schema>",\\ pg_temp`` (the temporary schema last, as the schema is applied
with). A startup parameter is the session's default, so it survives ``RESET ALL`` and ``DISCARD
ALL`` and needs no statement after connecting; a ``SET`` in a pool's ``configure`` callback does
neither, and through a transaction pooler (PgBouncer ``pool_mode=transaction``) it would leak
to other clients' server connections. A pooler may also refuse or drop the parameter:
PgBouncer before 1.20 refuses ``options``, 1.20 and later keep a ``-c`` of it only for a
parameter they track (``track_extra_parameters``), and all drop it silently when ``options``
is in their ``ignore_startup_parameters``. So the first connection is checked at entry, and a pool
that would not resolve names in the asked schema is never returned. ``public`` sets nothing:
its connections are exactly those of the conninfo (they work through any pooler).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .db import database, describe, translated
from .errors import ConfigError, DatabaseError
from .roles import Grants
from .schema import apply_schema
from .settings import DatabaseSettings, SSHSettings, load_environment, schema_name, value

__all__ = ["TEST_SCHEMA", "Pool", "search_path_of", "setup_database"]

log = logging.getLogger(__name__)

Pool: TypeAlias = AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]]
"""What :func:`setup_database` yields: a psycopg pool of (non-autocommit) async connections."""

TEST_SCHEMA = "test"
"""The schema of ``test=True``: spec 003's ``setupDatabase(true)``, ``setup_db.py --test``."""
CONNECT_TIMEOUT = 10
"""Seconds a connection of the pool may take to be established (libpq ``connect_timeout``),
unless the conninfo sets its own."""
OPEN_TIMEOUT = 30.0
"""Seconds the pool may take to open its first ``min_size`` connections at entry (default of
``setup_database(timeout=...)``)."""


def search_path_of(schema: str) -> str:
    """The ``search_path`` the connections of a pool for ``schema`` get: ``"<schema>", pg_temp``
    (the value ``SHOW search_path`` reads on them)."""
    return f'"{schema}", pg_temp'


def _options(schema: str) -> str:
    """``search_path_of(schema)`` as a ``-c`` switch of the libpq ``options`` parameter, where
    a space separates switches unless escaped with a backslash (a ``"`` of the identifier
    doubled, as SQL quotes it)."""
    quoted = search_path_of(schema.replace('"', '""'))
    return "-c search_path=" + quoted.replace("\\", "\\\\").replace(" ", "\\ ")


def _pool_conninfo(conninfo: str, schema: str) -> str:
    """``conninfo`` with the search_path of ``schema`` added to its own ``options`` (a later
    ``-c`` wins over an earlier one); unchanged for ``public``."""
    if schema == "public":
        return conninfo
    own = str(conninfo_to_dict(conninfo).get("options") or "").strip()
    return make_conninfo(conninfo, options=f"{own} {_options(schema)}".strip())


def _target_schema(test: bool, schema: str | None, env: Mapping[str, str]) -> str:
    """``test``, else ``schema``, else ``PGBRIDGE_SCHEMA`` (default ``public``): as
    ``setup_db.py --test`` / ``--schema`` / nothing. Raises :class:`ConfigError`."""
    if test:
        if schema is not None and schema != TEST_SCHEMA:
            raise ConfigError(f"setup_database(test=True, schema={schema!r}): test=True is "
                              f"schema {TEST_SCHEMA!r}; pass one or the other")
        return TEST_SCHEMA
    if schema is not None:
        return schema_name(schema, variable="schema")
    name: str = value(env, "PGBRIDGE_SCHEMA")
    return name


async def _check_connection(conninfo: str, schema: str, where: str,
                            kwargs: dict[str, Any]) -> None:
    """Connect once as the pool will (``kwargs``: its connection arguments), so that a refused
    connection fails now with its SQLSTATE (a pool retries in the background and says only
    "timeout"), and check that the server applied the search_path (a pooler may drop the
    ``options`` startup parameter)."""
    with translated(conninfo, doing="connecting for the pool"):
        conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True, **kwargs)
        async with conn:
            row = await (await conn.execute("SELECT current_setting('search_path')")).fetchone()
    if schema == "public" or (row is not None and row[0] == search_path_of(schema)):
        return
    raise DatabaseError(
        f"{where}: the pool's connections have search_path {row[0] if row else None!r}, not "
        f"{search_path_of(schema)!r}: something between here and PostgreSQL dropped the libpq "
        "options parameter (PgBouncer with options in ignore_startup_parameters?); connect to "
        "PostgreSQL directly for a schema other than public")


async def _open_pool(conninfo: str, schema: str, where: str, *, min_size: int, max_size: int,
                     checked: bool, timeout: float) -> Pool:
    """The open pool on ``conninfo`` for ``schema``, its first ``min_size`` connections made
    (``checked``: each connection checked as it is taken); on failure nothing is left open."""
    pool_conninfo = _pool_conninfo(conninfo, schema)
    kwargs: dict[str, Any] = {} if "connect_timeout" in conninfo_to_dict(conninfo) else {
        "connect_timeout": CONNECT_TIMEOUT}
    await _check_connection(pool_conninfo, schema, where, kwargs)
    pool: Pool = AsyncConnectionPool(
        pool_conninfo, min_size=min_size, max_size=max_size, open=False, kwargs=kwargs,
        name=f"pgbridge-{schema}", check=AsyncConnectionPool.check_connection if checked else None)
    try:
        try:
            await pool.open(wait=True, timeout=timeout)
        except PoolTimeout as exc:
            # The pool retried in the background, logging each failure as a warning, and has
            # closed what it made: connect once more, so that a server that now refuses
            # outright (gone, or its connections taken by others) is named with its SQLSTATE.
            # Except 53300: the server counts a closed connection until its backend has exited,
            # so that refusal may be the pool's own connections; the line below names the same
            # limits.
            try:
                await _check_connection(pool_conninfo, schema, where, kwargs)
            except DatabaseError as refused:
                if refused.sqlstate != "53300":
                    raise
            raise DatabaseError(f"{where}: the pool could not open {min_size} connection(s) in "
                                f"{timeout:g} s; lower min_size, or check the server's "
                                "max_connections and the role's CONNECTION LIMIT") from exc
    except BaseException:
        await pool.close()
        raise
    log.info("pool on schema %s at %s open (%d to %d connections)", schema, where, min_size,
             max_size, extra={"event": "setup_pool_open", "schema": schema})
    return pool


@asynccontextmanager
async def setup_database(
    test: bool = False,
    *,
    schema: str | None = None,
    env: Mapping[str, str] | None = None,
    apply: bool = True,
    min_size: int = 1,
    max_size: int = 10,
    grants: Grants | None = None,
    timeout: float = OPEN_TIMEOUT,
) -> AsyncIterator[Pool]:
    """Set up the database and yield an open pool on it; close both when the block exits.

    Spec 003's ``SSHTunnel.initializeFromEnv()`` + ``tunnel.connect()`` + ``setupDatabase(isTest)``
    (``isTest``: ``test``)::

        async with setup_database(test=True) as pool:
            async with pool.connection() as conn:
                ...

    * Settings: ``env``, else the process environment over ``.env.local`` over ``.env`` of the
      working directory (:func:`daemon.settings.load_environment`, as ``setup_db.py``).
      ``env`` replaces them all (tests, embedding); libpq still reads its own ``PG*``
      variables from the process environment.
    * Where: ``DATABASE_URL`` or ``POSTGRES_HOST``/``PORT``/``DB``/``USER``/``PASSWORD``;
      through an SSH tunnel when ``SSH_HOST`` is set (``SSH_PORT``, ``SSH_USER``,
      ``SSH_KEY_PATH``, ``SSH_KNOWN_HOSTS``; ``SSH_MAX_RETRIES`` retries ``SSH_RETRY_DELAY``
      seconds times the attempt apart: the spec's ``maxRetries``/``retryDelay``), kept open,
      and reopened if it drops, until the block exits; none of them set: the embedded
      PostgreSQL in ``PGBRIDGE_DATA_DIR``, as the CLI.
    * Schema: ``"test"`` when ``test``, else ``schema``, else ``PGBRIDGE_SCHEMA`` (default
      ``public``). Every connection of the pool has ``search_path`` ``"<schema>", pg_temp``
      (:func:`search_path_of`) from its first statement; ``public`` leaves the server's default.
    * ``apply``: first create or upgrade the schema (:func:`daemon.schema.apply_schema`: one
      transaction under an advisory lock, a no-op when up to date), granting ``grants``
      (:class:`daemon.roles.Grants`: ``setup_db.py --grant-app``/``--grant-bridge``).
      ``apply=False`` only connects: for a role that may use but not create the schema (the
      application role of docs/howto/database-roles.md), the owner applying it apart.
    * Pool: :class:`psycopg_pool.AsyncConnectionPool`, ``min_size`` to ``max_size``
      connections (spec 003's ``pg`` ``Pool`` defaults to 10), opened before the block runs
      (its ``min_size`` connections made), closed after it. Connections are psycopg's default
      (not autocommit): ``async with pool.connection()`` commits at the end of the block. Through
      a tunnel, each connection is checked as it is taken (a dropped tunnel breaks them all).
      ``timeout``: seconds the pool may take to make its ``min_size`` connections at entry.

    Raises, before the block runs and with nothing left open: :class:`ConfigError` (a setting,
    ``test`` with another ``schema``, sizes not ``1 <= min_size <= max_size``, ``timeout`` not
    positive);
    :class:`TunnelError` (``reason``, and ``code`` ``ECONNREFUSED``/``ENOTFOUND``/``ENOENT``
    for the spec's cases); :class:`DatabaseError` (``sqlstate``: ``3D000`` no such database,
    ``42501`` no privilege to create the schema, ``28P01`` wrong password, ...; ``None`` when
    the server was not reached). Errors of the block's own statements are psycopg's
    (:class:`psycopg.Error`, with the same ``sqlstate`` attribute) and pass through untouched.
    """
    source = load_environment() if env is None else dict(env)
    target = _target_schema(test, schema, source)
    if not 1 <= min_size <= max_size:
        raise ConfigError(f"setup_database(min_size={min_size}, max_size={max_size}): need "
                          "1 <= min_size <= max_size")
    if not timeout > 0:
        raise ConfigError(f"setup_database(timeout={timeout}): must be more than 0 (seconds)")
    db = DatabaseSettings.from_env(source)
    ssh = SSHSettings.from_env(source)
    async with database(db, ssh, supervised_tunnel=ssh is not None) as conninfo:
        where = f"{describe(conninfo)} (embedded)" if db.embedded else describe(conninfo)
        if apply:
            report = await apply_schema(conninfo, schema=target, grants=grants)
            log.info("schema %s at %s: %s", target, where,
                     "applied" if report.files or report.applied else "up to date",
                     extra={"event": "setup_applied", "schema": target})
        pool = await _open_pool(conninfo, target, where, min_size=min_size, max_size=max_size,
                                checked=ssh is not None, timeout=timeout)
        try:
            yield pool
        finally:
            await pool.close()
