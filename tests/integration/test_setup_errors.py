"""setup_db.py's documented error cases (spec 003, "Error Handling"), run as a subprocess with a
clean environment: each gives one line on stderr (no traceback) and its exit code.

Exit codes: 0 ok, 1 database, 2 usage/configuration, 3 SSH tunnel (daemon/cli.py).

Every case is produced for real against a PostgreSQL server, except 42P04 and 42P07, which
setup_db.py cannot meet (it creates no database, and every CREATE it runs is IF NOT EXISTS or OR
REPLACE): for those, real server errors (CREATE DATABASE / CREATE TABLE of an existing name) go
through daemon.db.translate. 28P01 needs a server that asks for a password, and the test servers
trust everyone, so that case starts a private embedded cluster whose pg_hba.conf requires
scram-sha-256 for one role.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import make_conninfo

from daemon.db import translate
from daemon.embedded import start_embedded
from tests.support.fixtures import ROOT, conninfo_env, dbname_of

SETUP_DB = str(ROOT / "setup_db.py")


def run_setup(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, SETUP_DB, *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


def clean_env(**variables: str) -> dict[str, str]:
    """The process environment without any database/tunnel/pgbridge variable, plus these."""
    env = conninfo_env("")
    del env["DATABASE_URL"]
    env.update(variables)
    return env


def one_line_error(result: subprocess.CompletedProcess[str], exit_code: int) -> str:
    """Check the exit code and that stderr is one error line; return that line."""
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("setup_db.py: error: "), lines[0]
    return lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- network -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_connection_refused(tmp_path: Path) -> None:
    port = closed_port()
    result = run_setup(clean_env(POSTGRES_HOST="127.0.0.1", POSTGRES_PORT=str(port)), tmp_path)
    line = one_line_error(result, 1)
    assert f"127.0.0.1:{port}" in line and "connection refused" in line
    assert "POSTGRES_HOST" in line and "POSTGRES_PORT" in line


@pytest.mark.slow
def test_connection_refused_through_database_url(tmp_path: Path) -> None:
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/chat"
    line = one_line_error(run_setup(clean_env(DATABASE_URL=url), tmp_path), 1)
    assert "connection refused" in line


@pytest.mark.slow
def test_host_not_found(tmp_path: Path) -> None:
    result = run_setup(clean_env(POSTGRES_HOST="nohost.invalid"), tmp_path)
    line = one_line_error(result, 1)
    assert "nohost.invalid" in line and "host not found" in line


# --- the server's answers -------------------------------------------------------------------

def test_missing_database_3D000(pg_server_conninfo: str, tmp_path: Path) -> None:
    missing = f"pgbridge_missing_{uuid.uuid4().hex[:8]}"
    url = make_conninfo(pg_server_conninfo, dbname=missing)
    line = one_line_error(run_setup(conninfo_env(url), tmp_path), 1)
    assert "SQLSTATE 3D000" in line
    assert f"database {missing} does not exist" in line


def test_missing_role_is_not_reported_as_a_missing_database(
        fresh_db: str, tmp_path: Path) -> None:
    """Regression: 'role "x" does not exist' matched the 3D000 text and was reported as a
    missing database (naming the database that does exist)."""
    url = make_conninfo(fresh_db, user=f"pgbridge_nobody_{uuid.uuid4().hex[:8]}")
    line = one_line_error(run_setup(conninfo_env(url), tmp_path), 1)
    assert "SQLSTATE 28000" in line and "3D000" not in line
    assert "does not exist: create it" not in line


@pytest.fixture(scope="module")
def password_server() -> Iterator[str]:
    """A private embedded cluster that asks role pgbridge_pw for a scram-sha-256 password
    ('right') over its socket; everyone else is trusted. Conninfo of its superuser."""
    data_dir = Path(tempfile.mkdtemp(prefix="pgbridge-pw-"))
    try:
        server = start_embedded(data_dir)
        with psycopg.connect(server.uri, autocommit=True) as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute("CREATE ROLE pgbridge_pw LOGIN PASSWORD 'right'")
        hba = server.pgdata / "pg_hba.conf"
        hba.write_text("local all pgbridge_pw scram-sha-256\n" + hba.read_text())
        server.stop()  # restarted below with the new pg_hba.conf (no reload race)
        server = start_embedded(data_dir)
        try:
            yield server.uri
        finally:
            server.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.slow
def test_wrong_password_28P01(password_server: str, tmp_path: Path) -> None:
    url = make_conninfo(password_server, user="pgbridge_pw", password="wrong-secret-42")
    line = one_line_error(run_setup(conninfo_env(url), tmp_path), 1)
    assert "SQLSTATE 28P01" in line
    assert "password authentication failed for pgbridge_pw" in line
    assert "POSTGRES_PASSWORD" in line
    assert "wrong-secret-42" not in line
    # The same role with the right password gets past authentication (the server is real).
    right = make_conninfo(password_server, user="pgbridge_pw", password="right")
    with psycopg.connect(right) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("pgbridge_pw",)


@pytest.mark.slow
@pytest.mark.parametrize("flag", [[], ["--test"]])
def test_role_without_create_privilege_42501(
        fresh_db: str, make_role: Callable[[str], str], tmp_path: Path, flag: list[str]) -> None:
    role = make_role("")
    url = make_conninfo(fresh_db, user=role)
    line = one_line_error(run_setup(conninfo_env(url), tmp_path, *flag), 1)
    assert "SQLSTATE 42501" in line and "insufficient privilege" in line
    assert role in line and dbname_of(fresh_db) in line
    with psycopg.connect(fresh_db) as conn:  # and nothing was left behind
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname IN "
                            "('public', 'test')").fetchone() == (0,)


@pytest.mark.slow
def test_role_connection_limit_reached_53300(
        fresh_db: str, make_role: Callable[[str], str], tmp_path: Path) -> None:
    role = make_role("CONNECTION LIMIT 1")
    url = make_conninfo(fresh_db, user=role)
    with psycopg.connect(url):  # the role's one connection
        line = one_line_error(run_setup(conninfo_env(url), tmp_path), 1)
    assert "SQLSTATE 53300" in line and "too many connections" in line
    assert "CONNECTION LIMIT" in line and role in line


def test_duplicate_table_42P07_translation(fresh_db: str) -> None:
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE users (id int)")
        with pytest.raises(errors.DuplicateTable) as exc:
            conn.execute("CREATE TABLE users (id int)")
    error = translate(exc.value, fresh_db, doing="applying the schema")
    assert error.sqlstate == "42P07" and error.exit_code == 1
    message = str(error)
    assert "\n" not in message and "SQLSTATE 42P07" in message
    assert 'relation "users" already exists' in message and "--schema" in message


def test_duplicate_database_42P04_translation(pg_server_conninfo: str, fresh_db: str) -> None:
    name = dbname_of(fresh_db)
    with psycopg.connect(pg_server_conninfo, autocommit=True) as conn:
        with pytest.raises(errors.DuplicateDatabase) as exc:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    error = translate(exc.value, pg_server_conninfo)
    assert error.sqlstate == "42P04" and error.exit_code == 1
    message = str(error)
    assert "\n" not in message and "SQLSTATE 42P04" in message
    # names the database that exists, not the one connected to
    assert f'database "{name}" already exists' in message


# --- usage and configuration (exit 2), tunnel (exit 3) ---------------------------------------

@pytest.mark.slow
def test_bad_schema_name_is_a_usage_error(tmp_path: Path) -> None:
    env = clean_env(POSTGRES_HOST="127.0.0.1", POSTGRES_PORT=str(closed_port()))
    line = one_line_error(run_setup(env, tmp_path, "--schema", "Bad;"), 2)
    assert "--schema='Bad;' is not a valid schema name" in line


def test_bad_schema_in_environment_names_the_variable(tmp_path: Path) -> None:
    env = clean_env(POSTGRES_HOST="127.0.0.1", PGBRIDGE_SCHEMA="x y")
    line = one_line_error(run_setup(env, tmp_path), 2)
    assert "PGBRIDGE_SCHEMA" in line


def test_bad_port_names_the_variable(tmp_path: Path) -> None:
    env = clean_env(POSTGRES_HOST="127.0.0.1", POSTGRES_PORT="fivefourthreetwo")
    line = one_line_error(run_setup(env, tmp_path), 2)
    assert "POSTGRES_PORT" in line and "not an integer" in line


@pytest.mark.slow
def test_conflicting_flags_are_a_usage_error(tmp_path: Path) -> None:
    result = run_setup(clean_env(), tmp_path, "--test", "--schema", "x")
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr and "Traceback" not in result.stderr


def test_help_documents_the_exit_codes(tmp_path: Path) -> None:
    result = run_setup(clean_env(), tmp_path, "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for code in ("0 ok", "1 database error", "2 usage or configuration error", "3 SSH tunnel"):
        assert code in text


@pytest.mark.slow
def test_ssh_tunnel_refused_exits_3(tmp_path: Path) -> None:
    """Only the exit code and the one line here; tests/integration/test_tunnel.py covers the
    tunnel."""
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    port = closed_port()
    env = clean_env(POSTGRES_HOST="127.0.0.1", SSH_HOST="127.0.0.1", SSH_PORT=str(port),
                    SSH_USER="nobody", SSH_MAX_RETRIES="0", SSH_KNOWN_HOSTS=str(known_hosts))
    line = one_line_error(run_setup(env, tmp_path), 3)
    assert f"SSH connection to 127.0.0.1:{port} refused" in line
