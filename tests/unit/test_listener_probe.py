"""The listener's start-up proof that LISTEN delivers (:meth:`Listener._probe_forever`), driven
without a database: a store double sends each probe, and delivers its echo back to the listener
only when the test says so, as a LISTEN connection would or would not."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from daemon.listener import Listener
from daemon.metrics import Metrics


class EchoStore:
    """``notify`` delivers the probe's echo as ``delivering`` says (one bool a probe, the last
    one for every probe after); ``sent_four`` is set at the fourth probe."""

    def __init__(self, delivering: list[bool]) -> None:
        self.delivering = delivering
        self.listener: Listener | None = None
        self.sent = 0
        self.sent_four = asyncio.Event()

    async def notify(self, channel: str, payload: str) -> None:
        deliver = self.delivering[min(self.sent, len(self.delivering) - 1)]
        self.sent += 1
        if self.sent >= 4:
            self.sent_four.set()
        if deliver and self.listener is not None:
            future = self.listener._probes[payload]
            asyncio.get_running_loop().call_soon(future.set_result, None)


def listener_on(store: EchoStore) -> Listener:
    listener = Listener("", cast(Any, store), Metrics(), probe_interval=0.01,
                        probe_timeout=0.05)
    listener.connected = True  # the LISTEN connection is up (its reader is not run here)
    store.listener = listener
    return listener


async def test_one_echo_by_chance_does_not_prove_listen() -> None:
    # A transaction-mode pooler: the first echo arrives (the LISTEN statement held a server
    # connection an earlier session left LISTENing), then never again.
    store = EchoStore([True, False])
    listener = listener_on(store)
    probe = asyncio.create_task(listener._probe_forever())
    try:
        await asyncio.wait_for(store.sent_four.wait(), 5)  # the chance echo, then time-outs
        assert not listener.ready.is_set()
    finally:
        probe.cancel()


async def test_two_echoes_in_a_row_prove_listen() -> None:
    store = EchoStore([True])
    listener = listener_on(store)
    probe = asyncio.create_task(listener._probe_forever())
    try:
        await asyncio.wait_for(listener.ready.wait(), 5)
        assert store.sent == 2 and listener.probed_at is not None
    finally:
        probe.cancel()
