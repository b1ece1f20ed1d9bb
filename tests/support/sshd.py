"""A real SSH server for the tests, running on 127.0.0.1 inside the test process (asyncssh).

* a generated ed25519 host key and one authorized client key (``client_key``), plus a key the
  server does not know (``wrong_key``), all written to ``directory``;
* ``known_hosts`` in ``directory`` trusts the host key for ``[127.0.0.1]:port``;
* local port forwarding (``direct-tcpip``) only to the targets in ``forwards``: a mapping from
  the (name, port) the client asks for to a unix socket path or a real (host, port), so that a
  forward to ``db.internal:5432`` reaches the test PostgreSQL wherever it listens; other targets
  fail as if the name did not resolve on the bastion; ``allow_forwarding=False`` refuses every
  forward like ``AllowTcpForwarding no``;
* :meth:`stop` / :meth:`start` (same port again), :meth:`cut` (abort every current connection,
  like a dropped network link), and counters of connection attempts.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncssh
from psycopg.conninfo import conninfo_to_dict

from daemon.settings import SSHSettings

Target = str | tuple[str, int]
"""A forward target: a unix socket path or a (host, port) reachable from the test process."""

HOST = "127.0.0.1"


def postgres_target(conninfo: str) -> Target:
    """Where the PostgreSQL of ``conninfo`` really listens: its unix socket file
    (``<dir>/.s.PGSQL.<port>``) when the host is a directory, else (host, port)."""
    parts = conninfo_to_dict(conninfo)
    host = str(parts.get("host") or "/tmp").split(",")[0]
    port = int(str(parts.get("port") or 5432).split(",")[0])
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}"
    return host, port


def write_key(path: Path, key: asyncssh.SSHKey, passphrase: str | None = None) -> Path:
    """Write a private key readable by its owner only; encrypted keys use PKCS#8."""
    if passphrase is None:
        key.write_private_key(str(path))
    else:
        key.write_private_key(str(path), "pkcs8-pem", passphrase=passphrase)
    os.chmod(path, 0o600)
    return path


class _Server(asyncssh.SSHServer):
    def __init__(self, owner: TestSSHServer) -> None:
        super().__init__()
        self._owner = owner
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._owner.connections_made += 1
        self._owner.live.add(conn)
        self._owner.idle.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._owner.live.discard(self._conn)
        if not self._owner.live:
            self._owner.idle.set()

    def auth_completed(self) -> None:
        self._owner.logins += 1

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> Any:  # a coroutine giving the forwarder
        owner = self._owner
        owner.forward_requests.append((dest_host, dest_port))
        if not owner.allow_forwarding:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "Port forwarding not permitted")
        target = owner.forwards.get((dest_host, dest_port))
        if target is None:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED,
                                            f"{dest_host}: Name or service not known")
        assert self._conn is not None
        if isinstance(target, str):
            return self._conn.forward_unix_connection(target)
        return self._conn.forward_connection(*target)


class TestSSHServer:
    """An SSH server on ``127.0.0.1:port`` for tests; ``port`` is fixed at the first start."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, forwards: Mapping[tuple[str, int], Target] | None = None,
                 *, user: str = "tunnel") -> None:
        self.directory = directory
        self.forwards: dict[tuple[str, int], Target] = dict(forwards or {})
        self.user = user
        self.allow_forwarding = True
        self.port = 0
        self.connections_made = 0  # TCP connections accepted (every attempt counts)
        self.logins = 0  # successful authentications
        self.forward_requests: list[tuple[str, int]] = []
        self.live: set[asyncssh.SSHServerConnection] = set()
        self.idle = asyncio.Event()  # set while no SSH connection is open
        self.idle.set()
        self._acceptor: asyncssh.SSHAcceptor | None = None

        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key_path = write_key(directory / "client_key", self.client_key)
        self.wrong_key_path = write_key(directory / "wrong_key",
                                        asyncssh.generate_private_key("ssh-ed25519"))
        self.known_hosts_path = directory / "known_hosts"

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (again) on ``127.0.0.1:port``; the first start picks a free port and writes
        ``known_hosts``."""
        authorized = asyncssh.import_authorized_keys(
            self.client_key.export_public_key().decode()
        )
        self._acceptor = await asyncssh.listen(
            HOST, self.port,
            server_factory=lambda: _Server(self),
            server_host_keys=[self.host_key],
            authorized_client_keys=authorized,
            reuse_address=True,
            config=None,
            login_timeout=10,
        )
        if not self.port:
            self.port = self._acceptor.get_port()
            self.write_known_hosts(self.known_hosts_path)

    async def stop(self, *, cut: bool = True) -> None:
        """Stop listening (new connections are refused); with ``cut`` also abort the
        current ones."""
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
            self._acceptor = None
        if cut:
            self.cut()

    def cut(self) -> int:
        """Abort every current SSH connection at once (no SSH disconnect message), as a
        dropped link would; return how many were cut."""
        cut = list(self.live)
        for conn in cut:
            conn.abort()
        self.live.clear()
        self.idle.set()
        return len(cut)

    @property
    def running(self) -> bool:
        return self._acceptor is not None

    # -- client side material -------------------------------------------------------------

    def known_hosts_line(self, key: asyncssh.SSHKey | None = None) -> str:
        """A known_hosts line for this server (its host key, or ``key`` instead)."""
        public = (key or self.host_key).export_public_key().decode().strip()
        return f"[{HOST}]:{self.port} {public}\n"

    def write_known_hosts(self, path: Path, key: asyncssh.SSHKey | None = None,
                          *, extra_lines: str = "") -> Path:
        path.write_text(extra_lines + self.known_hosts_line(key))
        return path

    def settings(self, **overrides: object) -> SSHSettings:
        """SSHSettings for this server: authorized key, known_hosts, fast retries."""
        values: dict[str, object] = {
            "host": HOST,
            "port": self.port,
            "user": self.user,
            "key_path": self.client_key_path,
            "known_hosts": self.known_hosts_path,
            "max_retries": 2,
            "retry_delay": 0.01,
        }
        values.update(overrides)
        return SSHSettings(**values)  # type: ignore[arg-type]
