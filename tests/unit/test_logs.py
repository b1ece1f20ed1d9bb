"""Unit tests of :mod:`daemon.logs`, no I/O (the clock is injected): the
:class:`~daemon.logs.Throttled` logger writes the first line of each kind per interval and says
how many it left out; correlation ids reach the lines written in their context, an explicit one
wins, incidents name both."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterator

import pytest

from daemon.logs import (
    CorrelationFilter,
    JSONFormatter,
    TextFormatter,
    Throttled,
    correlated,
    correlating,
    current_id,
    incident,
    new_id,
)


def test_throttled_log_says_how_many_lines_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttled = Throttled(logging.getLogger("t"), interval=10.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="t")
    for _ in range(5):
        throttled.info("a", "refused %s", "x")
    throttled.info("b", "other")
    now[0] += 10.0
    throttled.info("a", "refused %s", "y")
    assert [r.getMessage() for r in caplog.records] == [
        "refused x", "other", "refused y (and 4 more like it in the last 10 s)"]


# --- correlation ids (docs/reference/logs.md) ---------------------------------------------------

def _captured(*, json_lines: bool = True) -> tuple[list[str], logging.Handler]:
    """A handler set up as :func:`daemon.logs.configure` sets up its stderr one (formatter and
    filter), writing into the returned list."""
    lines: list[str] = []

    class Into(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Into()
    handler.setFormatter(JSONFormatter() if json_lines else TextFormatter())
    handler.addFilter(CorrelationFilter())
    return lines, handler


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines, handler = _captured()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def test_a_line_carries_the_current_correlation_id_and_a_daemon_wide_one_null(
        logged: list[str]) -> None:
    log = logging.getLogger("daemon.t")
    log.info("before", extra={"event": "x"})
    with correlated("00112233aabbccdd"):
        assert current_id() == "00112233aabbccdd"
        log.info("inside", extra={"event": "y", "room": "r1", "seq": 3})
    log.info("after")
    entries = [json.loads(line) for line in logged]
    assert [(e["message"], e["correlation_id"]) for e in entries] == [
        ("before", None), ("inside", "00112233aabbccdd"), ("after", None)]
    assert list(entries[1])[:6] == ["ts", "level", "logger", "event", "correlation_id",
                                    "message"]
    assert (entries[1]["room"], entries[1]["seq"]) == ("r1", 3)


def test_an_explicit_correlation_id_wins_over_the_current_one(logged: list[str]) -> None:
    log = logging.getLogger("daemon.t")
    with correlated("aaaaaaaaaaaaaaaa"):
        log.info("about another connection", extra={"correlation_id": "bbbbbbbbbbbbbbbb"})
        log.info("daemon-wide on purpose", extra={"correlation_id": None})
    assert [json.loads(line)["correlation_id"] for line in logged] == ["bbbbbbbbbbbbbbbb", None]


def test_a_third_party_logger_s_line_in_context_carries_it(logged: list[str]) -> None:
    with correlated("0123456789abcdef"):
        logging.getLogger("psycopg.pool").warning("a library speaking")
    assert json.loads(logged[0])["correlation_id"] == "0123456789abcdef"


async def test_tasks_started_inside_keep_the_id_and_nothing_leaks_out() -> None:
    async def seen() -> str | None:
        await asyncio.sleep(0)
        return current_id()

    with correlated("0123456789abcdef"):
        task = asyncio.create_task(seen())
    assert current_id() is None
    assert await task == "0123456789abcdef"


def test_a_correlating_method_runs_under_its_object_s_id_and_restores_the_caller_s() -> None:
    class Conn:
        correlation_id = "cccccccccccccccc"

        @correlating
        def callback(self) -> str | None:
            return current_id()

    with correlated("dddddddddddddddd"):  # the caller: another connection, a shared task
        assert Conn().callback() == "cccccccccccccccc"
        assert current_id() == "dddddddddddddddd"


def test_an_incident_is_a_correlation_id_too(logged: list[str]) -> None:
    log = logging.getLogger("daemon.t")
    alone = incident(log, "t_crashed", "outside any connection", exc_info=False)
    with correlated("0123456789abcdef"):
        inside = incident(log, "t_crashed", "inside one", exc_info=False)
    first, second = (json.loads(line) for line in logged)
    assert re.fullmatch(r"[0-9a-f]{16}", alone) and alone != inside
    assert (first["incident"], first["correlation_id"]) == (alone, alone)
    assert (second["incident"], second["correlation_id"]) == (inside, "0123456789abcdef")
    assert new_id() != new_id()


def test_the_tools_text_names_a_run_on_its_first_line_only() -> None:
    lines, handler = _captured(json_lines=False)
    log = logging.getLogger("daemon.tool")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("no run yet")
        with correlated("0123456789abcdef"):
            log.warning("first")
            log.warning("second")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    assert lines == ["no run yet", "run 0123456789abcdef: first", "second"]
