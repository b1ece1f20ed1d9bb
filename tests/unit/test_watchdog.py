"""Unit tests of :mod:`daemon.watchdog`, no I/O: how often to pet systemd's watchdog
(``WATCHDOG_USEC``, for this process only) and whether the listener's last NOTIFY round trip is
recent enough to do so."""

from __future__ import annotations

from daemon.watchdog import probe_fresh, probe_max_age, watchdog_interval


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid_only() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "60000000"}, 42) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "42"}, 42) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "7"}, 42) is None
    for usec in ("", "0", "-5", "1e6", "soon"):
        assert watchdog_interval({"WATCHDOG_USEC": usec}, 42) is None
    assert watchdog_interval({}, 42) is None


def test_a_probe_is_fresh_for_two_intervals_and_timeouts() -> None:
    assert probe_max_age(10.0, 10.0) == 40.0
    assert probe_fresh(100.0, 140.0, 40.0)
    assert not probe_fresh(100.0, 140.1, 40.0)
    assert not probe_fresh(None, 0.0, 40.0)
