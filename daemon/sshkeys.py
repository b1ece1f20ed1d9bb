"""SSH credentials and host keys for :mod:`daemon.tunnel`: loading ``SSH_KEY_PATH``, reading
``SSH_KNOWN_HOSTS``, and the one-line :class:`~daemon.errors.TunnelError` for an unknown or
changed host key (naming the file, the line and the command that fixes it).
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ._asyncssh import asyncssh
from .errors import TunnelError
from .settings import SSHSettings

__all__ = [
    "Credentials",
    "RecordingClient",
    "describe_key",
    "endpoint",
    "host_key_error",
    "keyscan_hint",
    "load_credentials",
    "matching_lines",
    "read_known_hosts",
]


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class Credentials:
    """What the client authenticates with, loaded once per tunnel."""

    keys: Sequence[asyncssh.SSHKeyPair] | None  # None: asyncssh defaults (~/.ssh/id_*, agent)
    description: str  # for messages; never contains the passphrase


async def load_credentials(settings: SSHSettings) -> Credentials:
    """Load ``SSH_KEY_PATH`` (with ``SSH_KEY_PASSPHRASE``), or choose asyncssh's defaults.

    Raises :class:`TunnelError` ``key_missing`` (no such file) or ``key_invalid`` (unreadable,
    not a private key, encrypted without/with a wrong passphrase), before any connection.
    """
    path = settings.key_path
    if path is None:
        return Credentials(None, "the default keys (~/.ssh/id_*) and the SSH agent "
                                  "(SSH_AUTH_SOCK)")
    if not path.exists():
        raise TunnelError(
            f"SSH key file {path} not found. Check SSH_KEY_PATH.", reason="key_missing"
        )
    try:
        # Decrypting a key may take a noticeable time (bcrypt KDF): keep it off the loop.
        keys = await asyncio.to_thread(asyncssh.load_keypairs, str(path),
                                       settings.key_passphrase)
    except FileNotFoundError as exc:  # removed between the check and the read
        raise TunnelError(
            f"SSH key file {path} not found. Check SSH_KEY_PATH.", reason="key_missing"
        ) from exc
    except OSError as exc:
        raise TunnelError(
            f"SSH key file {path} cannot be read ({exc.strerror}). Check SSH_KEY_PATH and the "
            "file's permissions.", reason="key_invalid",
        ) from exc
    except ValueError as exc:  # KeyImportError, KeyEncryptionError
        text = str(exc)
        lower = text.lower()
        if "incorrect passphrase" in lower or "unable to decrypt" in lower:
            hint = "wrong passphrase; check SSH_KEY_PASSPHRASE"
        elif "passphrase must be specified" in lower:
            hint = "it is encrypted; set SSH_KEY_PASSPHRASE"
        elif "bcrypt" in text:
            hint = ("decrypting OpenSSH-format keys needs the bcrypt package; install "
                    "asyncssh[bcrypt] or use an unencrypted key")
        else:
            hint = f"{text}; check SSH_KEY_PATH"
        raise TunnelError(f"SSH key file {path} cannot be used: {hint}.",
                          reason="key_invalid") from exc
    if not keys:
        raise TunnelError(f"SSH key file {path} holds no private key. Check SSH_KEY_PATH.",
                          reason="key_invalid")
    return Credentials(keys, f"key {path}")


# --------------------------------------------------------------------------- host keys


def endpoint(settings: SSHSettings) -> str:
    return f"{settings.host}:{settings.port}"


def keyscan_hint(settings: SSHSettings) -> str:
    return (f"ssh-keyscan -p {settings.port} {shlex.quote(settings.host)} >> "
            f"{shlex.quote(str(settings.known_hosts))}")


def read_known_hosts(settings: SSHSettings) -> asyncssh.SSHKnownHosts:
    """Read ``SSH_KNOWN_HOSTS``; a missing file means every host key is unknown."""
    path = settings.known_hosts
    try:
        return asyncssh.read_known_hosts(str(path))
    except FileNotFoundError as exc:
        raise TunnelError(
            f"SSH known_hosts file {path} does not exist, so the host key of {endpoint(settings)} "
            f"cannot be verified. After checking the fingerprint, add it with: "
            f"{keyscan_hint(settings)} (or set SSH_KNOWN_HOSTS).",
            reason="host_key_unknown",
        ) from exc
    except (OSError, ValueError) as exc:
        raise TunnelError(
            f"SSH known_hosts file {path} cannot be read: {exc}. Check SSH_KNOWN_HOSTS.",
            reason="error",
        ) from exc


def matching_lines(path: Path, host: str, addr: str, port: int) -> list[int]:
    """1-based line numbers of ``path`` holding an entry (key, CA or revocation) for the host."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    lookup_port = port if port != 22 else None
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        try:
            matched = asyncssh.import_known_hosts(entry).match(host, addr, lookup_port)
        except (ValueError, TypeError):
            continue
        if any(matched):
            found.append(number)
    return found


def _known_hosts_name(settings: SSHSettings) -> str:
    return settings.host if settings.port == 22 else f"[{settings.host}]:{settings.port}"


class RecordingClient(asyncssh.SSHClient):
    """Remembers the host key the server presented when it was not trusted (for messages)."""

    def __init__(self) -> None:
        super().__init__()
        self.addr = ""
        self.presented: asyncssh.SSHKey | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        self.addr = addr
        self.presented = key
        return False


def describe_key(key: asyncssh.SSHKey | None) -> str:
    if key is None:
        return ""
    return f" (server presents {key.get_algorithm()} {key.get_fingerprint()})"


def host_key_error(settings: SSHSettings, client: RecordingClient) -> TunnelError:
    lines = matching_lines(settings.known_hosts, settings.host, client.addr, settings.port)
    presented = describe_key(client.presented)
    if not lines:
        return TunnelError(
            f"SSH host key of {endpoint(settings)} is unknown: it is not in {settings.known_hosts}"
            f"{presented}. After checking the fingerprint with the server's administrator, add "
            f"it with: {keyscan_hint(settings)}",
            reason="host_key_unknown",
        )
    where = ", ".join(str(n) for n in lines)
    return TunnelError(
        f"SSH host key of {endpoint(settings)} has CHANGED{presented} and does not match "
        f"{settings.known_hosts} line {where}: this may be a man-in-the-middle attack. If the "
        f"change is expected, remove the old entry (ssh-keygen -R "
        f"{shlex.quote(_known_hosts_name(settings))} -f "
        f"{shlex.quote(str(settings.known_hosts))}) and add the verified new key "
        f"({keyscan_hint(settings)}).",
        reason="host_key_changed",
    )
