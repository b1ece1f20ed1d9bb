"""Unit tests of :mod:`daemon.protocol`, the WebSocket protocol's parsing, no I/O:
:func:`~daemon.protocol.parse_frame` (valid requests, only :class:`~daemon.protocol.ProtocolError`
for anything else, containers counted before decoding, and the presence flag of ``subscribe``
and the ``typing`` frame), :func:`~daemon.protocol.load_json`'s depth limit, and the
alphabets of :func:`~daemon.protocol.is_id` and :func:`~daemon.protocol.is_token`."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.protocol import (
    Ack,
    ProtocolError,
    Subscribe,
    Typing,
    is_id,
    is_token,
    load_json,
    parse_frame,
    welcome,
)


def test_parse_frame_accepts_valid_requests() -> None:
    assert parse_frame('{"type":"subscribe","room":"R","since":0,"ref":"a","extra":1}') == \
        Subscribe(room="R", since=0, ref="a")
    assert parse_frame('{"type":"ack","room":"R","seq":9}') == Ack(room="R", seq=9)


@given(st.text(max_size=200))
def test_parse_frame_never_raises_anything_but_protocol_error(text: str) -> None:
    try:
        parse_frame(text)
    except ProtocolError as exc:
        assert exc.code in ("bad_request", "unknown_type", "unauthorized")
        assert json.loads(exc.frame())["type"] == "error"


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=30),
       st.integers(1, 40))
def test_load_json_limits_depth_exactly(value: object, limit: int) -> None:
    text = json.dumps(value)

    def depth(v: object) -> int:
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        return 0 if children is None else 1 + max(map(depth, children), default=0)

    if depth(value) > limit:
        with pytest.raises(ValueError, match="nests deeper"):
            load_json(text, max_depth=limit)
    else:
        assert load_json(text, max_depth=limit) == value


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a":' * 3000 + "1" + "}" * 3000,
                                  "[" * 50_000])
def test_load_json_never_raises_recursion_error(text: str) -> None:
    with pytest.raises(ValueError) as refused:
        load_json(text)
    assert not isinstance(refused.value, RecursionError)


def test_frames_with_many_containers_are_refused_before_decoding() -> None:
    """A 64 KiB frame of shallow arrays (20,000 of them) used to cost 13 ms to check; the
    bracket count refuses it before the decoder runs."""
    with pytest.raises(ProtocolError, match="more than 256"):
        parse_frame("[" + "[[1]]," * 10_000 + "1]")
    assert parse_frame('{"type":"ping","ref":"' + "[" * 100 + '","x":[[1]]}') is not None


def test_ids_and_tokens_admit_only_their_alphabet() -> None:
    assert is_id("01JD3V6Z7W2Q4X8Y9A0B1C2D3E") and is_id("general-2_x") and is_id("R")
    for bad in ("", "A" * 27, "\ud800", "a\x00b", "a b", "é", "a/b", None, 7):
        assert not is_id(bad), bad
    assert is_token("eyJ.eyJ.sig-_=") and not is_token("a" * 4097)
    for bad in ("", "a b", "\udcff", "tok\x00", "a\nb"):
        assert not is_token(bad), bad


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


def test_welcome_names_the_connection_s_correlation_id() -> None:
    """PROTOCOL.md, "After the upgrade": ``correlation_id`` is added to welcome (a field more
    changes no meaning: clients ignore unknown fields); ``batch`` only when coalescing."""
    assert json.loads(welcome("u1", 20.0, correlation_id="00112233aabbccdd")) == {
        "type": "welcome", "user": "u1", "protocol": 1, "heartbeat": 20.0,
        "correlation_id": "00112233aabbccdd"}
    assert json.loads(welcome("u1", 0.5, batch=0, correlation_id="ffffffffffffffff")) == {
        "type": "welcome", "user": "u1", "protocol": 1, "heartbeat": 0.5, "batch": 0,
        "correlation_id": "ffffffffffffffff"}
