"""The pure side of presence and typing (daemon.presence, the hub's watchers, the new frames):
no I/O, times passed in."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.events import Event, PresenceHint, parse_notify
from daemon.hub import Hub, Subscription
from daemon.presence import Changes, Roster, TypingGate
from daemon.protocol import ProtocolError, Subscribe, Typing, parse_frame
from daemon.signing import NotifyKey
from tests.test_pure import RecordingSink


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


def test_subscribe_takes_presence_as_a_boolean_only() -> None:
    assert parse_frame('{"type":"subscribe","room":"r"}') == Subscribe(room="r")
    assert parse_frame('{"type":"subscribe","room":"r","presence":true}') == Subscribe(
        room="r", presence=True)
    for bad in ('"yes"', "1", "null", "{}"):
        with pytest.raises(ProtocolError) as refused:
            parse_frame(f'{{"type":"subscribe","room":"r","presence":{bad},"ref":"x"}}')
        assert (refused.value.code, refused.value.ref, refused.value.room) == (
            "bad_request", "x", "r")
    assert parse_frame('{"type":"typing","room":"r","ref":"t"}') == Typing(room="r", ref="t")
    with pytest.raises(ProtocolError):
        parse_frame('{"type":"typing","room":"r\\u0000"}')


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


def test_membership_events_name_who_joins_and_who_leaves() -> None:
    def frame(op: str) -> str:
        return json.dumps({"type": "event", "room": "r", "seq": 1, "table": "channel_members",
                           "op": op, "data": {"user_id": "u1"}})
    joined, left = parse_notify(frame("INSERT")), parse_notify(frame("DELETE"))
    assert isinstance(joined, Event) and (joined.joins, joined.revokes) == ("u1", None)
    assert isinstance(left, Event) and (left.joins, left.revokes) == (None, "u1")
    assert parse_notify('{"presence": "user", "user": "u1"}') == PresenceHint("u1")
    assert parse_notify('{"presence": "user", "user": "bad id"}') is None


@given(st.text(max_size=40))
def test_a_derived_key_never_verifies_the_parent_s_signatures(text: str) -> None:
    key = NotifyKey(bytes(range(32)))
    typing_key = key.derive("typing")
    assert typing_key.open(key.sign(text)) is None
    assert key.open(typing_key.sign(text)) is None
    assert typing_key.open(typing_key.sign(text)) == (text or None)
