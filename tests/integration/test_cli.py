"""The command line's one error boundary (daemon/cli.py) and its first-contact cases, each run
as a real subprocess against a real PostgreSQL: every failure is one line
``<prog>: error: <message>`` on stderr (no traceback) and a documented exit code.

Exit codes: 0 ok, 1 database error or refused, 2 usage or configuration, 3 SSH tunnel, 70
internal error (names an incident), 130 interrupted, 141 stdout closed.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
import websockets

from daemon.embedded import start_embedded
from tests.support.fixtures import ROOT, conninfo_env, running_bridge
from tests.support.helpers import SECRET, head, make_room, make_user, post, token
from tests.support.procs import PGBRIDGE, DaemonProcess, free_port, human_lines, run_cli, until

SETUP_DB = str(ROOT / "setup_db.py")
PYTHON = sys.executable

Conn = psycopg.AsyncConnection[Any]


def clean_env(**variables: str) -> dict[str, str]:
    """The process environment without any database/tunnel/pgbridge variable (so: the embedded
    database), plus these."""
    env = conninfo_env("")
    del env["DATABASE_URL"]
    return env | variables


def one_line(code: int, stderr: str, exit_code: int, prog: str, *needles: str) -> str:
    """Check the exit code and that the human part of stderr is one error line of ``prog``
    containing every needle; return the line."""
    assert code == exit_code, (code, stderr)
    lines = human_lines(stderr)  # the daemon's JSON log lines left out
    assert "Traceback" not in "\n".join(lines), stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- PGBRIDGE_DATA_DIR that cannot hold the embedded server ----------------------------------

COMMANDS: dict[str, tuple[str, list[str]]] = {
    "run": ("pgbridge", [PYTHON, "-m", "daemon"]),
    "setup": ("setup_db.py", [PYTHON, SETUP_DB]),
    "token": ("pgbridge token", [str(PGBRIDGE), "token", "someone"]),
    "tail": ("pgbridge tail", [str(PGBRIDGE), "tail", "room", "--user", "someone"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(COMMANDS))
async def test_data_dir_under_a_file_is_one_line_naming_PGBRIDGE_DATA_DIR(
        tmp_path: Path, command: str) -> None:
    """It was a NotADirectoryError traceback (from the JWT secret or the cluster's mkdir)."""
    (tmp_path / "a-file").write_text("")
    data_dir = tmp_path / "a-file" / "data"
    prog, argv = COMMANDS[command]
    env = clean_env(PGBRIDGE_DATA_DIR=str(data_dir), PGBRIDGE_PORT=str(free_port()))
    code, out, err = await run_cli(*argv, env=env, cwd=ROOT if command == "run" else tmp_path)
    one_line(code, err, 2, prog, f"PGBRIDGE_DATA_DIR={data_dir}", "Not a directory")
    assert out == ""


@pytest.mark.slow
async def test_pgdata_that_is_a_file_is_one_line_naming_PGBRIDGE_DATA_DIR(
        tmp_path: Path) -> None:
    (tmp_path / "pgdata").write_text("not a cluster")
    env = clean_env(PGBRIDGE_DATA_DIR=str(tmp_path))
    code, _, err = await run_cli(PYTHON, SETUP_DB, env=env, cwd=tmp_path)
    one_line(code, err, 2, "setup_db.py", f"PGBRIDGE_DATA_DIR={tmp_path}", "Not a directory")


@pytest.mark.slow  # runs initdb once (a few seconds)
async def test_setup_says_attaching_when_the_embedded_server_already_runs(
        tmp_path: Path) -> None:
    env = clean_env(PGBRIDGE_DATA_DIR=str(tmp_path))
    code, _, err = await run_cli(PYTHON, SETUP_DB, env=env, cwd=tmp_path)
    assert code == 0, err
    assert f"starting embedded PostgreSQL in {tmp_path / 'pgdata'}" in err
    assert "attaching to" not in err
    server = start_embedded(tmp_path)  # held by this process while setup_db.py runs again
    try:
        code, out, err = await run_cli(PYTHON, SETUP_DB, env=env, cwd=tmp_path)
        assert code == 0, err
        assert "already up to date" in out
        assert (f"attaching to the running embedded PostgreSQL in {tmp_path / 'pgdata'}"
                in err), err
        assert "starting embedded PostgreSQL" not in err
        with psycopg.connect(server.uri) as conn:  # still running: setup_db.py only attached
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        server.stop()


# --- the daemon's port -----------------------------------------------------------------------

@pytest.mark.slow
async def test_taken_port_is_one_line_naming_PGBRIDGE_PORT(db_url: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = conninfo_env(db_url) | {"PGBRIDGE_JWT_SECRET": SECRET, "PGBRIDGE_PORT": str(port),
                                      "PGBRIDGE_HOST": "127.0.0.1"}
        code, _, err = await run_cli(PYTHON, "-m", "daemon", env=env, cwd=tmp_path)
    one_line(code, err, 2, "pgbridge", "PGBRIDGE_PORT", str(port))


# --- a Python without the dependencies ------------------------------------------------------

async def test_setup_db_by_a_python_without_the_dependencies_says_run_dev_setup(
        tmp_path: Path) -> None:
    """``python3 setup_db.py`` outside the venv ended in a ModuleNotFoundError traceback. -I -S:
    no site-packages (so no psycopg) and not even the script's directory on sys.path."""
    code, out, err = await run_cli(PYTHON, "-I", "-S", SETUP_DB, env=clean_env(), cwd=tmp_path)
    one_line(code, err, 2, "setup_db.py", "dependencies are not installed", "./dev setup",
             "No module named")
    assert out == ""


async def test_python_m_daemon_without_the_dependencies_says_so(tmp_path: Path) -> None:
    # -S: no site-packages; the checkout is found as the working directory
    code, _, err = await run_cli(PYTHON, "-S", "-m", "daemon", env=clean_env(), cwd=ROOT)
    one_line(code, err, 2, "pgbridge", "dependencies are not installed", "./dev setup")


# --- pgbridge token --------------------------------------------------------------------------

@pytest.mark.slow
async def test_token_for_a_missing_user_is_refused(db_url: str, tmp_path: Path) -> None:
    env = conninfo_env(db_url) | {"PGBRIDGE_JWT_SECRET": SECRET}
    code, out, err = await run_cli(str(PGBRIDGE), "token", "nosuchuser", env=env, cwd=tmp_path)
    one_line(code, err, 1, "pgbridge token", "no user nosuchuser", "--no-check")
    assert out == ""
    # --no-check mints it without looking (offline)
    code, out, err = await run_cli(str(PGBRIDGE), "token", "nosuchuser", "--no-check",
                                   env=env, cwd=tmp_path)
    assert code == 0, err
    assert jwt.decode(out.strip(), SECRET, algorithms=["HS256"])["sub"] == "nosuchuser"


@pytest.mark.slow
async def test_token_for_a_live_user_and_not_for_a_deleted_one(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    live, deleted = await make_user(conn), await make_user(conn)
    await conn.execute("UPDATE users SET deleted_at = now() WHERE id = %s", [deleted])
    env = conninfo_env(db_url) | {"PGBRIDGE_JWT_SECRET": SECRET}
    code, out, err = await run_cli(str(PGBRIDGE), "token", live, "--ttl", "60", env=env,
                                   cwd=tmp_path)
    assert code == 0, err
    claims = jwt.decode(out.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == live and claims["exp"] - claims["iat"] == 60
    code, out, err = await run_cli(str(PGBRIDGE), "token", deleted, env=env, cwd=tmp_path)
    one_line(code, err, 1, "pgbridge token", f"user {deleted} is deleted")
    assert out == ""


@pytest.mark.slow
async def test_token_without_the_schema_says_apply_it(fresh_db: str, tmp_path: Path) -> None:
    env = conninfo_env(fresh_db) | {"PGBRIDGE_JWT_SECRET": SECRET}
    code, _, err = await run_cli(str(PGBRIDGE), "token", "someone", env=env, cwd=tmp_path)
    one_line(code, err, 1, "pgbridge token", "public.users", "setup_db.py", "--no-check")


async def test_token_for_a_malformed_user_id_is_a_usage_error(tmp_path: Path) -> None:
    code, out, err = await run_cli(str(PGBRIDGE), "token", "no such user", "--no-check",
                                   env=clean_env(PGBRIDGE_JWT_SECRET=SECRET), cwd=tmp_path)
    assert code == 2 and out == "" and "Traceback" not in err
    assert "'no such user' is not a users.id" in err


# --- --version and usage ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    [str(PGBRIDGE), "--version"], [str(PGBRIDGE), "run", "--version"],
    [PYTHON, "-m", "daemon", "--version"], [PYTHON, SETUP_DB, "--version"],
])
async def test_version(tmp_path: Path, argv: list[str]) -> None:
    """``pgbridge --version`` printed the usage and exited 2."""
    code, out, err = await run_cli(*argv, env=clean_env(), cwd=tmp_path)
    assert code == 0, err
    assert out == f"pgbridge {importlib.metadata.version('pgbridge')}\n"


async def test_unknown_command_is_a_usage_error(tmp_path: Path) -> None:
    code, out, err = await run_cli(str(PGBRIDGE), "nosuchcommand", env=clean_env(), cwd=tmp_path)
    assert code == 2 and out == ""
    assert "usage: pgbridge COMMAND" in err
    assert err.strip().splitlines()[-1] == "pgbridge: error: unknown command 'nosuchcommand'"


# --- the boundary's other cases --------------------------------------------------------------

def _guarded(body: str, *, json_log: bool = False) -> list[str]:
    setup = "from daemon import logs; logs.configure('INFO', json_lines=True); " if json_log \
        else ""
    return [PYTHON, "-c", f"import sys; {setup}from daemon.cli import guarded; "
            f"sys.exit(guarded('prog', {body}))"]

BOOM = "lambda: {}['missing']"  # a KeyError: not a BridgeError, so a bug


async def test_unexpected_exception_is_one_line_naming_an_incident(tmp_path: Path) -> None:
    code, _, err = await run_cli(*_guarded(BOOM), env=clean_env(), cwd=ROOT)
    line = one_line(code, err, 70, "prog", "internal error (KeyError: 'missing'; incident ",
                    "PGBRIDGE_LOG_LEVEL=DEBUG")
    assert "this is a bug" in line


async def test_unexpected_exception_in_the_daemon_logs_its_traceback_as_json(
        tmp_path: Path) -> None:
    code, _, err = await run_cli(*_guarded(BOOM, json_log=True), env=clean_env(), cwd=ROOT)
    line = one_line(code, err, 70, "prog", "internal error (KeyError", "traceback is in the log")
    records = [json.loads(raw) for raw in err.splitlines() if raw.startswith("{")]
    assert [r["event"] for r in records] == ["internal_error"]
    assert f"incident {records[0]['incident']})" in line
    assert "Traceback" in records[0]["exception"] and "KeyError" in records[0]["exception"]


@pytest.mark.parametrize(("body", "exit_code"), [
    ("lambda: (_ for _ in ()).throw(KeyboardInterrupt)", 130),
    ("lambda: __import__('psycopg_pool.nonexistent')", 2),
    ("lambda: __import__('nosuchmodule_of_ours')", 70),
])
async def test_boundary_exit_codes(tmp_path: Path, body: str, exit_code: int) -> None:
    code, _, err = await run_cli(*_guarded(body), env=clean_env(), cwd=ROOT)
    assert code == exit_code, err
    assert "Traceback" not in err and len(human_lines(err)) == (0 if exit_code == 130 else 1)


def test_closed_stdout_exits_quietly(tmp_path: Path) -> None:
    """A reader that went away (``pgbridge tail ROOM | head``) gave a BrokenPipeError
    traceback; tail reconnected forever on it."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([str(PGBRIDGE), "--help"], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, env=clean_env(),
                                cwd=tmp_path, timeout=60, check=False)
    finally:
        os.close(write_end)
    assert result.returncode == 141, result.stderr
    assert result.stderr == ""


# --- pgbridge tail ---------------------------------------------------------------------------

async def test_tail_refused_token_is_one_line(db_url: str, tmp_path: Path) -> None:
    async with running_bridge(db_url) as bridge:
        code, out, err = await run_cli(
            str(PGBRIDGE), "tail", "room", "--url", f"ws://127.0.0.1:{bridge.port}/ws",
            "--token", token("someone", secret="x" * 40), env=clean_env(), cwd=tmp_path)
    one_line(code, err, 1, "pgbridge tail", "refused: HTTP 401")
    assert out == ""


async def test_tail_not_a_member_is_one_line_after_the_frame(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    outsider, owner = await make_user(conn), await make_user(conn)
    room = await make_room(conn, owner)
    async with running_bridge(db_url) as bridge:
        code, out, err = await run_cli(
            str(PGBRIDGE), "tail", room, "--url", f"ws://127.0.0.1:{bridge.port}/ws",
            "--token", token(outsider), env=clean_env(), cwd=tmp_path)
    assert code == 1 and out == "", err
    lines = err.strip().splitlines()
    welcome = json.loads(lines[0])
    assert lines[1] == (f"pgbridge tail: connected as user {outsider}, correlation id "
                        f"{welcome['correlation_id']}")  # its lines in the bridge's log
    assert json.loads(lines[-2])["type"] == "error"  # the frame, as tail shows every frame
    assert lines[-1].startswith("pgbridge tail: error: refused: forbidden"), lines[-1]
    assert "Traceback" not in err


async def test_tail_reconnect_lines_are_progress_and_ctrl_c_exits_130(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(PGBRIDGE), "tail", "room", "--url", f"ws://127.0.0.1:{free_port()}/ws",
        "--token", token("someone"), env=clean_env(), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    try:
        seen: list[str] = []
        while not any("reconnecting in" in line for line in seen):
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            assert line, f"tail exited: {seen}"
            seen.append(line.decode())
        assert not any("error:" in line for line in seen), seen
        proc.send_signal(signal.SIGINT)
        rest = await asyncio.wait_for(proc.stderr.read(), 30)
        assert await proc.wait() == 130
        assert b"Traceback" not in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_tail_feed_prints_the_rooms_then_the_events_of_all_of_them(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    """``pgbridge tail --feed``: the ``feed`` frame (unread counts only other users' messages)
    on the first stdout line, then the events of every room, a room joined from its membership
    event on, and a room left with its ``unsubscribed``; ``--ack`` records each in sync_state."""
    user, other = await make_user(conn), await make_user(conn)
    a, b = await make_room(conn, user, other), await make_room(conn, user, other)
    for text in ("one", "two"):
        await post(conn, a, other, text)
    await post(conn, a, user, "mine")
    async with running_bridge(db_url) as bridge:
        proc = await asyncio.create_subprocess_exec(
            str(PGBRIDGE), "tail", "--feed", "--ack", "--count", "4", "--url",
            f"ws://127.0.0.1:{bridge.port}/ws", "--token", token(user), env=clean_env(),
            cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = proc.stdout, proc.stderr
        assert stdout is not None and stderr is not None
        lines: list[dict[str, Any]] = []

        async def line() -> dict[str, Any]:
            text = await asyncio.wait_for(stdout.readline(), 30)
            assert text, f"tail exited: {lines} {(await stderr.read()).decode()}"
            lines.append(json.loads(text))
            return lines[-1]

        try:
            feed = await line()
            assert feed["type"] == "feed", feed
            assert {r["room"]: (r["head"], r["acked"], r["unread"]) for r in feed["rooms"]} == {
                a: (await head(conn, a), 0, 2), b: (await head(conn, b), 0, 0)}
            await post(conn, b, other, "in b")
            assert (await line())["room"] == b
            c = await make_room(conn, other)
            await conn.execute("INSERT INTO channel_members (channel_id, user_id) "
                               "VALUES (%s, %s)", (c, user))
            joined = await line()
            assert (joined["room"], joined["table"], joined["op"]) == (
                c, "channel_members", "INSERT"), joined
            assert joined["data"]["user_id"] == user
            await post(conn, a, other, "three")
            assert (await line())["room"] == a
            await conn.execute("DELETE FROM channel_members WHERE channel_id = %s AND "
                               "user_id = %s", (b, user))
            await post(conn, b, other, "after the leave")
            left = await line()
            assert (left["type"], left["room"], left["reason"]) == (
                "unsubscribed", b, "membership_revoked"), left
            last = await post(conn, c, other, "in c")
            assert (await line())["id"] == last
            code = await asyncio.wait_for(proc.wait(), 30)
            err = (await stderr.read()).decode()
            assert code == 0, err
            assert await stdout.read() == b""
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert "pgbridge tail: feed of 2 rooms, 2 unread" in human_lines(err)
        # the last event's ack leaves just before the close, and may arrive in its read
        want = {a: await head(conn, a), c: await head(conn, c)}

        async def acked() -> bool:  # written by the bridge in batches
            cur = await conn.execute("SELECT room_id, last_seq FROM sync_state WHERE user_id = "
                                     "%s AND sync_type = 'events'", [user])
            return {r: s for r, s in await cur.fetchall() if r in want} == want

        await until(acked, "the acks of tail --feed in sync_state")


async def test_tail_ack_records_the_last_event_printed(conn: Conn, db_url: str,
                                                      tmp_path: Path) -> None:
    """``pgbridge tail ROOM --ack --count N`` acknowledges the N-th event too (it leaves the
    subscription's ``async with`` cleanly after printing it), as when it sent an ack per event."""
    user, other = await make_user(conn), await make_user(conn)
    room = await make_room(conn, user, other)
    for text in ("one", "two"):
        await post(conn, room, other, text)
    async with running_bridge(db_url) as bridge:
        code, out, err = await run_cli(
            str(PGBRIDGE), "tail", room, "--since", "0", "--ack", "--count", "2", "--url",
            f"ws://127.0.0.1:{bridge.port}/ws", "--token", token(user), env=clean_env(),
            cwd=tmp_path)
        assert code == 0, err
        assert [json.loads(line)["seq"] for line in out.splitlines()] == [1, 2]

        async def acked() -> bool:  # written by the bridge in batches
            cur = await conn.execute("SELECT last_seq FROM sync_state WHERE user_id = %s AND "
                                     "room_id = %s AND sync_type = 'events'", [user, room])
            return await cur.fetchone() == (2,)

        await until(acked, "the ack of tail's last event in sync_state")


# --- first contact: ./dev run with nothing configured ---------------------------------------

@pytest.mark.slow
async def test_first_run_prints_the_banner_on_stdout_and_only_log_lines_on_stderr(
        tmp_path: Path) -> None:
    """What `./dev run` does on a fresh machine: the embedded PostgreSQL, the demo user and
    room, and a banner on stdout that a script can take the token from; stderr holds only the
    daemon's JSON log lines (no banner, no third-party warning such as cryptography's DSA
    deprecation printed by asyncssh's import)."""
    port = free_port()
    daemon = DaemonProcess(clean_env(PGBRIDGE_DATA_DIR=str(tmp_path / "data"),
                                     PGBRIDGE_PORT=str(port)), tmp_path)
    await daemon.start()
    try:
        await daemon.wait_event("ready", timeout=90)

        async def banner_printed() -> bool:
            return any(line.startswith("  token (24 h): ") for line in daemon.out)

        await until(banner_printed, "the banner on stdout", timeout=10)
        jwt_token = next(line.split(": ", 1)[1] for line in daemon.out
                         if line.startswith("  token (24 h): "))
        url = next(line.split()[1] for line in daemon.out if line.startswith("  WebSocket:"))
        assert url.startswith(f"ws://127.0.0.1:{port}/ws"), daemon.out
        async with websockets.connect(url.replace("<token>", jwt_token)) as ws:
            welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert welcome["type"] == "welcome", welcome
    finally:
        await daemon.stop()
    not_json = []
    for line in daemon.log:
        try:
            json.loads(line)
        except ValueError:
            not_json.append(line)
    assert not_json == [], not_json


@pytest.mark.slow
def test_the_ssh_modules_import_with_warnings_as_errors() -> None:
    """The daemon imports asyncssh (SSH_HOST set) without a warning on stderr: cryptography
    51's DSA deprecation, raised by asyncssh's import, is ignored there by message and module
    (daemon/_asyncssh.py), and any other warning would fail this."""
    result = subprocess.run([sys.executable, "-W", "error", "-c",
                             "import daemon.tunnel, daemon.sshkeys"],
                            capture_output=True, text=True, cwd=ROOT, env=clean_env(),
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
