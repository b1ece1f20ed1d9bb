"""WebSocket keepalive for every connection from one task (``PGBRIDGE_HEARTBEAT``).

websockets' own keepalive is a task per connection, sleeping between pings: 1.7 KB of an idle
connection's 13.5 and a task to create per handshake (README, "Fan-out cost"). Here the
connections are spread over :data:`SLICES` slices, and one task pings a slice every
``interval / SLICES`` seconds, so each connection gets a ping every ``interval`` seconds and the
pings of 10,000 connections are 20 small bursts per interval, not one large one. A connection
whose previous ping got no pong by its next turn (one interval later, what websockets'
``ping_timeout`` set to the interval did) is closed with 1011, "keepalive ping timeout".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

log = logging.getLogger(__name__)

__all__ = ["SLICES", "Heartbeat"]

SLICES = 20
CLOSE_INTERNAL = 1011


def _retrieve(pong: asyncio.Future[float]) -> None:
    """A pong that will never come fails with ConnectionClosed: nobody awaits it."""
    if not pong.cancelled():
        pong.exception()


class Heartbeat:
    """Pings every connection :meth:`add`-ed once per ``interval`` seconds (:meth:`run`)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._slices: list[dict[ServerConnection, asyncio.Future[float] | None]] = [
            {} for _ in range(SLICES)]
        self._slice_of: dict[ServerConnection, int] = {}
        self._next = 0
        self._failing: set[asyncio.Task[None]] = set()

    def add(self, ws: ServerConnection) -> None:
        """Ping ``ws`` from now on (its first ping within ``interval`` seconds)."""
        index = self._next
        self._next = (index + 1) % SLICES
        self._slice_of[ws] = index
        self._slices[index][ws] = None

    def remove(self, ws: ServerConnection) -> None:
        index = self._slice_of.pop(ws, None)
        if index is not None:
            self._slices[index].pop(ws, None)

    async def run(self) -> None:
        """Forever: ping one slice, then wait ``interval / SLICES`` seconds."""
        turn = 0
        while True:
            await self._beat(self._slices[turn])
            turn = (turn + 1) % SLICES
            await asyncio.sleep(self.interval / SLICES)

    async def _beat(self, pongs: dict[ServerConnection, asyncio.Future[float] | None]) -> None:
        for ws, pong in list(pongs.items()):
            transport = ws.transport
            if ws not in pongs or ws.protocol.state is not State.OPEN:
                continue  # removed meanwhile, or closing (a ping would wait for the close)
            if pong is not None and not pong.done():
                self.remove(ws)
                self._fail(ws)
                continue
            if transport.get_write_buffer_size() >= transport.get_write_buffer_limits()[1]:
                continue  # behind: a ping would wait for its socket (the send timeout acts)
            try:
                pong = asyncio.ensure_future(await ws.ping())
            except ConnectionClosed:
                continue
            pong.add_done_callback(_retrieve)
            if ws in pongs:
                pongs[ws] = pong

    def _fail(self, ws: ServerConnection) -> None:
        log.info("client %s answered no ping for %g s; closing it with 1011", ws.id,
                 self.interval, extra={"event": "keepalive_timeout"})
        task = asyncio.create_task(_fail(ws), name=f"keepalive-timeout-{ws.id}")
        self._failing.add(task)
        task.add_done_callback(self._failing.discard)


async def _fail(ws: ServerConnection) -> None:
    """Close ``ws`` with 1011 at once, without waiting for the peer's close frame: what
    websockets' own keepalive does on a ping timeout."""
    with contextlib.suppress(ConnectionClosed):
        async with ws.send_context():
            ws.protocol.fail(CLOSE_INTERNAL, "keepalive ping timeout")
