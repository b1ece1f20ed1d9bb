"""Sequencing: which events of a room the listener publishes, in which order, and when it must
read the log instead (docs/design.md, "The event log is the truth; NOTIFY is the doorbell").

Pure, like :mod:`daemon.hub`: the listener (:mod:`daemon.listener`) does the reading and calls
these to decide. A room's cursor is the last seq published in it (:meth:`daemon.hub.Hub.last`);
seqs are 1, 2, 3, ... per room with no hole (sql/triggers/10_change_capture.sql), so:

* a signed NOTIFY with seq = cursor + 1 that carries its frame is published as is; one at or
  below the cursor was published already; anything else (a later seq: NOTIFYs were lost or the
  doorbell was quiet; or a pointer to an event too large for NOTIFY) reads the log
  (:func:`on_notify`);
* a page read from the log after the cursor is published in order (:func:`take_page`). A seq
  missing between two events, or before the first, is a **hole**: the log lost it for good
  (deleted by hand, or pruned while the bridge was behind). Subscriptions that still needed it
  end with ``cursor_expired`` (PROTOCOL.md, "Ordering and delivery guarantees"); never a silent
  gap. Events announced by a NOTIFY but not in the log leave the cursor where the log ends:
  nothing moves a cursor past what the log holds;
* a catch-up (after the listener reconnected, a failed read, a rotated key) and a poll (while
  writers do not ring: :mod:`daemon.doorbell`) read every tracked room to the end of its log in
  as few queries as possible (:class:`Pass`): up to :data:`ROOMS_PER_READ` rooms per query,
  each with a page of :func:`page_size` events; a room whose page came back full is read again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from .events import Event, Pointer

__all__ = ["READ_PAGE", "ROOMS_PER_READ", "Arrival", "Hole", "Page", "Pass", "Read",
           "classify", "on_notify", "page_size", "take_page"]

# Most events read for one room in one query, and most rows one query of many rooms returns.
READ_PAGE = 500
READ_ROWS = 2000
# Most rooms read by one query; a page of at least MIN_PAGE events each.
ROOMS_PER_READ = 500
MIN_PAGE = 16


class Arrival(Enum):
    DUPLICATE = "duplicate"  # already published
    NEXT = "next"  # exactly cursor + 1
    GAP = "gap"  # later than next: read the missing range from the log first


def classify(last: int, seq: int) -> Arrival:
    """Compare an arriving ``seq`` with the ``last`` seq published in its room."""
    if seq <= last:
        return Arrival.DUPLICATE
    return Arrival.NEXT if seq == last + 1 else Arrival.GAP


@dataclass(frozen=True, slots=True)
class Read:
    """Read ``room``'s log after ``after``, up to ``upto`` included."""

    room: str
    after: int
    upto: int


def on_notify(last: int, note: Event | Pointer) -> Event | Read | None:
    """What to do with a signed NOTIFY of a tracked room whose cursor is ``last``: publish the
    event, read the log, or nothing (``None``: published already)."""
    arrival = classify(last, note.seq)
    if arrival is Arrival.DUPLICATE:
        return None
    if arrival is Arrival.NEXT and isinstance(note, Event):
        return note
    return Read(note.room, last, note.seq)


@dataclass(frozen=True, slots=True)
class Hole:
    """Seqs ``first`` to ``last`` of ``room`` are not in the log and never will be."""

    room: str
    first: int
    last: int


@dataclass(slots=True)
class Page:
    """What one page read from the log means. ``steps``: events to publish and holes to
    report, in seq order; ``cursor``: the room's cursor after them; ``more``: the page was
    full, read again after ``cursor``; ``missing``: seqs announced (``upto``) that the log does
    not hold (the cursor stays where the log ends)."""

    steps: list[Event | Hole] = field(default_factory=list)
    cursor: int = 0
    more: bool = False
    missing: Hole | None = None


def take_page(room: str, last: int, events: Sequence[Event], *, limit: int,
              upto: int | None = None) -> Page:
    """Decide about ``events``, a page of at most ``limit`` events of ``room`` with seq above
    ``last`` (the cursor when the read was made), in seq order, read up to ``upto`` (``None``:
    to the end of the log)."""
    page = Page(cursor=last)
    for event in events:
        if event.seq <= page.cursor:  # published meanwhile (cannot happen from one read)
            continue
        if event.seq > page.cursor + 1:
            page.steps.append(Hole(room, page.cursor + 1, event.seq - 1))
        page.steps.append(event)
        page.cursor = event.seq
    reached = upto is not None and page.cursor >= upto
    # (a full page that moved nothing, which one read after ``last`` cannot give, is not read
    # again: that would loop)
    page.more = len(events) >= limit and not reached and page.cursor > last
    if not page.more and upto is not None and not reached:
        page.missing = Hole(room, page.cursor + 1, upto)
    return page


def page_size(rooms: int) -> int:
    """Events per room when one query reads ``rooms`` rooms: at most :data:`READ_PAGE`, and
    about :data:`READ_ROWS` rows in all (at least :data:`MIN_PAGE` each)."""
    return max(MIN_PAGE, min(READ_PAGE, READ_ROWS // max(1, rooms)))


class Pass:
    """One read of ``rooms`` to the end of their logs: :meth:`batch` gives the rooms of the
    next query; :meth:`again` puts back a room whose page was full."""

    def __init__(self, rooms: Iterable[str]) -> None:
        self._pending: deque[str] = deque(rooms)

    def __len__(self) -> int:
        """Rooms not read to the end yet (those of the current batch included until they are
        put back or dropped)."""
        return len(self._pending)

    def batch(self) -> list[str]:
        """The rooms of the next query (empty: the pass is over); they leave the pass."""
        n = min(ROOMS_PER_READ, len(self._pending))
        return [self._pending.popleft() for _ in range(n)]

    def again(self, room: str) -> None:
        self._pending.append(room)
