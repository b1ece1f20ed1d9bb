"""daemon.tunnel against a real SSH server (tests/support/sshd.py) and the real test PostgreSQL.

The SSH server runs in this process, so every PostgreSQL connection here is async: a blocking
connect would stop the loop that serves the tunnel.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import shutil
from pathlib import Path
from typing import Any

import asyncssh
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from daemon.errors import EXIT_TUNNEL, TunnelError
from daemon.tunnel import LOCAL_HOST, SupervisedTunnel, open_tunnel
from tests.support.fixtures import DB_HOST, DB_PORT
from tests.support.sshd import TestSSHServer, write_key

WAIT = 10.0  # seconds; only reached when a test is failing


@pytest.fixture
def tunnel_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="daemon.tunnel")
    return caplog


class LogCounter(logging.Handler):
    """Sets ``reached`` once ``count`` records of ``event`` were logged by daemon.tunnel."""

    def __init__(self, event: str, count: int) -> None:
        super().__init__()
        self.event, self.count, self.seen = event, count, 0
        self.reached = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == self.event:
            self.seen += 1
            if self.seen >= self.count:
                self.reached.set()


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


async def select_one(conninfo: str, host: str, port: int) -> Any:
    """SELECT through host:port with the credentials of ``conninfo``."""
    target = make_conninfo(conninfo, host=host, port=port, connect_timeout=5)
    async with await psycopg.AsyncConnection.connect(target) as conn:
        cur = await conn.execute("SELECT 1")
        row = await cur.fetchone()
    assert row is not None
    return row[0]


async def refused(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def open_error(settings: Any, host: str = DB_HOST, port: int = DB_PORT) -> TunnelError:
    with pytest.raises(TunnelError) as info:
        async with open_tunnel(settings, host, port):
            pytest.fail("the tunnel opened")
    return info.value


# --------------------------------------------------------------------------- open_tunnel


async def test_query_through_tunnel(sshd: TestSSHServer, pg_server_conninfo: str,
                                    tunnel_log: pytest.LogCaptureFixture) -> None:
    async with open_tunnel(sshd.settings(), DB_HOST, DB_PORT) as (host, port):
        assert host == LOCAL_HOST and port > 0
        assert await select_one(pg_server_conninfo, host, port) == 1
        assert sshd.logins == 1
        assert (DB_HOST, DB_PORT) in sshd.forward_requests
    assert await refused(host, port), "the local port must be closed after the block"
    assert events(tunnel_log, "tunnel_open") and events(tunnel_log, "tunnel_closed")
    assert not events(tunnel_log, "tunnel_host_key_unchecked")


async def test_fixed_local_port(sshd: TestSSHServer, pg_server_conninfo: str,
                                unused_tcp_port: int) -> None:
    async with open_tunnel(sshd.settings(), DB_HOST, DB_PORT,
                           local_port=unused_tcp_port) as (host, port):
        assert port == unused_tcp_port
        assert await select_one(pg_server_conninfo, host, port) == 1


async def test_unknown_host_key_refused_without_retry(
    sshd: TestSSHServer, tmp_path: Path, tunnel_log: pytest.LogCaptureFixture
) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    known_hosts = tmp_path / "other_known_hosts"
    known_hosts.write_text(f"elsewhere.example {other}")
    error = await open_error(sshd.settings(known_hosts=known_hosts, max_retries=3))
    assert error.reason == "host_key_unknown"
    assert error.exit_code == EXIT_TUNNEL
    message = str(error)
    assert "\n" not in message
    assert str(known_hosts) in message
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {known_hosts}" in message
    assert sshd.host_key.get_fingerprint() in message
    assert isinstance(error.__cause__, asyncssh.HostKeyNotVerifiable)
    assert sshd.connections_made == 1 and sshd.logins == 0
    assert not events(tunnel_log, "tunnel_retry")


@pytest.mark.skipif(shutil.which("ssh-keyscan") is None, reason="needs OpenSSH's ssh-keyscan")
async def test_keyscan_hint_makes_the_host_known(sshd: TestSSHServer, pg_server_conninfo: str,
                                                 tmp_path: Path) -> None:
    """Running the command the host_key_unknown message suggests is enough to connect."""
    known_hosts = tmp_path / "hint_known_hosts"
    error = await open_error(sshd.settings(known_hosts=known_hosts))
    command = str(error).split("add it with: ")[1].split(" (or set")[0]
    argv, target = command.split(" >> ")
    scan = await asyncio.create_subprocess_exec(
        *shlex.split(argv), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    output, _ = await scan.communicate()
    assert scan.returncode == 0 and Path(target) == known_hosts
    known_hosts.write_bytes(output)
    async with open_tunnel(sshd.settings(known_hosts=known_hosts), DB_HOST, DB_PORT) as address:
        assert await select_one(pg_server_conninfo, *address) == 1


async def test_missing_known_hosts_file(sshd: TestSSHServer, tmp_path: Path) -> None:
    error = await open_error(sshd.settings(known_hosts=tmp_path / "absent"))
    assert error.reason == "host_key_unknown"
    assert str(tmp_path / "absent") in str(error) and "ssh-keyscan" in str(error)
    assert sshd.connections_made == 0


async def test_changed_host_key_refused(sshd: TestSSHServer, tmp_path: Path,
                                        tunnel_log: pytest.LogCaptureFixture) -> None:
    impostor = asyncssh.generate_private_key("ssh-ed25519")
    known_hosts = sshd.write_known_hosts(tmp_path / "kh_changed", key=impostor,
                                         extra_lines="# pinned bastion key\n")
    error = await open_error(sshd.settings(known_hosts=known_hosts, max_retries=3))
    assert error.reason == "host_key_changed"
    message = str(error)
    assert "\n" not in message
    assert "man-in-the-middle" in message
    assert f"{known_hosts} line 2" in message
    assert "ssh-keygen -R" in message
    assert sshd.host_key.get_fingerprint() in message
    assert sshd.connections_made == 1 and sshd.logins == 0
    assert not events(tunnel_log, "tunnel_retry")


async def test_wrong_client_key_refused(sshd: TestSSHServer,
                                        tunnel_log: pytest.LogCaptureFixture) -> None:
    error = await open_error(sshd.settings(key_path=sshd.wrong_key_path, max_retries=3))
    assert error.reason == "auth_failed"
    assert "'tunnel'" in str(error) and str(sshd.wrong_key_path) in str(error)
    assert isinstance(error.__cause__, asyncssh.PermissionDenied)
    assert sshd.connections_made == 1 and sshd.logins == 0
    assert not events(tunnel_log, "tunnel_retry")


async def test_missing_key_file_reported_without_connecting(sshd: TestSSHServer,
                                                            tmp_path: Path) -> None:
    missing = tmp_path / "no_such_key"
    error = await open_error(sshd.settings(key_path=missing))
    assert error.reason == "key_missing"
    assert str(missing) in str(error) and "SSH_KEY_PATH" in str(error)
    assert sshd.connections_made == 0


async def test_encrypted_key(sshd: TestSSHServer, pg_server_conninfo: str, tmp_path: Path,
                             tunnel_log: pytest.LogCaptureFixture) -> None:
    secret = "correct horse battery"
    key_path = write_key(tmp_path / "encrypted_key", sshd.client_key, passphrase=secret)

    error = await open_error(sshd.settings(key_path=key_path, key_passphrase="wrong guess"))
    assert error.reason == "key_invalid"
    assert "SSH_KEY_PASSPHRASE" in str(error) and "wrong guess" not in str(error)
    error = await open_error(sshd.settings(key_path=key_path))
    assert error.reason == "key_invalid" and "SSH_KEY_PASSPHRASE" in str(error)
    assert sshd.connections_made == 0

    settings = sshd.settings(key_path=key_path, key_passphrase=secret)
    assert secret not in repr(settings)
    async with open_tunnel(settings, DB_HOST, DB_PORT) as (host, port):
        assert await select_one(pg_server_conninfo, host, port) == 1
    assert secret not in tunnel_log.text


async def test_server_down_retried_max_retries_times(
    sshd: TestSSHServer, tunnel_log: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    await sshd.stop()
    attempts = 0
    real_connect = asyncssh.connect

    async def counting_connect(*args: Any, **kwargs: Any) -> Any:
        nonlocal attempts
        attempts += 1
        return await real_connect(*args, **kwargs)

    monkeypatch.setattr(asyncssh, "connect", counting_connect)
    error = await open_error(sshd.settings(max_retries=3, retry_delay=0.01))
    assert error.reason == "refused"
    assert f"127.0.0.1:{sshd.port} refused" in str(error)
    assert "Check SSH_HOST and SSH_PORT" in str(error) and "\n" not in str(error)
    assert isinstance(error.__cause__, TunnelError)
    assert isinstance(error.__cause__.__cause__, ConnectionRefusedError)
    assert attempts == 4  # the first attempt and 3 retries
    retries = events(tunnel_log, "tunnel_retry")
    assert [r.levelno for r in retries] == [logging.WARNING] * 3
    assert [getattr(r, "attempt", None) for r in retries] == [1, 2, 3]
    assert [getattr(r, "delay", None) for r in retries] == pytest.approx([0.01, 0.02, 0.03])


async def test_host_not_found(tmp_path: Path) -> None:
    from daemon.settings import SSHSettings

    settings = SSHSettings(host="bastion.invalid", port=22, known_hosts=tmp_path / "kh",
                           max_retries=0, retry_delay=0.01)
    (tmp_path / "kh").write_text("")
    error = await open_error(settings)
    assert error.reason == "not_found"
    assert "bastion.invalid" in str(error) and "Check DNS or SSH_HOST" in str(error)


async def test_silent_server_times_out(tmp_path: Path,
                                       tunnel_log: pytest.LogCaptureFixture) -> None:
    """A port that accepts TCP but never speaks SSH: each attempt ends at connect_timeout."""
    from daemon.settings import SSHSettings

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    (tmp_path / "kh").write_text("")
    settings = SSHSettings(host="127.0.0.1", port=port, known_hosts=tmp_path / "kh",
                           key_path=None, max_retries=1, retry_delay=0.01)
    try:
        with pytest.raises(TunnelError) as info:
            async with open_tunnel(settings, DB_HOST, DB_PORT, connect_timeout=0.2):
                pytest.fail("the tunnel opened")
    finally:
        server.close()
        await server.wait_closed()
    assert info.value.reason == "timeout"
    assert "timed out after 0.2 s" in str(info.value)
    assert len(events(tunnel_log, "tunnel_retry")) == 1


async def test_forward_refused_by_server(sshd: TestSSHServer,
                                         tunnel_log: pytest.LogCaptureFixture) -> None:
    sshd.allow_forwarding = False
    error = await open_error(sshd.settings(max_retries=3))
    assert error.reason == "forward_refused"
    assert f"{DB_HOST}:{DB_PORT}" in str(error) and "AllowTcpForwarding" in str(error)
    assert isinstance(error.__cause__, asyncssh.ChannelOpenError)
    assert sshd.connections_made == 1
    assert not events(tunnel_log, "tunnel_retry")


async def test_forward_target_unreachable_is_retried(
    sshd: TestSSHServer, tunnel_log: pytest.LogCaptureFixture
) -> None:
    error = await open_error(sshd.settings(max_retries=2), host="nowhere.internal", port=5432)
    assert error.reason == "forward_failed"
    assert "nowhere.internal:5432" in str(error) and "POSTGRES_HOST" in str(error)
    assert sshd.connections_made == 3
    assert len(events(tunnel_log, "tunnel_retry")) == 2
    async with asyncio.timeout(WAIT):  # every failed attempt closes its SSH connection
        await sshd.idle.wait()


async def test_strict_checking_off_connects_with_warning(
    sshd: TestSSHServer, pg_server_conninfo: str, tmp_path: Path,
    tunnel_log: pytest.LogCaptureFixture,
) -> None:
    settings = sshd.settings(known_hosts=tmp_path / "absent", strict_host_key_checking=False)
    for _ in range(2):  # a warning at every open
        async with open_tunnel(settings, DB_HOST, DB_PORT) as (host, port):
            assert await select_one(pg_server_conninfo, host, port) == 1
    warnings = events(tunnel_log, "tunnel_host_key_unchecked")
    assert len(warnings) == 2
    assert all(r.levelno == logging.WARNING for r in warnings)
    assert "SSH_STRICT_HOST_KEY_CHECKING=no" in warnings[0].getMessage()
    assert sshd.host_key.get_fingerprint() in warnings[0].getMessage()


# --------------------------------------------------------------------------- SupervisedTunnel


async def test_supervised_reopens_after_cut(sshd: TestSSHServer, pg_server_conninfo: str,
                                            tunnel_log: pytest.LogCaptureFixture) -> None:
    tunnel = SupervisedTunnel(sshd.settings(), DB_HOST, DB_PORT)
    async with tunnel as (host, port):
        assert tunnel.is_up and tunnel.reconnects == 0
        assert await select_one(pg_server_conninfo, host, port) == 1

        assert sshd.cut() == 1
        async with asyncio.timeout(WAIT):
            await tunnel.wait_down()
            await tunnel.wait_up()
        assert tunnel.reconnects == 1
        assert tunnel.address == (host, port)
        assert await select_one(pg_server_conninfo, host, port) == 1
        assert sshd.logins == 2

        assert sshd.cut() == 1  # and again
        async with asyncio.timeout(WAIT):
            await tunnel.wait_down()
            await tunnel.wait_up()
        assert tunnel.reconnects == 2
        assert await select_one(pg_server_conninfo, host, port) == 1
    assert not tunnel.is_up
    assert await refused(host, port)
    assert len(events(tunnel_log, "tunnel_down")) == 2
    assert len(events(tunnel_log, "tunnel_reopened")) == 2


async def test_supervised_waits_for_server_restart(
    sshd: TestSSHServer, pg_server_conninfo: str, tunnel_log: pytest.LogCaptureFixture
) -> None:
    tunnel = SupervisedTunnel(sshd.settings(retry_delay=0.01), DB_HOST, DB_PORT,
                              max_backoff=0.05)
    three_failures = LogCounter("tunnel_reopen_failed", 3)
    logging.getLogger("daemon.tunnel").addHandler(three_failures)
    try:
        async with tunnel as (host, port):
            await sshd.stop()  # refuses new connections and cuts the current one
            async with asyncio.timeout(WAIT):
                await tunnel.wait_down()
                await three_failures.reached.wait()
            assert not tunnel.is_up
            assert await refused(host, port), "while down, the local port refuses connections"
            failed = events(tunnel_log, "tunnel_reopen_failed")
            assert all(getattr(r, "reason", None) == "refused" for r in failed)
            assert [getattr(r, "attempt", None) for r in failed[:3]] == [1, 2, 3]

            await sshd.start()  # same port
            async with asyncio.timeout(WAIT):
                await tunnel.wait_up()
            assert tunnel.reconnects == 1 and tunnel.address == (host, port)
            assert await select_one(pg_server_conninfo, host, port) == 1
    finally:
        logging.getLogger("daemon.tunnel").removeHandler(three_failures)


async def test_supervised_first_open_fails_like_open_tunnel(
    sshd: TestSSHServer, tmp_path: Path
) -> None:
    impostor = asyncssh.generate_private_key("ssh-ed25519")
    known_hosts = sshd.write_known_hosts(tmp_path / "kh_changed", key=impostor)
    tunnel = SupervisedTunnel(sshd.settings(known_hosts=known_hosts), DB_HOST, DB_PORT)
    with pytest.raises(TunnelError) as info:
        async with tunnel:
            pytest.fail("the tunnel opened")
    assert info.value.reason == "host_key_changed"
    assert sshd.connections_made == 1
