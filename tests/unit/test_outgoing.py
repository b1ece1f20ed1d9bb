"""The outgoing side of a connection (daemon/outgoing.py), driven without a socket: a
:class:`Peer` stands for the connection and its transport (what the kernel would take, and
whether the client reads), the queue under test, the flusher and the metrics are the real
ones."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from daemon.closes import Close
from daemon.metrics import Metrics
from daemon.outbox import Flusher
from daemon.outgoing import OutgoingQueue
from tests.support.doubles import parse_wire

HIGH = 1000  # bytes: the peer's write buffer high-water mark


class _Transport(asyncio.WriteTransport):
    """The part of an asyncio transport the queue reads: its write buffer and limits."""

    def __init__(self) -> None:
        super().__init__()
        self.buffered = 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return HIGH // 4, HIGH

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default  # no socket


class Peer:
    """A connection whose client reads only when told (:meth:`read`): what was written stays
    in the transport's buffer until then, and :meth:`drain` waits for it, as
    :meth:`daemon.connection.Connection.drain` does above the high-water mark."""

    id = 1
    correlation_id = "00000000000000c1"

    def __init__(self) -> None:
        self.transport = _Transport()
        self.writes: list[bytes] = []
        self.closed: tuple[Close, str, bool] | None = None
        self._read = asyncio.Event()
        self.ended = asyncio.Event()  # set by close() or fail()

    @property
    def open(self) -> bool:
        return self.closed is None

    def write(self, data: bytes) -> None:
        if self.open:
            self.writes.append(data)
            self.transport.buffered += len(data)

    async def drain(self) -> None:
        while self.transport.buffered >= HIGH and self.open:
            self._read.clear()
            await self._read.wait()

    def read(self) -> None:
        self.transport.buffered = 0
        self._read.set()

    def close(self, code: Close, reason: str = "") -> None:
        self.closed = (code, reason, False)
        self.ended.set()

    def fail(self, code: Close, reason: str = "") -> None:
        self.closed = (code, reason, True)
        self.ended.set()

    def crashed(self, doing: str) -> None:
        raise AssertionError(f"crashed {doing}")

    def messages(self) -> list[list[bytes]]:
        """What the client received: the frames of each message, in order."""
        return [parse_wire(data).data.split(b"\n") for data in self.writes]


class Owner:
    """Counts the ``on_close`` calls (the client leaving its rooms)."""

    def __init__(self) -> None:
        self.left = 0

    def leave_rooms(self) -> None:
        self.left += 1


def make(peer: Peer, owner: Owner, metrics: Metrics, *, size: int = 10,
         batch_ms: int | None = None, send_timeout: float = 5.0) -> OutgoingQueue:
    return OutgoingQueue(peer, user="u1", size=size, page=max(1, size // 2),
                         send_timeout=send_timeout, send_buffer=4096, batch_ms=batch_ms,
                         flusher=Flusher(), metrics=metrics, on_close=owner.leave_rooms)


def frame(i: int) -> bytes:
    return b'{"seq":%d}' % i


def slow_closes(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("pgbridge_slow_client_closes_total")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_frame_leaves_at_once_while_the_client_keeps_up() -> None:
    peer, metrics = Peer(), Metrics()
    queue = make(peer, Owner(), metrics)
    queue.send(frame(1))
    queue.send(frame(2))
    assert peer.messages() == [[frame(1)], [frame(2)]]  # written in the call, one per message
    assert queue._writer is None  # no task for a client that keeps up


async def test_frames_wait_behind_a_full_buffer_and_leave_in_order_once_read() -> None:
    peer, metrics = Peer(), Metrics()
    queue = make(peer, Owner(), metrics)
    peer.transport.buffered = HIGH  # the client stopped reading
    for i in range(1, 6):
        queue.send(frame(i))
    await settle()
    assert peer.messages() == [[frame(1)]]  # the writer wrote one and waits for room
    peer.read()
    await settle()
    assert [m for [m] in peer.messages()] == [frame(i) for i in range(1, 6)]
    assert queue._writer is None and peer.closed is None


async def test_a_full_queue_closes_the_client_with_4008_once() -> None:
    peer, owner, metrics = Peer(), Owner(), Metrics()
    queue = make(peer, owner, metrics, size=3)
    peer.transport.buffered = HIGH
    for i in range(1, 10):
        queue.send(frame(i))
    await settle()
    assert peer.closed == (Close.TOO_SLOW, "too slow: outgoing queue overflowed", False)
    assert owner.left == 1 and slow_closes(metrics) == 1
    assert queue.closing


async def test_a_socket_that_accepts_nothing_closes_the_client_after_the_send_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="daemon.outgoing")
    peer, owner, metrics = Peer(), Owner(), Metrics()
    queue = make(peer, owner, metrics, send_timeout=0.05)
    peer.transport.buffered = HIGH
    queue.send(frame(1))
    queue.send(frame(2))
    async with asyncio.timeout(2):
        await peer.ended.wait()
    assert peer.closed is not None and peer.closed[0] is Close.TOO_SLOW
    assert slow_closes(metrics) == 1
    [why] = [r.getMessage() for r in caplog.records
             if getattr(r, "event", None) == "slow_client"]
    assert "accepted nothing for 0.05 s" in why


async def test_a_burst_leaves_in_two_messages_with_batch_0() -> None:
    peer, metrics = Peer(), Metrics()
    queue = make(peer, Owner(), metrics, batch_ms=0)
    for i in range(1, 5):
        queue.send(frame(i))
    assert peer.messages() == [[frame(1)]]  # the first at once, the rest at the turn's end
    await settle()
    assert peer.messages() == [[frame(1)], [frame(2), frame(3), frame(4)]]


async def test_a_replay_waits_for_room_in_the_queue() -> None:
    peer, metrics = Peer(), Metrics()
    queue = make(peer, Owner(), metrics, size=4)
    peer.transport.buffered = HIGH
    for i in range(1, 5):
        queue.send(frame(i))
    waiting = asyncio.create_task(queue.room_for(2))
    await settle()
    assert not waiting.done()
    peer.read()
    async with asyncio.timeout(2):
        await waiting
    assert peer.closed is None


async def test_a_close_stops_sending_and_wakes_a_replay_waiting_for_room() -> None:
    peer, owner, metrics = Peer(), Owner(), Metrics()
    queue = make(peer, owner, metrics, size=4)
    peer.transport.buffered = HIGH
    for i in range(1, 5):
        queue.send(frame(i))
    waiting = asyncio.create_task(queue.room_for(2))
    await settle()
    queue.close(Close.POLICY, "rate limit exceeded repeatedly", fail=True)
    async with asyncio.timeout(2):
        await waiting
    assert peer.closed == (Close.POLICY, "rate limit exceeded repeatedly", True)
    assert owner.left == 1 and slow_closes(metrics) == 0
    queue.send(frame(5))
    assert len(peer.writes) == 1


async def test_a_lost_connection_lets_go_of_its_owner() -> None:
    peer, owner, metrics = Peer(), Owner(), Metrics()
    queue = make(peer, owner, metrics)
    queue.lost()
    queue.close(Close.GOING_AWAY, "late")
    assert owner.left == 0  # the owner is no longer referenced: freed without the collector
