"""Unit tests of :mod:`daemon.doorbell`, no I/O: when the bridge asks writers to stop ringing,
renews and lets go of the lease, follows another bridge's lease, waits for the barrier before
it stops polling, and what each policy does."""

from __future__ import annotations

import pytest

from daemon.doorbell import HINT_GAP, Call, Doorbell, Mode, Reading


def ringing(now: float) -> Reading:
    return Reading(quiet_until=None, now=1000.0 + now, captured=0)


def quiet(now: float, captured: int = 0) -> Reading:
    return Reading(quiet_until=1003.0 + now, now=1000.0 + now, captured=captured)


def ring_for(bell: Doorbell, seconds: float, rate: float, start: float = 0.0) -> float:
    """Signed NOTIFYs at ``rate`` per second for ``seconds``; returns the time at the end."""
    n = int(seconds * rate)
    for i in range(1, n + 1):
        bell.rang(start + i / rate)
    return start + seconds


def test_it_starts_ringing_and_reads_the_lease_at_once() -> None:
    bell = Doorbell(now=0.0)
    assert bell.mode is Mode.RINGING and not bell.polling
    assert bell.due(0.0) == 0
    assert bell.call() == Call(quiet_ms=0, new_barrier=False, barrier=None)
    assert bell.observed(ringing(0.0), 0.0) is None
    assert bell.due(0.0) == pytest.approx(1.0)  # then once a second


def test_light_traffic_keeps_the_doorbell() -> None:
    bell = Doorbell(quiet_above=500, now=0.0)
    bell.observed(ringing(0.0), 0.0)
    end = ring_for(bell, 5.0, 200)
    assert bell.rate == pytest.approx(200, rel=0.05)
    assert bell.call().quiet_ms == 0
    assert bell.due(end) > 0 or bell.call().quiet_ms == 0


def test_heavy_traffic_asks_for_quiet_at_once_and_polls() -> None:
    bell = Doorbell(quiet_above=500, now=0.0)
    bell.observed(ringing(0.0), 0.0)
    end = ring_for(bell, 1.01, 1000)
    assert bell.due(end) == 0
    assert bell.call() == Call(quiet_ms=round(bell.lease * 1000), new_barrier=False,
                               barrier=None)
    assert bell.observed(quiet(end), end) is Mode.QUIET
    assert bell.polling
    assert bell.poll_delay(end) == bell.poll_interval
    assert bell.due(end) == pytest.approx(bell.renew_every)


def quiet_for(bell: Doorbell, t: float, seconds: float, rate: float, captured: int,
              step: float = 0.5) -> tuple[float, int, int]:
    """Readings every ``step`` seconds while writers are quiet and ``rate`` events per second
    are captured; returns (time, captured, renewals asked for)."""
    renewals = 0
    for _ in range(round(seconds / step)):
        t += step
        captured += round(rate * step)
        if bell.call().quiet_ms:
            renewals += 1
        assert bell.call().new_barrier
        lease = quiet(t, captured) if bell.call().quiet_ms or bell.mode is Mode.QUIET else None
        bell.observed(lease or Reading(None, 1000.0 + t, captured, barrier="9:12:10"), t)
    return t, captured, renewals


def quiet_bell(rate: float = 1000) -> tuple[Doorbell, float]:
    bell = Doorbell(quiet_above=500, lease=2.0, renew_every=0.5, window=2.0, now=0.0)
    bell.observed(ringing(0.0), 0.0)
    t = ring_for(bell, 1.01, rate)
    assert bell.call().quiet_ms == 2000
    bell.observed(quiet(t), t)
    return bell, t


def test_the_lease_is_renewed_while_traffic_stays_above_half() -> None:
    bell, t = quiet_bell()
    t, _, renewals = quiet_for(bell, t, 5.0, rate=300, captured=0)  # above half of 500
    assert bell.mode is Mode.QUIET
    assert renewals == 10
    assert bell.rate == pytest.approx(300)


def test_calm_traffic_lets_the_lease_go_then_settles_on_the_barrier() -> None:
    bell, t = quiet_bell()
    t, captured, renewals = quiet_for(bell, t, 3.0, rate=100, captured=0)  # calm
    assert bell.call().quiet_ms == 0
    assert renewals <= 3  # until the window saw the calm
    # the lease ran out: the call takes a barrier, and the bridge keeps polling until it passed
    t += 2.0
    assert bell.call().new_barrier
    done = bell.observed(Reading(None, 1000.0 + t, captured=captured, barrier="10:20:12,15"), t)
    assert done is Mode.SETTLING and bell.polling
    assert bell.call() == Call(quiet_ms=0, new_barrier=False, barrier="10:20:12,15")
    t += 0.1
    assert bell.observed(Reading(None, 1000.0 + t, captured, settled=False), t) is None
    assert bell.polling
    t += 0.1
    assert bell.observed(Reading(None, 1000.0 + t, captured, settled=True), t) is Mode.RINGING
    assert not bell.polling
    assert bell.call() == Call(quiet_ms=0, new_barrier=False, barrier=None)


def test_statistics_flushed_in_bursts_do_not_take_the_lease_back_at_light_load() -> None:
    # Regression: settling, the count of inserts jumped by one backend's second of rows within
    # a tenth of a second (255/s "measured" at 100/s): the bridge asked for quiet again 2 ms
    # after it rang again.
    bell, t = quiet_bell()
    t, captured, _ = quiet_for(bell, t, 3.0, rate=100, captured=0)
    t += 2.0
    bell.observed(Reading(None, 1000.0 + t, captured, barrier="10:20:12"), t)
    assert bell.mode is Mode.SETTLING
    for jump in (0, 26, 0, 0, 25):  # bursts of flushed statistics, 0.1 s apart
        t += 0.1
        captured += jump
        bell.observed(Reading(None, 1000.0 + t, captured, settled=False), t)
        assert bell.call().quiet_ms == 0, bell.rate
    t += 0.1
    assert bell.observed(Reading(None, 1000.0 + t, captured, settled=True), t) is Mode.RINGING
    assert bell.call().quiet_ms == 0
    assert bell.due(t) == pytest.approx(bell.check_every)
    ring_for(bell, 3.0, 100, start=t)
    assert bell.call().quiet_ms == 0, bell.rate  # 100/s: ringing stays


def test_another_bridges_lease_is_followed_even_by_policy_on() -> None:
    bell = Doorbell("on", now=0.0)
    bell.hinted(0.5)
    assert bell.due(0.5) == 0
    assert bell.call().quiet_ms == 0  # never asks for quiet itself
    assert bell.observed(quiet(0.5), 0.5) is Mode.QUIET
    assert bell.polling  # writers are quiet: it must read the log
    ring_for(bell, 2.0, 5000, start=0.5)
    assert bell.call().quiet_ms == 0


def test_policy_off_holds_the_lease_however_calm() -> None:
    bell = Doorbell("off", now=0.0)
    assert bell.call().quiet_ms == bell.lease * 1000
    bell.observed(quiet(0.0), 0.0)
    t = 0.0
    for _ in range(10):
        t += 1.0
        bell.observed(quiet(t, captured=0), t)
        assert bell.call().quiet_ms == bell.lease * 1000
    assert bell.polling


def test_a_hint_makes_the_lease_read_now() -> None:
    bell = Doorbell(now=0.0)
    bell.observed(ringing(0.0), 0.0)
    assert bell.due(0.2) > 0
    bell.hinted(0.2)
    assert bell.due(0.2) == 0


def test_a_flood_of_hints_costs_at_most_one_read_per_hint_gap() -> None:
    bell = Doorbell(now=0.0)
    bell.observed(ringing(0.0), 0.0)
    reads, t = 0, 0.0
    for _ in range(1000):  # a hint every millisecond for a second
        t += 0.001
        bell.hinted(t)
        if bell.due(t) == 0:
            reads += 1
            bell.observed(ringing(t), t)
    assert reads <= 1.0 / HINT_GAP + 1
    assert reads >= 1.0 / HINT_GAP - 1  # and each gap still reads once


def test_a_forged_hint_changes_nothing_but_a_read() -> None:
    bell = Doorbell(now=0.0)
    bell.observed(ringing(0.0), 0.0)
    bell.hinted(0.1)
    assert bell.observed(ringing(0.1), 0.1) is None
    assert not bell.polling


def test_a_failed_call_is_retried_and_changes_no_mode() -> None:
    bell = Doorbell(now=0.0)
    bell.observed(quiet(0.0), 0.0)
    bell.failed(1.0)
    assert bell.mode is Mode.QUIET and bell.due(1.0) > 0


def test_settling_for_long_slows_the_polls_to_check_every() -> None:
    bell = Doorbell(poll_interval=0.01, check_every=1.0, settle_patience=10.0, now=0.0)
    bell.observed(quiet(0.0), 0.0)
    bell.observed(Reading(None, 1001.0, barrier="5:9:6"), 1.0)
    assert bell.poll_delay(2.0) == 0.01
    assert bell.poll_delay(12.0) == 1.0


def test_a_lease_renewed_by_another_bridge_while_settling_is_quiet_again() -> None:
    bell = Doorbell(now=0.0)
    bell.observed(quiet(0.0), 0.0)
    bell.observed(Reading(None, 1001.0, barrier="5:9:6"), 1.0)
    assert bell.mode is Mode.SETTLING
    assert bell.observed(quiet(1.1), 1.1) is Mode.QUIET


def test_without_statistics_the_rate_comes_from_the_polls() -> None:
    bell, t = quiet_bell()
    for _ in range(4):
        bell.polled(400)
        t += 0.5
        bell.observed(Reading(1003.0 + t, 1000.0 + t, captured=None), t)
    assert bell.rate == pytest.approx(800)


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="adaptive"):
        Doorbell("sometimes")


def test_slow_polls_are_spaced_out_to_a_fifth_of_the_time() -> None:
    bell = Doorbell(poll_interval=0.01, now=0.0)
    bell.observed(quiet(0.0), 0.0)
    assert bell.poll_delay(0.1, took=0.001) == 0.01  # cheap polls: every interval
    assert bell.poll_delay(0.1, took=0.02) == pytest.approx(0.1)  # many rooms: 20 % busy
