"""Processes and ports for tests: the daemon as a subprocess, CLI runs, polling helpers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.fixtures import conninfo_env
from tests.support.helpers import SECRET

PGBRIDGE = Path(sys.executable).with_name("pgbridge")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(condition: Callable[[], Awaitable[bool]], what: str,
                timeout: float = 20.0, every: float = 0.02) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(every)


async def http_status(port: int, path: str) -> int | None:
    """Status of ``GET path`` on 127.0.0.1:port, or ``None`` when nothing answers."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), 2.0)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                     .encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5.0)
        parts = line.split()
        return int(parts[1]) if len(parts) >= 2 else None
    except (OSError, TimeoutError, ValueError):
        return None
    finally:
        writer.close()


class DaemonProcess:
    """``python -m daemon`` in a subprocess. Its stderr (JSON log lines) is kept in ``log`` (and
    written to ``log_path`` when given); the lines that are JSON objects are also in
    ``records``, and :meth:`wait_event` awaits one by its ``event`` field."""

    def __init__(self, env: dict[str, str], cwd: Path, log_path: Path | None = None) -> None:
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self.out: list[str] = []
        self.records: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()
        self._pumps: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon", env=self.env, cwd=self.cwd,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._pumps = [asyncio.create_task(self._pump(self.proc.stdout, self.out)),
                       asyncio.create_task(self._pump(self.proc.stderr, self.log, parse=True))]

    async def _pump(self, stream: asyncio.StreamReader, into: list[str], *,
                    parse: bool = False) -> None:
        with contextlib.ExitStack() as stack:
            copy = stack.enter_context(self.log_path.open("w")) if (
                parse and self.log_path is not None) else None
            async for raw in stream:
                line = raw.decode(errors="replace").rstrip("\n")
                into.append(line)
                if copy is not None:
                    copy.write(line + "\n")
                    copy.flush()
                if parse:
                    with contextlib.suppress(ValueError):
                        record = json.loads(line)
                        if isinstance(record, dict):
                            self.records.append(record)
                async with self._changed:
                    self._changed.notify_all()
        async with self._changed:  # end of the stream: the process is exiting
            self._changed.notify_all()

    def tail(self) -> str:
        return "\n".join(self.log[-20:])

    def dump(self) -> str:
        return "\n".join(self.log)

    def count(self, event: str) -> int:
        return sum(1 for r in self.records if r.get("event") == event)

    def with_event(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == event]

    async def wait_event(self, event: str, count: int = 1, timeout: float = 20.0) -> None:
        """Return once ``event`` was logged ``count`` times; fail if the daemon exits first."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                while self.count(event) < count:
                    if self._pumps and self._pumps[1].done():
                        pytest.fail(f"the daemon exited (code {self.proc and self.proc.returncode})"
                                    f" before logging {event!r} x{count}")
                    await self._changed.wait()
        except TimeoutError:
            pytest.fail(f"the daemon logged {event!r} {self.count(event)} times, not {count}, "
                        f"within {timeout:g} s")

    async def wait_healthy(self, port: int, timeout: float = 30.0) -> None:
        assert self.proc is not None

        async def healthy() -> bool:
            assert self.proc is not None
            if self.proc.returncode is not None:
                await asyncio.gather(*self._pumps)
                pytest.fail(f"daemon exited with {self.proc.returncode}:\n{self.tail()}")
            return await http_status(port, "/healthz") == 200

        await until(healthy, f"GET /healthz == 200 on port {port}", timeout=timeout, every=0.05)

    async def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.gather(*self._pumps)
        return code

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; return the exit code."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.wait()


@asynccontextmanager
async def daemon_process(db_url: str, port: int, cwd: Path,
                         **extra: str) -> AsyncIterator[DaemonProcess]:
    """A healthy daemon subprocess on ``port``; killed at the end of the block if still up."""
    env = conninfo_env(db_url) | {"PGBRIDGE_JWT_SECRET": SECRET, "PGBRIDGE_PORT": str(port),
                                  "PGBRIDGE_PROBE_INTERVAL": "1"} | extra
    daemon = DaemonProcess(env, cwd)
    await daemon.start()
    try:
        await daemon.wait_healthy(port)
        yield daemon
    finally:
        await daemon.kill()


async def run_cli(*args: str, env: dict[str, str], cwd: Path,
                  timeout: float = 60.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*args, env=env, cwd=cwd,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def tail_subscribed(bridge: Any, room: str, bearer: str, *args: str,
                          cwd: Path) -> asyncio.Task[tuple[int, str, str]]:
    """``pgbridge tail ROOM ARGS`` against the in-process ``bridge`` (a
    :class:`daemon.app.Bridge`), as the user of the token ``bearer``, in an environment without
    the machine's database settings; returned, as the task of its :func:`run_cli`, once the
    bridge holds its subscription (writes committed from then on reach it live)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PGBRIDGE_", "POSTGRES_", "SSH_")) and k != "DATABASE_URL"}
    tail = asyncio.create_task(run_cli(
        str(PGBRIDGE), "tail", room, *args, "--url", f"ws://127.0.0.1:{bridge.port}/ws",
        "--token", bearer, env=env, cwd=cwd))

    async def subscribed() -> bool:
        if tail.done():
            pytest.fail(f"pgbridge tail ended early: {tail.result()}")
        return bool(bridge.hub.subscribers(room) == 1)

    await until(subscribed, "pgbridge tail to subscribe")
    return tail


def human_lines(stderr: str) -> list[str]:
    """stderr lines meant for people (the daemon's JSON log lines left out)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]
