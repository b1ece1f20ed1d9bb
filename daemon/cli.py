"""Command line: ``pgbridge run|setup|token|tail`` (``python -m daemon`` is ``pgbridge run``,
``setup_db.py`` is ``pgbridge setup``), and its one error boundary.

Every entry point (:func:`main`, :func:`run_main`, :func:`setup_main`) runs its command through
:func:`guarded` (:mod:`daemon.cli_boundary`), the only place where an exception becomes output
and an exit code: a :class:`~daemon.errors.BridgeError` is one line on stderr and its exit code,
a bug one line naming an incident and exit 70 (that module's docstring lists every case).

The tools (setup, token, tail) log as plain text at ``PGBRIDGE_LOG_LEVEL`` when it is set
(default INFO for setup, WARNING for token and tail); the daemon logs JSON lines. A setup run
has a correlation id (docs/reference/logs.md): every log line of the run carries it (the first
one shown names it), and its database sessions are named ``pgbridge setup <id>``
(``application_name``: pg_stat_activity, the server's log).

Progress is not an error and is printed where it happens: ``pgbridge tail``'s "reconnecting in
0.4 s" lines and the frames it does not print on stdout, ``setup_db.py``'s warnings and the
problems ``--verify`` finds.

This module imports only the standard library and :mod:`daemon.errors`/:mod:`daemon.logs` at
the top, so that a Python without the dependencies reaches the boundary.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import logs
from .cli_boundary import guarded
from .errors import EXIT_OK, EXIT_USAGE, ConfigError

if TYPE_CHECKING:
    from .settings import DaemonSettings, DatabaseSettings, SSHSettings

log = logging.getLogger(__name__)

__all__ = ["guarded", "main", "run_main", "setup_main"]

PACKAGE = "pgbridge"  # the distribution name in pyproject.toml

EXIT_CODES = """exit codes: 0 ok, 1 database error or refused (no such user, the bridge refused),
2 usage or configuration error (also: dependencies not installed), 3 SSH tunnel error, 70
internal error (a bug: the line names an incident, whose traceback is in the log), 130
interrupted; errors are one line on stderr
settings: DATABASE_URL or POSTGRES_HOST/PORT/DB/USER/PASSWORD (none set: embedded PostgreSQL in
PGBRIDGE_DATA_DIR, default .pgbridge); SSH_HOST, SSH_PORT, SSH_USER, SSH_KEY_PATH, SSH_KNOWN_HOSTS
for a tunnel; read from the environment, .env and .env.local"""


# --- shared --------------------------------------------------------------------------------

def version() -> str:
    """The installed version of pgbridge (``importlib.metadata``)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown: not installed, run ./dev setup or pip install -e .)"


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pgbridge {version()}")
    return parser


def _tool_logging(env: dict[str, str], default: str) -> None:
    """Plain-text logging for the tools: ``PGBRIDGE_LOG_LEVEL`` when it is valid, else
    ``default``."""
    level = (env.get("PGBRIDGE_LOG_LEVEL") or "").upper()
    logs.configure(level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else default)


def _run_session(conninfo: str) -> str:
    """``conninfo`` naming its sessions ``pgbridge setup <id>`` (``application_name``, over any
    the settings gave), ``<id>`` the run's correlation id, so that a DBA finds the run in
    pg_stat_activity and the server's log."""
    from psycopg.conninfo import make_conninfo

    run = logs.current_id()
    log.debug("setup run %s: sessions named 'pgbridge setup %s'", run, run,
              extra={"event": "setup_run"})
    return make_conninfo(conninfo, application_name=f"pgbridge setup {run}")


def _prepare_embedded(db: DatabaseSettings) -> None:
    """With the embedded database, check PGBRIDGE_DATA_DIR before anything writes there (the
    development JWT secret, the cluster)."""
    if db.embedded:
        from .embedded import prepare_data_dir

        prepare_data_dir(db.data_dir)


def _secret(settings: DaemonSettings, db: DatabaseSettings) -> str:
    from .auth import resolve_secret

    if not settings.jwt_secret:
        _prepare_embedded(db)
    return resolve_secret(settings, db)


# --- setup ---------------------------------------------------------------------------------

def _setup_parser(prog: str) -> argparse.ArgumentParser:
    from .schema import LOCK_TIMEOUT, MAX_WAIT

    parser = _parser(prog, "Apply the pgbridge chat schema, change capture and migrations "
                     "(idempotent; one transaction under an advisory lock), or take pgbridge "
                     "off again with --rollback.")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--test", action="store_true",
                        help="apply into schema 'test' (created if needed); public is untouched")
    target.add_argument("--schema", metavar="NAME",
                        help="apply into this schema (default: PGBRIDGE_SCHEMA or public)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the SQL that would run (with --rollback: the rollback's), "
                        "without connecting")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--verify", action="store_true",
                      help="check tables, functions, triggers and migrations, and prove that a "
                      "change reaches change_events and a LISTEN connection (leaves no trace)")
    mode.add_argument("--rollback", action="store_true",
                      help="remove pgbridge from the schema, keeping the chat tables and every "
                      "row in them, verified (docs/howto/rollback.md)")
    parser.add_argument("--drop-extensions", action="store_true",
                        help="with --rollback: also drop the extensions pgbridge's apply "
                        "created (uuid-ossp, pgcrypto, citext; only those, and only unused)")
    roles = parser.add_argument_group(
        "roles", "production set-up with three roles (docs/howto/database-roles.md): run as the "
        "owner, and grant the others exactly what they need")
    roles.add_argument("--grant-app", metavar="ROLE", action="append", default=[],
                       help="the application role: read and write the chat tables, nothing of "
                       "the event log (repeatable)")
    roles.add_argument("--grant-bridge", metavar="ROLE", action="append", default=[],
                       help="the daemon's role: read the log and what decides access, write "
                       "sync_state, prune the log (repeatable)")
    live = parser.add_argument_group("on a live database")
    live.add_argument("--lock-timeout", metavar="SECONDS", type=float, default=LOCK_TIMEOUT,
                      help="longest wait for a table lock before the run rolls back and retries "
                      f"(writers wait behind it at most about this long; {LOCK_TIMEOUT:g})")
    live.add_argument("--max-wait", metavar="SECONDS", type=float, default=MAX_WAIT,
                      help=f"give up retrying after this long ({MAX_WAIT:g})")
    return parser


async def _setup(args: argparse.Namespace, env: dict[str, str], prog: str) -> int:
    from .db import database, describe
    from .errors import SchemaError
    from .roles import Grants
    from .schema import apply_schema, dry_run_sql, verify_schema
    from .settings import DatabaseSettings, SSHSettings, schema_name, value

    schema: str = ("test" if args.test else
                   schema_name(args.schema, variable="--schema") if args.schema else
                   value(env, "PGBRIDGE_SCHEMA"))
    if args.dry_run:
        from .rollback import rollback_sql

        print(rollback_sql(schema, drop_extensions=args.drop_extensions) if args.rollback
              else dry_run_sql(schema))
        return EXIT_OK
    db = DatabaseSettings.from_env(env)
    ssh = SSHSettings.from_env(env)
    async with database(db, ssh) as conninfo:
        conninfo = _run_session(conninfo)
        where = f"{describe(conninfo)} (embedded)" if db.embedded else describe(conninfo)
        if args.rollback:
            from .rollback import rollback_schema

            rolled = await rollback_schema(conninfo, schema=schema,
                                           drop_extensions=args.drop_extensions,
                                           lock_timeout=args.lock_timeout,
                                           max_wait=args.max_wait)
            print("\n".join(rolled.lines(where)))
            return EXIT_OK
        if args.verify:
            problems = await verify_schema(conninfo, schema=schema)
            for problem in problems:
                print(f"{prog}: {problem}", file=sys.stderr)
            if problems:
                raise SchemaError(
                    f"schema {schema} at {where} failed verification ({len(problems)} "
                    "problem(s)): run python setup_db.py"
                    f"{'' if schema == 'public' else ' --schema ' + schema}")
            print(f"schema {schema} at {where}: verified (objects present, a change reached "
                  "change_events and LISTEN)")
            return EXIT_OK
        report = await apply_schema(
            conninfo, schema=schema, grants=Grants(app=tuple(args.grant_app),
                                                   bridge=tuple(args.grant_bridge)),
            lock_timeout=args.lock_timeout, max_wait=args.max_wait)
    if report.files or report.applied:
        done = [f"sql/{name}" for name in report.files] + [f"migration {m}"
                                                            for m in report.applied]
        print(f"schema {schema} at {where}: applied {', '.join(done)}")
    else:
        print(f"schema {schema} at {where}: already up to date, nothing changed")
    for role in args.grant_app:
        print(f"granted role {role} the application's privileges on schema {schema}")
    for role in args.grant_bridge:
        print(f"granted role {role} the bridge's privileges on schema {schema}")
    for warning in report.warnings:
        print(f"{prog}: warning: {warning}", file=sys.stderr)
    return EXIT_OK


def _setup_command(argv: Sequence[str] | None, prog: str) -> int:
    parser = _setup_parser(prog)
    args = parser.parse_args(argv)
    if not 0 < args.lock_timeout <= 600 or not 0 <= args.max_wait <= 86400:
        parser.error("--lock-timeout must be in (0, 600] and --max-wait in [0, 86400] seconds")
    if args.dry_run and args.verify:
        parser.error("argument --dry-run: not allowed with argument --verify")
    if args.drop_extensions and not args.rollback:
        parser.error("argument --drop-extensions: only with --rollback")
    if args.rollback and (args.grant_app or args.grant_bridge):
        parser.error("--grant-app and --grant-bridge are for the apply, not --rollback (it "
                     "revokes the bridge roles' privileges itself)")
    from .settings import load_environment

    env = load_environment()
    _tool_logging(env, "INFO")
    with logs.correlated(logs.new_id()):  # the run's id, on each of its lines
        return asyncio.run(_setup(args, env, prog))


def setup_main(argv: Sequence[str] | None = None, prog: str = "setup_db.py") -> int:
    """Entry point of ``setup_db.py`` and ``pgbridge setup``; returns the exit code."""
    return guarded(prog, lambda: _setup_command(argv, prog))


# --- run -----------------------------------------------------------------------------------

def _run_command(argv: Sequence[str]) -> int:
    _parser("pgbridge run", "Run the pgbridge daemon: LISTEN for chat changes and fan them out "
            "to WebSocket clients. Settings come from the environment, .env and .env.local "
            "(docs/reference/settings.md).").parse_args(list(argv))
    from .settings import DaemonSettings, DatabaseSettings, load_environment

    env = load_environment()
    settings = DaemonSettings.from_env(env)
    db = DatabaseSettings.from_env(env)
    logs.configure(settings.log_level, json_lines=True)
    _prepare_embedded(db)
    from .app import run

    with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
        return runner.run(run(env))


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``PGBRIDGE_EVENT_LOOP`` asks for (``None``: asyncio's own). Raises
    :class:`ConfigError` for ``uvloop`` when it is not installed."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("PGBRIDGE_EVENT_LOOP=uvloop, but uvloop is not installed: "
                              "pip install 'pgbridge[uvloop]', or set "
                              "PGBRIDGE_EVENT_LOOP=asyncio") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_main(argv: Sequence[str] = (), prog: str = "pgbridge") -> int:
    """``pgbridge run`` / ``python -m daemon``: run the bridge until SIGTERM or SIGINT."""
    return guarded(prog, lambda: _run_command(argv))


# --- token ---------------------------------------------------------------------------------

def _user_id(value: str) -> str:
    from .protocol import is_id

    if not is_id(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a users.id (1 to 26 characters of A-Z a-z 0-9 _ -)")
    return value


async def _check_user(user_id: str, schema: str, db: DatabaseSettings,
                      ssh: SSHSettings | None) -> None:
    """Refuse unless ``user_id`` is a live (not soft-deleted) row of ``schema.users``."""
    import psycopg
    from psycopg import errors, sql

    from .db import database, describe, translated
    from .errors import RefusedError, SchemaError

    query = sql.SQL("SELECT deleted_at IS NULL FROM {}.users WHERE id = %s").format(
        sql.Identifier(schema))
    async with database(db, ssh) as conninfo:
        where = f"{describe(conninfo)} (embedded)" if db.embedded else describe(conninfo)
        with translated(conninfo, doing=f"looking user {user_id} up"):
            try:
                async with await psycopg.AsyncConnection.connect(conninfo,
                                                                 autocommit=True) as conn:
                    row = await (await conn.execute(query, [user_id])).fetchone()
            except (errors.UndefinedTable, errors.InvalidSchemaName) as exc:
                raise SchemaError(
                    f"{where}: there is no table {schema}.users to look user {user_id} up in: "
                    "apply the schema first (python setup_db.py), or pass --no-check",
                    sqlstate=exc.sqlstate) from exc
    if row is None:
        raise RefusedError(f"no user {user_id} in {schema}.users at {where}: create it first, or "
                           "pass --no-check to mint the token anyway")
    if not row[0]:
        raise RefusedError(f"user {user_id} is deleted (users.deleted_at is set) at {where}: the "
                           "bridge refuses its tokens; pass --no-check to mint one anyway")


def _token_command(argv: Sequence[str], prog: str) -> int:
    parser = _parser(prog, "Mint a JWT for a user with the configured secret "
                     "(PGBRIDGE_JWT_SECRET, or the embedded database's development secret). The "
                     "user must exist, not deleted, in the configured database (schema "
                     "PGBRIDGE_SCHEMA) unless --no-check is given.")
    parser.add_argument("user_id", type=_user_id, help="users.id (the token's sub)")
    parser.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds (3600)")
    parser.add_argument("--no-check", action="store_true",
                        help="do not look the user up in the database (mint offline)")
    args = parser.parse_args(list(argv))
    if args.ttl <= 0:
        parser.error("--ttl must be positive")
    from .auth import mint_token
    from .settings import DaemonSettings, DatabaseSettings, SSHSettings, load_environment

    env = load_environment()
    _tool_logging(env, "WARNING")
    settings = DaemonSettings.from_env(env)
    db = DatabaseSettings.from_env(env)
    secret = _secret(settings, db)
    if not args.no_check:
        asyncio.run(_check_user(args.user_id, settings.schema, db, SSHSettings.from_env(env)))
    print(mint_token(secret, args.user_id, ttl=args.ttl, audience=settings.jwt_audience,
                     issuer=settings.jwt_issuer))
    return EXIT_OK


# --- tail ----------------------------------------------------------------------------------

def _tail_command(argv: Sequence[str], prog: str) -> int:
    parser = _parser(prog, "Subscribe to a room (or, with --feed, every room of the user) and "
                     "print its events as JSON lines (reconnects and resumes).")
    parser.add_argument("room", nargs="?", help="channels.id (not with --feed)")
    parser.add_argument("--feed", action="store_true", help="follow every room of the user "
                        "instead: first the `feed` frame (each room's head, acked, unread) on one "
                        "line, then the events of all of them")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--since", type=int, help="last seq you hold (default: sync_state or "
                       "live only)")
    start.add_argument("--snapshot", type=int, metavar="N", help="first print the room's N "
                       "most recent messages (one `snapshot` line), then the events after them")
    parser.add_argument("--url", help="WebSocket URL (default ws://PGBRIDGE_HOST:PGBRIDGE_PORT/ws)")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--token", help="a JWT (see pgbridge token)")
    who.add_argument("--user", help="mint a token for this users.id with the configured secret")
    parser.add_argument("--ack", action="store_true", help="acknowledge each event (sync_state)")
    parser.add_argument("--count", type=int, help="exit after this many events")
    parser.add_argument("--batch", type=int, default=0, metavar="MS",
                        help="let the bridge hold events up to MS ms to send them together "
                        "(0 to 1000; default 0: only those ready at once; -1: one per message)")
    args = parser.parse_args(list(argv))
    if not -1 <= args.batch <= 1000:
        parser.error("--batch must be from -1 to 1000 (ms)")
    if args.feed and (args.room is not None or args.since is not None
                      or args.snapshot is not None):
        parser.error("--feed follows every room of the user: no ROOM, --since nor --snapshot")
    if not args.feed and args.room is None:
        parser.error("give a ROOM, or --feed")
    from .settings import DaemonSettings, DatabaseSettings, load_environment
    from .tail import tail, tail_feed

    env = load_environment()
    _tool_logging(env, "WARNING")
    settings = DaemonSettings.from_env(env)
    token: str | Callable[[], str] = args.token
    if args.token is None:
        from .auth import mint_token

        secret = _secret(settings, DatabaseSettings.from_env(env))

        def token() -> str:  # a fresh one for each connection and before each expires
            return mint_token(secret, args.user, audience=settings.jwt_audience,
                              issuer=settings.jwt_issuer)

    url = args.url or f"ws://{settings.host}:{settings.port}/ws"
    if args.feed:
        return asyncio.run(tail_feed(url, token, ack=args.ack, max_events=args.count,
                                     batch=None if args.batch < 0 else args.batch))
    return asyncio.run(tail(url, token, args.room, since=args.since, ack=args.ack,
                            max_events=args.count, snapshot=args.snapshot,
                            batch=None if args.batch < 0 else args.batch))


# --- dispatch ------------------------------------------------------------------------------

COMMANDS = {
    "run": "run the bridge daemon (same as python -m daemon)",
    "setup": "apply the schema (same as python setup_db.py)",
    "token": "mint a token for a user",
    "tail": "subscribe to a room (or --feed: all the user's rooms) and print its events as "
            "JSON lines",
}


def _usage(argv: list[str]) -> int:
    """``pgbridge``, ``pgbridge --help``, ``pgbridge --version`` or an unknown command."""
    if argv and argv[0] == "--version":
        print(f"pgbridge {version()}")
        return EXIT_OK
    listing = "\n".join(f"  {name:<7} {text}" for name, text in COMMANDS.items())
    text = (f"usage: pgbridge COMMAND [ARGS] | --version\n\ncommands:\n{listing}\n\n"
            f"{EXIT_CODES}")
    if argv and argv[0] in ("-h", "--help"):
        print(text)
        return EXIT_OK
    print(text, file=sys.stderr)
    if argv:
        print(f"pgbridge: error: unknown command {argv[0]!r}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """``pgbridge COMMAND ...``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    command, rest = (args[0], args[1:]) if args else ("", [])
    if command == "run":
        return run_main(rest)
    if command == "setup":
        return setup_main(rest, prog="pgbridge setup")
    if command == "token":
        return guarded("pgbridge token", lambda: _token_command(rest, "pgbridge token"))
    if command == "tail":
        return guarded("pgbridge tail", lambda: _tail_command(rest, "pgbridge tail"))
    return guarded("pgbridge", lambda: _usage(args))
