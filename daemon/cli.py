"""Command line: ``pgbridge run|setup|token|tail`` (``python -m daemon`` is ``pgbridge run``).

Exit codes (all commands): 0 ok, 1 database error, 2 usage or configuration error, 3 SSH tunnel
error. A :class:`BridgeError` is printed as one line on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence

from . import logs
from .errors import EXIT_OK, EXIT_USAGE, BridgeError
from .settings import (
    DaemonSettings,
    DatabaseSettings,
    SSHSettings,
    load_environment,
    schema_name,
)

EXIT_CODES = """exit codes: 0 ok, 1 database error, 2 usage or configuration error, 3 SSH tunnel
error
settings: DATABASE_URL or POSTGRES_HOST/PORT/DB/USER/PASSWORD (none set: embedded PostgreSQL in
PGBRIDGE_DATA_DIR, default .pgbridge); SSH_HOST, SSH_PORT, SSH_USER, SSH_KEY_PATH, SSH_KNOWN_HOSTS
for a tunnel; read from the environment, .env and .env.local"""


def _report(exc: BridgeError, prog: str) -> int:
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return exc.exit_code


def _run(prog: str, coro: Callable[[], Awaitable[int]]) -> int:
    try:
        return asyncio.run(coro())  # type: ignore[arg-type]
    except BridgeError as exc:
        return _report(exc, prog)
    except KeyboardInterrupt:
        return 130


# --- setup ---------------------------------------------------------------------------------

def _setup_parser(prog: str) -> argparse.ArgumentParser:
    from .schema import LOCK_TIMEOUT, MAX_WAIT

    parser = argparse.ArgumentParser(
        prog=prog, description="Apply the pgbridge chat schema, change capture and migrations "
        "(idempotent; one transaction under an advisory lock).",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--test", action="store_true",
                        help="apply into schema 'test' (created if needed); public is untouched")
    target.add_argument("--schema", metavar="NAME",
                        help="apply into this schema (default: PGBRIDGE_SCHEMA or public)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="print the SQL that would run, without connecting")
    mode.add_argument("--verify", action="store_true",
                      help="check tables, functions, triggers and migrations, and prove that a "
                      "change reaches change_events and a LISTEN connection (leaves no trace)")
    roles = parser.add_argument_group(
        "roles", "production set-up with three roles (README, 'Database roles'): run as the "
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


async def _setup(args: argparse.Namespace, prog: str) -> int:
    from .db import database, describe
    from .roles import Grants
    from .schema import apply_schema, dry_run_sql, verify_schema

    env = load_environment()
    schema = "test" if args.test else schema_name(
        args.schema or env.get("PGBRIDGE_SCHEMA") or "public",
        variable="--schema" if args.schema else "PGBRIDGE_SCHEMA")
    if args.dry_run:
        print(dry_run_sql(schema))
        return EXIT_OK
    db = DatabaseSettings.from_env(env)
    ssh = SSHSettings.from_env(env)
    async with database(db, ssh) as conninfo:
        where = f"{describe(conninfo)} (embedded)" if db.embedded else describe(conninfo)
        if args.verify:
            problems = await verify_schema(conninfo, schema=schema)
            for problem in problems:
                print(f"{prog}: {problem}", file=sys.stderr)
            if problems:
                print(f"{prog}: error: schema {schema} at {where} failed verification "
                      f"({len(problems)} problem(s)): run python setup_db.py"
                      f"{'' if schema == 'public' else ' --schema ' + schema}", file=sys.stderr)
                return 1
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


def setup_main(argv: Sequence[str] | None = None, prog: str = "setup_db.py") -> int:
    """Entry point of ``setup_db.py`` and ``pgbridge setup``; returns the exit code."""
    parser = _setup_parser(prog)
    args = parser.parse_args(argv)
    if not 0 < args.lock_timeout <= 600 or not 0 <= args.max_wait <= 86400:
        parser.error("--lock-timeout must be in (0, 600] and --max-wait in [0, 86400] seconds")
    logs.configure("INFO")
    return _run(prog, lambda: _setup(args, prog))


# --- run -----------------------------------------------------------------------------------

def run_main(argv: Sequence[str] = (), prog: str = "pgbridge") -> int:
    """``pgbridge run`` / ``python -m daemon``: run the bridge until SIGTERM or SIGINT."""
    argparse.ArgumentParser(
        prog="pgbridge run", description="Run the pgbridge daemon: LISTEN for chat changes and "
        "fan them out to WebSocket clients. Settings come from the environment, .env and "
        ".env.local (see README).", epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(list(argv))
    try:
        env = load_environment()
        settings = DaemonSettings.from_env(env)
    except BridgeError as exc:
        return _report(exc, prog)
    logs.configure(settings.log_level, json_lines=True)
    from .app import run

    return _run(prog, lambda: run(env))


# --- token ---------------------------------------------------------------------------------

def token_main(argv: Sequence[str], prog: str = "pgbridge token") -> int:
    from .auth import mint_token, resolve_secret

    parser = argparse.ArgumentParser(prog=prog, description="Mint a JWT for a user with the "
                                     "configured secret (PGBRIDGE_JWT_SECRET, or the embedded "
                                     "database's development secret).", epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("user_id", help="users.id (the token's sub)")
    parser.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds (3600)")
    args = parser.parse_args(argv)
    if args.ttl <= 0:
        parser.error("--ttl must be positive")
    try:
        env = load_environment()
        settings = DaemonSettings.from_env(env)
        secret = resolve_secret(settings, DatabaseSettings.from_env(env))
    except BridgeError as exc:
        return _report(exc, prog)
    print(mint_token(secret, args.user_id, ttl=args.ttl, audience=settings.jwt_audience,
                     issuer=settings.jwt_issuer))
    return EXIT_OK


# --- dispatch ------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """``pgbridge COMMAND ...``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "run": "run the bridge daemon (same as python -m daemon)",
        "setup": "apply the schema (same as python setup_db.py)",
        "token": "mint a token for a user",
        "tail": "subscribe to a room and print its events as JSON lines",
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        usage = "\n".join(f"  {name:<7} {text}" for name, text in commands.items())
        print(f"usage: pgbridge COMMAND [ARGS]\n\ncommands:\n{usage}\n\n{EXIT_CODES}",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return EXIT_OK if argv and argv[0] in ("-h", "--help") else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command == "setup":
        return setup_main(rest, prog="pgbridge setup")
    if command == "token":
        return token_main(rest)
    if command == "tail":
        from .tail import tail_main

        return tail_main(rest)
    return run_main(rest)
