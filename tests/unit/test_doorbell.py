"""Unit tests of :mod:`daemon.doorbell`, no I/O: when the bridge asks writers to stop ringing,
renews and lets go of the lease, follows another bridge's lease, waits for the barrier before
it stops polling, and what each policy does."""

from __future__ import annotations

import pytest

from daemon.doorbell import Call, Doorbell, Mode, Reading

LEASE_MS = 3000


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
    bell = Doorbell(quiet_above=500, lease=3.0, now=0.0)
    bell.observed(ringing(0.0), 0.0)
    end = ring_for(bell, 1.01, 1000)
    assert bell.due(end) == 0
    assert bell.call() == Call(quiet_ms=LEASE_MS, new_barrier=False, barrier=None)
    assert bell.observed(quiet(end), end) is Mode.QUIET
    assert bell.polling
    assert bell.poll_delay(end) == bell.poll_interval
    assert bell.due(end) == pytest.approx(bell.renew_every)


def test_the_lease_is_renewed_while_traffic_stays_above_half() -> None:
    bell = Doorbell(quiet_above=500, now=0.0)
    bell.observed(ringing(0.0), 0.0)
    t = ring_for(bell, 1.01, 1000)
    bell.observed(quiet(t), t)
    for i in range(1, 6):  # 300 events/s: above half of 500
        t += 1.0
        assert bell.call().quiet_ms == LEASE_MS
        assert bell.call().new_barrier
        bell.observed(quiet(t, captured=300 * i), t)
        assert bell.mode is Mode.QUIET
    assert bell.rate == pytest.approx(300)
    assert bell.call().quiet_ms == LEASE_MS


def test_calm_traffic_lets_the_lease_go_then_settles_on_the_barrier() -> None:
    bell = Doorbell(quiet_above=500, calm_for=3.0, now=0.0)
    bell.observed(ringing(0.0), 0.0)
    t = ring_for(bell, 1.01, 1000)
    bell.observed(quiet(t), t)
    renewals = 0
    for _ in range(10):  # 100 events/s: calm
        t += 1.0
        if bell.call().quiet_ms:
            renewals += 1
        bell.observed(quiet(t, captured=int(100 * t)), t)
    assert bell.call().quiet_ms == 0
    assert 1 <= renewals <= 4  # kept it for calm_for seconds, then let go
    # the lease ran out: the call takes a barrier, and the bridge keeps polling until it passed
    t += 3.0
    assert bell.call().new_barrier
    done = bell.observed(Reading(None, 1000.0 + t, captured=int(100 * t),
                                 barrier="10:20:12,15"), t)
    assert done is Mode.SETTLING and bell.polling
    assert bell.call() == Call(quiet_ms=0, new_barrier=False, barrier="10:20:12,15")
    t += 0.1
    assert bell.observed(Reading(None, 1000.0 + t, settled=False), t) is None
    assert bell.polling
    t += 0.1
    assert bell.observed(Reading(None, 1000.0 + t, settled=True), t) is Mode.RINGING
    assert not bell.polling
    assert bell.call() == Call(quiet_ms=0, new_barrier=False, barrier=None)


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
    assert bell.call().quiet_ms == LEASE_MS
    bell.observed(quiet(0.0), 0.0)
    t = 0.0
    for _ in range(10):
        t += 1.0
        bell.observed(quiet(t, captured=0), t)
        assert bell.call().quiet_ms == LEASE_MS
    assert bell.polling


def test_a_hint_makes_the_lease_read_now() -> None:
    bell = Doorbell(now=0.0)
    bell.observed(ringing(0.0), 0.0)
    assert bell.due(0.2) > 0
    bell.hinted(0.2)
    assert bell.due(0.2) == 0


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
    bell = Doorbell(quiet_above=500, now=0.0)
    bell.observed(ringing(0.0), 0.0)
    t = ring_for(bell, 1.01, 1000)
    bell.observed(Reading(1003.0 + t, 1000.0 + t, captured=None), t)
    bell.polled(800)
    t += 1.0
    bell.observed(Reading(1003.0 + t, 1000.0 + t, captured=None), t)
    assert bell.rate == pytest.approx(800)


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="adaptive"):
        Doorbell("sometimes")
