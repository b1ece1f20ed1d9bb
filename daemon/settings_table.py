"""Every environment variable pgbridge reads, declared once (issue 26).

:data:`SETTINGS` holds one :class:`Setting` per variable: its name, type, default, unit and
meaning, the bounds or choices the parser enforces and the document that defines it.
:mod:`daemon.settings` parses the environment by it (and takes its dataclass defaults from it);
this module renders from it the reference page ``docs/reference/settings.md`` and the production
template ``deploy/pgbridge.env.example``::

    python -m daemon.settings_table            # print the reference page
    python -m daemon.settings_table --env      # print the env template
    python -m daemon.settings_table --write    # rewrite both files in this checkout

``tests/unit/test_settings_reference.py`` fails when either file differs from what is rendered.
"""

from __future__ import annotations

import argparse
import posixpath
import re
import textwrap
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Literal

from .doorbell import POLICIES

_DOC_PAGE = re.compile(r"(docs/[\w./-]+\.md)(#[\w-]+)?")  # a page of the manual

__all__ = ["EVENT_LOOPS", "GROUPS", "SETTINGS", "Setting", "env_example", "reference_page"]

EVENT_LOOPS = ("auto", "asyncio", "uvloop")  # PGBRIDGE_EVENT_LOOP
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")  # PGBRIDGE_LOG_LEVEL

Group = Literal["database", "ssh", "daemon", "tests"]
# How a value is parsed (daemon.settings._value): text as is (secret: kept out of the settings'
# reprs); path with ~ expanded; integer
# (rate: an integer, given as a float); duration: seconds, or with a unit (500ms, 30s, 5m, 12h,
# 7d); yes/no; choice (case-insensitive); schema: a lower-case SQL identifier; origins and
# allowlist: comma-separated origins (daemon.origins); servers: comma-separated nats:// or
# tls:// URLs.
Kind = Literal["text", "secret", "path", "integer", "rate", "duration", "yes/no", "choice",
               "schema", "origins", "allowlist", "servers"]


@dataclass(frozen=True)
class Setting:
    """One environment variable.

    ``attr``: the field of the group's settings class it fills (``None``: read elsewhere, e.g.
    by the tests). ``default``: the value as it would be written in the environment (``None``:
    unset; ``unset`` then says what that means). ``minimum``/``maximum``: inclusive bounds
    (``above``: an exclusive lower bound), in the value's unit (seconds for durations).
    ``choices``: the accepted values, compared in the case of the first one. ``see``: the
    document or section that defines it. ``example``: the value the env template shows (default:
    ``default``); ``required``: the template sets it rather than leaving it commented out.
    """

    name: str
    group: Group
    attr: str | None
    kind: Kind
    default: str | None
    meaning: str
    _: KW_ONLY
    unit: str = ""
    unset: str = ""
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    choices: tuple[str, ...] = ()
    see: str = ""
    example: str | None = None
    required: bool = False

    def bounds(self) -> str:
        """The bounds in words (``at least 1ms and at most 1s``), or ``""`` when there are none."""
        show = _duration if self.kind == "duration" else _number
        words = [f"at least {show(self.minimum)}"] if self.minimum is not None else []
        words += [f"more than {show(self.above)}"] if self.above is not None else []
        words += [f"at most {show(self.maximum)}"] if self.maximum is not None else []
        return " and ".join(words)

    def type_text(self) -> str:
        """The type with its bounds or choices, as the reference page shows it."""
        if self.choices:
            return " \\| ".join(f"`{choice}`" for choice in self.choices)
        base = {"rate": "integer", "secret": "text (secret)"}.get(self.kind, self.kind)
        return f"{base}, {self.bounds()}" if self.bounds() else base


def _number(value: float) -> str:
    return f"{value:g}"


def _duration(seconds: float) -> str:
    """``0.1`` → ``100ms``, ``1`` → ``1s``: the shortest way to write a bound."""
    return f"{seconds * 1000:g}ms" if 0 < seconds < 1 else f"{seconds:g}s"


_LIMITS = 'docs/PROTOCOL.md, "Limits"'
_BASTION = 'spec 003, "SSH tunnel"; docs/howto/bastion.md'
_DOORBELL = 'docs/topics/doorbell.md'

SETTINGS: tuple[Setting, ...] = (
    # -- where PostgreSQL is (DatabaseSettings)
    Setting("DATABASE_URL", "database", "url", "secret", None,
            "libpq URI or conninfo of the database; wins over the `POSTGRES_*` variables",
            unset="the `POSTGRES_*` variables", see="docs/design.md#configuration",
            example="postgresql://pgbridge:change-me@db.internal:5432/chatgenius"),
    Setting("POSTGRES_HOST", "database", "host", "text", "localhost",
            "name or address of PostgreSQL (with an SSH tunnel: as the bastion sees it)",
            see="spec 003", example="db.internal", required=True),
    Setting("POSTGRES_PORT", "database", "port", "integer", "5432", "PostgreSQL's TCP port",
            minimum=1, maximum=65535, see="spec 003", required=True),
    Setting("POSTGRES_DB", "database", "dbname", "text", None, "database name",
            unset="libpq's default", see="spec 003", example="chatgenius", required=True),
    Setting("POSTGRES_USER", "database", "user", "text", None,
            "role to connect as: for the daemon its own role, given its privileges by the schema "
            "owner with `setup_db.py --grant-bridge <role>`", unset="libpq's default",
            see='spec 003; docs/howto/database-roles.md',
            example="pgbridge", required=True),
    Setting("POSTGRES_PASSWORD", "database", "password", "secret", None,
            "password of `POSTGRES_USER`", unset="none, or libpq's `~/.pgpass`",
            see="spec 003", example="change-me", required=True),
    Setting("PGBRIDGE_DATA_DIR", "database", "data_dir", "path", ".pgbridge",
            "directory of the embedded PostgreSQL (its cluster in `pgdata/`) and of its "
            "development JWT secret, used only when none of the variables above is set; `~` is "
            "expanded"),
    # -- the SSH tunnel (SSHSettings)
    Setting("SSH_HOST", "ssh", "host", "text", None,
            "the bastion: setting it turns the tunnel on; `setup_db.py` and the daemon forward a "
            "local port on 127.0.0.1 through it to `POSTGRES_HOST`:`POSTGRES_PORT` (or the host in "
            "`DATABASE_URL`), as the bastion sees them", unset="no tunnel", see=_BASTION,
            example="bastion.example.com"),
    Setting("SSH_PORT", "ssh", "port", "integer", "22", "the bastion's SSH port",
            minimum=1, maximum=65535, see=_BASTION),
    Setting("SSH_USER", "ssh", "user", "text", None,
            "user on the bastion; it must be allowed TCP forwarding (`AllowTcpForwarding yes`, "
            "and `PermitOpen db.internal:5432` if forwarding is restricted); `~/.ssh/config` is "
            "not read",
            unset="the local user", see=_BASTION, example="tunnel"),
    Setting("SSH_KEY_PATH", "ssh", "key_path", "path", None,
            "private key file; `~` is expanded", unset="`~/.ssh/id_*` and the SSH agent "
            "(`SSH_AUTH_SOCK`)", see=_BASTION, example="/etc/ssh/private_key"),
    Setting("SSH_KEY_PASSPHRASE", "ssh", "key_passphrase", "secret", None,
            "passphrase of an encrypted key; never logged", unset="the key is not encrypted",
            see=_BASTION, example="..."),
    Setting("SSH_KNOWN_HOSTS", "ssh", "known_hosts", "path", "~/.ssh/known_hosts",
            "known_hosts file the bastion's host key must be in; add it once, after checking its "
            "fingerprint with the bastion's administrator: `ssh-keyscan -p 22 bastion.example.com "
            ">> ~/.ssh/known_hosts`; a changed key is refused as a possible man-in-the-middle "
            "attack (the error names the file and line to fix)", see=_BASTION,
            example="/etc/pgbridge/known_hosts"),
    Setting("SSH_STRICT_HOST_KEY_CHECKING", "ssh", "strict_host_key_checking", "yes/no", "yes",
            "whether the bastion's host key is checked against `SSH_KNOWN_HOSTS`; `no` disables "
            "the checks: insecure, logged as a warning", see=_BASTION),
    Setting("SSH_MAX_RETRIES", "ssh", "max_retries", "integer", "3",
            "retries after the first failed attempt to open the tunnel; only network failures are "
            "retried, the others fail at once (exit code 3); spec 003's production value is 5",
            unit="retries", minimum=0, maximum=100, see=_BASTION, example="5"),
    Setting("SSH_RETRY_DELAY", "ssh", "retry_delay", "duration", "1",
            "wait before retry n, multiplied by n (1 s, 2 s, 3 s); the daemon reopens a dropped "
            "tunnel with backoff from it up to 30 s; spec 003's production value is 2",
            unit="seconds", see=_BASTION, example="2"),
    # -- the daemon (DaemonSettings)
    Setting("PGBRIDGE_HOST", "daemon", "host", "text", "127.0.0.1",
            "address the WebSocket server listens on"),
    Setting("PGBRIDGE_PORT", "daemon", "port", "integer", "8080",
            "TCP port the WebSocket server listens on (0: any free port)", minimum=0,
            maximum=65535),
    Setting("PGBRIDGE_JWT_SECRET", "daemon", "jwt_secret", "secret", None,
            "HS256 secret tokens are signed with, at least 32 characters; generate one with "
            "`python3 -c 'import secrets; print(secrets.token_urlsafe(48))'`",
            unset="required with a configured database; the embedded one gets a generated "
            "development secret", see='docs/topics/authorization.md', example="", required=True),
    Setting("PGBRIDGE_JWT_AUDIENCE", "daemon", "jwt_audience", "text", None,
            "the `aud` a token must carry, so tokens minted for another service are refused",
            unset="a token with an `aud` is refused", see='docs/topics/authorization.md',
            example="pgbridge"),
    Setting("PGBRIDGE_JWT_ISSUER", "daemon", "jwt_issuer", "text", None,
            "the `iss` a token must carry", unset="any", see='docs/topics/authorization.md',
            example="https://auth.example.com/"),
    Setting("PGBRIDGE_PUBLIC_ORIGIN", "daemon", "public_origins", "origins", None,
            "the origin(s) the bridge's pages are published at, comma-separated "
            "`http(s)://host[:port]`, e.g. `https://chat.example.com`: the bridge's own origin; "
            "**set it in production** whenever browsers reach the bridge by a name (DNS rebinding)",
            unset="only loopback names and IP addresses are the bridge's own",
            see='docs/topics/authorization.md#origins', example="https://chat.example.com",
            required=True),
    Setting("PGBRIDGE_ALLOWED_ORIGINS", "daemon", "allowed_origins", "allowlist", None,
            "browser origins besides the bridge's own that may connect, comma-separated: "
            "`https://app.example.com`, `https://*.example.com` (any subdomain), or `*` (any, for "
            "development); requests without `Origin` (non-browser clients) are always admitted",
            unset="the bridge's own origin only", see='docs/topics/authorization.md#origins',
            example="https://app.example.com,https://*.example.com"),
    Setting("PGBRIDGE_ACCESS_CHECK_INTERVAL", "daemon", "access_check_interval", "duration", "30",
            "time between two checks of every connected user and subscription against the "
            "database, the backstop for changes that bypass the triggers: a deleted user is "
            "closed with 4003 and a lost subscription ends with `membership_revoked` within it",
            unit="seconds",
            above=0, see='docs/topics/authorization.md'),
    Setting("PGBRIDGE_SCHEMA", "daemon", "schema", "schema", "public",
            "schema the bridge reads (`test` after `setup_db.py --test`)"),
    Setting("PGBRIDGE_RETENTION", "daemon", "retention", "duration", "7d",
            "age after which `change_events` are pruned; a member reads the room's history as far "
            "back as this", unit="seconds"),
    Setting("PGBRIDGE_PRUNE_INTERVAL", "daemon", "prune_interval", "duration", "300",
            "time between two prunes of `change_events`", unit="seconds"),
    Setting("PGBRIDGE_QUEUE_SIZE", "daemon", "queue_size", "integer", "1000",
            "frames queued per connection before it is closed with 4008", unit="frames", minimum=1,
            see='docs/topics/faults.md'),
    Setting("PGBRIDGE_SEND_TIMEOUT", "daemon", "send_timeout", "duration", "5",
            "time a frame may wait for a client's socket before the client is closed with 4008",
            unit="seconds", above=0, see='docs/topics/faults.md'),
    Setting("PGBRIDGE_SEND_BUFFER", "daemon", "send_buffer", "integer", "65536",
            "kernel send buffer per connection (SO_SNDBUF; a fixed size turns auto-tuning off), so "
            "a client that stops reading is noticed after that much rather than megabytes",
            unit="bytes", minimum=4096, see='docs/topics/faults.md'),
    Setting("PGBRIDGE_MAX_SUBSCRIPTIONS", "daemon", "max_subscriptions", "integer", "100",
            "rooms one connection may subscribe to", unit="rooms", minimum=1, see=_LIMITS),
    Setting("PGBRIDGE_SNAPSHOT_MAX", "daemon", "snapshot_max", "integer", "1000",
            "the largest `snapshot` a `subscribe` may ask for (its N most recent messages)",
            unit="messages", minimum=1, maximum=100000, see=_LIMITS),
    Setting("PGBRIDGE_SNAPSHOT_MAX_BYTES", "daemon", "snapshot_max_bytes", "integer", "1000000",
            "bytes of message rows one `snapshot` frame holds at most; older messages that do not "
            "fit are left out (`\"truncated\": true`)", unit="bytes", minimum=1024,
            maximum=64 * 1024 * 1024, see=_LIMITS),
    Setting("PGBRIDGE_FEED_MAX_ROOMS", "daemon", "feed_max_rooms", "integer", "5000",
            "rooms one `feed` follows at most: the `feed` of a user in more rooms is refused "
            "(`rate_limited`), and its frame of 5,000 rooms is about 550 KB", unit="rooms",
            minimum=1, maximum=100000, see=_LIMITS),
    Setting("PGBRIDGE_RATE_LIMIT", "daemon", "rate_limit", "rate", "50",
            "client frames (WebSocket pings included) per second, per connection; a client that "
            "keeps sending past the limit (more than `PGBRIDGE_RATE_BURST` refusals beyond one a "
            "second) is closed with 1008", unit="frames per second", minimum=1, see=_LIMITS),
    Setting("PGBRIDGE_RATE_BURST", "daemon", "rate_burst", "integer", "100",
            "burst of `PGBRIDGE_RATE_LIMIT`", unit="frames", minimum=1, see=_LIMITS),
    Setting("PGBRIDGE_SUBSCRIBE_RATE", "daemon", "subscribe_rate", "rate", "5",
            "subscribe attempts (refused ones too) and refreshes per second, per connection",
            unit="per second", minimum=1, see=_LIMITS),
    Setting("PGBRIDGE_SUBSCRIBE_BURST", "daemon", "subscribe_burst", "integer", "100",
            "burst of `PGBRIDGE_SUBSCRIBE_RATE`", unit="subscribes", minimum=1, see=_LIMITS),
    Setting("PGBRIDGE_USER_SUBSCRIBE_RATE", "daemon", "user_subscribe_rate", "rate", "10",
            "subscribe attempts and refreshes per second over all connections of one user",
            unit="per second", minimum=1, see=_LIMITS),
    Setting("PGBRIDGE_USER_SUBSCRIBE_BURST", "daemon", "user_subscribe_burst", "integer", "300",
            "burst of `PGBRIDGE_USER_SUBSCRIBE_RATE`", unit="subscribes", minimum=1, see=_LIMITS),
    Setting("PGBRIDGE_MAX_CONNECTIONS_PER_USER", "daemon", "max_connections_per_user", "integer",
            "20", "connections of one user; more are refused with HTTP 429", unit="connections",
            minimum=1, see=_LIMITS),
    Setting("PGBRIDGE_MAX_CONNECTIONS", "daemon", "max_connections", "integer", "10000",
            "connections in total; more are refused with HTTP 503", unit="connections", minimum=1,
            see=_LIMITS),
    Setting("PGBRIDGE_HEARTBEAT", "daemon", "heartbeat", "duration", "20",
            "time between two WebSocket pings to each client (spread over 20 slices); one that "
            "answered no ping by the next is closed with 1011", unit="seconds", minimum=0.1,
            see='docs/topics/fan-out-cost.md'),
    Setting("PGBRIDGE_ACK_FLUSH_INTERVAL", "daemon", "ack_flush_interval", "duration", "1",
            "time between two batched `sync_state` writes of acknowledgements (a crash loses at "
            "most the last interval's)", unit="seconds"),
    Setting("PGBRIDGE_PROBE_INTERVAL", "daemon", "probe_interval", "duration", "10",
            "time between two NOTIFY round-trip probes of the listener (a probe's timeout is the "
            "interval, kept between 2 and 10 s); the systemd watchdog is petted only while they "
            "come back", unit="seconds", see='docs/howto/systemd.md'),
    Setting("PGBRIDGE_POOL_SIZE", "daemon", "pool_size", "integer", "10",
            "pooled database connections (the listener has its own)", unit="connections",
            minimum=2),
    Setting("PGBRIDGE_LOG_LEVEL", "daemon", "log_level", "choice", "INFO",
            "logging level; the daemon logs JSON lines on stderr, each line about a connection "
            "with its correlation id (DEBUG adds a line per connection, request and delivery: "
            "[docs/reference/logs.md](logs.md)); the tools log plain text, at this level when it "
            "is set, else at INFO (setup) or WARNING (token, tail)",
            choices=LOG_LEVELS),
    Setting("PGBRIDGE_DEMO", "daemon", "demo", "yes/no", None,
            "serve the demo page at `/` (`/client.js` is always served)",
            unset="yes with the embedded database, else no", see='docs/howto/web-page.md',
            example="no"),
    Setting("PGBRIDGE_PRESENCE_GRACE", "daemon", "presence_grace", "duration", "15",
            "time a user stays online after their last connection closed, so a reconnect (to any "
            "instance) is not seen", unit="seconds", see='docs/topics/presence-and-typing.md'),
    Setting("PGBRIDGE_PRESENCE_LEASE", "daemon", "presence_lease", "duration", "30",
            "how long an instance's presence lease lasts without renewal (renewed every third of "
            "it); a dead instance's users go offline within 4/3 of it", unit="seconds", minimum=1,
            see='docs/topics/presence-and-typing.md'),
    Setting("PGBRIDGE_DOORBELL", "daemon", "doorbell", "choice", "adaptive",
            "`adaptive`: writers NOTIFY at light load, and above `PGBRIDGE_DOORBELL_QUIET_ABOVE` "
            "the bridges ask them to stop and read the log instead; `on`: this bridge never asks "
            "(it still reads the log while another one has); `off`: it keeps writers quiet for as "
            "long as it runs", choices=POLICIES, see=_DOORBELL),
    Setting("PGBRIDGE_DOORBELL_QUIET_ABOVE", "daemon", "doorbell_quiet_above", "rate", "500",
            "captured events per second above which an `adaptive` bridge asks writers to stop "
            "ringing; it asks for the doorbell again once the rate over the last 2 s is under half "
            "of it; raise it where writers have headroom and latency matters more, lower it "
            "where writes dominate", unit="events per second", minimum=1, see=_DOORBELL),
    Setting("PGBRIDGE_POLL_INTERVAL", "daemon", "poll_interval", "duration", "10ms",
            "how often a bridge reads the log of its rooms while writers do not ring: the added "
            "delivery delay at most", unit="seconds", minimum=0.001, maximum=1.0, see=_DOORBELL),
    Setting("PGBRIDGE_BROKER", "daemon", "broker", "servers", None,
            "the NATS servers the bridges share (`nats://host:port`, comma-separated; `tls://` "
            "for TLS; credentials in the URL): one capture reader per database publishes the "
            "rooms' events, the other bridges read no log while it runs",
            unset="no broker: each bridge LISTENs and reads the log itself",
            see="docs/topics/broker.md"),
    Setting("PGBRIDGE_EVENT_LOOP", "daemon", "event_loop", "choice", "auto",
            "`auto`: uvloop when it is installed (the `uvloop` extra; `./dev` installs it), else "
            "asyncio's own loop; `asyncio` or `uvloop` to choose (a missing uvloop is then a "
            "start-up error)", choices=EVENT_LOOPS, see='docs/topics/fan-out-cost.md'),
    # -- read by the test suite (tests/), never by the daemon
    Setting("PGBRIDGE_TEST_DSN", "tests", None, "text", None,
            "a PostgreSQL the tests create and drop their databases on (a superuser's conninfo, "
            "e.g. `postgresql://postgres@127.0.0.1:5432/postgres`)",
            unset="an embedded server in `PGBRIDGE_TEST_DATA_DIR`",
            see="docs/contributing.md#tests"),
    Setting("PGBRIDGE_TEST_DATA_DIR", "tests", None, "path", None,
            "directory of the tests' embedded server", unset="`$TMPDIR/pgbridge-test`"),
    Setting("PGBRIDGE_FUZZ_EXAMPLES", "tests", None, "integer", None,
            "examples per property of `tests/integration/test_fuzz.py`, for a longer run (e.g. "
            "5000)", unset="each test's own number", see='docs/reference/protocol.md'),
    Setting("PGBRIDGE_PG_BINDIR", "tests", None, "path", None,
            "directory of `initdb`, `pg_ctl`, `pg_basebackup` and `postgres` for the tests that "
            "make their own clusters", unset="looked for as `tests/pgcluster.py` says"),
    Setting("PGBRIDGE_CHROMIUM", "tests", None, "path", "/usr/bin/chromium",
            "Chromium for the browser tests"),
    Setting("PGBRIDGE_CHROMEDRIVER", "tests", None, "path", "/usr/bin/chromedriver",
            "chromedriver for the browser tests"),
    Setting("PGBRIDGE_NODE", "tests", None, "path", None,
            "Node ≥ 20 for the JavaScript client's tests", unset="`node` on `PATH`"),
)

GROUPS: dict[Group, tuple[str, str]] = {  # heading, introduction
    "database": ("Database", "Where PostgreSQL is: `DATABASE_URL`, or spec 003's `POSTGRES_*`; "
                 "with none of them set, pgbridge runs an embedded PostgreSQL in "
                 "`PGBRIDGE_DATA_DIR`."),
    "ssh": ("SSH tunnel", "Optional, on when `SSH_HOST` is set (spec 003, \"SSH tunnel\"). "
            "Errors print one line naming what to fix and exit with code 3."),
    "daemon": ("Daemon", "The daemon's own settings."),
    "tests": ("Test suite", "Read by the tests (`./dev test`), never by the daemon."),
}

ROOT = Path(__file__).resolve().parent.parent  # the checkout the generated files live in
REFERENCE_PAGE = Path("docs/reference/settings.md")
ENV_EXAMPLE = Path("deploy/pgbridge.env.example")
REGENERATE = "python -m daemon.settings_table --write"


def _default_text(setting: Setting) -> str:
    if setting.default is not None:
        return f"`{setting.default}`"
    return f"— ({setting.unset})" if setting.unset else "—"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_page() -> str:
    """The Markdown of ``docs/reference/settings.md``: a table per group of :data:`SETTINGS`."""
    out = [
        "# Settings",
        "",
        f"<!-- Generated from daemon/settings_table.py by `{REGENERATE}`; do not edit. -->",
        "",
        "pgbridge reads its settings from the process environment, `.env.local` and `.env` in the "
        "working directory, in that order of precedence (python-dotenv). An empty value counts "
        "as unset. A malformed value stops the daemon and the tools with one line naming the "
        "variable. `deploy/pgbridge.env.example` is a production template of them.",
        "",
        "A **duration** is seconds (`2.5`) or a number with a unit: `500ms`, `30s`, `5m`, `12h`, "
        "`7d`. A **yes/no** is `yes`, `true`, `on`, `1` or `no`, `false`, `off`, `0`. A "
        "**choice** is case-insensitive. A **schema** is a lower-case SQL identifier.",
    ]
    for group, (heading, intro) in GROUPS.items():
        out += ["", f"## {heading}", "", intro, "",
                "| variable | type | default | unit | meaning |", "|---|---|---|---|---|"]
        for s in SETTINGS:
            if s.group == group:
                meaning = f"{s.meaning} ({_linked(s.see)})" if s.see else s.meaning
                out.append(f"| `{s.name}` | {s.type_text()} | {_cell(_default_text(s))} | "
                           f"{s.unit or '—'} | {_cell(meaning)} |")
    return "\n".join(out) + "\n"


def _linked(see: str) -> str:
    """``see`` with each ``docs/...`` page made a link relative to docs/reference/."""
    return _DOC_PAGE.sub(
        lambda m: f"[{m[0]}]({posixpath.relpath(m[1], 'docs/reference')}{m[2] or ''})", see)


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text.replace("`", "").replace("**", ""), 98, initial_indent="# ",
                         subsequent_indent="# ", break_on_hyphens=False)


def _env_default(setting: Setting) -> str:
    """``integer, at least 1; default 1000 frames`` (a text's type goes without saying)."""
    kind = "" if setting.kind in ("text", "secret", "path") else setting.type_text()
    default = setting.default
    if default is None:
        default = f"default: {setting.unset}" if setting.unset else "no default"
    elif setting.kind == "duration":
        default = f"default {default} s" if default[-1].isdigit() else f"default {default}"
    else:
        default = f"default {default} {setting.unit}".rstrip()
    return f"{kind}; {default}".replace(" \\| ", " | ") if kind else default


def env_example() -> str:
    """The text of ``deploy/pgbridge.env.example``: every daemon, database and tunnel variable
    with its meaning and default; set when production needs it, else commented out."""
    out = [
        "# /etc/pgbridge/pgbridge.env (mode 0600, owner root): production settings of pgbridge.",
        "# Copy this file there and edit the copy. A line starting with # shows an optional",
        "# setting with its default or an example; the reference is docs/reference/settings.md.",
        "# In the repository this file is generated from daemon/settings_table.py:",
        f"# `{REGENERATE}` rewrites it.",
    ]
    for group, (heading, intro) in GROUPS.items():
        if group == "tests":
            continue
        out += ["", f"# == {heading} ==", *_comment(intro)]
        for s in SETTINGS:
            if s.group != group:
                continue
            out += ["", *_comment(f"{s.meaning} ({_env_default(s)}).")]
            value = s.example if s.example is not None else s.default or ""
            out.append(f"{'' if s.required else '#'}{s.name}={value}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Print the reference page (``--env``: the env template), or ``--write`` both files."""
    parser = argparse.ArgumentParser(prog="python -m daemon.settings_table",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--env", action="store_true", help=f"print {ENV_EXAMPLE}")
    what.add_argument("--write", action="store_true",
                      help=f"rewrite {REFERENCE_PAGE} and {ENV_EXAMPLE} under {ROOT}")
    args = parser.parse_args(argv)
    if args.write:
        for path, text in ((REFERENCE_PAGE, reference_page()), (ENV_EXAMPLE, env_example())):
            (ROOT / path).parent.mkdir(parents=True, exist_ok=True)
            (ROOT / path).write_text(text, encoding="utf-8")
            print(f"wrote {ROOT / path}")
    else:
        print(env_example() if args.env else reference_page(), end="")


if __name__ == "__main__":
    main()
