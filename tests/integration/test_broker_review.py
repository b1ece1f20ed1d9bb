"""A second review of the broker mode (issue 29, docs/topics/broker.md), on the code as fixed
after the first attacks (tests/integration/test_broker_attacks.py).

Real parts only: nats-servers of this file's own on free ports (never the machine's 4222), a
fresh database per test, real instances (``python -m daemon`` subprocesses, or
:class:`daemon.app.Bridge` in this process where the test must see an instance's state), and an
attacker that is a plain ``nats-py`` client of the same server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest
from nats.aio.msg import Msg

from daemon.schema import apply_schema
from tests.integration.test_broker_attacks import (
    _nats_server_path,
    await_state,
    broker_url,
    instance,
)
from tests.support.procs import free_port, until

__all__ = ["broker_url"]  # the fixture, shared with the first attacks

Conn = psycopg.AsyncConnection[Any]


class NatsServer:
    """A nats-server on ``port`` that can be stopped and started again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        assert self.port != 4222
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[bytes] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            _nats_server_path(), "-a", "127.0.0.1", "-p", str(self.port),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        assert self.proc.stderr is not None
        async with asyncio.timeout(20):
            async for line in self.proc.stderr:
                if b"Server is ready" in line:
                    break
            else:
                pytest.fail("nats-server exited before it was ready")
        self._drain = asyncio.create_task(self.proc.stderr.read())

    async def stop(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@contextlib.asynccontextmanager
async def nats_server() -> AsyncIterator[NatsServer]:
    server = NatsServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# --- a flood of junk on one subject ---------------------------------------------------------

async def test_a_flood_of_junk_on_the_signal_subject_does_not_depose_a_live_leader(
        fresh_db: str, broker_url: str, tmp_path: Path) -> None:
    """Anyone on the NATS server may publish on ``<prefix>.signal``, which every instance
    hears. Past 50 failed checks in 0.25 s an instance drops *every* broker message unchecked
    until the window ends (docs/topics/broker.md, "Trust"): its leader's heartbeats included.
    A steady flood of junk (about 2,000 messages a second, each failing its check) then hides
    the heartbeats of a leader that beats all along, and the follower falls back and reads the
    log itself: an attacker moves the load the broker saves back onto the database. The
    follower must keep following while its leader beats."""
    await apply_schema(fresh_db, schema="public")
    spy = await nats.connect(broker_url)
    beats: list[str] = []  # the subjects of the heartbeats heard

    async def beat(msg: Msg) -> None:
        beats.append(msg.subject)

    await spy.subscribe("pgbridge.*.leader", cb=beat)
    try:
        pa, pb = free_port(), free_port()
        async with instance(fresh_db, pa, tmp_path, broker_url), \
                instance(fresh_db, pb, tmp_path, broker_url) as follower:
            await await_state(pa, "leader")
            await await_state(pb, "follower")
            signal = beats[-1].rpartition(".")[0] + ".signal"

            async def flood() -> None:
                while True:
                    for _ in range(100):
                        await spy.publish(signal, b"f" * 64 + b'{"junk":1}')
                    await spy.flush()
                    await asyncio.sleep(0.05)

            flooding = asyncio.create_task(flood())
            try:
                start, fell = len(beats), follower.count("broker_fallback")

                async def fell_or_held() -> bool:  # 40 heartbeats: 10 s of a live leader
                    return follower.count("broker_fallback") > fell or len(beats) - start >= 40

                await until(fell_or_held, "a fallback or 40 heartbeats", timeout=60)
            finally:
                flooding.cancel()
            why = [r.get("reason") for r in follower.with_event("broker_fallback")][fell:]
            assert not why, f"the follower fell back while its leader beat: {why}"
    finally:
        await spy.close()
