"""``setup_database`` (daemon/setup_api.py), spec 003's programmatic usage, against a real
PostgreSQL, through a real SSH tunnel (tests/support/sshd.py) where ``SSH_HOST`` is set.

The SSH server runs in this test's event loop, so every database access here is async: a
blocking call would stop the loop that carries the tunnel. The tests' own reads go to
PostgreSQL directly, never through the tunnel. ``env=`` gives each call its whole environment
(nothing of the machine's ``POSTGRES_*``/``SSH_*``/``.env`` leaks in).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from daemon import ConfigError, DatabaseError, TunnelError, setup_database
from daemon.setup_api import search_path_of
from tests.support.fixtures import DB_HOST, DB_PORT, conninfo_env, dbname_of
from tests.support.helpers import make_room, make_user
from tests.support.pgcluster import PgBouncer, work_dir
from tests.support.procs import until
from tests.support.sshd import TestSSHServer

WAIT = 10.0  # seconds; only reached when a test is failing

Conn = psycopg.AsyncConnection[Any]


def tunnel_env(conninfo: str, sshd: TestSSHServer, **extra: str) -> dict[str, str]:
    """Spec 003's POSTGRES_* and SSH_* variables for the database of ``conninfo`` behind the
    bastion ``sshd``, which forwards DB_HOST:DB_PORT to it; no retries (a refused SSH fails at
    once)."""
    parts = conninfo_to_dict(conninfo)
    env = conninfo_env(conninfo)
    del env["DATABASE_URL"]
    env.update({
        "POSTGRES_HOST": DB_HOST, "POSTGRES_PORT": str(DB_PORT),
        "POSTGRES_DB": dbname_of(conninfo), "POSTGRES_USER": str(parts.get("user") or "postgres"),
        "SSH_HOST": "127.0.0.1", "SSH_PORT": str(sshd.port), "SSH_USER": sshd.user,
        "SSH_KEY_PATH": str(sshd.client_key_path), "SSH_KNOWN_HOSTS": str(sshd.known_hosts_path),
        "SSH_MAX_RETRIES": "0", "SSH_RETRY_DELAY": "10ms",
    })
    if parts.get("password"):
        env["POSTGRES_PASSWORD"] = str(parts["password"])
    env.update(extra)
    return env


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def one(conninfo: str, query: str, *params: Any) -> Any:
    """The first column of the first row of ``query``, on a direct connection."""
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        row = await (await conn.execute(query.encode(), params)).fetchone()
        return row[0] if row else None


async def sessions_left(conninfo: str) -> int:
    """Sessions on the database of ``conninfo`` other than the one asking, once none is left or
    after WAIT seconds: a backend leaves pg_stat_activity a moment after its client closed, and
    there is no event to wait for, so this polls."""
    deadline = time.monotonic() + WAIT
    while True:
        count = int(await one(conninfo, "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                              "current_database() AND pid <> pg_backend_pid()"))
        if count == 0 or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.02)


async def refuses(port: int) -> bool:
    """True when nothing accepts TCP connections on 127.0.0.1:port."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


def tunnel_ports(caplog: pytest.LogCaptureFixture) -> list[int]:
    """The local ports of the tunnels opened during the test (the ``tunnel_open`` log event)."""
    return [record.local_port for record in caplog.records  # type: ignore[attr-defined]
            if getattr(record, "event", None) == "tunnel_open"]


# --------------------------------------------------------------------------- through the tunnel


async def test_setup_database_applies_test_schema_through_ssh_tunnel_and_yields_working_pool(
        sshd: TestSSHServer, fresh_db: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="daemon.tunnel")
    async with setup_database(test=True, env=tunnel_env(fresh_db, sshd)) as pool:
        assert not pool.closed
        assert sshd.logins == 1 and (DB_HOST, DB_PORT) in sshd.forward_requests
        [port] = tunnel_ports(caplog)
        assert conninfo_to_dict(str(pool.conninfo))["port"] == str(port)  # the pool uses the tunnel
        async with pool.connection() as conn:
            assert await (await conn.execute("SHOW search_path")).fetchone() == (
                '"test", pg_temp',)
            assert await (await conn.execute("SELECT current_schema()")).fetchone() == ("test",)
            user = await make_user(conn, "ada")  # unqualified names: the test schema's tables
            room = await make_room(conn, user, name="general")
        # committed when the pooled connection went back; read directly, not through the tunnel
        assert await one(fresh_db, "SELECT username FROM test.users WHERE id = %s", user) == "ada"
        assert await one(fresh_db, "SELECT to_regclass('public.users')") is None
        assert await one(fresh_db, "SELECT count(*) FROM pg_tables WHERE schemaname = "
                         "'public'") == 0
        # change capture works in the test schema: the room and its member were logged
        assert await one(fresh_db, "SELECT count(*) FROM test.change_events WHERE room_id = %s",
                         room) == 2
    assert pool.closed
    assert await refuses(port)
    async with asyncio.timeout(WAIT):
        await sshd.idle.wait()
    assert sshd.live == set()
    assert await sessions_left(fresh_db) == 0


async def test_setup_database_twice_finds_schema_up_to_date_and_opens_a_tunnel_each_time(
        sshd: TestSSHServer, fresh_db: str) -> None:
    env = tunnel_env(fresh_db, sshd)
    for _ in range(2):  # the second run finds the schema up to date, and works the same
        async with setup_database(test=True, env=env) as pool, pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM schema_migrations")
            assert (await cur.fetchone() or [0])[0] > 0
    assert sshd.logins == 2
    async with asyncio.timeout(WAIT):
        await sshd.idle.wait()


# --------------------------------------------------------------------------- without SSH


async def test_setup_database_without_ssh_uses_public_schema_by_default(fresh_db: str) -> None:
    async with setup_database(env=conninfo_env(fresh_db), max_size=2) as pool:
        assert pool.conninfo == fresh_db  # no tunnel, no options: the conninfo as configured
        assert pool.max_size == 2
        async with pool.connection() as conn:
            cur = await conn.execute("SHOW search_path")
            assert await cur.fetchone() == ('"$user", public',)  # the server's default
            user = await make_user(conn)
    assert await one(fresh_db, "SELECT count(*) FROM public.users WHERE id = %s", user) == 1
    assert await one(fresh_db, "SELECT to_regnamespace('test')") is None
    assert await sessions_left(fresh_db) == 0


async def test_setup_database_reads_env_local_of_the_working_directory_like_setup_db(
        fresh_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = [name for name in os.environ if name == "DATABASE_URL" or (
        name.startswith(("POSTGRES_", "SSH_", "PGBRIDGE_"))
        and not name.startswith("PGBRIDGE_TEST_"))]
    for name in settings:  # the machine's own settings would win over the files
        monkeypatch.delenv(name)
    (tmp_path / ".env").write_text("DATABASE_URL=postgresql://nobody@127.0.0.1:1/nothing\n")
    (tmp_path / ".env.local").write_text(f"DATABASE_URL={fresh_db}\nPGBRIDGE_SCHEMA=local\n")
    monkeypatch.chdir(tmp_path)
    async with setup_database() as pool, pool.connection() as conn:  # no env=: the files
        assert await (await conn.execute("SELECT current_schema()")).fetchone() == ("local",)
    assert await one(fresh_db, "SELECT to_regclass('local.users') IS NOT NULL") is True


async def test_setup_database_keeps_the_conninfos_own_options(fresh_db: str) -> None:
    url = make_conninfo(fresh_db, options="-c statement_timeout=1234")
    async with setup_database(test=True, env=conninfo_env(url)) as pool, \
            pool.connection() as conn:
        cur = await conn.execute("SELECT current_setting('statement_timeout'), "
                                 "current_setting('search_path')")
        assert await cur.fetchone() == ("1234ms", search_path_of("test"))


async def test_setup_database_schema_argument_and_pgbridge_schema(fresh_db: str) -> None:
    async with setup_database(schema="chat", env=conninfo_env(fresh_db)) as pool, \
            pool.connection() as conn:
        assert await (await conn.execute("SELECT current_schema()")).fetchone() == ("chat",)
    env = conninfo_env(fresh_db) | {"PGBRIDGE_SCHEMA": "chat2"}
    async with setup_database(env=env) as pool, pool.connection() as conn:
        assert await (await conn.execute("SELECT current_schema()")).fetchone() == ("chat2",)
    assert await one(fresh_db, "SELECT count(*) FROM pg_tables WHERE tablename = 'users' AND "
                     "schemaname IN ('chat', 'chat2')") == 2


async def test_temporary_table_does_not_shadow_the_test_schemas_tables(fresh_db: str) -> None:
    """pg_temp is last in the pool's search_path (as the schema is applied with): a temporary
    table named like a chat table, made by whoever holds the connection, is not what an
    unqualified name resolves to."""
    async with setup_database(test=True, env=conninfo_env(fresh_db)) as pool, \
            pool.connection() as conn:
        await conn.execute("CREATE TEMPORARY TABLE users (id text, stolen boolean)")
        user = await make_user(conn)
        cur = await conn.execute("SELECT count(*) FROM pg_temp.users")
        assert await cur.fetchone() == (0,)
    assert await one(fresh_db, "SELECT count(*) FROM test.users WHERE id = %s", user) == 1


async def test_setup_database_apply_false_on_unapplied_database_returns_a_pool(
        fresh_db: str) -> None:
    """apply=False only connects (the application role of a three-role set-up, the owner
    applying the schema apart): nothing is created, and the block's own errors are psycopg's,
    untranslated."""
    async with setup_database(test=True, env=conninfo_env(fresh_db), apply=False) as pool:
        async with pool.connection() as conn:
            assert await (await conn.execute("SHOW search_path")).fetchone() == (
                '"test", pg_temp',)
            assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
        with pytest.raises(errors.UndefinedTable):
            async with pool.connection() as conn:
                await conn.execute("SELECT * FROM users")
    assert await one(fresh_db, "SELECT to_regnamespace('test')") is None
    assert await one(fresh_db, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0


@contextlib.contextmanager
def pgbouncer_for(conninfo: str, *, ignore: str) -> Iterator[PgBouncer]:
    """A transaction-mode PgBouncer on 127.0.0.1 in front of the database of ``conninfo``, with
    ``ignore_startup_parameters = ignore``. Skips when pgbouncer is not installed, and for a
    server on a unix socket (the embedded one's is in its data directory, which only the
    server's OS user may enter)."""
    parts = conninfo_to_dict(conninfo)
    if str(parts.get("host") or "").startswith("/"):
        pytest.skip("PgBouncer reaches the test server over TCP only (PGBRIDGE_TEST_DSN)")
    port = int(parts.get("port") or 5432)
    with work_dir("pgbridge-setup-api-pgbouncer-") as base:
        target: Any = SimpleNamespace(port=port)  # PgBouncer reads only the target's port
        bouncer = PgBouncer(base, target, dbname_of(conninfo))
        bouncer.ini.write_text(f"{bouncer.ini.read_text()}ignore_startup_parameters = {ignore}\n")
        bouncer.start()
        try:
            yield bouncer
        finally:
            bouncer.stop()


@pytest.mark.parametrize("ignored", [False, True])
async def test_through_pgbouncer_a_test_pool_is_refused_at_entry_and_public_works(
        fresh_db: str, ignored: bool) -> None:
    """PgBouncer refuses the options startup parameter, or drops it when told to ignore it:
    either way no pool that would write to another schema than asked is returned."""
    ignore = "extra_float_digits, options" if ignored else "extra_float_digits"
    with pgbouncer_for(fresh_db, ignore=ignore) as bouncer:

        async def answers() -> bool:
            try:
                await (await psycopg.AsyncConnection.connect(bouncer.conninfo())).close()
            except psycopg.OperationalError:
                return False
            return True

        await until(answers, f"pgbouncer to answer ({bouncer.log()})")
        env = conninfo_env(bouncer.conninfo())
        with pytest.raises(DatabaseError) as caught:
            async with setup_database(test=True, env=env):
                pytest.fail("the block ran")
        expected = ("search_path '\"$user\", public', not '\"test\", pg_temp'" if ignored
                    else "unsupported startup parameter")
        assert expected in str(caught.value)
        async with setup_database(env=env) as pool, pool.connection() as conn:
            assert await (await conn.execute("SHOW search_path")).fetchone() == (
                '"$user", public',)
            user = await make_user(conn)
    assert await one(fresh_db, "SELECT count(*) FROM public.users WHERE id = %s", user) == 1


# --------------------------------------------------------------------------- errors at entry


@pytest.mark.parametrize(("variables", "reason", "code"), [
    ({"SSH_PORT": "closed"}, "refused", "ECONNREFUSED"),
    ({"SSH_HOST": "bastion.invalid"}, "not_found", "ENOTFOUND"),
    ({"SSH_KEY_PATH": "missing"}, "key_missing", "ENOENT"),
])
async def test_ssh_failures_raise_tunnel_error_with_spec_code_and_leave_nothing_open(
        sshd: TestSSHServer, fresh_db: str, tmp_path: Path, variables: dict[str, str],
        reason: str, code: str) -> None:
    values = {"closed": str(closed_port()), "missing": str(tmp_path / "no_such_key")}
    env = tunnel_env(fresh_db, sshd, **{k: values.get(v, v) for k, v in variables.items()})
    started = time.monotonic()
    with pytest.raises(TunnelError) as caught:
        async with setup_database(test=True, env=env):
            pytest.fail("the block ran")
    assert time.monotonic() - started < 5.0
    assert (caught.value.reason, caught.value.code) == (reason, code)
    assert caught.value.exit_code == 3 and "\n" not in str(caught.value)
    assert sshd.logins == 0 and sshd.live == set()
    assert await one(fresh_db, "SELECT to_regnamespace('test')") is None
    assert await sessions_left(fresh_db) == 0


async def test_missing_database_through_tunnel_raises_3D000_and_closes_the_tunnel(
        sshd: TestSSHServer, fresh_db: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="daemon.tunnel")
    missing = f"pgbridge_missing_{uuid.uuid4().hex[:8]}"
    with pytest.raises(DatabaseError) as caught:
        async with setup_database(test=True, env=tunnel_env(fresh_db, sshd,
                                                             POSTGRES_DB=missing)):
            pytest.fail("the block ran")
    assert caught.value.sqlstate == "3D000"
    assert f"database {missing} does not exist" in str(caught.value)
    assert sshd.logins == 1  # the tunnel was open, and is closed
    [port] = tunnel_ports(caplog)
    assert await refuses(port)
    async with asyncio.timeout(WAIT):
        await sshd.idle.wait()


@pytest.mark.parametrize("test", [True, False])
async def test_role_without_create_privilege_raises_42501_and_leaves_nothing(
        fresh_db: str, make_role: Callable[..., str], test: bool) -> None:
    role = make_role()
    with pytest.raises(DatabaseError) as caught:
        async with setup_database(test, env=conninfo_env(make_conninfo(fresh_db, user=role))):
            pytest.fail("the block ran")
    assert caught.value.sqlstate == "42501"
    assert "insufficient privilege" in str(caught.value) and role in str(caught.value)
    assert await one(fresh_db, "SELECT count(*) FROM pg_tables WHERE schemaname IN "
                     "('public', 'test')") == 0
    assert await sessions_left(fresh_db) == 0


@pytest.mark.slow
async def test_pool_that_cannot_fill_raises_the_servers_reason_and_closes_what_it_opened(
        fresh_db: str, make_role: Callable[..., str]) -> None:
    """min_size above the role's CONNECTION LIMIT: the pool waits ``timeout`` for connections
    the server refuses (psycopg_pool logs each refusal, 53300), then closes those it made; the
    error names the limits to check."""
    role = make_role("CONNECTION LIMIT 1")
    env = conninfo_env(make_conninfo(fresh_db, user=role))
    started = time.monotonic()
    with pytest.raises(DatabaseError) as caught:
        async with setup_database(env=env, apply=False, min_size=2, timeout=2.0):
            pytest.fail("the block ran")
    assert 2.0 <= time.monotonic() - started < 2.0 + WAIT
    assert "could not open 2 connection(s) in 2 s" in str(caught.value)
    assert "CONNECTION LIMIT" in str(caught.value) and "\n" not in str(caught.value)
    assert await sessions_left(fresh_db) == 0


async def test_bad_arguments_raise_config_error_before_connecting(
        sshd: TestSSHServer, fresh_db: str) -> None:
    env = tunnel_env(fresh_db, sshd)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"test": True, "schema": "chat"}, "pass one or the other"),
        ({"schema": "Bad;"}, "schema='Bad;' is not a valid schema name"),
        ({"min_size": 3, "max_size": 2}, "1 <= min_size <= max_size"),
        ({"timeout": 0}, "timeout=0): must be more than 0"),
        ({"env": env | {"SSH_PORT": "twenty-two"}}, "SSH_PORT"),
    ]
    for kwargs, text in cases:
        with pytest.raises(ConfigError, match=re.escape(text)):
            async with setup_database(**{"env": env, **kwargs}):
                pytest.fail("the block ran")
    assert sshd.connections_made == 0
