"""The SSH tunnel to a PostgreSQL server behind a bastion (spec 003, "SSH tunnel").

I/O only: connect to the SSH server with asyncssh, open a local port forward on ``127.0.0.1`` to
the database host and port *as seen from the SSH host*, and translate every failure into one
:class:`~daemon.errors.TunnelError` whose one-line message says what to fix (the translation
itself, plain functions of the exception, is :mod:`daemon.tunnel_errors`).

* :func:`open_tunnel` is a one-shot tunnel (``setup_db.py``): retried on network errors, closed
  when the ``async with`` block ends.
* :class:`SupervisedTunnel` is for the long-running daemon: the local address stays the same for
  its whole life and the SSH connection is reopened, with jittered exponential backoff, whenever
  it drops. While it is down, new TCP connections to the local port are refused; PostgreSQL
  clients reconnect.

Security: the SSH server's host key is always checked against ``SSH_KNOWN_HOSTS`` unless
``SSH_STRICT_HOST_KEY_CHECKING=no``, which is logged as a warning at every open. The key
passphrase is never logged nor put into a message. ``~/.ssh/config`` is not read: the tunnel is
configured by the ``SSH_*`` variables only.

Failure reasons (``TunnelError.reason``) and whether a retry is attempted:

=================== ======= ==========================================================
reason              retried cause
=================== ======= ==========================================================
``refused``         yes     nothing listens on SSH_HOST:SSH_PORT
``not_found``       yes     SSH_HOST does not resolve
``timeout``         yes     no SSH answer within the connect timeout
``unreachable``     yes     other network error (no route, reset, ...)
``disconnected``    yes     the server closed the connection during the handshake
``forward_failed``  yes     the SSH host could not connect to the database host:port
``key_missing``     no      SSH_KEY_PATH does not exist
``key_invalid``     no      SSH_KEY_PATH unreadable, not a key, or wrong passphrase
``auth_failed``     no      the server rejected the user/key
``host_key_unknown`` no     no key for the server in SSH_KNOWN_HOSTS
``host_key_changed`` no     the server's key differs from SSH_KNOWN_HOSTS (possible MITM)
``forward_refused`` no      the SSH server does not allow the forward (AllowTcpForwarding)
``error``           no      anything else (protocol error, local port in use, ...)
=================== ======= ==========================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType

from ._asyncssh import asyncssh
from .backoff import Backoff
from .errors import TunnelError
from .settings import SSHSettings
from .sshkeys import (
    Credentials,
    RecordingClient,
    describe_key,
    endpoint,
    load_credentials,
    read_known_hosts,
)
from .tunnel_errors import connect_error, forward_error, is_retryable

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_KEEPALIVE_INTERVAL",
    "LOCAL_HOST",
    "SupervisedTunnel",
    "open_tunnel",
]

log = logging.getLogger(__name__)

LOCAL_HOST = "127.0.0.1"
"""The only address the local end of a tunnel listens on."""
DEFAULT_CONNECT_TIMEOUT = 15.0
"""Seconds allowed for TCP connect + SSH handshake + authentication of one attempt."""
DEFAULT_KEEPALIVE_INTERVAL = 15.0
"""Seconds between SSH keepalives; after 3 unanswered ones the connection counts as dropped."""
_KEEPALIVE_COUNT_MAX = 3


# --------------------------------------------------------------------------- one attempt


@dataclass
class _Opened:
    conn: asyncssh.SSHClientConnection
    listener: asyncssh.SSHListener

    @property
    def port(self) -> int:
        return self.listener.get_port()

    async def close(self) -> None:
        self.listener.close()
        self.conn.close()
        with contextlib.suppress(Exception):
            await self.listener.wait_closed()
        with contextlib.suppress(Exception):
            await self.conn.wait_closed()


@dataclass(frozen=True)
class _Options:
    connect_timeout: float
    keepalive_interval: float
    check_forward: bool


async def _open_once(settings: SSHSettings, credentials: Credentials, remote_host: str,
                     remote_port: int, local_port: int, options: _Options) -> _Opened:
    """One attempt: connect, optionally check the forward, listen on 127.0.0.1:local_port."""
    known_hosts = read_known_hosts(settings) if settings.strict_host_key_checking else None
    client = RecordingClient()
    try:
        conn = await asyncssh.connect(
            settings.host,
            settings.port,
            config=None,  # never ~/.ssh/config: the SSH_* variables are the whole configuration
            username=settings.user if settings.user else (),
            known_hosts=known_hosts,
            client_keys=credentials.keys if credentials.keys is not None else (),
            # an explicit key is the only one offered; without one, asyncssh's defaults apply
            agent_path=None if credentials.keys is not None else (),
            passphrase=settings.key_passphrase if credentials.keys is None else None,
            client_factory=lambda: client,
            connect_timeout=options.connect_timeout,
            keepalive_interval=options.keepalive_interval,
            keepalive_count_max=_KEEPALIVE_COUNT_MAX,
        )
    except (OSError, asyncssh.Error) as exc:
        raise connect_error(settings, credentials, client, exc,
                            options.connect_timeout) from exc

    if not settings.strict_host_key_checking:
        log.warning(
            "SSH host key of %s NOT verified (SSH_STRICT_HOST_KEY_CHECKING=no)%s: the tunnel "
            "is open to man-in-the-middle attacks; set SSH_KNOWN_HOSTS and remove this setting",
            endpoint(settings), describe_key(conn.get_server_host_key()),
            extra={"event": "tunnel_host_key_unchecked", "ssh_host": settings.host,
                   "ssh_port": settings.port},
        )
    try:
        if options.check_forward:
            # Open (and close at once, sending nothing) one forwarded connection, so that a
            # refused forward or an unreachable database fails here, with a clear message,
            # rather than later as a reset connection inside the PostgreSQL driver.
            _, writer = await conn.open_connection(remote_host, remote_port)
            writer.close()
        listener = await conn.forward_local_port(LOCAL_HOST, local_port, remote_host,
                                                 remote_port)
    except BaseException as exc:
        conn.close()
        if not isinstance(exc, asyncio.CancelledError):
            with contextlib.suppress(Exception):
                await conn.wait_closed()
        if isinstance(exc, asyncssh.ChannelOpenError):
            raise forward_error(settings, remote_host, remote_port, exc) from exc
        if isinstance(exc, OSError):
            raise TunnelError(
                f"Cannot listen on {LOCAL_HOST}:{local_port} for the SSH tunnel: "
                f"{exc.strerror or exc}. Choose another local port.",
                reason="error",
            ) from exc
        if isinstance(exc, asyncssh.Error):
            raise TunnelError(
                f"SSH connection to {endpoint(settings)} was lost while opening the tunnel: "
                f"{exc.reason}.",
                reason="disconnected",
            ) from exc
        raise
    return _Opened(conn, listener)


async def _open_with_retries(settings: SSHSettings, credentials: Credentials, remote_host: str,
                             remote_port: int, local_port: int, options: _Options) -> _Opened:
    """Up to ``1 + settings.max_retries`` attempts, sleeping ``retry_delay * n`` after the
    n-th failed one; errors a retry cannot fix are raised at once."""
    attempts = settings.max_retries + 1
    for attempt in range(1, attempts + 1):
        try:
            return await _open_once(settings, credentials, remote_host, remote_port, local_port,
                                    options)
        except TunnelError as exc:
            if not is_retryable(exc):
                raise
            if attempt == attempts:
                if attempts == 1:
                    raise
                raise TunnelError(
                    f"{exc} Gave up after {attempts} attempts (SSH_MAX_RETRIES="
                    f"{settings.max_retries}).",
                    reason=exc.reason,
                ) from exc
            delay = settings.retry_delay * attempt
            log.warning(
                "SSH tunnel attempt %d of %d failed: %s Retrying in %.2f s.",
                attempt, attempts, exc, delay,
                extra={"event": "tunnel_retry", "attempt": attempt, "attempts": attempts,
                       "reason": exc.reason, "delay": delay},
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- public API


@asynccontextmanager
async def open_tunnel(
    settings: SSHSettings,
    remote_host: str,
    remote_port: int,
    *,
    local_port: int = 0,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
    check_forward: bool = True,
) -> AsyncIterator[tuple[str, int]]:
    """Open an SSH tunnel and yield its local end ``("127.0.0.1", port)``.

    Connects to ``settings.host:settings.port`` (``SSH_HOST``, ``SSH_PORT``) as
    ``settings.user`` (``SSH_USER``; default: the local user) with the key ``settings.key_path``
    (``SSH_KEY_PATH``, decrypted with ``SSH_KEY_PASSPHRASE``; without it asyncssh's default keys
    and the SSH agent at ``SSH_AUTH_SOCK`` are used), verifies the server's host key against
    ``settings.known_hosts`` (``SSH_KNOWN_HOSTS``) unless ``SSH_STRICT_HOST_KEY_CHECKING=no``,
    and forwards ``127.0.0.1:local_port`` (``0``: a free port chosen by the OS) to
    ``remote_host:remote_port`` as seen from the SSH host (``POSTGRES_HOST``, ``POSTGRES_PORT``).

    Network failures are retried ``settings.max_retries`` times (``SSH_MAX_RETRIES``), sleeping
    ``settings.retry_delay * attempt`` seconds (``SSH_RETRY_DELAY``) before attempt
    ``attempt + 1``; key, authentication and host key failures are not retried.

    ``connect_timeout`` (seconds) bounds each attempt; ``keepalive_interval`` (seconds) is the
    SSH keepalive period; ``check_forward`` opens one forwarded connection before yielding so
    that a refused forward or an unreachable database is reported here.

    Raises :class:`~daemon.errors.TunnelError` (see the module docstring for ``reason``).
    Everything is closed when the block exits.
    """
    credentials = await load_credentials(settings)
    options = _Options(connect_timeout, keepalive_interval, check_forward)
    opened = await _open_with_retries(settings, credentials, remote_host, remote_port,
                                      local_port, options)
    log.info("SSH tunnel %s:%d -> %s -> %s:%d open", LOCAL_HOST, opened.port, endpoint(settings),
             remote_host, remote_port,
             extra={"event": "tunnel_open", "local_port": opened.port,
                    "ssh_host": settings.host, "ssh_port": settings.port})
    try:
        yield LOCAL_HOST, opened.port
    finally:
        await opened.close()
        log.info("SSH tunnel to %s closed", endpoint(settings), extra={"event": "tunnel_closed"})


class SupervisedTunnel:
    """An SSH tunnel that reopens itself, on the same local port, when the connection drops.

    ::

        async with SupervisedTunnel(settings, "db.internal", 5432) as (host, port):
            ...  # connect PostgreSQL clients to host:port for as long as the daemon runs

    The first open follows the rules of :func:`open_tunnel` (same retries, same
    :class:`~daemon.errors.TunnelError`). Afterwards a background task waits for the SSH
    connection to close (server restart, network loss detected by keepalives every
    ``keepalive_interval`` seconds) and reopens it forever, sleeping a jittered exponential
    backoff starting at ``settings.retry_delay`` (``SSH_RETRY_DELAY``) and capped at
    ``max_backoff`` seconds between attempts. While it is down, connections to the local port
    are refused.

    ``reconnects`` counts successful reopens; :meth:`wait_up` / :meth:`wait_down` wait for the
    state to change; ``is_up`` is the current state. ``on_reopen`` is called after each reopen
    (the daemon's listener reconnects at once instead of at the end of its backoff).
    """

    def __init__(
        self,
        settings: SSHSettings,
        remote_host: str,
        remote_port: int,
        *,
        local_port: int = 0,
        max_backoff: float = 30.0,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        check_forward: bool = True,
        on_reopen: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_reopen = on_reopen
        self.remote_host = remote_host
        self.remote_port = remote_port
        self.max_backoff = max_backoff
        self.reconnects = 0
        self._local_port = local_port
        self._options = _Options(connect_timeout, keepalive_interval, check_forward)
        self._credentials: Credentials | None = None
        self._opened: _Opened | None = None
        self._task: asyncio.Task[None] | None = None
        self._up = asyncio.Event()
        self._down = asyncio.Event()

    # -- state ---------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The local end ``("127.0.0.1", port)``; fixed after the first open."""
        if not self._local_port:
            raise RuntimeError("the tunnel has not been opened yet")
        return LOCAL_HOST, self._local_port

    @property
    def is_up(self) -> bool:
        return self._up.is_set()

    async def wait_up(self) -> None:
        """Return once the tunnel is open (at once if it is)."""
        await self._up.wait()

    async def wait_down(self) -> None:
        """Return once the SSH connection has dropped (at once if it is down)."""
        await self._down.wait()

    # -- life cycle ------------------------------------------------------------------------

    async def __aenter__(self) -> tuple[str, int]:
        self._credentials = await load_credentials(self.settings)
        opened = await _open_with_retries(self.settings, self._credentials, self.remote_host,
                                          self.remote_port, self._local_port, self._options)
        self._set_up(opened)
        log.info("SSH tunnel %s:%d -> %s -> %s:%d open (supervised)", LOCAL_HOST, opened.port,
                 endpoint(self.settings), self.remote_host, self.remote_port,
                 extra={"event": "tunnel_open", "local_port": opened.port,
                        "ssh_host": self.settings.host, "ssh_port": self.settings.port})
        self._task = asyncio.create_task(self._supervise(), name="ssh-tunnel-supervisor")
        return self.address

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop supervising and close the tunnel (idempotent)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._opened is not None:
            opened, self._opened = self._opened, None
            await opened.close()
            log.info("SSH tunnel to %s closed", endpoint(self.settings),
                     extra={"event": "tunnel_closed"})
        self._up.clear()
        self._down.set()

    def _set_up(self, opened: _Opened) -> None:
        self._opened = opened
        self._local_port = opened.port
        self._down.clear()
        self._up.set()

    async def _supervise(self) -> None:
        while True:
            opened = self._opened
            assert opened is not None
            await opened.conn.wait_closed()
            self._up.clear()
            self._down.set()
            log.warning("SSH tunnel to %s dropped; reopening on %s:%d", endpoint(self.settings),
                        LOCAL_HOST, self._local_port,
                        extra={"event": "tunnel_down", "ssh_host": self.settings.host,
                               "ssh_port": self.settings.port})
            await opened.close()
            self._opened = None
            self._set_up(await self._reopen())
            self.reconnects += 1
            log.info("SSH tunnel to %s reopened on %s:%d (reconnect %d)", endpoint(self.settings),
                     LOCAL_HOST, self._local_port, self.reconnects,
                     extra={"event": "tunnel_reopened", "reconnects": self.reconnects,
                            "local_port": self._local_port})
            if self.on_reopen is not None:
                self.on_reopen()

    async def _reopen(self) -> _Opened:
        assert self._credentials is not None
        backoff = Backoff(base=max(self.settings.retry_delay, 0.001), cap=self.max_backoff)
        attempt = 0
        while True:
            attempt += 1
            await asyncio.sleep(backoff.next())
            try:
                return await _open_once(self.settings, self._credentials, self.remote_host,
                                        self.remote_port, self._local_port, self._options)
            except TunnelError as exc:
                level = logging.WARNING if is_retryable(exc) else logging.ERROR
                log.log(level, "SSH tunnel reopen attempt %d failed: %s", attempt, exc,
                        extra={"event": "tunnel_reopen_failed", "attempt": attempt,
                               "reason": exc.reason})
            except Exception:  # a bug must not end supervision: log it and keep trying
                log.exception("SSH tunnel reopen attempt %d failed unexpectedly", attempt,
                              extra={"event": "tunnel_reopen_failed", "attempt": attempt,
                                     "reason": "bug"})
