"""What went wrong when an SSH tunnel would not open, in one line: the translation of asyncssh's
and the OS's exceptions into one :class:`~daemon.errors.TunnelError` each, whose message says
what to fix and whose ``reason`` is one of the table in :mod:`daemon.tunnel`'s docstring; and
which of those reasons a retry may cure (:func:`is_retryable`).

Why a module of its own: :mod:`daemon.tunnel` does the I/O (connect, forward, retry,
supervise); deciding what an exception means is a set of plain functions of the exception and
the settings, with no socket, read and changed apart from the I/O (errors translated at one
boundary).
"""

from __future__ import annotations

import errno
import getpass
import re
import socket

from ._asyncssh import asyncssh
from .errors import TunnelError
from .settings import SSHSettings
from .sshkeys import Credentials, RecordingClient, endpoint, host_key_error, matching_lines

__all__ = ["connect_error", "forward_error", "is_retryable"]

_RETRYABLE = frozenset(
    {"refused", "not_found", "timeout", "unreachable", "disconnected", "forward_failed"}
)


def is_retryable(exc: TunnelError) -> bool:
    """True when a new attempt may succeed (a network failure); see the table's "retried"."""
    return exc.reason in _RETRYABLE


def _all_refused(exc: BaseException) -> bool:
    """asyncio reports failures on several addresses of one name (IPv6 and IPv4) as a plain
    ``OSError("Multiple exceptions: [Errno 111] ..., [Errno 111] ...")``."""
    if not isinstance(exc, OSError) or exc.errno is not None:
        return False
    numbers = re.findall(r"\[Errno (\d+)\]", str(exc))
    return bool(numbers) and all(int(n) == errno.ECONNREFUSED for n in numbers)


def connect_error(settings: SSHSettings, credentials: Credentials, client: RecordingClient,
                   exc: BaseException, connect_timeout: float) -> TunnelError:
    """Translate an exception of :func:`asyncssh.connect` into one clear TunnelError."""
    where = endpoint(settings)
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return host_key_error(settings, client)
    if isinstance(exc, asyncssh.PermissionDenied):
        user = settings.user or getpass.getuser()
        return TunnelError(
            f"SSH authentication as {user!r} on {where} failed with {credentials.description}. "
            f"Check SSH_USER and SSH_KEY_PATH, and that the public key is in {user}'s "
            "~/.ssh/authorized_keys on the SSH host.",
            reason="auth_failed",
        )
    if isinstance(exc, asyncssh.KeyExchangeFailed):
        lines = matching_lines(settings.known_hosts, settings.host, client.addr, settings.port)
        if lines and "host key" in str(exc).lower():
            # known_hosts pins key types the server no longer offers: treat as a changed key.
            return host_key_error(settings, client)
        return TunnelError(f"SSH key exchange with {where} failed: {exc.reason}.",
                           reason="error")
    if isinstance(exc, asyncssh.DisconnectError):
        return TunnelError(
            f"SSH server {where} closed the connection during login ({exc.reason}). Check "
            "SSH_HOST and SSH_PORT, and the SSH server's logs.",
            reason="disconnected",
        )
    if isinstance(exc, ConnectionRefusedError) or _all_refused(exc):
        return TunnelError(f"SSH connection to {where} refused. Check SSH_HOST and SSH_PORT.",
                           reason="refused")
    if isinstance(exc, socket.gaierror):
        return TunnelError(
            f"SSH host {settings.host!r} not found ({exc.strerror}). Check DNS or SSH_HOST.",
            reason="not_found",
        )
    if isinstance(exc, TimeoutError):
        return TunnelError(
            f"SSH connection to {where} timed out after {connect_timeout:g} s. Check SSH_HOST, "
            "SSH_PORT and firewalls.",
            reason="timeout",
        )
    if isinstance(exc, OSError):
        return TunnelError(
            f"SSH connection to {where} failed: {exc.strerror or exc}. Check SSH_HOST, SSH_PORT "
            "and the network.",
            reason="unreachable",
        )
    return TunnelError(f"SSH connection to {where} failed: {exc}.", reason="error")


def forward_error(settings: SSHSettings, remote_host: str, remote_port: int,
                   exc: asyncssh.ChannelOpenError) -> TunnelError:
    target = f"{remote_host}:{remote_port}"
    if exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED:
        return TunnelError(
            f"SSH server {endpoint(settings)} refused to forward to {target} ({exc.reason}). Allow "
            "TCP forwarding for this user on the SSH host (sshd_config AllowTcpForwarding, "
            "PermitOpen).",
            reason="forward_refused",
        )
    return TunnelError(
        f"SSH host {settings.host} could not connect to {target} ({exc.reason}). Check "
        "POSTGRES_HOST and POSTGRES_PORT (or the host in DATABASE_URL) as seen from the SSH "
        "host, and that PostgreSQL is running.",
        reason="forward_failed",
    )

