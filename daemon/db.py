"""Where the database is, and what its errors mean.

:func:`database` resolves the settings to a conninfo string: ``DATABASE_URL`` or the spec's
``POSTGRES_*``, through the SSH tunnel when ``SSH_HOST`` is set, or the embedded PostgreSQL when
nothing is configured. :func:`translate` turns a psycopg error into a :class:`DatabaseError`
whose message is one line naming the SQLSTATE and what to do (spec 003, "Error Handling");
:func:`translated` is the boundary where psycopg errors become ours: every module that talks to
PostgreSQL wraps its driver calls in it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import DatabaseError
from .settings import DatabaseSettings, SSHSettings

log = logging.getLogger(__name__)

__all__ = ["channels_query", "database", "describe", "listen_query", "translate", "translated"]

# What the spec's error cases (and a few more we meet) mean for whoever runs pgbridge.
_SQLSTATE_ADVICE: dict[str, str] = {
    "28P01": "password authentication failed for {user}: check POSTGRES_PASSWORD or DATABASE_URL",
    "28000": "the server refused {user}: check that the role exists and may log in "
             "(POSTGRES_USER) and the server's pg_hba.conf",
    "3D000": "database {db} does not exist: create it (createdb {db}) or fix POSTGRES_DB",
    "42501": "insufficient privilege: {user} needs CREATE on database {db} and its schema "
             "(GRANT CREATE ON DATABASE ...), or run setup_db.py as the owner",
    "42P04": "the database already exists{detail}",
    "42P07": "an object of the schema already exists with another definition{detail}; inspect "
             "it or apply into another schema with --schema",
    "53300": "too many connections: the server's max_connections, or the CONNECTION LIMIT of "
             "{user} or of database {db}, is reached; close idle clients, lower "
             "PGBRIDGE_POOL_SIZE, or raise the limit",
    "57P03": "the server is starting up or shutting down: retry in a moment",
    "25006": "the server is read-only (a hot standby?): point pgbridge at the primary",
}


# Errors raised while connecting carry no SQLSTATE in libpq; recognise them by their text.
# Checked in order: 'too many connections for role "x"' is 53300, and 'role "x" does not
# exist' must not be taken for a missing database.
_CONNECT_ERRORS = (
    ("password authentication failed", "28P01"),
    ("no pg_hba.conf entry", "28000"),
    ("too many clients", "53300"),
    ("too many connections for", "53300"),  # CONNECTION LIMIT of a role or database
    ("remaining connection slots are reserved", "53300"),
    ('role "', "28000"),  # role "x" does not exist / is not permitted to log in
    ("does not exist", "3D000"),
    ("permission denied for database", "42501"),
    ("the database system is starting up", "57P03"),
    ("the database system is shutting down", "57P03"),
)


def _connect_sqlstate(text: str) -> str | None:
    if "connection failed" not in text and "FATAL" not in text:
        return None
    lowered = text.lower()
    return next((code for needle, code in _CONNECT_ERRORS if needle in lowered), None)


def describe(conninfo: str) -> str:
    """``user@host:port/dbname`` of a conninfo, for messages and logs (never the password)."""
    try:
        parts = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "<invalid conninfo>"
    host = str(parts.get("host") or "localhost")
    user = f"{parts['user']}@" if parts.get("user") else ""
    return f"{user}{host}:{parts.get('port') or 5432}/{parts.get('dbname') or ''}"


def translate(exc: psycopg.Error, conninfo: str, *, doing: str = "connecting") -> DatabaseError:
    """Map a psycopg error to a one-line :class:`DatabaseError` keeping its SQLSTATE.

    ``doing`` says what was being attempted (``"connecting"``, ``"applying the schema"``).
    """
    parts = conninfo_to_dict(conninfo) if conninfo else {}
    fields = {"user": parts.get("user") or "the user", "db": parts.get("dbname") or "?"}
    # the object the server complains about (42P04/42P07 name it only there)
    primary = exc.diag.message_primary
    fields["detail"] = f" ({primary})" if primary else ""
    target = describe(conninfo)
    sqlstate = exc.sqlstate or _connect_sqlstate(str(exc))
    if sqlstate in _SQLSTATE_ADVICE:
        advice = _SQLSTATE_ADVICE[sqlstate].format(**fields)
        return DatabaseError(f"{target}: SQLSTATE {sqlstate}: {advice}", sqlstate=sqlstate)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lowered = str(exc).lower()
    if "connection refused" in lowered:
        return DatabaseError(
            f"{target}: connection refused: is PostgreSQL running there? Check POSTGRES_HOST "
            "and POSTGRES_PORT (or DATABASE_URL)"
        )
    if "could not translate host name" in lowered or "name or service not known" in lowered:
        return DatabaseError(
            f"{target}: host not found: check POSTGRES_HOST (or DATABASE_URL) and DNS"
        )
    if "timeout expired" in lowered or "timed out" in lowered:
        return DatabaseError(f"{target}: connection timed out: check the network and firewall")
    if sqlstate:
        return DatabaseError(f"{target}: SQLSTATE {sqlstate} while {doing}: {text}",
                             sqlstate=sqlstate)
    return DatabaseError(f"{target}: error while {doing}: {text}")


@contextmanager
def translated(conninfo: str, *, doing: str = "connecting") -> Iterator[None]:
    """Raise every :class:`psycopg.Error` of the block as the :class:`DatabaseError` that
    :func:`translate` makes of it (the original kept as ``__cause__``); anything else passes."""
    try:
        yield
    except psycopg.Error as exc:
        raise translate(exc, conninfo, doing=doing) from exc


def listen_query(schema: str) -> sql.Composed:
    """The statement that LISTENs on ``schema``'s two secret NOTIFY channels in the calling
    session and returns their names as one row ``(capture, typing)``: the capture triggers'
    channel and the typing signals' (sql/triggers/10_change_capture.sql, "Secret channels").

    Channels are derived in one place, the SQL function ``pgbridge_channel``, from the schema's
    key (``change_notify_key``), so only the owner and the bridge role can name them; the
    statement's text names neither (``pg_stat_activity`` shows it to the same role and
    ``pg_read_all_stats``). The bridge role needs ``setup_db.py --grant-bridge`` to run it; it
    raises SQLSTATE 42501 otherwise, 55000 when the key is missing.
    """
    return sql.SQL("SELECT capture, typing FROM {}()").format(
        sql.Identifier(schema, "pgbridge_listen"))


def channels_query(schema: str) -> sql.Composed:
    """The owner's query of ``schema``'s two channels, one row ``(capture, typing)``, without
    LISTENing (``pgbridge_channels``; only the owner may run it: tools and tests)."""
    return sql.SQL("SELECT capture, typing FROM {}()").format(
        sql.Identifier(schema, "pgbridge_channels"))


def _base_conninfo(settings: DatabaseSettings) -> str:
    if settings.url:
        return settings.url
    return make_conninfo("", **settings.conninfo_parts())


@asynccontextmanager
async def database(
    settings: DatabaseSettings, ssh: SSHSettings | None = None, *, keep_embedded: bool = False,
    supervised_tunnel: bool = False, on_tunnel_reopen: Callable[[], None] | None = None,
) -> AsyncIterator[str]:
    """Yield the conninfo to use for as long as the block runs.

    * nothing configured: the embedded PostgreSQL in ``settings.data_dir`` (started or attached;
      with ``keep_embedded`` it keeps running after this process exits);
    * ``ssh`` given: a local port forward through the bastion to the configured host and port
      as seen from the bastion (:mod:`daemon.tunnel`); ``supervised_tunnel`` reopens it when
      the SSH connection drops (the daemon), calling ``on_tunnel_reopen`` after each reopen,
      else it is a one-shot tunnel (``setup_db.py``);
    * otherwise the configured conninfo itself.

    Raises :class:`DatabaseError` (embedded server failed) or :class:`TunnelError`.
    """
    if settings.embedded:
        from .embedded import start_embedded

        server = start_embedded(settings.data_dir, keep_running=keep_embedded)
        yield server.uri
        return
    conninfo = _base_conninfo(settings)
    if ssh is None:
        yield conninfo
        return
    from . import tunnel

    parts = conninfo_to_dict(conninfo)
    remote_host = str(parts.get("host") or "localhost")
    remote_port = int(parts.get("port") or 5432)
    opener = (tunnel.SupervisedTunnel(ssh, remote_host, remote_port,
                                      on_reopen=on_tunnel_reopen) if supervised_tunnel
              else tunnel.open_tunnel(ssh, remote_host, remote_port))
    async with opener as (local_host, local_port):
        log.info("database %s reached through SSH %s:%s", describe(conninfo), ssh.host, ssh.port,
                 extra={"event": "tunnel_ready"})
        yield make_conninfo(conninfo, host=local_host, port=local_port)
