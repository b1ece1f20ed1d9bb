"""The start-up refusals docs/howto/own-postgresql.md promises, met for real: a daemon pointed
at a hot standby, or at a connection LISTEN does not work on (a transaction-mode PgBouncer),
stops with one line on stderr naming the problem and exit code 1 (a database error).

The servers are this module's own (tests/support/pgcluster.py): a throwaway primary with the
pgbridge schema, a hot standby streaming from it, and PgBouncers in front of it, one in
transaction mode (refused) and one in session mode (the control: served). The test server of
tests/support/fixtures.py cannot be a standby, so these tests run the same with and without
``PGBRIDGE_TEST_DSN``. Without
server binaries or pgbouncer they skip (fail under ``CI=true``).

The standby is refused at once (its recovery check); the transaction-mode PgBouncer only once
the listener's first NOTIFY round trip has not come back within ``READY_TIMEOUT`` (15 s), so
that test is marked slow.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from daemon.app import READY_TIMEOUT
from daemon.schema import apply_schema_sync
from tests.support.fixtures import conninfo_env
from tests.support.helpers import SECRET, events, post, subscribed_member
from tests.support.pgcluster import (
    Cluster,
    PgBouncer,
    pgbouncer_path,
    primary_cluster,
    server_bindir,
    standby_of,
    work_dir,
)
from tests.support.procs import DaemonProcess, daemon_process, free_port, human_lines, until

DBNAME = "pgbridge"


@pytest.fixture(scope="module")
def primary() -> Iterator[Cluster]:
    """A throwaway primary whose database ``pgbridge`` has the schema applied."""
    bindir = server_bindir()
    with work_dir("pgbridge-refusals-") as base, primary_cluster(base, bindir) as cluster:
        with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DBNAME}")
        apply_schema_sync(cluster.conninfo(DBNAME))
        yield cluster


@pytest.fixture(scope="module")
def standby(primary: Cluster) -> Iterator[Cluster]:
    with standby_of(primary) as cluster:
        yield cluster


@contextlib.contextmanager
def running_pgbouncer(request: pytest.FixtureRequest, pool_mode: str) -> Iterator[PgBouncer]:
    pgbouncer_path()  # skip (or fail under CI) before starting any server
    primary: Cluster = request.getfixturevalue("primary")
    with work_dir(f"pgbridge-pgbouncer-{pool_mode}-") as base:
        bouncer = PgBouncer(base, primary, DBNAME, pool_mode=pool_mode)
        bouncer.start()
        try:
            yield bouncer
        finally:
            bouncer.stop()


@pytest.fixture(scope="module")
def pgbouncer(request: pytest.FixtureRequest) -> Iterator[PgBouncer]:
    """A transaction-mode PgBouncer in front of the primary's database ``pgbridge``."""
    with running_pgbouncer(request, "transaction") as bouncer:
        yield bouncer


@pytest.fixture(scope="module")
def session_pgbouncer(request: pytest.FixtureRequest) -> Iterator[PgBouncer]:
    """The same in session mode, where LISTEN works."""
    with running_pgbouncer(request, "session") as bouncer:
        yield bouncer


async def wait_answering(bouncer: PgBouncer) -> None:
    """Wait until ``bouncer`` accepts connections and reaches the schema."""

    async def answers() -> bool:
        if bouncer.proc is not None and bouncer.proc.poll() is not None:
            pytest.fail(f"pgbouncer exited with {bouncer.proc.returncode}:\n{bouncer.log()}")
        try:
            async with await psycopg.AsyncConnection.connect(bouncer.conninfo(),
                                                             autocommit=True) as conn:
                cur = await conn.execute(
                    "SELECT to_regclass('public.change_events') IS NOT NULL")
                return (await cur.fetchone()) == (True,)
        except psycopg.OperationalError:
            return False

    await until(answers, f"pgbouncer on port {bouncer.port} to reach the schema", every=0.05)


async def run_refused_daemon(conninfo: str, cwd: Path,
                             timeout: float) -> tuple[int, list[str], str, float]:
    """Run ``python -m daemon`` on ``conninfo`` until it exits: (exit code, the human lines of
    its stderr, all of its stderr, seconds it ran). Fails the test if it is still running after
    ``timeout`` seconds."""
    env = conninfo_env(conninfo) | {"PGBRIDGE_JWT_SECRET": SECRET,
                                    "PGBRIDGE_PORT": str(free_port())}
    daemon = DaemonProcess(env, cwd)
    started = time.monotonic()
    await daemon.start()
    try:
        code = await daemon.wait(timeout)
    except TimeoutError:
        pytest.fail(f"the daemon was still running {timeout:g} s after its start instead of "
                    f"refusing {conninfo}:\n{daemon.tail()}")
    finally:
        await daemon.kill()
    elapsed = time.monotonic() - started
    stderr = "\n".join(daemon.log)
    return code, human_lines(stderr), stderr, elapsed


def assert_refused(code: int, lines: list[str], stderr: str, port: int, *words: str) -> None:
    """Exit 1 (a database error) with one human line, naming the server and the problem."""
    assert code == 1, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("pgbridge: error: "), line
    assert f"127.0.0.1:{port}" in line, line
    assert all(word in line for word in words), line

@pytest.mark.slow
async def test_a_hot_standby_is_refused(primary: Cluster, standby: Cluster,
                                        tmp_path: Path) -> None:
    # The standby really is one, and has replayed the primary's schema.
    async with await psycopg.AsyncConnection.connect(primary.conninfo(DBNAME),
                                                     autocommit=True) as conn:
        row = await (await conn.execute("SELECT pg_current_wal_lsn()::text")).fetchone()
        assert row is not None
        primary_lsn = str(row[0])
    async with await psycopg.AsyncConnection.connect(standby.conninfo(DBNAME),
                                                     autocommit=True) as conn:
        row = await (await conn.execute("SELECT pg_is_in_recovery()")).fetchone()
        assert row == (True,)

        async def replayed() -> bool:
            cur = await conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
                                     [primary_lsn])
            return (await cur.fetchone()) == (True,)

        await until(replayed, f"the standby to replay the primary's WAL up to {primary_lsn}")
        row = await (await conn.execute(
            "SELECT to_regclass('public.change_events') IS NOT NULL")).fetchone()
        assert row == (True,)

    code, lines, stderr, elapsed = await run_refused_daemon(
        standby.conninfo(DBNAME), tmp_path, timeout=READY_TIMEOUT + 30)

    assert_refused(code, lines, stderr, standby.port, "hot standby", "primary")
    # Refused by its recovery check, not by the wait for the listener's first round trip.
    assert elapsed < READY_TIMEOUT, (elapsed, stderr)


@pytest.mark.slow  # waits out READY_TIMEOUT (15 s)
async def test_a_transaction_mode_pgbouncer_is_refused(pgbouncer: PgBouncer,
                                                       tmp_path: Path) -> None:
    await wait_answering(pgbouncer)
    code, lines, stderr, elapsed = await run_refused_daemon(
        pgbouncer.conninfo(), tmp_path, timeout=READY_TIMEOUT + 30)

    assert_refused(code, lines, stderr, pgbouncer.port, "LISTEN", "PgBouncer")
    assert READY_TIMEOUT <= elapsed < READY_TIMEOUT + 15, (elapsed, stderr)
    # No alarm before the refusal: this is not a connection that went deaf in service.
    assert '"level": "error"' not in stderr and "listener_deaf" not in stderr, stderr


@pytest.mark.slow
async def test_a_session_mode_pgbouncer_is_served(session_pgbouncer: PgBouncer,
                                                  tmp_path: Path) -> None:
    """The control: the refusal above is for the pool mode, not for PgBouncer. In session mode
    the daemon starts, and a message written on the primary reaches a subscriber."""
    await wait_answering(session_pgbouncer)
    port = free_port()
    async with daemon_process(session_pgbouncer.conninfo(), port, tmp_path), \
            await psycopg.AsyncConnection.connect(session_pgbouncer.target.conninfo(DBNAME),
                                                  autocommit=True) as conn:
        user, room, ws, _ = await subscribed_member(conn, port)
        try:
            mid = await post(conn, room, user, "through pgbouncer")
            (event,) = await events(ws, 1)
            assert event["id"] == mid and event["data"]["content"] == "through pgbouncer"
        finally:
            await ws.close()
