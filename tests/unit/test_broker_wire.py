"""Unit tests of :mod:`daemon.broker_wire` (the broker's messages: signed, for one install, for
one epoch) and of the hub's pins (:meth:`daemon.hub.Hub.pin`), no I/O."""

from __future__ import annotations

import json

import pytest

from daemon.broker_wire import (
    TRACK_CHUNK,
    BrokerKeys,
    Heartbeat,
    Subjects,
    TrackRequest,
    heartbeat,
    missed,
    read_heartbeat,
    read_missed,
    read_track_reply,
    read_track_request,
    track_reply,
    track_request,
)
from daemon.hub import Hub, Subscription
from daemon.notes import Change, Forged, MemberHint, UserHint, classify
from daemon.signing import NotifyKey
from tests.support.doubles import RecordingSink

KEY = NotifyKey(b"k" * 32)
OTHER = NotifyKey(b"o" * 32)
KEYS = BrokerKeys.of(KEY)


def test_every_purpose_has_its_own_key() -> None:
    """A payload signed for one purpose is never accepted for another, nor as a NOTIFY."""
    beat = heartbeat(KEYS.control, 7, 1, "a")
    assert read_heartbeat(KEYS.control, beat) == Heartbeat(7, 1, "a")
    assert read_heartbeat(KEYS.events, beat) is None
    assert read_heartbeat(KEY, beat) is None
    frame = '{"type":"event","room":"R","seq":1,"table":"messages","op":"INSERT","data":{}}'
    event = KEYS.events.sign(frame)
    assert isinstance(classify("capture", event, KEYS.notes), Change)
    # the capture triggers' own signature (a NOTIFY payload) is not a broker event
    assert isinstance(classify("capture", KEY.sign(frame), KEYS.notes), Forged)
    assert isinstance(classify("capture", KEYS.control.sign(frame), KEYS.notes), Forged)


def test_hints_travel_signed() -> None:
    user = KEYS.events.sign(json.dumps({"access": "user", "user": "U1"}))
    member = KEYS.events.sign(json.dumps({"access": "member", "user": "U1"}))
    assert classify("capture", user, KEYS.notes) == UserHint("U1")
    assert classify("capture", member, KEYS.notes) == MemberHint("U1")


def test_subjects_are_the_installs_own() -> None:
    """Two installs sharing one NATS never share a subject, nor two copies of one database
    (the same key); a room id is one token."""
    mine, theirs = Subjects.of(KEY, "7:16384"), Subjects.of(OTHER, "7:16384")
    assert mine.room("R_1-x").startswith("pgbridge.") and mine.room("R_1-x").endswith(
        ".room.R_1-x") and mine.room("R_1-x").count(".") == 3
    assert mine.room("R") != theirs.room("R")
    # a copy of the database (the same key) in the same cluster, or in another one
    assert mine.room("R") != Subjects.of(KEY, "7:16385").room("R")
    assert mine.room("R") != Subjects.of(KEY, "8:16384").room("R")
    assert mine.track(5) != mine.track(6)
    assert {mine.signal, mine.typing, mine.leader} & {theirs.signal, theirs.typing,
                                                      theirs.leader} == set()


@pytest.mark.parametrize("data", [
    b"", b"\xff\xfe", b"{}", b"x" * 64 + b"{}",
    KEYS.control.sign('{"epoch":-1,"beat":1,"leader":"a"}').encode(),
    KEYS.control.sign('{"epoch":true,"beat":1,"leader":"a"}').encode(),
    KEYS.control.sign('{"epoch":1,"beat":1.5,"leader":"a"}').encode(),
    KEYS.control.sign('{"epoch":1,"beat":1,"leader":7}').encode(),
    KEYS.control.sign("[1, 2]").encode(),
    KEYS.control.sign("[" * 100 + "]" * 100).encode(),
])
def test_a_heartbeat_that_is_not_one_is_refused(data: bytes) -> None:
    assert read_heartbeat(KEYS.control, data) is None


def test_a_track_request_is_for_one_epoch_and_bounded() -> None:
    request = track_request(KEYS.control, 9, ["A", "B", "A"], "n1")
    assert read_track_request(KEYS.control, 9, request) == TrackRequest(["A", "B"], "n1")
    assert read_track_request(KEYS.control, 10, request) is None  # another leader's
    assert read_track_request(KEYS.events, 9, request) is None
    too_many = track_request(KEYS.control, 9, [f"r{i}" for i in range(TRACK_CHUNK + 1)], "n")
    assert read_track_request(KEYS.control, 9, too_many) is None
    for bad in (["a.b"], ["a b"], ["*"], [">"], [""], ["x" * 27], [1]):
        assert read_track_request(KEYS.control, 9, track_request(
            KEYS.control, 9, bad, "n")) is None, bad  # type: ignore[arg-type]
    for nonce in ("", "a.b", "x" * 27):
        assert read_track_request(KEYS.control, 9, track_request(
            KEYS.control, 9, ["A"], nonce)) is None, nonce


def test_a_track_reply_answers_exactly_its_request() -> None:
    """Anyone who hears a request may answer it: only the reply of that epoch, to that nonce,
    with every room asked for, signed, is taken (a recorded reply answers no other request)."""
    reply = track_reply(KEYS.control, 9, "n1", {"A": 3, "B": 0})
    assert read_track_reply(KEYS.control, reply, 9, "n1", ["A", "B"]) == {"A": 3, "B": 0}
    assert read_track_reply(KEYS.control, reply, 9, "n2", ["A", "B"]) is None  # replayed
    assert read_track_reply(KEYS.control, reply, 8, "n1", ["A", "B"]) is None
    assert read_track_reply(KEYS.control, reply, 9, "n1", ["A", "C"]) is None  # C missing
    assert read_track_reply(KEYS.events, reply, 9, "n1", ["A"]) is None
    negative = track_reply(KEYS.control, 9, "n1", {"A": -1})
    assert read_track_reply(KEYS.control, negative, 9, "n1", ["A"]) is None


def test_the_missed_signal_is_signed_for_control() -> None:
    assert read_missed(KEYS.control, missed(KEYS.control, 4, 2)) == (4, 2)
    assert read_missed(KEYS.events, missed(KEYS.control, 4, 2)) is None
    assert read_missed(KEYS.control, heartbeat(KEYS.control, 4, 2, "x")) is None
    assert read_missed(KEYS.control, KEYS.control.sign('{"missed":-1,"count":1}').encode()) is None


def test_a_pinned_room_stays_tracked_without_subscribers() -> None:
    seen: list[tuple[str, bool]] = []
    hub = Hub()
    hub.observer = lambda room, tracked: seen.append((room, tracked))
    hub.track("R", 4)
    assert hub.pin("R") == 4
    sub = Subscription(RecordingSink("u"), "R", pending_limit=10)
    hub.add(sub)
    hub.remove(sub)
    assert "R" in hub and hub.pinned() == ["R"]
    hub.unpin("R")
    assert "R" not in hub
    hub.unpin("R")  # unpinning an untracked room is nothing
    assert seen == [("R", True), ("R", False)]


def test_unpinning_keeps_a_room_with_subscribers() -> None:
    hub = Hub()
    hub.track("R", 0)
    sub = Subscription(RecordingSink("u"), "R", pending_limit=10)
    hub.add(sub)
    hub.pin("R")
    hub.unpin("R")
    assert "R" in hub and hub.pinned() == []
    hub.remove(sub)
    assert "R" not in hub
