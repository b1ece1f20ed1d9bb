"""The systemd watchdog: ``WATCHDOG=1`` only while the listener's NOTIFY round trip comes back,
and a notify socket that is gone never stops the daemon.

The daemon runs as ``python -m daemon`` with ``NOTIFY_SOCKET`` bound by the test (a real unix
datagram socket, what systemd gives) and ``WATCHDOG_USEC``; its database connections go through
a :class:`FreezingProxy` that can make the LISTEN connection deaf
(tests/integration/test_deaf_listener.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from daemon import systemd
from daemon.logs import Throttled
from tests.support.procs import DaemonProcess, daemon_process, free_port, http_status, until
from tests.support.proxy import FreezingProxy

# --- systemd.notify ---------------------------------------------------------------------------


@pytest.fixture
def fresh_throttle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(systemd, "_failures", Throttled(systemd.log, interval=300.0))


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        yield sock, path


def test_notify_never_raises_nor_blocks_and_logs_failures_once(
        receiver: tuple[socket.socket, Path], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, fresh_throttle: None) -> None:
    """sd_notify used to raise OSError from a vanished notify socket (and could block on a full
    one), which would have ended the watchdog task and with it the daemon."""
    caplog.set_level(logging.WARNING, logger="daemon.systemd")
    sock, path = receiver
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False  # not run by systemd

    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    assert systemd.notify("WATCHDOG=1") is True
    assert sock.recv(4096) == b"WATCHDOG=1"
    # nobody reads: the receiver's queue fills, and a full queue is a failure, not a wait
    sent = 0
    while systemd.notify("WATCHDOG=1"):
        sent += 1
        assert sent < 100_000, "notify never reported the full queue"
    sock.close()
    path.unlink()  # the socket vanished
    assert systemd.notify("WATCHDOG=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "@pgbridge-test-nobody-listens-here")
    assert systemd.notify("STOPPING=1") is False

    failures = [r for r in caplog.records if getattr(r, "event", None) == "notify_failed"]
    assert len(failures) == 1, [r.getMessage() for r in failures]  # throttled
    assert "WATCHDOG=1" in failures[0].getMessage()


# --- the daemon -------------------------------------------------------------------------------


@pytest.fixture
async def proxy(db_url: str) -> AsyncIterator[tuple[FreezingProxy, str]]:
    p = FreezingProxy(conninfo_to_dict(db_url))
    port = await p.start()
    yield p, make_conninfo(db_url, host="127.0.0.1", port=port)
    p.resume()
    await p.close()


async def _datagram(sock: socket.socket, timeout: float = 20.0) -> str:
    loop = asyncio.get_running_loop()
    return (await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)).decode()


def _drain(sock: socket.socket) -> list[str]:
    got = []
    while True:
        try:
            got.append(sock.recv(4096).decode())
        except BlockingIOError:
            return got


def _logged(daemon: DaemonProcess, event: str) -> int:
    return sum(1 for line in daemon.log if line.startswith("{")
               and json.loads(line).get("event") == event)


@pytest.mark.slow
async def test_watchdog_is_petted_only_while_the_listener_hears_its_probes(
        proxy: tuple[FreezingProxy, str], receiver: tuple[socket.socket, Path],
        tmp_path: Path) -> None:
    freezer, via_proxy = proxy
    sock, path = receiver
    port = free_port()
    # probe every 0.5 s (timeout 2 s): a round trip is fresh for 2 * (0.5 + 2) = 5 s;
    # WATCHDOG_USEC 1 s: a pet every 0.5 s
    async with daemon_process(via_proxy, port, tmp_path, NOTIFY_SOCKET=str(path),
                              WATCHDOG_USEC="1000000",
                              PGBRIDGE_PROBE_INTERVAL="0.5") as daemon:
        assert (await _datagram(sock)).startswith("READY=1")
        assert [await _datagram(sock) for _ in range(3)] == ["WATCHDOG=1"] * 3

        # the listener hears nothing from now on, and its reconnects hang in LISTEN
        freezer.freeze_new_listeners = True
        freezer.freeze_listeners()

        async def withheld() -> bool:
            return _logged(daemon, "watchdog_withheld") == 1

        await until(withheld, "the daemon to withhold WATCHDOG=1", timeout=30)
        assert set(_drain(sock)) <= {"WATCHDOG=1"}  # sent before it noticed
        # systemd would now restart it: not one more pet for three pet intervals
        with pytest.raises(TimeoutError):
            got = await _datagram(sock, timeout=1.5)
            pytest.fail(f"{got!r} arrived while the listener was deaf")
        assert daemon.proc is not None and daemon.proc.returncode is None

        # the path heals: the listener reconnects, its probe comes back, the pets resume
        freezer.freeze_new_listeners = False
        freezer.resume()
        assert await _datagram(sock, timeout=30) == "WATCHDOG=1"

        async def resumed() -> bool:
            return _logged(daemon, "watchdog_resumed") == 1

        await until(resumed, "the watchdog_resumed log line")

        # systemd goes away: the socket vanishes; the daemon logs it once and carries on
        sock.close()
        path.unlink()

        async def notify_failed() -> bool:
            return _logged(daemon, "notify_failed") >= 1

        await until(notify_failed, "the notify_failed log line")
        assert daemon.proc.returncode is None
        assert await http_status(port, "/healthz") == 200
        assert _logged(daemon, "notify_failed") == 1  # throttled, not one line per pet


@pytest.mark.slow
async def test_no_watchdog_task_without_watchdog_usec(
        db_url: str, receiver: tuple[socket.socket, Path], tmp_path: Path) -> None:
    sock, path = receiver
    port = free_port()
    async with daemon_process(db_url, port, tmp_path, NOTIFY_SOCKET=str(path),
                              PGBRIDGE_PROBE_INTERVAL="0.2") as daemon:
        assert (await _datagram(sock)).startswith("READY=1")
        with pytest.raises(TimeoutError):  # several probe intervals: no pet ever
            got = await _datagram(sock, timeout=1.0)
            pytest.fail(f"{got!r} arrived without a watchdog")
        assert daemon.proc is not None and daemon.proc.returncode is None
