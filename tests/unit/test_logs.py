"""Unit tests of :mod:`daemon.logs`, no I/O (the clock is injected): the
:class:`~daemon.logs.Throttled` logger writes the first line of each kind per interval and says
how many it left out."""

from __future__ import annotations

import logging

import pytest

from daemon.logs import Throttled


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
