"""Unit tests of :mod:`daemon.presence`, the presence and typing decisions, no I/O (times are
passed in): the :class:`~daemon.presence.Roster`'s per-user connection counts and grace period,
the :class:`~daemon.presence.Changes` waiting to be written (one per user, cancelling what
nobody saw, restored after a failed write), and the :class:`~daemon.presence.TypingGate`'s
per-room and per-user buckets. Named ``test_roster`` because
``tests/integration/test_presence.py`` (the end-to-end presence tests) already holds the
basename."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

from daemon.errors import BridgeError
from daemon.metrics import Metrics
from daemon.presence import Changes, Roster, TypingGate
from daemon.presence_writer import RETRY_DELAY, PresenceWriter


def test_a_reconnect_within_the_grace_is_no_transition() -> None:
    roster = Roster(grace=10.0)
    assert roster.opened("u") is True  # a join to write
    assert roster.opened("u") is False  # a second connection
    roster.closed("u", now=100.0)
    roster.closed("u", now=101.0)  # the last one: grace until 111
    assert roster.due(110.9) == []
    assert roster.opened("u") is False, "back within the grace: nothing to write"
    roster.closed("u", now=120.0)
    assert roster.due(125.0) == [], "the stale deadline (111) released nothing"
    assert roster.due(130.0) == [("u", 120.0)], "released with when it closed"
    assert len(roster) == 0 and roster.next_due() is None
    assert roster.opened("u") is True


def test_roster_lists_what_it_holds() -> None:
    roster = Roster(grace=5.0)
    roster.opened("a")
    roster.opened("b")
    roster.closed("b", now=1.0)
    assert sorted(roster.held()) == ["a", "b"]
    assert roster.in_grace(3.0) == [("b", 2.0)]


def test_changes_keep_one_per_user_and_cancel_what_nobody_saw() -> None:
    changes = Changes()
    changes.join("a")
    changes.leave("a", closed_at=5.0)  # joined and left before the write: nothing
    assert not changes
    changes.leave("b", closed_at=5.0)
    changes.join("b")  # left and came back before the write: nothing
    assert not changes
    changes.join("c")
    changes.leave("d", closed_at=5.0)
    assert sorted(changes.take(now=7.0), key=str) == [("c", None), ("d", 2.0)]
    assert not changes


def test_a_failed_write_is_restored_under_newer_changes() -> None:
    changes = Changes()
    changes.join("a")
    changes.leave("b", closed_at=1.0)
    taken = changes.take(now=2.0)
    changes.leave("a", closed_at=3.0)  # a left while the write failed
    changes.restore(taken, taken_at=2.0)
    assert sorted(changes.take(now=4.0), key=str) == [("a", 1.0), ("b", 3.0)]


def test_typing_gate_admits_about_one_a_second_per_user_and_room() -> None:
    gate = TypingGate(rate=1.0, burst=2)
    assert [gate.allow("u", "r") for _ in range(5)] == [True, True, False, False, False]
    assert gate.allow("u", "other") and gate.allow("v", "r")


def test_typing_gate_caps_a_user_over_all_rooms() -> None:
    gate = TypingGate(rate=1.0, burst=2, user_rate=1.0, user_burst=3)
    assert [gate.allow("u", f"r{i}") for i in range(5)] == [True, True, True, False, False]
    assert gate.allow("v", "r0")


def test_typing_gate_forgets_full_buckets() -> None:
    now = [0.0]
    gate = TypingGate(clock=lambda: now[0])
    gate.SWEEP_AT = 3
    for user in "abc":
        gate.allow(user, "r")
    now[0] = 60.0  # every bucket has refilled
    gate.allow("d", "r")
    assert list(gate._buckets) == [("d", "r")] and list(gate._users) == ["d"]


class _FailingStore:
    """A store whose every presence write fails, as a closed pool's does at once."""

    def __init__(self) -> None:
        self.writes = 0

    async def presence_sync(self, *args: object, **kwargs: object) -> tuple[bool, int]:
        self.writes += 1
        raise BridgeError("the pool 'pgbridge' is already closed")


async def test_a_failing_presence_write_is_retried_after_the_delay_not_at_once() -> None:
    """A renewal that was due and failed left the next renewal in the past: the writer retried
    without waiting, 144,759 times in one test's shutdown. It waits RETRY_DELAY between tries."""
    store = _FailingStore()
    writer = PresenceWriter(cast(Any, store), Metrics(), grace=1.0, lease=30.0)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(RETRY_DELAY / 2):
            await writer.run()
    assert store.writes == 1
