"""Review of issue 26 (the listener split): what the end of a shedding window does.

Before the split (1b65006, daemon/listener.py ``_shed_over``), the timer that ends a shedding
window set ``_users_checked = False`` synchronously, so that no signed change handled after the
window was published before every connected user was checked again (hints, user deletions
among them, may have been dropped unchecked in the window). ``Listener._shed_over`` now starts
a task that calls ``Rooms.missed`` later: a change put in the rooms' queue in the same turn of
the loop is published before the check.

It also calls every follower's ``missed`` whether or not LISTEN is up: ``Rooms.missed`` sets
``polls.listening = True`` while the LISTEN connection is down (the old poll looked at
``Listener.connected``, which a shedding window never set).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from daemon.listener import Listener
from daemon.metrics import Metrics
from daemon.notes import Change
from tests.support.doubles import event
from tests.unit.test_rooms import KEYS, Fixture, rooms  # noqa: F401  (fixture)


def _listener(fixture: Fixture) -> Listener:
    listener = Listener("", cast(Any, fixture.store), Metrics(), followers=(fixture.rooms,))
    listener.keys = KEYS
    return listener


async def test_a_change_heard_as_the_shedding_window_ends_waits_for_the_user_check(
        rooms: Fixture) -> None:  # noqa: F811
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
    listener.connected = True  # the LISTEN connection is up
    # In the window, a user's deletion hint was shed (dropped unchecked). The reader's step that
    # hears the next signed change and the timer that ends the window run in the same turn:
    rooms.store.append(event(1))
    await rooms.rooms.changed(Change(event(1)))  # the reader (never suspends: queue not full)
    listener._shed_over()  # the call_later timer, same turn of the loop
    await asyncio.sleep(1.2)  # a retry_delay: the change deferred to the catch-up, if it was
    assert sink.seqs() == [1]
    # Before issue 26 the timer set _users_checked = False itself: check, then publish.
    assert timeline[:2] == ["check", "publish"], timeline


async def test_a_shedding_window_that_ends_while_listen_is_down_does_not_start_the_polls(
        rooms: Fixture) -> None:  # noqa: F811
    await rooms.rooms.missed(KEYS)
    await rooms.settle()
    listener = _listener(rooms)
    rooms.rooms.deaf()  # the LISTEN connection dropped (reader's finally)
    assert not rooms.rooms.polls.listening
    listener._shed_over()  # the window's timer fires while the reader waits to reconnect
    await rooms.settle()
    assert not rooms.rooms.polls.listening, (
        "polls run (and publish from the log, users checked once) while LISTEN is down")
    await asyncio.sleep(0)
