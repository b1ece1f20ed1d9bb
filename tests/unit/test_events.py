"""Unit tests of :mod:`daemon.events`, the event model, no I/O:
:func:`~daemon.events.parse_notify` turning NOTIFY payloads into events, pointers, probes and
presence hints (or nothing), and the membership effects it reads from them: who a
``channel_members`` change admits or revokes, and when a ``channels`` update ends the room."""

from __future__ import annotations

import json

from daemon.events import Event, Pointer, PresenceHint, Probe, capture_time, parse_notify


def test_parse_notify_kinds() -> None:
    full = json.dumps({"type": "event", "room": "R", "seq": 3, "table": "channel_members",
                       "op": "DELETE", "data": {"user_id": "U"}})
    parsed = parse_notify(full)
    assert isinstance(parsed, Event) and parsed.revokes == "U" and parsed.frame == full.encode()
    assert (parsed.table, parsed.op) == ("channel_members", "DELETE")
    assert parse_notify('{"room": "R", "seq": 4}') == Pointer("R", 4)
    assert parse_notify('{"probe": "abc"}') == Probe("abc")
    assert parse_notify("garbage") is None and parse_notify("[1]") is None

    def channel_update(deleted_at: str | None) -> Event | Pointer | Probe | None:
        return parse_notify(json.dumps({"type": "event", "room": "R", "seq": 1,
                                        "table": "channels", "op": "UPDATE",
                                        "data": {"deleted_at": deleted_at}}))

    deleted, kept = channel_update("2026-01-01"), channel_update(None)
    assert isinstance(deleted, Event) and deleted.ends_room
    assert isinstance(kept, Event) and not kept.ends_room


def test_membership_events_name_who_joins_and_who_leaves() -> None:
    def frame(op: str) -> str:
        return json.dumps({"type": "event", "room": "r", "seq": 1, "table": "channel_members",
                           "op": op, "data": {"user_id": "u1"}})
    joined, left = parse_notify(frame("INSERT")), parse_notify(frame("DELETE"))
    assert isinstance(joined, Event) and (joined.joins, joined.revokes) == ("u1", None)
    assert isinstance(left, Event) and (left.joins, left.revokes) == (None, "u1")
    assert parse_notify('{"presence": "user", "user": "u1"}') == PresenceHint("u1")
    assert parse_notify('{"presence": "user", "user": "bad id"}') is None


def test_capture_time_reads_the_ts_at_the_end_of_a_frame() -> None:
    """pgbridge_commit_to_send_seconds reads the capture time from the frame's fixed-width
    tail (json_build_object's text, 'ts' last), never from a 'ts' inside the data."""
    frame = (b'{"type" : "event", "room" : "r", "seq" : 1, "data" : {"ts" : "not this"}, '
             b'"ts" : "2025-01-31T12:00:00.250000+00:00"}')
    assert capture_time(frame) == 1738324800.25
    assert capture_time(b'{"type":"event","ts":"2025-01-31T12:00:00.250000+00:00"}') is None
    assert capture_time(b'{"ts" : "2025-13-31T12:00:00.250000+00:00"}') is None
    assert capture_time(b"") is None
