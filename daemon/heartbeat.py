"""WebSocket keepalive for every connection from one task (``PGBRIDGE_HEARTBEAT``).

websockets' own keepalive is a task per connection, sleeping between pings: 1.7 KB of an idle
connection's 13.5 and a task to create per handshake (docs/topics/fan-out-cost.md). Here the
connections are spread over :data:`SLICES` slices, and one task pings a slice every
``interval / SLICES`` seconds, so each connection gets a ping every ``interval`` seconds and the
pings of 10,000 connections are 20 small bursts per interval, not one large one. A connection
whose previous ping got no pong by its next turn (one interval later, what websockets'
``ping_timeout`` set to the interval did) is closed with 1011, "keepalive ping timeout". A
connection whose write buffer is backed up is pinged too: only a pong shows that its client
still reads (its own send timeout acts only on frames its client queued, not on pongs).
"""

from __future__ import annotations

import asyncio
import logging

from .closes import Close
from .connection import Connection

log = logging.getLogger(__name__)

__all__ = ["SLICES", "Heartbeat"]

SLICES = 20


class Heartbeat:
    """Pings every connection :meth:`add`-ed once per ``interval`` seconds (:meth:`run`)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._slices: list[set[Connection]] = [set() for _ in range(SLICES)]
        self._slice_of: dict[Connection, int] = {}
        self._next = 0
        self.beats = 0  # slices pinged so far: a full round is SLICES beats

    def add(self, conn: Connection) -> None:
        """Ping ``conn`` from now on (its first ping within ``interval`` seconds)."""
        index = self._next
        self._next = (index + 1) % SLICES
        self._slice_of[conn] = index
        self._slices[index].add(conn)

    def remove(self, conn: Connection) -> None:
        index = self._slice_of.pop(conn, None)
        if index is not None:
            self._slices[index].discard(conn)

    async def run(self) -> None:
        """Forever: ping one slice, then wait ``interval / SLICES`` seconds."""
        turn = 0
        while True:
            self._beat(self._slices[turn])
            self.beats += 1
            turn = (turn + 1) % SLICES
            await asyncio.sleep(self.interval / SLICES)

    def _beat(self, conns: set[Connection]) -> None:
        for conn in list(conns):
            if not conn.open:
                continue  # closing: its close has its own timeout
            if conn.awaiting_pong:
                self.remove(conn)
                log.info("client %s answered no ping for %g s; closing it with 1011",
                         conn.id, self.interval,
                         extra={"event": "keepalive_timeout",
                                "correlation_id": conn.correlation_id})
                # at once, without waiting for the peer's close frame: what websockets' own
                # keepalive does on a ping timeout
                conn.fail(Close.INTERNAL, "keepalive ping timeout")
            else:  # a backed-up one too: only a pong shows that its client still reads
                conn.ping()
