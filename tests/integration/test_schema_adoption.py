"""The apply adopts nothing another role planted (docs/topics/security.md, "Planted objects").

``CREATE SCHEMA IF NOT EXISTS``, ``CREATE TABLE IF NOT EXISTS`` and ``CREATE OR REPLACE
FUNCTION`` keep an object that is already there, and its owner with it: a role that created
the target schema, a chat table or a function the capture triggers call before the set-up ran
would own what the bridge then trusts. The apply refuses, in one line naming the object, its
owner and the fix, before it changes anything, whoever runs it (a superuser too); ``--verify``
reports the same on an applied schema. The legitimate set-ups still work: the owner role that
owns the database, a role acting through an explicit membership, the bare spec tables created
by the role that runs the set-up.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from daemon.errors import SchemaError
from daemon.schema import apply_schema_sync, verify_schema
from tests.integration.test_schema import (
    LOG_TABLES,
    SPEC_DDL,
    SPEC_TABLES,
    catalog_fingerprint,
    connect,
    run_setup,
    schema_objects,
    tables_of,
)
from tests.support.fixtures import conninfo_env

# spec 003's users table, as an application would create it
SPEC_USERS = SPEC_DDL[SPEC_DDL.index("CREATE TABLE users"):SPEC_DDL.index("CREATE TABLE channels")]


def _dbname(conninfo: str) -> str:
    return str(conninfo_to_dict(conninfo)["dbname"])


@pytest.fixture
def make_role(pg_server_conninfo: str, fresh_db: str) -> Iterator[Callable[..., str]]:
    """Factory: a new role (``LOGIN`` unless told otherwise) with CREATE on ``fresh_db``;
    what it owns there is the superuser's afterwards, and the role is dropped."""
    made: list[str] = []

    def make(options: str = "LOGIN") -> str:
        name = f"pgbridge_planter_{uuid.uuid4().hex[:8]}"
        with connect(pg_server_conninfo) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} " + options).format(sql.Identifier(name)))
            conn.execute(sql.SQL("GRANT CREATE, TEMPORARY ON DATABASE {} TO {}").format(
                sql.Identifier(_dbname(fresh_db)), sql.Identifier(name)))
        made.append(name)
        return name

    yield make
    with connect(fresh_db) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO CURRENT_USER").format(
            sql.Identifier(_dbname(fresh_db))))
        for name in made:
            conn.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(
                sql.Identifier(name)))
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
    with connect(pg_server_conninfo) as conn:
        for name in made:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def as_role(conninfo: str, role: str) -> str:
    return make_conninfo(conninfo, user=role)


def me(conninfo: str) -> str:
    """The role a conninfo logs in as (the test server's superuser: postgres, mostly)."""
    with connect(conninfo) as conn:
        return str((conn.execute("SELECT current_user").fetchone() or ("",))[0])


def test_a_schema_another_role_planted_is_refused_by_setup_db_test_and_nothing_is_created(
        fresh_db: str, make_role: Callable[..., str], tmp_path: Path) -> None:
    mallory = make_role()
    with connect(as_role(fresh_db, mallory)) as conn:
        conn.execute("CREATE SCHEMA test")
    with connect(fresh_db) as conn:
        public_before = schema_objects(conn, "public")
    result = run_setup("--test", env=conninfo_env(fresh_db), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "SQLSTATE 42501" in errors[0]
    assert f"schema test is owned by role {mallory}" in errors[0]
    assert "ALTER SCHEMA test OWNER TO" in errors[0] and "nothing was changed" in errors[0]
    with connect(fresh_db) as conn:
        assert schema_objects(conn, "test") == []
        assert schema_objects(conn, "public") == public_before


def test_a_spec_users_table_another_role_planted_in_the_owners_schema_is_refused(
        fresh_db: str, make_role: Callable[..., str]) -> None:
    mallory = make_role()
    with connect(fresh_db) as conn:
        conn.execute("CREATE SCHEMA test")  # the superuser's
        conn.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA test TO {}").format(
            sql.Identifier(mallory)))
    with connect(as_role(fresh_db, mallory)) as conn:
        conn.execute("SET search_path TO test")
        conn.execute(SPEC_USERS)
    with connect(fresh_db) as conn:
        before = catalog_fingerprint(conn, "test")
    with pytest.raises(SchemaError) as caught:
        apply_schema_sync(fresh_db, schema="test", max_wait=0)
    line = str(caught.value)
    assert caught.value.sqlstate == "42501" and "\n" not in line
    assert f"table test.users is owned by role {mallory}" in line
    assert f"ALTER TABLE test.users OWNER TO {me(fresh_db)} if role {mallory}" in line
    with connect(fresh_db) as conn:
        assert catalog_fingerprint(conn, "test") == before
        assert tables_of(conn, "test") == {"users"}


@pytest.mark.parametrize(("planted", "named"), [
    ("CREATE FUNCTION test.gen_ulid() RETURNS varchar(26) LANGUAGE sql AS $$ SELECT 'X' $$",
     "function test.gen_ulid()"),
    ("CREATE FUNCTION test.pgbridge_hmac(bytea, bytea, text) RETURNS text LANGUAGE sql "
     "AS $$ SELECT 'forged' $$", "function test.pgbridge_hmac(bytea, bytea, text)"),
])
def test_a_function_another_role_planted_in_the_schema_is_refused(
        fresh_db: str, make_role: Callable[..., str], planted: str, named: str) -> None:
    mallory = make_role()
    with connect(fresh_db) as conn:
        conn.execute("CREATE SCHEMA test")
        conn.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA test TO {}").format(
            sql.Identifier(mallory)))
    with connect(as_role(fresh_db, mallory)) as conn:
        conn.execute(planted)
    with connect(fresh_db) as conn:
        before = catalog_fingerprint(conn, "test")
    with pytest.raises(SchemaError) as caught:
        apply_schema_sync(fresh_db, schema="test", max_wait=0)
    assert caught.value.sqlstate == "42501"
    assert f"{named} is owned by role {mallory}" in str(caught.value)
    with connect(fresh_db) as conn:
        assert catalog_fingerprint(conn, "test") == before


def test_verify_and_the_next_apply_report_a_table_handed_to_another_role(
        fresh_db: str, make_role: Callable[..., str]) -> None:
    mallory = make_role()
    apply_schema_sync(fresh_db)
    assert asyncio.run(verify_schema(fresh_db)) == []
    with connect(fresh_db) as conn:
        conn.execute(sql.SQL("ALTER TABLE public.messages OWNER TO {}").format(
            sql.Identifier(mallory)))
    problems = asyncio.run(verify_schema(fresh_db))
    runner = me(fresh_db)
    assert [p for p in problems if "owned by" in p] == [
        f"table public.messages is owned by role {mallory}, not by role {runner} (running "
        f"this) or a role it is a member of: ALTER TABLE public.messages OWNER TO {runner} if "
        f"role {mallory} is legitimately the application's, else drop it, or run this as role "
        f"{mallory}"]
    with pytest.raises(SchemaError, match=f"table public.messages is owned by role {mallory}"):
        apply_schema_sync(fresh_db, max_wait=0)


def test_a_superuser_refuses_public_of_a_database_a_plain_role_owns(
        fresh_db: str, make_role: Callable[..., str]) -> None:
    mallory = make_role()
    with connect(fresh_db) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
            sql.Identifier(_dbname(fresh_db)), sql.Identifier(mallory)))
    with pytest.raises(SchemaError, match="schema public is owned by role pg_database_owner"):
        apply_schema_sync(fresh_db, max_wait=0)
    with connect(fresh_db) as conn:
        assert tables_of(conn, "public") == set()


def test_the_owner_role_that_owns_the_database_sets_up_public_over_its_own_spec_tables(
        fresh_db: str, make_role: Callable[..., str]) -> None:
    """The documented production set-up (docs/howto/database-roles.md), over tables the
    application created from the bare spec as that same role; then a re-apply and --verify."""
    owner = make_role()
    with connect(fresh_db) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
            sql.Identifier(_dbname(fresh_db)), sql.Identifier(owner)))
    url = as_role(fresh_db, owner)
    with connect(url) as conn:
        conn.execute(SPEC_DDL)
    report = apply_schema_sync(url)
    assert "0001_spec_constraints" in report.applied
    assert apply_schema_sync(url).files == []
    assert asyncio.run(verify_schema(url)) == []
    with connect(fresh_db) as conn:
        assert tables_of(conn, "public") == set(SPEC_TABLES) | set(LOG_TABLES)


def test_tables_of_a_role_the_runner_is_an_explicit_member_of_are_adopted(
        fresh_db: str, make_role: Callable[..., str]) -> None:
    """A superuser is not trusted with every role's tables by being a superuser: only the
    membership granted to it makes the group's tables its own."""
    group = make_role("NOLOGIN")
    with connect(fresh_db) as conn:
        conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(group)))
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(group)))
        conn.execute(SPEC_DDL)
        conn.execute("RESET ROLE")
    with pytest.raises(SchemaError, match=f"is owned by role {group}"):
        apply_schema_sync(fresh_db, max_wait=0)
    with connect(fresh_db) as conn:
        conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(group)))
    try:
        apply_schema_sync(fresh_db)
        assert asyncio.run(verify_schema(fresh_db)) == []
    finally:
        with connect(fresh_db) as conn:
            conn.execute(sql.SQL("REVOKE {} FROM CURRENT_USER").format(sql.Identifier(group)))
