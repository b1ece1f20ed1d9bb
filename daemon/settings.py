"""Settings from the environment, ``.env`` and ``.env.local``.

Precedence (highest first): the process environment, ``.env.local``, ``.env`` (python-dotenv,
files read from the working directory). Names follow spec 003 (``POSTGRES_*``, ``SSH_*``) and
DESIGN.md (``DATABASE_URL``, ``PGBRIDGE_*``). Every parse error is a :class:`ConfigError` whose
message names the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values

from .doorbell import POLICIES
from .errors import ConfigError
from .origins import Allowlist, PublicOrigins, parse_allowlist, parse_public_origins

EVENT_LOOPS = ("auto", "asyncio", "uvloop")  # PGBRIDGE_EVENT_LOOP

__all__ = [
    "DaemonSettings",
    "DatabaseSettings",
    "SSHSettings",
    "load_environment",
]

_DATABASE_VARIABLES = (
    "DATABASE_URL", "POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_DB", "POSTGRES_USER",
    "POSTGRES_PASSWORD",
)
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def load_environment(directory: Path | None = None) -> dict[str, str]:
    """Return the merged environment: ``.env`` < ``.env.local`` < process environment.

    ``directory`` is where the files are looked for (default: the working directory). Missing
    files are ignored. Nothing is written to ``os.environ``.
    """
    base = directory or Path.cwd()
    merged: dict[str, str] = {}
    for name in (".env", ".env.local"):
        path = base / name
        if path.is_file():
            merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    merged.update(os.environ)
    return merged


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0,
         maximum: int | None = None) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise ConfigError(f"{name}={value} must be at least {minimum}{upper}")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    """Parse a duration: seconds (``2.5``) or with a unit (``500ms``, ``30s``, ``12h``, ``7d``)."""
    raw = _get(env, name)
    if raw is None:
        return default
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?", raw.lower())
    if not match:
        raise ConfigError(f"{name}={raw!r} is not a duration (examples: 2.5, 500ms, 30s, 12h, 7d)")
    scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * scale


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _get(env, name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} must be yes or no")


def schema_name(value: str, *, variable: str = "PGBRIDGE_SCHEMA") -> str:
    """Validate a schema name (lower-case SQL identifier); raise :class:`ConfigError` if not."""
    if not _IDENTIFIER.match(value):
        raise ConfigError(
            f"{variable}={value!r} is not a valid schema name (lower-case letters, digits, _)"
        )
    return value


@dataclass(frozen=True, kw_only=True)
class DatabaseSettings:
    """Where PostgreSQL is.

    ``url`` comes from ``DATABASE_URL``; otherwise the spec's ``POSTGRES_HOST`` (localhost),
    ``POSTGRES_PORT`` (5432), ``POSTGRES_DB``, ``POSTGRES_USER``, ``POSTGRES_PASSWORD`` are used.
    ``embedded`` is true when none of them is set: an embedded server in ``data_dir``
    (``PGBRIDGE_DATA_DIR``, default ``.pgbridge``; the cluster lives in ``data_dir/pgdata``).
    """

    url: str | None = field(default=None, repr=False)
    host: str = "localhost"
    port: int = 5432
    dbname: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    data_dir: Path = Path(".pgbridge")

    embedded: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DatabaseSettings:
        return cls(
            url=_get(env, "DATABASE_URL"),
            host=_get(env, "POSTGRES_HOST") or "localhost",
            port=_int(env, "POSTGRES_PORT", 5432, minimum=1, maximum=65535),
            dbname=_get(env, "POSTGRES_DB"),
            user=_get(env, "POSTGRES_USER"),
            password=_get(env, "POSTGRES_PASSWORD"),
            data_dir=Path(_get(env, "PGBRIDGE_DATA_DIR") or ".pgbridge").expanduser(),
            embedded=not any(_get(env, name) for name in _DATABASE_VARIABLES),
        )

    def conninfo_parts(self) -> dict[str, str | int]:
        """Keyword connection parameters for psycopg (no URL); empty values left out."""
        parts: dict[str, str | int] = {"host": self.host, "port": self.port}
        if self.dbname:
            parts["dbname"] = self.dbname
        if self.user:
            parts["user"] = self.user
        if self.password:
            parts["password"] = self.password
        return parts


@dataclass(frozen=True, kw_only=True)
class SSHSettings:
    """The SSH tunnel (spec 003, "SSH tunnel"); on when ``SSH_HOST`` is set.

    ``SSH_PORT`` (22), ``SSH_USER``, ``SSH_KEY_PATH`` (``~`` expanded), ``SSH_KEY_PASSPHRASE``,
    ``SSH_KNOWN_HOSTS`` (``~/.ssh/known_hosts``), ``SSH_STRICT_HOST_KEY_CHECKING`` (yes; ``no``
    disables host key checks with a warning), ``SSH_MAX_RETRIES`` (3 attempts after the first
    failure) and ``SSH_RETRY_DELAY`` (1 second, multiplied by the attempt number).
    """

    host: str
    port: int = 22
    user: str | None = None
    key_path: Path | None = None
    key_passphrase: str | None = None
    known_hosts: Path = field(default_factory=lambda: Path("~/.ssh/known_hosts").expanduser())
    strict_host_key_checking: bool = True
    max_retries: int = 3
    retry_delay: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SSHSettings | None:
        """Return the tunnel settings, or ``None`` when ``SSH_HOST`` is not set."""
        host = _get(env, "SSH_HOST")
        if host is None:
            return None
        key = _get(env, "SSH_KEY_PATH")
        return cls(
            host=host,
            port=_int(env, "SSH_PORT", 22, minimum=1, maximum=65535),
            user=_get(env, "SSH_USER"),
            key_path=Path(key).expanduser() if key else None,
            key_passphrase=_get(env, "SSH_KEY_PASSPHRASE"),
            known_hosts=Path(_get(env, "SSH_KNOWN_HOSTS") or "~/.ssh/known_hosts").expanduser(),
            strict_host_key_checking=_bool(env, "SSH_STRICT_HOST_KEY_CHECKING", True),
            max_retries=_int(env, "SSH_MAX_RETRIES", 3, maximum=100),
            retry_delay=_seconds(env, "SSH_RETRY_DELAY", 1.0),
        )

    def __repr__(self) -> str:  # never print the passphrase
        return (f"SSHSettings(host={self.host!r}, port={self.port}, user={self.user!r}, "
                f"key_path={self.key_path!r})")


@dataclass(frozen=True, kw_only=True)
class DaemonSettings:
    """The daemon's own settings (``PGBRIDGE_*``); durations in seconds, rates per second.

    Slow clients: ``queue_size`` frames queued per connection, ``send_timeout`` seconds a frame
    may wait for the client's socket, ``send_buffer`` bytes of kernel send buffer per
    connection (SO_SNDBUF); past either bound the client is closed with 4008.

    Limits on clients (PROTOCOL.md, "Limits"): ``rate_limit``/``rate_burst`` frames per
    connection, ``subscribe_rate``/``subscribe_burst`` subscribe attempts per connection,
    ``user_subscribe_rate``/``user_subscribe_burst`` per user, ``max_subscriptions`` rooms per
    connection, ``max_connections_per_user`` and ``max_connections`` in total.

    ``jwt_secret`` may be ``None`` here: the composition root requires it when a database is
    configured, and generates a development secret for the embedded server. ``jwt_audience``
    and ``jwt_issuer``: the ``aud``/``iss`` a token must carry (``None``: none).

    ``demo``: serve the demo page at ``/`` (``PGBRIDGE_DEMO``; ``None``: on with the embedded
    database, off with a configured one, decided by the composition root).

    Presence (README, "Presence and typing"): ``presence_grace`` seconds a user stays online
    after their last connection closed (``PGBRIDGE_PRESENCE_GRACE``), ``presence_lease``
    seconds an instance's lease lasts without renewal (``PGBRIDGE_PRESENCE_LEASE``): a dead
    instance's users go offline within 4/3 of it.

    The adaptive doorbell (README, "The adaptive doorbell"; :mod:`daemon.doorbell`):
    ``doorbell`` is ``adaptive`` (writers NOTIFY at light load; above ``doorbell_quiet_above``
    events per second they stop and the bridges read the log every ``poll_interval`` seconds),
    ``on`` (this bridge never asks writers to stop) or ``off`` (it keeps them quiet while it
    runs) (``PGBRIDGE_DOORBELL``, ``PGBRIDGE_DOORBELL_QUIET_ABOVE``, ``PGBRIDGE_POLL_INTERVAL``).

    ``event_loop``: ``asyncio`` (the standard library's), ``uvloop`` (the optional extra
    ``pgbridge[uvloop]``), or ``auto``: uvloop when it is installed (``PGBRIDGE_EVENT_LOOP``;
    README, "Fan-out cost").

    ``allowed_origins``: browser origins admitted besides the bridge's own
    (``PGBRIDGE_ALLOWED_ORIGINS``, :mod:`daemon.origins`). ``public_origins``: the origins the
    bridge is published at, its own (``PGBRIDGE_PUBLIC_ORIGIN``; empty: only pages on a loopback
    name or an IP literal are its own). ``access_check_interval``: seconds
    between two checks of every connected user and subscription against the database.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    jwt_secret: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    allowed_origins: Allowlist = field(default_factory=Allowlist)
    public_origins: PublicOrigins = frozenset()
    access_check_interval: float = 30.0
    schema: str = "public"
    queue_size: int = 1000
    send_timeout: float = 5.0
    send_buffer: int = 64 * 1024
    max_subscriptions: int = 100
    rate_limit: float = 50.0
    rate_burst: int = 100
    subscribe_rate: float = 5.0
    subscribe_burst: int = 100
    user_subscribe_rate: float = 10.0
    user_subscribe_burst: int = 300
    max_connections: int = 10000
    max_connections_per_user: int = 20
    max_frame_bytes: int = 64 * 1024
    heartbeat: float = 20.0
    retention: float = 7 * 86400.0
    prune_interval: float = 300.0
    ack_flush_interval: float = 1.0
    probe_interval: float = 10.0
    pool_size: int = 10
    log_level: str = "INFO"
    demo: bool | None = None
    presence_grace: float = 15.0
    presence_lease: float = 30.0
    doorbell: str = "adaptive"
    doorbell_quiet_above: float = 500.0
    poll_interval: float = 0.01
    event_loop: str = "auto"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DaemonSettings:
        level = (_get(env, "PGBRIDGE_LOG_LEVEL") or "INFO").upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"PGBRIDGE_LOG_LEVEL={level!r} must be DEBUG, INFO, WARNING or ERROR")
        try:
            origins = parse_allowlist(_get(env, "PGBRIDGE_ALLOWED_ORIGINS"))
        except ValueError as exc:
            raise ConfigError(f"PGBRIDGE_ALLOWED_ORIGINS: {exc}") from None
        try:
            public_origins = parse_public_origins(_get(env, "PGBRIDGE_PUBLIC_ORIGIN"))
        except ValueError as exc:
            raise ConfigError(f"PGBRIDGE_PUBLIC_ORIGIN: {exc}") from None
        send_timeout = _seconds(env, "PGBRIDGE_SEND_TIMEOUT", 5.0)
        if send_timeout <= 0:
            raise ConfigError("PGBRIDGE_SEND_TIMEOUT must be more than 0 seconds")
        access_check_interval = _seconds(env, "PGBRIDGE_ACCESS_CHECK_INTERVAL", 30.0)
        if access_check_interval <= 0:
            raise ConfigError("PGBRIDGE_ACCESS_CHECK_INTERVAL must be more than 0 seconds")
        presence_lease = _seconds(env, "PGBRIDGE_PRESENCE_LEASE", 30.0)
        if presence_lease < 1:
            raise ConfigError("PGBRIDGE_PRESENCE_LEASE must be at least 1 second")
        doorbell = (_get(env, "PGBRIDGE_DOORBELL") or "adaptive").lower()
        if doorbell not in POLICIES:
            raise ConfigError(f"PGBRIDGE_DOORBELL={doorbell!r} must be adaptive, on or off")
        event_loop = (_get(env, "PGBRIDGE_EVENT_LOOP") or "auto").lower()
        if event_loop not in EVENT_LOOPS:
            raise ConfigError(f"PGBRIDGE_EVENT_LOOP={event_loop!r} must be auto, asyncio or "
                              "uvloop")
        heartbeat = _seconds(env, "PGBRIDGE_HEARTBEAT", 20.0)
        if heartbeat < 0.1:  # a client that answered no ping by the next one is closed
            raise ConfigError("PGBRIDGE_HEARTBEAT must be at least 100ms")
        poll_interval = _seconds(env, "PGBRIDGE_POLL_INTERVAL", 0.01)
        if not 0.001 <= poll_interval <= 1.0:
            raise ConfigError("PGBRIDGE_POLL_INTERVAL must be between 1ms and 1s")
        return cls(
            host=_get(env, "PGBRIDGE_HOST") or "127.0.0.1",
            port=_int(env, "PGBRIDGE_PORT", 8080, maximum=65535),
            jwt_secret=_get(env, "PGBRIDGE_JWT_SECRET"),
            jwt_audience=_get(env, "PGBRIDGE_JWT_AUDIENCE"),
            jwt_issuer=_get(env, "PGBRIDGE_JWT_ISSUER"),
            allowed_origins=origins,
            public_origins=public_origins,
            access_check_interval=access_check_interval,
            schema=schema_name(_get(env, "PGBRIDGE_SCHEMA") or "public"),
            queue_size=_int(env, "PGBRIDGE_QUEUE_SIZE", 1000, minimum=1),
            send_timeout=send_timeout,
            send_buffer=_int(env, "PGBRIDGE_SEND_BUFFER", 64 * 1024, minimum=4096),
            max_subscriptions=_int(env, "PGBRIDGE_MAX_SUBSCRIPTIONS", 100, minimum=1),
            rate_limit=float(_int(env, "PGBRIDGE_RATE_LIMIT", 50, minimum=1)),
            rate_burst=_int(env, "PGBRIDGE_RATE_BURST", 100, minimum=1),
            subscribe_rate=float(_int(env, "PGBRIDGE_SUBSCRIBE_RATE", 5, minimum=1)),
            subscribe_burst=_int(env, "PGBRIDGE_SUBSCRIBE_BURST", 100, minimum=1),
            user_subscribe_rate=float(_int(env, "PGBRIDGE_USER_SUBSCRIBE_RATE", 10, minimum=1)),
            user_subscribe_burst=_int(env, "PGBRIDGE_USER_SUBSCRIBE_BURST", 300, minimum=1),
            max_connections=_int(env, "PGBRIDGE_MAX_CONNECTIONS", 10000, minimum=1),
            max_connections_per_user=_int(env, "PGBRIDGE_MAX_CONNECTIONS_PER_USER", 20,
                                          minimum=1),
            heartbeat=heartbeat,
            retention=_seconds(env, "PGBRIDGE_RETENTION", 7 * 86400.0),
            prune_interval=_seconds(env, "PGBRIDGE_PRUNE_INTERVAL", 300.0),
            ack_flush_interval=_seconds(env, "PGBRIDGE_ACK_FLUSH_INTERVAL", 1.0),
            probe_interval=_seconds(env, "PGBRIDGE_PROBE_INTERVAL", 10.0),
            pool_size=_int(env, "PGBRIDGE_POOL_SIZE", 10, minimum=2),
            log_level=level,
            demo=_bool(env, "PGBRIDGE_DEMO", True) if _get(env, "PGBRIDGE_DEMO") else None,
            presence_grace=_seconds(env, "PGBRIDGE_PRESENCE_GRACE", 15.0),
            presence_lease=presence_lease,
            doorbell=doorbell,
            doorbell_quiet_above=float(_int(env, "PGBRIDGE_DOORBELL_QUIET_ABOVE", 500,
                                            minimum=1)),
            poll_interval=poll_interval,
            event_loop=event_loop,
        )
