"""Start-up and shutdown as systemd sees them, and the token CLI."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import jwt
import psycopg
import pytest

from tests.support.fixtures import conninfo_env
from tests.support.helpers import SECRET, make_user
from tests.support.procs import (
    PGBRIDGE,
    DaemonProcess,
    free_port,
    http_status,
    human_lines,
    run_cli,
)


@pytest.mark.slow
async def test_ready_is_sent_only_once_serving_and_stopping_on_sigterm(db_url: str,
                                                                      tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.setblocking(False)
        port = free_port()
        env = conninfo_env(db_url) | {"PGBRIDGE_JWT_SECRET": SECRET, "PGBRIDGE_PORT": str(port),
                                      "NOTIFY_SOCKET": str(notify_path)}
        daemon = DaemonProcess(env, tmp_path)
        await daemon.start()
        loop = asyncio.get_running_loop()
        try:
            ready = (await asyncio.wait_for(loop.sock_recv(notify, 4096), 30)).decode()
            assert ready.startswith("READY=1"), ready
            # READY came after the listener proved a round trip and the port listens:
            assert await http_status(port, "/healthz") == 200
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGTERM)
            stopping = (await asyncio.wait_for(loop.sock_recv(notify, 4096), 30)).decode()
            assert stopping == "STOPPING=1"
            assert await daemon.wait() == 0
        finally:
            await daemon.kill()


@pytest.mark.slow
async def test_token_cli_mints_a_token_for_the_configured_secret(db_url: str,
                                                                tmp_path: Path) -> None:
    env = conninfo_env(db_url) | {"PGBRIDGE_JWT_SECRET": SECRET}
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        user = await make_user(conn)  # the token command checks that the user exists
    code, out, err = await run_cli(str(PGBRIDGE), "token", user, "--ttl", "60", env=env,
                                   cwd=tmp_path)
    assert code == 0, err
    claims = jwt.decode(out.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == user and claims["exp"] - claims["iat"] == 60

    code, out, err = await run_cli(str(PGBRIDGE), "token", "someone", env=conninfo_env(db_url),
                                   cwd=tmp_path)
    assert code == 2 and out == ""
    assert len(human_lines(err)) == 1 and "PGBRIDGE_JWT_SECRET" in err
