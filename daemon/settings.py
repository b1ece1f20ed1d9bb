"""Settings from the environment, ``.env`` and ``.env.local``, parsed by the settings table.

Precedence (highest first): the process environment, ``.env.local``, ``.env`` (python-dotenv,
files read from the working directory). Every variable, its type, default, unit, bounds and
meaning is declared once, in :data:`daemon.settings_table.SETTINGS` (rendered as
``docs/reference/settings.md``); this module parses by it, and the dataclasses below take their
defaults from it. Names follow spec 003 (``POSTGRES_*``, ``SSH_*``) and docs/design.md
(``DATABASE_URL``, ``PGBRIDGE_*``). Every parse error is a :class:`ConfigError` whose one-line
message names the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from .errors import ConfigError
from .origins import Allowlist, PublicOrigins, parse_allowlist, parse_public_origins
from .settings_table import SETTINGS, Group, Setting

__all__ = [
    "DaemonSettings",
    "DatabaseSettings",
    "SSHSettings",
    "load_environment",
    "schema_name",
    "value",
]

_BY_NAME = {setting.name: setting for setting in SETTINGS}
# Any of these set: a configured database; none: the embedded one.
_DATABASE_VARIABLES = tuple(s.name for s in SETTINGS
                            if s.group == "database" and s.name != "PGBRIDGE_DATA_DIR")
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_SCALE = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}


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


def _int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def _seconds(name: str, raw: str) -> float:
    """Parse a duration: seconds (``2.5``) or with a unit (``500ms``, ``30s``, ``12h``, ``7d``)."""
    match = _DURATION.fullmatch(raw.lower())
    if not match:
        raise ConfigError(f"{name}={raw!r} is not a duration (examples: 2.5, 500ms, 30s, 12h, 7d)")
    return float(match.group(1)) * _SCALE[match.group(2)]


def _bool(name: str, raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} must be yes or no")


def _choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    value = raw.upper() if choices[0].isupper() else raw.lower()
    if value not in choices:
        raise ConfigError(f"{name}={value!r} must be {', '.join(choices[:-1])} or {choices[-1]}")
    return value


def _bounded(setting: Setting, value: float, shown: str) -> None:
    """Raise :class:`ConfigError` when ``value`` is outside the setting's bounds (``shown``: the
    value as the message quotes it)."""
    low, high, above = setting.minimum, setting.maximum, setting.above
    if ((low is None or value >= low) and (high is None or value <= high)
            and (above is None or value > above)):
        return
    raise ConfigError(f"{setting.name}={shown} must be {setting.bounds()}")


def _servers(name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated ``nats://`` or ``tls://`` URLs with a host; :class:`ConfigError` names
    the first one that is not (without its credentials)."""
    servers = tuple(part.strip() for part in raw.split(",") if part.strip())
    for server in servers:
        scheme, sep, rest = server.partition("://")
        host = rest.rpartition("@")[2].split("/")[0]
        if not sep or scheme.lower() not in ("nats", "tls") or not host:
            shown = f"{scheme}://{host}" if sep else server.rpartition("@")[2]
            raise ConfigError(f"{name}: {shown!r} is not a NATS server URL (nats://host:port or "
                              "tls://host:port)")
    if not servers:
        raise ConfigError(f"{name}={raw!r} names no server")
    return servers


def schema_name(value: str, *, variable: str = "PGBRIDGE_SCHEMA") -> str:
    """Validate a schema name (lower-case SQL identifier); raise :class:`ConfigError` if not."""
    if not _IDENTIFIER.match(value):
        raise ConfigError(
            f"{variable}={value!r} is not a valid schema name (lower-case letters, digits, _)"
        )
    return value


def _value(env: Mapping[str, str], setting: Setting) -> Any:
    """The setting's value from ``env`` (its default when unset or empty), converted to its
    kind and checked against its bounds and choices; :class:`ConfigError` names the variable."""
    name = setting.name
    raw = _get(env, name)
    text = raw if raw is not None else setting.default
    if setting.kind in ("origins", "allowlist"):
        parse = parse_public_origins if setting.kind == "origins" else parse_allowlist
        try:
            return parse(text)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    if text is None:
        return None
    match setting.kind:
        case "text" | "secret":
            return text
        case "path":
            return Path(text).expanduser()
        case "schema":
            return schema_name(text, variable=name)
        case "yes/no":
            return _bool(name, text)
        case "choice":
            return _choice(name, text, setting.choices)
        case "servers":
            return _servers(name, text)
        case "duration":
            seconds = _seconds(name, text)
            _bounded(setting, seconds, repr(text))
            return seconds
    number = _int(name, text)
    _bounded(setting, number, str(number))
    return float(number) if setting.kind == "rate" else number


def value(env: Mapping[str, str], name: str) -> Any:
    """One variable's value from ``env`` (its default from the table when unset), parsed as
    the settings classes parse it: for the tools that need one setting, not a whole group.
    Raises :class:`ConfigError` naming the variable, ``KeyError`` for a name not in the
    table."""
    return _value(env, _BY_NAME[name])


def _values(env: Mapping[str, str], group: Group) -> dict[str, Any]:
    """The keyword arguments of a group's settings class, every field from ``env``."""
    return {s.attr: _value(env, s) for s in SETTINGS if s.group == group and s.attr}


def _default(name: str) -> Any:
    """The parsed default of one variable, for a dataclass field's default."""
    return _value({}, _BY_NAME[name])


_DEFAULTS: dict[str, Any] = {s.name: _default(s.name) for s in SETTINGS if s.attr}


@dataclass(frozen=True, kw_only=True)
class DatabaseSettings:
    """Where PostgreSQL is (the table's ``database`` group).

    ``url`` comes from ``DATABASE_URL``; otherwise spec 003's ``POSTGRES_HOST``,
    ``POSTGRES_PORT``, ``POSTGRES_DB``, ``POSTGRES_USER``, ``POSTGRES_PASSWORD`` are used.
    ``embedded`` is true when none of them is set: an embedded server in ``data_dir``
    (``PGBRIDGE_DATA_DIR``; the cluster lives in ``data_dir/pgdata``).
    """

    url: str | None = field(default=None, repr=False)
    host: str = _DEFAULTS["POSTGRES_HOST"]
    port: int = _DEFAULTS["POSTGRES_PORT"]
    dbname: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    data_dir: Path = _DEFAULTS["PGBRIDGE_DATA_DIR"]

    embedded: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DatabaseSettings:
        """Parse ``env``; raises :class:`ConfigError` naming the variable."""
        return cls(**_values(env, "database"),
                   embedded=not any(_get(env, name) for name in _DATABASE_VARIABLES))

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
    """The SSH tunnel (spec 003, "SSH tunnel"; the table's ``ssh`` group); on when ``SSH_HOST``
    is set.

    ``port`` (``SSH_PORT``), ``user`` (``SSH_USER``; ``None``: the local user), ``key_path``
    (``SSH_KEY_PATH``, ``~`` expanded; ``None``: ``~/.ssh/id_*`` and the agent),
    ``key_passphrase`` (``SSH_KEY_PASSPHRASE``), ``known_hosts`` (``SSH_KNOWN_HOSTS``),
    ``strict_host_key_checking`` (``SSH_STRICT_HOST_KEY_CHECKING``; false disables host key
    checks with a warning), ``max_retries`` attempts after the first failure
    (``SSH_MAX_RETRIES``) and ``retry_delay`` seconds, multiplied by the attempt number
    (``SSH_RETRY_DELAY``).
    """

    host: str
    port: int = _DEFAULTS["SSH_PORT"]
    user: str | None = None
    key_path: Path | None = None
    key_passphrase: str | None = None
    known_hosts: Path = field(default_factory=lambda: _default("SSH_KNOWN_HOSTS"))
    strict_host_key_checking: bool = _DEFAULTS["SSH_STRICT_HOST_KEY_CHECKING"]
    max_retries: int = _DEFAULTS["SSH_MAX_RETRIES"]
    retry_delay: float = _DEFAULTS["SSH_RETRY_DELAY"]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SSHSettings | None:
        """Return the tunnel settings, or ``None`` when ``SSH_HOST`` is not set; raises
        :class:`ConfigError` naming the variable."""
        if _get(env, "SSH_HOST") is None:
            return None
        return cls(**_values(env, "ssh"))

    def __repr__(self) -> str:  # never print the passphrase
        return (f"SSHSettings(host={self.host!r}, port={self.port}, user={self.user!r}, "
                f"key_path={self.key_path!r})")


@dataclass(frozen=True, kw_only=True)
class DaemonSettings:
    """The daemon's own settings (``PGBRIDGE_*``, the table's ``daemon`` group): each field is
    the variable of its name in upper case (``queue_size``: ``PGBRIDGE_QUEUE_SIZE``) except
    ``allowed_origins`` (``PGBRIDGE_ALLOWED_ORIGINS``) and ``public_origins``
    (``PGBRIDGE_PUBLIC_ORIGIN``). Durations are in seconds (floats), rates per second (floats),
    ``send_buffer`` in bytes; defaults, bounds and meanings are in the table.

    ``jwt_secret`` may be ``None`` here: the composition root requires it when a database is
    configured, and generates a development secret for the embedded server. ``jwt_audience``
    and ``jwt_issuer``: the ``aud``/``iss`` a token must carry (``None``: none).

    ``demo``: ``None`` when unset: on with the embedded database, off with a configured one,
    decided by the composition root. ``doorbell``: one of :data:`daemon.doorbell.POLICIES`;
    ``event_loop``: ``auto``, ``asyncio`` or ``uvloop``; ``log_level``: upper case.

    ``allowed_origins``: browser origins admitted besides the bridge's own
    (:mod:`daemon.origins`). ``public_origins``: the origins the bridge is published at, its own
    (empty: only pages on a loopback name or an IP literal are its own).

    ``broker``: the NATS servers' URLs (``None``: no broker; docs/topics/broker.md).

    ``max_frame_bytes`` is no setting: the largest client frame, 64 KiB.
    """

    host: str = _DEFAULTS["PGBRIDGE_HOST"]
    port: int = _DEFAULTS["PGBRIDGE_PORT"]
    jwt_secret: str | None = field(default=None, repr=False)
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    allowed_origins: Allowlist = _DEFAULTS["PGBRIDGE_ALLOWED_ORIGINS"]
    public_origins: PublicOrigins = _DEFAULTS["PGBRIDGE_PUBLIC_ORIGIN"]
    access_check_interval: float = _DEFAULTS["PGBRIDGE_ACCESS_CHECK_INTERVAL"]
    schema: str = _DEFAULTS["PGBRIDGE_SCHEMA"]
    queue_size: int = _DEFAULTS["PGBRIDGE_QUEUE_SIZE"]
    send_timeout: float = _DEFAULTS["PGBRIDGE_SEND_TIMEOUT"]
    send_buffer: int = _DEFAULTS["PGBRIDGE_SEND_BUFFER"]
    max_subscriptions: int = _DEFAULTS["PGBRIDGE_MAX_SUBSCRIPTIONS"]
    rate_limit: float = _DEFAULTS["PGBRIDGE_RATE_LIMIT"]
    rate_burst: int = _DEFAULTS["PGBRIDGE_RATE_BURST"]
    subscribe_rate: float = _DEFAULTS["PGBRIDGE_SUBSCRIBE_RATE"]
    subscribe_burst: int = _DEFAULTS["PGBRIDGE_SUBSCRIBE_BURST"]
    user_subscribe_rate: float = _DEFAULTS["PGBRIDGE_USER_SUBSCRIBE_RATE"]
    user_subscribe_burst: int = _DEFAULTS["PGBRIDGE_USER_SUBSCRIBE_BURST"]
    max_connections: int = _DEFAULTS["PGBRIDGE_MAX_CONNECTIONS"]
    max_connections_per_user: int = _DEFAULTS["PGBRIDGE_MAX_CONNECTIONS_PER_USER"]
    snapshot_max: int = _DEFAULTS["PGBRIDGE_SNAPSHOT_MAX"]
    snapshot_max_bytes: int = _DEFAULTS["PGBRIDGE_SNAPSHOT_MAX_BYTES"]
    feed_max_rooms: int = _DEFAULTS["PGBRIDGE_FEED_MAX_ROOMS"]
    max_frame_bytes: int = 64 * 1024
    heartbeat: float = _DEFAULTS["PGBRIDGE_HEARTBEAT"]
    retention: float = _DEFAULTS["PGBRIDGE_RETENTION"]
    prune_interval: float = _DEFAULTS["PGBRIDGE_PRUNE_INTERVAL"]
    ack_flush_interval: float = _DEFAULTS["PGBRIDGE_ACK_FLUSH_INTERVAL"]
    probe_interval: float = _DEFAULTS["PGBRIDGE_PROBE_INTERVAL"]
    pool_size: int = _DEFAULTS["PGBRIDGE_POOL_SIZE"]
    log_level: str = _DEFAULTS["PGBRIDGE_LOG_LEVEL"]
    demo: bool | None = None
    presence_grace: float = _DEFAULTS["PGBRIDGE_PRESENCE_GRACE"]
    presence_lease: float = _DEFAULTS["PGBRIDGE_PRESENCE_LEASE"]
    doorbell: str = _DEFAULTS["PGBRIDGE_DOORBELL"]
    doorbell_quiet_above: float = _DEFAULTS["PGBRIDGE_DOORBELL_QUIET_ABOVE"]
    poll_interval: float = _DEFAULTS["PGBRIDGE_POLL_INTERVAL"]
    event_loop: str = _DEFAULTS["PGBRIDGE_EVENT_LOOP"]
    broker: tuple[str, ...] | None = field(default=None, repr=False)  # credentials maybe

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DaemonSettings:
        """Parse ``env``; raises :class:`ConfigError` naming the variable."""
        return cls(**_values(env, "daemon"))
