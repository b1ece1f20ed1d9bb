"""The one exception hierarchy of pgbridge.

Driver errors (psycopg, asyncssh, OS) are translated where they enter the program, with the
original kept as ``__cause__`` and the SQLSTATE or OS error number kept on the new exception::

    BridgeError                   root; ``exit_code`` is what the CLI exits with
    ├── ConfigError               bad or missing setting (names the variable)      exit 2
    ├── DatabaseError             PostgreSQL refused or failed (keeps ``sqlstate``) exit 1
    │   └── SchemaError           schema missing, outdated or tampered with        exit 1
    ├── RefusedError              the request cannot be done: no such user         exit 1
    │                             (pgbridge token), the bridge refused (pgbridge tail)
    └── TunnelError               the SSH tunnel could not be opened               exit 3
                                  (keeps ``reason``, and spec 003's ``code``)

Every message is one line that says what is wrong and what to do about it; the CLI
(:mod:`daemon.cli`, its one error boundary) prints it without a traceback. Anything else that
reaches the boundary is a bug: one line naming an incident, exit 70 (``EXIT_SOFTWARE``);
Ctrl-C exits 130.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_DATABASE = 1
EXIT_USAGE = 2
EXIT_TUNNEL = 3
EXIT_SOFTWARE = 70  # sysexits.h EX_SOFTWARE: an exception that is not a BridgeError (a bug)
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C


class BridgeError(Exception):
    """Root of every error pgbridge raises on purpose."""

    exit_code: int = EXIT_DATABASE


class ConfigError(BridgeError):
    """A setting is missing or malformed. The message names the environment variable."""

    exit_code = EXIT_USAGE


class DatabaseError(BridgeError):
    """PostgreSQL refused or failed an operation.

    ``sqlstate`` is the five-character SQLSTATE when the server sent one, else ``None``
    (connection refused, host not found).
    """

    exit_code = EXIT_DATABASE

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class SchemaError(DatabaseError):
    """The pgbridge schema is missing, outdated, or an applied migration was changed."""


class RefusedError(BridgeError):
    """What was asked cannot be done as asked: ``pgbridge token`` for a user that does not
    exist or is deleted, ``pgbridge tail`` refused by the bridge (HTTP 401/403, a subscribe
    error a retry cannot fix, close code 1008 or 4003)."""

    exit_code = EXIT_DATABASE  # 1, as every other failure that is not the caller's usage


class TunnelError(BridgeError):
    """The SSH tunnel could not be opened or was refused (host key, auth, network).

    ``reason`` is a short machine-readable tag: retried ones ``refused``, ``not_found``,
    ``timeout``, ``unreachable``, ``disconnected``, ``forward_failed``; final ones
    ``key_missing``, ``key_invalid``, ``auth_failed``, ``host_key_unknown``,
    ``host_key_changed``, ``forward_refused``; ``error`` otherwise.
    """

    exit_code = EXIT_TUNNEL

    def __init__(self, message: str, *, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def code(self) -> str | None:
        """The error code spec 003's "Error Handling" switches on (Node.js's, for the same
        failure): ``ECONNREFUSED`` (``reason`` ``refused``), ``ENOTFOUND`` (``not_found``),
        ``ENOENT`` (``key_missing``); ``None`` for every other reason, which the spec's
        ``default:`` branch handles (``reason`` tells them apart)."""
        return _SPEC_TUNNEL_CODES.get(self.reason)


# TunnelError.reason -> the code spec 003's switch names; no others (the spec has none).
_SPEC_TUNNEL_CODES = {"refused": "ECONNREFUSED", "not_found": "ENOTFOUND", "key_missing": "ENOENT"}
