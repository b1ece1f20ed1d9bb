"""Unit tests of :mod:`daemon.hub`: the :class:`~daemon.hub.Hub` and its
:class:`~daemon.hub.Subscription` objects, no I/O. They cover the switch from replay to live
events without gap or duplicate, subscriptions ended by a revocation (live, buffered during the
replay, or replayed) or a deleted room, the pending-buffer overflow, and the presence watchers:
presence and typing frames held until the snapshot is live, their own overflow, and ended
subscriptions that cannot be watched."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from daemon.hub import Hub, Subscription
from tests.support.doubles import RecordingSink, event


@given(st.data())
def test_switch_from_replay_to_live_has_no_gap_and_no_duplicate(data: st.DataObject) -> None:
    """Whatever the interleaving of live events with the replay, a subscriber gets exactly
    from+1 .. last, in order."""
    total = data.draw(st.integers(0, 60), label="events in the log")
    at = data.draw(st.integers(0, total), label="published when the subscriber registers")
    # from may exceed L: the database's head can be ahead of what the hub has published yet
    start = data.draw(st.integers(0, total), label="from")
    hub = Hub()
    hub.track("R", 0)
    keep = Subscription(RecordingSink("other"), "R", pending_limit=1000)
    hub.add(keep)  # keeps the room tracked throughout
    for seq in range(1, at + 1):
        hub.publish(event(seq))
    sink = RecordingSink()
    sub = Subscription(sink, "R", pending_limit=1000)
    live_from = hub.add(sub)
    assert live_from == at
    sub.from_seq = start
    published = at
    replay = list(range(start + 1, live_from + 1))
    while replay or published < total:  # replay pages and live events, interleaved at random
        if replay and (published == total or data.draw(st.booleans())):
            sub.replay(event(replay.pop(0)))
        else:
            published += 1
            hub.publish(event(published))
    sub.go_live()
    for seq in range(total + 1, total + 4):
        hub.publish(event(seq))
    assert sink.seqs() == list(range(start + 1, total + 4))


def test_revocation_ends_subscription_before_later_events() -> None:
    hub, sink = Hub(), RecordingSink("bob")
    hub.track("R", 0)
    sub = Subscription(sink, "R", pending_limit=10)
    hub.add(sub)
    sub.go_live()
    hub.publish(event(1))
    hub.publish(event(2, revokes="alice"))  # somebody else: delivered
    hub.publish(event(3, revokes="bob"))
    hub.publish(event(4))
    assert sink.seqs() == [1, 2]
    assert json.loads(sink.frames[-1]) == {"type": "unsubscribed", "room": "R",
                                           "reason": "membership_revoked"}
    assert sink.ended == [sub] and "R" not in hub


def test_revocation_buffered_during_replay_is_applied_at_go_live() -> None:
    hub, sink = Hub(), RecordingSink("bob")
    hub.track("R", 5)
    sub = Subscription(sink, "R", pending_limit=10)
    assert hub.add(sub) == 5
    hub.publish(event(6, revokes="bob"))
    hub.publish(event(7))
    sub.replay(event(5))
    assert sub.go_live() is True
    assert sink.seqs() == [5]
    assert json.loads(sink.frames[-1])["reason"] == "membership_revoked"


def test_room_deleted_event_is_delivered_then_subscription_ends() -> None:
    hub, sink = Hub(), RecordingSink()
    hub.track("R", 0)
    sub = Subscription(sink, "R", pending_limit=10)
    hub.add(sub)
    sub.go_live()
    hub.publish(event(1, ends_room=True))
    hub.publish(event(2))
    assert sink.seqs() == [1]
    assert json.loads(sink.frames[-1])["reason"] == "room_deleted"


def test_pending_overflow_reports_slow_client() -> None:
    hub, sink = Hub(), RecordingSink()
    hub.track("R", 0)
    sub = Subscription(sink, "R", pending_limit=3)
    hub.add(sub)
    for seq in range(1, 5):
        hub.publish(event(seq))
    assert sink.overflowed
    # the log names the buffer that overflowed (not the empty outgoing queue)
    assert sink.why == "more than 3 live events of room R arrived while its replay was running"


def test_replayed_revocation_after_the_membership_check_ends_the_subscription() -> None:
    """Membership is checked at head 5; the log then holds the user's removal at 7: replaying
    it ends the subscription exactly as the live event would. Older removals (a membership
    ended and granted again before the check) are history and change nothing."""
    hub, sink = Hub(), RecordingSink("bob")
    hub.track("R", 8)
    sub = Subscription(sink, "R", pending_limit=10, checked_at=5)
    sub.from_seq = 2
    assert hub.add(sub) == 8
    assert sub.replay(event(3, revokes="bob")) is False
    assert sub.replay(event(6)) is False
    assert sub.replay(event(7, revokes="bob")) is True
    assert sub.replay(event(8)) is False
    assert sink.seqs() == [3, 6] and sub.ended and sink.ended == [sub]
    assert json.loads(sink.frames[-1])["reason"] == "membership_revoked"


def test_presence_waits_for_the_snapshot_then_flows() -> None:
    hub, sink = Hub(), RecordingSink()
    hub.track("r", 0)
    sub = Subscription(sink, "r", pending_limit=2, presence=True)
    hub.add(sub)
    sub.offer_presence("before the snapshot was read")  # not watching yet: not for it
    assert hub.watch(sub) and hub.watched() == ["r"]
    sub.offer_presence("p1")
    assert sub.offer_typing("t0") is False, "typing before the snapshot is dropped"
    assert sink.frames == []
    sub.presence_live()
    sub.offer_presence("p2")
    assert sub.offer_typing("t1") is True
    assert sink.frames == ["p1", "p2", "t1"]
    hub.remove(sub)
    assert hub.watchers("r") == () and hub.watched() == []


def test_presence_pending_past_the_limit_is_an_overflow() -> None:
    hub, sink = Hub(), RecordingSink()
    hub.track("r", 0)
    sub = Subscription(sink, "r", pending_limit=2, presence=True)
    hub.add(sub)
    hub.watch(sub)
    for i in range(3):
        sub.offer_presence(f"p{i}")
    assert sink.overflowed and "presence" in sink.why


def test_an_ended_subscription_is_not_watched() -> None:
    hub, sink = Hub(), RecordingSink()
    hub.track("r", 0)
    sub = Subscription(sink, "r", pending_limit=2, presence=True)
    hub.add(sub)
    sub.end("client")
    assert hub.watch(sub) is False
