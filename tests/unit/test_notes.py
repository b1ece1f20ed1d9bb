"""Unit tests of :mod:`daemon.notes`, no I/O: :func:`~daemon.notes.classify` sorts every
notification the LISTEN connection can hear into one typed note, once: changes and pointers,
user and presence hints, typing signals, probes and doorbell hints (unsigned), forgeries
(unsigned, signed with another key, or signed for the other channel), payloads dropped
unchecked while shedding, and what makes no sense (bad JSON, a channel not LISTENed to)."""

from __future__ import annotations

import json
import time

import pytest

from daemon.events import Event, Pointer, PresenceHint, UserHint
from daemon.notes import (
    Change,
    DoorbellHint,
    Forged,
    Ignored,
    Keys,
    ProbeEcho,
    Shed,
    Typing,
    Unreadable,
    classify,
    read_typing,
)
from daemon.signing import NotifyKey

KEY = NotifyKey(bytes(range(32)))
OTHER = NotifyKey(bytes(range(1, 33)))  # a rotated key, or an attacker's
KEYS = Keys.of("pgbridge_capture_x", "pgbridge_typing_x", KEY)
CAPTURE, TYPING = KEYS.channel, KEYS.typing_channel


def signed(obj: object, key: NotifyKey = KEY) -> str:
    return key.sign(json.dumps(obj))


def typing(key: NotifyKey = KEY, **fields: object) -> str:
    return key.derive("typing").sign(json.dumps(fields))


def now_ms() -> int:
    return round(time.time() * 1000)


def test_a_signed_event_is_a_change_carrying_its_frame() -> None:
    text = json.dumps({"type": "event", "room": "R", "seq": 3, "table": "channel_members",
                       "op": "INSERT", "data": {"user_id": "U"}})
    note = classify(CAPTURE, KEY.sign(text), KEYS)
    assert isinstance(note, Change) and isinstance(note.event, Event)
    assert (note.event.room, note.event.seq, note.event.joins) == ("R", 3, "U")
    assert note.event.frame == text.encode()  # the frame is the signed text, not the payload


def test_a_signed_pointer_is_a_change_to_read_from_the_log() -> None:
    assert classify(CAPTURE, signed({"room": "R", "seq": 9}), KEYS) == Change(Pointer("R", 9))


def test_signed_hints_name_their_user() -> None:
    assert classify(CAPTURE, signed({"access": "user", "user": "u1"}), KEYS) == UserHint("u1")
    assert classify(CAPTURE, signed({"presence": "user", "user": "u2"}),
                    KEYS) == PresenceHint("u2")


@pytest.mark.parametrize("obj", [{"access": "room", "user": "u1"},
                                 {"access": "user", "user": "bad id"},
                                 {"presence": "user"},
                                 {"presence": "everyone", "user": "u1"}])
def test_signed_hints_of_an_unknown_kind_or_bad_user_are_ignored(obj: object) -> None:
    assert isinstance(classify(CAPTURE, signed(obj), KEYS), Ignored)


def test_a_signed_probe_is_ignored_not_matched() -> None:
    assert isinstance(classify(CAPTURE, KEY.sign(' {"probe": "t"}'), KEYS), Ignored)


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"room": "R"}', '{"seq": 1}',
                                  '{"room": 1, "seq": 1}', "[" * 300 + "]" * 300])
def test_signed_text_without_meaning_here_is_unreadable(text: str) -> None:
    """Bad JSON, another shape, nesting too deep: whatever it announced is in the log."""
    assert classify(CAPTURE, KEY.sign(text), KEYS) == Unreadable()


def test_probes_and_doorbell_hints_are_recognised_unsigned_by_their_start() -> None:
    probe = json.dumps({"probe": "0123abcd"})
    assert classify(CAPTURE, probe, KEYS) == ProbeEcho(probe)
    assert classify(CAPTURE, '{"doorbell":"quiet"}', KEYS) == DoorbellHint()
    # even while shedding: they cost a comparison, not a signature check
    assert classify(CAPTURE, probe, KEYS, shedding=True) == ProbeEcho(probe)
    assert classify(CAPTURE, '{"doorbell":"quiet"}', KEYS, shedding=True) == DoorbellHint()


@pytest.mark.parametrize("payload", [
    json.dumps({"type": "event", "room": "R", "seq": 1}),  # unsigned
    signed({"room": "R", "seq": 1}, OTHER),  # another key (rotated, or an attacker's)
    "0" * 64 + '{"room": "R", "seq": 1}',  # a signature of the right shape, wrong
    signed({"room": "R", "seq": 1})[:64],  # the signature alone
    "",
    typing(room="r", user="u", at=now_ms()),  # signed for the typing channel
])
def test_a_capture_payload_failing_its_signature_is_forged(payload: str) -> None:
    assert classify(CAPTURE, payload, KEYS) == Forged("capture", len(payload))


def test_while_shedding_nothing_is_checked() -> None:
    assert classify(CAPTURE, signed({"room": "R", "seq": 1}), KEYS, shedding=True) == Shed()
    assert classify(CAPTURE, "forged", KEYS, shedding=True) == Shed()
    assert classify(TYPING, typing(room="r", user="u", at=now_ms()), KEYS,
                    shedding=True) == Shed()


def test_a_signed_typing_signal_is_a_typing_note() -> None:
    at = now_ms()
    assert classify(TYPING, typing(room="r", user="u", at=at), KEYS) == Typing("r", "u", at)
    # its freshness is the receiver's call (it needs a clock): an old one is still a note
    assert classify(TYPING, typing(room="r", user="u", at=1), KEYS) == Typing("r", "u", 1)


@pytest.mark.parametrize("payload", [
    typing(OTHER, room="r", user="u", at=1),  # another key
    signed({"room": "r", "user": "u", "at": 1}),  # signed with the capture key itself
    json.dumps({"room": "r", "user": "u", "at": 1}),  # unsigned
])
def test_a_typing_payload_failing_its_signature_is_forged(payload: str) -> None:
    assert classify(TYPING, payload, KEYS) == Forged("typing", len(payload))


@pytest.mark.parametrize("fields", [{"room": "r", "user": "u", "at": 10**400},
                                    {"room": "r", "user": "u", "at": -1},
                                    {"room": "r", "user": "u", "at": True},
                                    {"room": "r", "user": "u", "at": 1.5},
                                    {"room": "r\u0000", "user": "u", "at": 1},
                                    {"room": "r", "user": "\ud800", "at": 1},
                                    {"room": "r", "at": 1}])
def test_signed_typing_signals_that_make_no_sense_are_ignored(fields: dict[str, object]) -> None:
    assert isinstance(classify(TYPING, typing(**fields), KEYS), Ignored)


@pytest.mark.parametrize("text", ["not json", "[1]", '{"room": {"nested": 1}}', '"r"'])
def test_signed_typing_text_that_is_not_a_flat_object_is_ignored(text: str) -> None:
    assert isinstance(read_typing(KEY.derive("typing"), KEY.derive("typing").sign(text)),
                      Ignored)


def test_an_overheard_channel_is_ignored_whatever_it_carries() -> None:
    """Only the two channels LISTENed to carry notes: a valid payload elsewhere means nothing."""
    for payload in (signed({"room": "R", "seq": 1}), json.dumps({"probe": "x"}), "forged"):
        assert classify("pgbridge", payload, KEYS) == Ignored("channel")


def test_a_rotated_key_brings_its_own_channels() -> None:
    rotated = Keys.of("capture_2", "typing_2", OTHER)
    payload = signed({"room": "R", "seq": 1}, OTHER)
    assert classify("capture_2", payload, rotated) == Change(Pointer("R", 1))
    assert classify(CAPTURE, payload, rotated) == Ignored("channel")
    assert classify(CAPTURE, payload, KEYS) == Forged("capture", len(payload))


def test_the_secret_channel_names_and_keys_stay_out_of_the_repr() -> None:
    keys = Keys.of("c_4f9a1e", "t_77b2c0", NotifyKey(bytes(range(32))))
    assert not any(secret in repr(keys) for secret in ("c_4f9a1e", "t_77b2c0", "000102"))
