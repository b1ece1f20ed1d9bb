"""The integration tests' fixtures (``tests/integration/conftest.py`` imports them): a real
PostgreSQL for every test, and bridges to test against.

The server is ``PGBRIDGE_TEST_DSN`` when set (for example this machine's PostgreSQL 15:
``postgresql://postgres@127.0.0.1:5432/postgres``), else an embedded PostgreSQL started for the
session in ``PGBRIDGE_TEST_DATA_DIR`` (default ``$TMPDIR/pgbridge-test``). Tests never touch
existing databases: each database they use is created here with a unique name and dropped after.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from daemon.app import Bridge
from daemon.embedded import start_embedded
from daemon.schema import apply_schema_sync
from daemon.settings import DaemonSettings
from tests.support.proxy import FreezingProxy
from tests.support.sshd import TestSSHServer, postgres_target

ROOT = Path(__file__).resolve().parents[2]
DB_HOST, DB_PORT = "db.internal", 5432  # the database as the test SSH server's forwards see it


@pytest.fixture(scope="session")
def pg_server_conninfo() -> Iterator[str]:
    """Conninfo of a maintenance database on the test server (superuser, trust auth)."""
    dsn = os.environ.get("PGBRIDGE_TEST_DSN")
    if dsn:
        yield dsn
        return
    data_dir = Path(
        os.environ.get("PGBRIDGE_TEST_DATA_DIR") or Path(tempfile.gettempdir()) / "pgbridge-test"
    )
    server = start_embedded(data_dir)
    yield server.uri
    server.stop()


@pytest.fixture(scope="session")
def create_database(pg_server_conninfo: str) -> Iterator[Callable[[], str]]:
    """Factory: create an empty database with a unique name, return its conninfo."""
    created: list[str] = []

    def create() -> str:
        name = f"pgbridge_t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(pg_server_conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        created.append(name)
        return make_conninfo(pg_server_conninfo, dbname=name)

    yield create
    with psycopg.connect(pg_server_conninfo, autocommit=True) as conn:
        for name in created:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def db_url(create_database: Callable[[], str]) -> str:
    """Conninfo of a database with the pgbridge schema applied in ``public`` (shared by tests:
    tests isolate themselves by creating their own users and rooms)."""
    url = create_database()
    apply_schema_sync(url, schema="public")
    return url


@pytest.fixture
def fresh_db(create_database: Callable[[], str]) -> str:
    """Conninfo of a new, empty database for this test only."""
    return create_database()


def conninfo_env(conninfo: str) -> dict[str, str]:
    """Environment for a subprocess that should use ``conninfo`` (``DATABASE_URL``), with every
    other database/tunnel variable removed so the machine's settings cannot leak in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POSTGRES_", "SSH_", "PGBRIDGE_", "PG")) and k != "DATABASE_URL"
    }
    env["DATABASE_URL"] = conninfo
    return env


def dbname_of(conninfo: str) -> str:
    return str(conninfo_to_dict(conninfo)["dbname"])


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """An autocommit connection to ``db_url`` for writing chat rows."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as c:
        yield c


@asynccontextmanager
async def running_bridge(conninfo: str, **overrides: Any) -> AsyncIterator[Bridge]:
    """A :class:`Bridge` served in this event loop on a free port until the block ends."""
    from tests.support.helpers import SECRET

    options: dict[str, Any] = {"port": 0, "jwt_secret": SECRET, "probe_interval": 1.0,
                               "ack_flush_interval": 0.05, "heartbeat": 5.0}
    options.update(overrides)
    bridge = Bridge(conninfo, DaemonSettings(**options), SECRET)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.serve(stop))
    started = asyncio.create_task(bridge.started.wait())
    done, _ = await asyncio.wait({task, started}, timeout=30,
                                 return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    assert started in done, "bridge did not start within 30 s"
    try:
        yield bridge
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def bridge(db_url: str) -> AsyncIterator[Bridge]:
    async with running_bridge(db_url) as b:
        yield b


@asynccontextmanager
async def bridge_behind_proxy(conninfo: str,
                              **overrides: Any) -> AsyncIterator[tuple[Bridge, FreezingProxy]]:
    """:func:`running_bridge` whose every database connection goes through a
    :class:`FreezingProxy` (the test's own connections go direct)."""
    proxy = FreezingProxy(conninfo_to_dict(conninfo))
    port = await proxy.start()
    try:
        async with running_bridge(make_conninfo(conninfo, host="127.0.0.1", port=port),
                                  **overrides) as bridge:
            yield bridge, proxy
    finally:
        proxy.resume()
        await proxy.close()


@pytest.fixture
async def proxied_bridge(db_url: str) -> AsyncIterator[tuple[Bridge, FreezingProxy]]:
    async with bridge_behind_proxy(db_url) as pair:
        yield pair


@pytest.fixture
async def sshd(tmp_path: Path, pg_server_conninfo: str) -> AsyncIterator[TestSSHServer]:
    """A real SSH server (asyncssh) on loopback whose forwards to DB_HOST:DB_PORT reach the
    test PostgreSQL."""
    server = TestSSHServer(tmp_path, {(DB_HOST, DB_PORT): postgres_target(pg_server_conninfo)})
    await server.start()
    yield server
    await server.stop()
