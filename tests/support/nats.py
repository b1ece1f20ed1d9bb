"""A NATS server of a test's own: Debian's ``nats-server`` binary (core NATS, no JetStream) as a
subprocess on 127.0.0.1 and a free port, which a test can SIGKILL, stop and start again on the
same port (so daemons configured with its URL find it again).

The machine's NATS (port 4222) is never used. Executable: ``nats-server`` on ``PATH`` or
``/usr/sbin/nats-server`` (Debian: ``apt-get install nats-server``; ``.ci/run`` installs it).
Without it a test skips, except under ``CI=true`` where it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.pgcluster import unavailable
from tests.support.procs import free_port

__all__ = ["NatsServer", "nats_server", "nats_server_path"]

MACHINE_PORT = 4222  # the machine's own NATS: never ours
READY = "Server is ready"  # nats-server's log line once it accepts clients
BIND_FAILED = "address already in use"


def nats_server_path() -> str:
    """The nats-server executable; skips the test (fails under CI) when there is none."""
    found = shutil.which("nats-server")
    if found:
        return found
    if shutil.which("nats-server", path="/usr/sbin"):
        return "/usr/sbin/nats-server"
    unavailable("nats-server not found on PATH nor at /usr/sbin/nats-server "
                "(Debian: apt-get install nats-server)")


class NatsServer:
    """``nats-server -a 127.0.0.1 -p PORT`` as a child process. ``port`` is chosen free at the
    first :meth:`start` (given: used as is, never 4222) and kept by every later start; ``url``
    is ``nats://127.0.0.1:PORT``. Its log (stderr) is in ``log``, and also appended to
    ``log_path`` when given. ``starts`` counts the starts that became ready."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        assert port != MACHINE_PORT, "port 4222 is the machine's NATS"
        self.executable = nats_server_path()
        self.port = port
        self.log_path = log_path
        self.log: list[str] = []
        self.starts = 0
        self.proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    @property
    def url(self) -> str:
        assert self.port is not None, "not started yet"
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, timeout: float = 20.0) -> None:
        """Start it and return once it logged that it is ready for clients (and a TCP connect
        gets its ``INFO``). Fails the test when it exits first (its log in the message) or is
        not ready within ``timeout`` seconds. A port picked here that another process took
        meanwhile is replaced by a new free one (a port given or already used is not)."""
        assert not self.running, "already running"
        pick = self.port is None
        for _ in range(3 if pick else 1):
            if self.port is None:
                self.port = free_port()
                assert self.port != MACHINE_PORT
            if await self._start_once(timeout):
                self.starts += 1
                await self._check_info()
                return
            if not (pick and any(BIND_FAILED in line for line in self.log[-5:])):
                break
            self.port = None
        pytest.fail(f"nats-server did not start on port {self.port}:\n{self.tail()}")

    async def _start_once(self, timeout: float) -> bool:
        """One start; ``True`` once ready, ``False`` if it exited first."""
        self._ready.clear()
        self.log.append(f"--- start on port {self.port} ---")
        self.proc = await asyncio.create_subprocess_exec(
            self.executable, "-a", "127.0.0.1", "-p", str(self.port),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        assert self.proc.stderr is not None
        self._pump = asyncio.create_task(self._read(self.proc.stderr))
        ready = asyncio.create_task(self._ready.wait())
        try:
            done, _ = await asyncio.wait({ready, self._pump}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if ready in done:
            return True
        await self.kill()
        if not done:
            pytest.fail(f"nats-server on port {self.port} not ready within {timeout:g} s:\n"
                        f"{self.tail()}")
        return False

    async def _read(self, stream: asyncio.StreamReader) -> None:
        with contextlib.ExitStack() as stack:
            copy = stack.enter_context(self.log_path.open("a")) if self.log_path else None
            async for raw in stream:
                line = raw.decode(errors="replace").rstrip("\n")
                self.log.append(line)
                if copy is not None:
                    copy.write(line + "\n")
                    copy.flush()
                if READY in line:
                    self._ready.set()

    async def _check_info(self) -> None:
        """A client connecting now is greeted with ``INFO {...}`` (core NATS protocol)."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.port), 5.0)
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        assert line.startswith(b"INFO "), (line, self.tail())

    async def _wait(self, timeout: float) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._pump is not None:
            await self._pump
        return code

    async def kill(self) -> None:
        """SIGKILL it (no goodbye to its clients) and wait until it is gone."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
        if self.proc is not None:
            await self._wait(10.0)

    async def stop(self) -> None:
        """SIGTERM it and wait (SIGKILL after 10 s); nothing when it is not running."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await self._wait(10.0)
                return
            except TimeoutError:
                pass
        await self.kill()

    async def restart(self, *, kill: bool = True) -> None:
        """SIGKILL (``kill=False``: SIGTERM) it and start it again on the same port."""
        await (self.kill() if kill else self.stop())
        await self.start()

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log[-lines:])


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A running :class:`NatsServer` for this test (log: ``tmp_path/nats-server.log``),
    stopped after it."""
    server = NatsServer(log_path=tmp_path / "nats-server.log")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
