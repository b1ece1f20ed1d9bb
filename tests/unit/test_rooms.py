"""Unit tests of :mod:`daemon.rooms` without a database: a store double holds the log, an
access double records the checks. What the processor publishes, in which order, and what it
reads from the log: a change next in line is published as is, a gap and a pointer read the
log, nothing is published before every connected user was checked after LISTEN came up, user
hints coalesce, and a joining member is told to the presence side through ``joined``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, cast

import pytest

from daemon.doorbell import Doorbell
from daemon.events import Event, Pointer, UserHint
from daemon.hub import Hub, Subscription
from daemon.listener import Listener
from daemon.metrics import Metrics
from daemon.notes import Change, Keys
from daemon.rooms import Rooms
from daemon.signing import NotifyKey
from tests.support.doubles import RecordingSink, event

KEYS = Keys.of("capture", "typing", NotifyKey(bytes(range(32))))


class LogStore:
    """The part of :class:`daemon.store.Store` the rooms read: a log per room."""

    def __init__(self) -> None:
        self.log: dict[str, list[Event]] = {}
        self.reads: list[tuple[str, int, int]] = []

    def append(self, *events: Event) -> None:
        for ev in events:
            self.log.setdefault(ev.room, []).append(ev)

    async def head(self, room: str) -> int:
        return max((ev.seq for ev in self.log.get(room, [])), default=0)

    async def read_events(self, room: str, *, after: int, upto: int,
                          limit: int = 500) -> list[Event]:
        self.reads.append((room, after, upto))
        return [ev for ev in self.log.get(room, []) if after < ev.seq <= upto][:limit]

    async def read_rooms(self, cursors: Mapping[str, int], *, limit: int
                         ) -> dict[str, list[Event]]:
        found = {room: [ev for ev in self.log.get(room, []) if ev.seq > after][:limit]
                 for room, after in cursors.items()}
        return {room: events for room, events in found.items() if events}


class CheckingAccess:
    def __init__(self) -> None:
        self.checks: list[tuple[list[str] | None, bool]] = []

    async def check_users(self, users: Iterable[str] | None = None, *, fail_closed: bool,
                          why: str) -> None:
        self.checks.append((None if users is None else sorted(users), fail_closed))


class Fixture:
    def __init__(self) -> None:
        self.hub = Hub()
        self.store = LogStore()
        self.access = CheckingAccess()
        self.joins: list[tuple[str, str]] = []
        self.metrics = Metrics()
        self.rooms = Rooms(self.hub, cast(Any, self.store), self.metrics, cast(Any, self.access),
                           joined=lambda user, room: self.joins.append((user, room)),
                           doorbell=Doorbell("on", now=0.0))

    async def subscribe(self, room: str = "R") -> RecordingSink:
        sink = RecordingSink()
        sub = Subscription(sink, room, pending_limit=100)
        await self.rooms.add(sub)
        sub.go_live()
        return sink

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def published(self, sink: RecordingSink, timeout: float = 5.0) -> None:
        """Wait until ``sink`` got a frame (one published after a ``retry_delay`` timer)."""
        await asyncio.wait_for(sink.sent.wait(), timeout)


@pytest.fixture
async def rooms() -> AsyncIterator[Fixture]:
    fixture = Fixture()
    task = asyncio.create_task(fixture.rooms.process())
    try:
        yield fixture
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_add_returns_the_room_s_head_and_later_events_are_published_live(
        rooms: Fixture) -> None:
    rooms.store.append(event(1), event(2))
    sink = RecordingSink()
    assert await rooms.rooms.add(Subscription(sink, "R", pending_limit=10)) == 2
    await rooms.rooms.missed(KEYS)
    await rooms.rooms.changed(Change(event(3)))
    await rooms.settle()
    assert rooms.hub.last("R") == 3


async def test_nothing_is_published_before_every_connected_user_was_checked(
        rooms: Fixture) -> None:
    sink = await rooms.subscribe()
    rooms.rooms.retry_delay = 0.01
    await rooms.rooms.changed(Change(event(1)))  # LISTEN not up yet: hints may be lost
    await rooms.settle()
    assert sink.seqs() == [] and rooms.access.checks == []
    rooms.store.append(event(1))
    await rooms.published(sink)  # the catch-up that the change asked for checks users first
    assert rooms.access.checks == [(None, False)] and sink.seqs() == [1]


async def test_a_gap_and_a_pointer_read_the_log_in_order(rooms: Fixture) -> None:
    sink = await rooms.subscribe()
    await rooms.rooms.missed(KEYS)
    await rooms.settle()
    rooms.store.append(*(event(seq) for seq in range(1, 6)))
    await rooms.rooms.changed(Change(event(1)))
    await rooms.rooms.changed(Change(event(4)))  # 2 and 3 were missed: read up to 4
    await rooms.rooms.changed(Change(Pointer("R", 5)))  # too large for NOTIFY
    await rooms.rooms.changed(Change(event(2)))  # a late duplicate
    await rooms.settle()
    assert sink.seqs() == [1, 2, 3, 4, 5]
    assert rooms.store.reads == [("R", 1, 4), ("R", 4, 5)]


async def test_each_published_event_is_counted_once_by_its_table_and_op(rooms: Fixture) -> None:
    """pgbridge_trigger_executions_total: an event published from a NOTIFY or read from the log
    counts once, a duplicate NOTIFY of it not again, whatever the number of subscribers."""
    sinks = [await rooms.subscribe(), await rooms.subscribe()]
    await rooms.rooms.missed(KEYS)
    await rooms.settle()
    rooms.store.append(*(event(seq, table="messages", op="INSERT") for seq in range(1, 4)))
    await rooms.rooms.changed(Change(event(1, table="messages", op="INSERT")))
    await rooms.rooms.changed(Change(Pointer("R", 3)))  # 2 and 3 from the log
    await rooms.rooms.changed(Change(event(2, table="messages", op="INSERT")))  # duplicate
    await rooms.settle()
    assert all(sink.seqs() == [1, 2, 3] for sink in sinks)
    assert rooms.metrics.registry.get_sample_value(
        "pgbridge_trigger_executions_total", {"table": "messages", "op": "INSERT"}) == 3


async def test_user_hints_arriving_together_cost_one_check(rooms: Fixture) -> None:
    await rooms.rooms.missed(KEYS)
    await rooms.settle()
    for user in ("u1", "u2", "u1"):
        await rooms.rooms.user_hinted(UserHint(user))
    await rooms.settle()
    assert rooms.access.checks[1:] == [(["u1", "u2"], True)]


async def test_a_published_join_is_told_to_the_presence_side(rooms: Fixture) -> None:
    await rooms.subscribe()
    await rooms.rooms.missed(KEYS)
    await rooms.rooms.changed(Change(event(1, joins="u9")))
    await rooms.settle()
    assert rooms.joins == [("u9", "R")]


async def test_while_deaf_the_poll_waits_and_users_are_checked_again(rooms: Fixture) -> None:
    await rooms.rooms.missed(KEYS)
    await rooms.settle()
    assert rooms.rooms.polls.listening
    rooms.rooms.deaf()
    assert not rooms.rooms.polls.listening
    await rooms.rooms.missed(KEYS)
    await rooms.settle()
    assert rooms.access.checks == [(None, False), (None, False)]


# --- the end of a window in which the listener shed notifications -------------------------
# Hints (a user's deletion among them) may have been dropped unchecked in the window: nothing
# heard after it may be published before every connected user was checked again, and the polls
# wait for LISTEN as they do after any loss.

def _listener(fixture: Fixture) -> Listener:
    listener = Listener("", cast(Any, fixture.store), Metrics(), followers=(fixture.rooms,))
    listener.keys = KEYS
    return listener


async def test_a_change_heard_as_a_shedding_window_ends_waits_for_the_user_check(
        rooms: Fixture) -> None:
    sink = await rooms.subscribe()
    await rooms.rooms.missed(KEYS)  # LISTEN up, users checked once
    await rooms.settle()
    timeline: list[str] = []
    check = rooms.access.check_users

    async def recording_check(*args: Any, **kwargs: Any) -> None:
        timeline.append("check")
        await check(*args, **kwargs)

    send = sink.send
    rooms.access.check_users = recording_check  # type: ignore[method-assign]
    sink.send = lambda frame: (timeline.append("publish"), send(frame))  # type: ignore[method-assign]
    listener = _listener(rooms)
    listener.connected = True
    # the reader hears a signed change and the timer that ends the window fires, same turn
    rooms.store.append(event(1))
    await rooms.rooms.changed(Change(event(1)))  # never suspends: the queue is not full
    listener._shed_over()
    await rooms.published(sink)  # once checked: at the latest after one retry_delay (1 s)
    assert sink.seqs() == [1]
    assert timeline[:2] == ["check", "publish"], timeline


async def test_a_shedding_window_that_ends_while_listen_is_down_does_not_start_the_polls(
        rooms: Fixture) -> None:
    await rooms.rooms.missed(KEYS)
    await rooms.settle()
    listener = _listener(rooms)
    rooms.rooms.deaf()  # the LISTEN connection dropped
    assert not rooms.rooms.polls.listening
    listener._shed_over()  # the window's timer fires while the reader waits to reconnect
    await rooms.settle()
    assert not rooms.rooms.polls.listening, (
        "polls run (and publish from the log, users checked once) while LISTEN is down")
