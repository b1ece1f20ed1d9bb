"""Unit tests of :mod:`daemon.ratelimit`, the client limits, no I/O (the clock is injected):
:class:`~daemon.ratelimit.TokenBucket`'s rate and burst, and
:class:`~daemon.ratelimit.ClientLimits`' per-user and total connection counts, each user's
subscribe bucket, and the sweep that forgets refilled buckets."""

from __future__ import annotations

from daemon.ratelimit import ClientLimits, TokenBucket


def test_client_limits_per_user_total_and_subscribe_buckets() -> None:
    now = [0.0]
    limits = ClientLimits(max_connections=3, max_per_user=2, user_rate=1.0, user_burst=2,
                          clock=lambda: now[0])
    limits.opened("a")
    limits.opened("a")
    assert limits.user_at_capacity("a") and not limits.user_at_capacity("b")
    assert not limits.at_capacity() and limits.at_capacity(pending=1)
    limits.opened("b")
    assert limits.at_capacity()
    assert [limits.subscribe_allowed("a") for _ in range(3)] == [True, True, False]
    assert limits.subscribe_allowed("b")  # each user has its own bucket
    limits.closed("a")
    limits.closed("a")
    assert limits.connections("a") == 0 and limits.total == 1
    now[0] += 0.5  # a user who leaves and comes back finds its bucket as it left it
    assert limits.subscribe_allowed("a") is False
    now[0] += ClientLimits.SWEEP_INTERVAL  # refilled and gone: forgotten at the next sweep
    limits.closed("b")
    assert limits.buckets() == 0 and limits.total == 0


def test_token_bucket_rate_and_burst() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 1.0
    assert [bucket.take() for _ in range(3)] == [True, True, False]
