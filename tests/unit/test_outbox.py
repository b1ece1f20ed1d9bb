"""The outbox's pure parts: wire frames encoded once, and frames joined into messages."""

from __future__ import annotations

import json
from collections import deque

from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Opcode

from daemon.outbox import BATCH_BYTES, joined, take_frames, wire_message
from daemon.protocol import error, pong, welcome
from tests.support.doubles import parse_wire


@given(st.lists(st.binary(max_size=70_000), min_size=1, max_size=3))
def test_a_wire_message_is_the_text_frame_a_client_reads_back(frames: list[bytes]) -> None:
    frame = parse_wire(wire_message(frames))
    assert frame.opcode is Opcode.TEXT and frame.fin and frame.data == b"\n".join(frames)
    assert joined(frames) == frame.data


def test_the_same_frames_are_encoded_once_and_others_anew() -> None:
    first, second = b'{"type":"event","seq":1}', '{"type":"event","seq":2}'
    wire = wire_message((first,))
    assert wire_message([first]) is wire  # the fan-out's next subscriber: no new bytes
    assert parse_wire(wire_message((second,))).data == second.encode()
    both = wire_message([first, second])
    assert wire_message((first, second)) is both
    assert parse_wire(wire_message([first])).data == first
    # equal bytes but another object: encoded anew, never mistaken for the last frames
    assert parse_wire(wire_message([bytes(bytearray(first)) + b" "])).data == first + b" "


def test_a_message_takes_what_fits_and_at_least_one_frame() -> None:
    queue: deque[bytes | str] = deque([b"a" * 40, "b" * 40, b"c" * 40])
    assert take_frames(queue, limit=81) == [b"a" * 40, "b" * 40]
    assert take_frames(queue, limit=10) == [b"c" * 40]  # alone, larger than the limit
    assert not queue


@given(st.lists(st.text(max_size=3000), min_size=1, max_size=60))
def test_frames_come_back_whole_and_in_order_from_their_messages(texts: list[str]) -> None:
    frames = [error("bad_request", text, ref=text[:10]) for text in texts]
    queue: deque[bytes | str] = deque(frames)
    back: list[str] = []
    while queue:
        taken = take_frames(queue)
        message = parse_wire(wire_message(taken)).data
        assert len(message) <= BATCH_BYTES or len(taken) == 1
        parts = message.decode().split("\n")
        assert len(parts) == len(taken)
        back.extend(parts)
    assert back == frames
    assert [json.loads(part)["message"] for part in back] == texts


def test_the_daemons_own_frames_hold_no_raw_newline() -> None:
    for frame in (welcome("u\n", 20.0, batch=5), pong("r\n\u2028"),
                  error("bad_request", "line\nbreak", ref="\r\n", room="x\n")):
        assert "\n" not in frame and "\r" not in frame
