"""The outbox's pure parts: wire frames encoded once, and frames joined into messages."""

from __future__ import annotations

import json
from collections import deque

from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from daemon.outbox import BATCH_BYTES, take_message, text_frame, wire_frame
from daemon.protocol import error, pong, welcome


def parse_wire(data: bytes) -> Frame:
    """Read back one frame as a client does (unmasked from a server)."""
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        return frame
    raise AssertionError("incomplete frame")


@given(st.binary(max_size=70_000))
def test_a_wire_frame_is_the_text_frame_a_client_reads_back(payload: bytes) -> None:
    frame = parse_wire(wire_frame(payload))
    assert frame.opcode is Opcode.TEXT and frame.fin and frame.data == payload


def test_the_same_frame_is_encoded_once_and_another_anew() -> None:
    first = b'{"type":"event","seq":1}'
    wire = wire_frame(first)
    assert wire_frame(first) is wire  # the fan-out's next subscriber: no new bytes
    second = b'{"type":"event","seq":2}'
    assert parse_wire(wire_frame(second)).data == second
    assert parse_wire(text_frame(first)).data == first


def test_a_message_takes_what_fits_and_at_least_one_frame() -> None:
    queue: deque[bytes | str] = deque([b"a" * 40, "b" * 40, b"c" * 40])
    assert take_message(queue, limit=81) == (b"a" * 40 + b"\n" + b"b" * 40, 2)
    assert take_message(queue, limit=10) == (b"c" * 40, 1)  # alone, larger than the limit
    assert not queue


@given(st.lists(st.text(max_size=3000), min_size=1, max_size=60))
def test_frames_come_back_whole_and_in_order_from_their_messages(texts: list[str]) -> None:
    frames = [error("bad_request", text, ref=text[:10]) for text in texts]
    queue: deque[bytes | str] = deque(frames)
    back: list[str] = []
    while queue:
        message, count = take_message(queue)
        assert len(message) <= BATCH_BYTES or count == 1
        parts = message.decode().split("\n")
        assert len(parts) == count
        back.extend(parts)
    assert back == frames
    assert [json.loads(part)["message"] for part in back] == texts


def test_the_daemons_own_frames_hold_no_raw_newline() -> None:
    for frame in (welcome("u\n", 20.0, batch=5), pong("r\n\u2028"),
                  error("bad_request", "line\nbreak", ref="\r\n", room="x\n")):
        assert "\n" not in frame and "\r" not in frame
