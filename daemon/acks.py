"""Acknowledgements: coalesced in memory, written to ``sync_state`` in batches.

A crash loses at most the acks of the last interval (``PGBRIDGE_ACK_FLUSH_INTERVAL``); that
only means a few events are sent again, which clients de-duplicate by seq.

What is written is what the bridge delivered: a client's ack past its subscription's cursor is
refused before it reaches the buffer (``bad_request``), and the rows written are the bridge's
alone (the application role may not write them: ``sql/triggers/50_resume_state.sql``). A stored
seq past the room's head, which no bridge wrote, is replaced by the next ack
(:meth:`daemon.store.Store.save_acks`), not kept as the greater.
"""

from __future__ import annotations

import logging

from .errors import BridgeError
from .metrics import Metrics
from .periodic import every
from .store import Store

log = logging.getLogger(__name__)


class AckBuffer:
    """Highest acked seq per ``(user, room)`` since the last :meth:`take`. Pure."""

    def __init__(self) -> None:
        self._acks: dict[tuple[str, str], int] = {}

    def __len__(self) -> int:
        return len(self._acks)

    def record(self, user: str, room: str, seq: int) -> None:
        key = (user, room)
        if seq > self._acks.get(key, -1):
            self._acks[key] = seq

    def take(self) -> list[tuple[str, str, int]]:
        acks, self._acks = self._acks, {}
        return [(user, room, seq) for (user, room), seq in acks.items()]

    def put_back(self, acks: list[tuple[str, str, int]]) -> None:
        for user, room, seq in acks:
            self.record(user, room, seq)


class AckWriter:
    """Flushes an :class:`AckBuffer` to the database every ``interval`` seconds."""

    def __init__(self, buffer: AckBuffer, store: Store, metrics: Metrics, *,
                 interval: float) -> None:
        self.buffer = buffer
        self.store = store
        self.metrics = metrics
        self.interval = interval

    async def flush(self) -> None:
        """Write what is buffered; on failure keep it for the next flush and re-raise."""
        acks = self.buffer.take()
        if not acks:
            return
        try:
            await self.store.save_acks(acks)
        except BaseException:
            self.buffer.put_back(acks)
            raise
        self.metrics.acks_saved.inc(len(acks))

    async def run(self) -> None:
        def failed(exc: BridgeError) -> None:
            log.warning("could not save acknowledgements (%s); retrying", exc,
                        extra={"event": "ack_flush_failed"})

        await every(self.interval, self.flush, failed=failed)
