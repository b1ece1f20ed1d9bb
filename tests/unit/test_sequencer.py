"""Unit tests of :mod:`daemon.sequencer`, no I/O: what a signed NOTIFY makes the listener do
(publish, read the log, nothing), what a page read from the log means (events in order, holes,
read again, announced but missing), and how a pass over many rooms is cut into queries."""

from __future__ import annotations

import pytest

from daemon.events import Event, Pointer
from daemon.sequencer import (
    MIN_PAGE,
    READ_PAGE,
    READ_ROWS,
    ROOMS_PER_READ,
    Arrival,
    Hole,
    Pass,
    Read,
    classify,
    on_notify,
    page_size,
    take_page,
)


def ev(seq: int, room: str = "R") -> Event:
    return Event(room=room, seq=seq, frame=b'{"seq":%d}' % seq)


@pytest.mark.parametrize(("last", "seq", "arrival"), [
    (5, 5, Arrival.DUPLICATE), (5, 3, Arrival.DUPLICATE), (5, 6, Arrival.NEXT),
    (5, 9, Arrival.GAP), (0, 1, Arrival.NEXT)])
def test_classify(last: int, seq: int, arrival: Arrival) -> None:
    assert classify(last, seq) is arrival


def test_the_next_event_of_a_notify_is_published_as_is() -> None:
    event = ev(6)
    assert on_notify(5, event) is event


def test_a_notify_already_published_does_nothing() -> None:
    assert on_notify(5, ev(5)) is None
    assert on_notify(5, Pointer("R", 2)) is None


def test_a_notify_past_a_gap_reads_the_missing_range_and_itself() -> None:
    assert on_notify(5, ev(9)) == Read("R", 5, 9)


def test_a_pointer_reads_even_the_next_seq() -> None:
    # too large for NOTIFY: the frame is in the log only
    assert on_notify(5, Pointer("R", 6)) == Read("R", 5, 6)


def test_a_contiguous_page_is_published_in_order() -> None:
    page = take_page("R", 5, [ev(6), ev(7), ev(8)], limit=10)
    assert page.steps == [ev(6), ev(7), ev(8)]
    assert page.cursor == 8
    assert not page.more and page.missing is None


def test_an_empty_page_changes_nothing() -> None:
    page = take_page("R", 5, [], limit=10)
    assert page.steps == [] and page.cursor == 5 and not page.more and page.missing is None


def test_a_full_page_is_read_again_after_its_last_event() -> None:
    page = take_page("R", 0, [ev(1), ev(2)], limit=2)
    assert page.more and page.cursor == 2


def test_a_full_page_that_reached_upto_is_not_read_again() -> None:
    page = take_page("R", 0, [ev(1), ev(2)], limit=2, upto=2)
    assert not page.more and page.missing is None


def test_a_seq_missing_before_the_first_event_is_a_hole() -> None:
    page = take_page("R", 5, [ev(8), ev(9)], limit=10)
    assert page.steps == [Hole("R", 6, 7), ev(8), ev(9)]
    assert page.cursor == 9


def test_a_seq_missing_between_two_events_is_a_hole_in_its_place() -> None:
    page = take_page("R", 0, [ev(1), ev(2), ev(5)], limit=10)
    assert page.steps == [ev(1), ev(2), Hole("R", 3, 4), ev(5)]


def test_events_at_or_below_the_cursor_are_skipped() -> None:
    page = take_page("R", 5, [ev(5), ev(6)], limit=10)
    assert page.steps == [ev(6)]


def test_a_full_page_that_moved_nothing_is_not_read_again() -> None:
    page = take_page("R", 5, [ev(4), ev(5)], limit=2)
    assert page.steps == [] and not page.more


def test_announced_events_the_log_does_not_hold_leave_the_cursor_where_the_log_ends() -> None:
    # a NOTIFY announced 9; the log ends at 7: nothing moves the cursor past what it holds
    page = take_page("R", 5, [ev(6), ev(7)], limit=10, upto=9)
    assert page.cursor == 7
    assert page.missing == Hole("R", 8, 9)
    assert not page.more


def test_a_short_page_below_upto_is_missing_not_more() -> None:
    page = take_page("R", 5, [], limit=10, upto=6)
    assert page.missing == Hole("R", 6, 6) and page.cursor == 5


def test_page_size_keeps_one_query_bounded() -> None:
    assert page_size(1) == READ_PAGE
    assert page_size(0) == READ_PAGE
    assert page_size(10) == READ_ROWS // 10
    assert page_size(ROOMS_PER_READ) == MIN_PAGE
    for rooms in range(1, ROOMS_PER_READ + 1):
        assert MIN_PAGE <= page_size(rooms) <= READ_PAGE
        assert rooms * page_size(rooms) <= max(READ_ROWS, rooms * MIN_PAGE)


def test_a_pass_reads_many_rooms_per_query_and_full_rooms_again() -> None:
    rooms = [f"R{i}" for i in range(ROOMS_PER_READ + 3)]
    work = Pass(rooms)
    assert len(work) == len(rooms)
    first = work.batch()
    assert first == rooms[:ROOMS_PER_READ]
    work.again("R0")  # its page was full
    second = work.batch()
    assert second == [*rooms[ROOMS_PER_READ:], "R0"]
    assert work.batch() == []
    assert len(work) == 0


def test_a_pass_over_no_room_is_over_at_once() -> None:
    assert Pass([]).batch() == []
