"""sd_notify(3) without a dependency: one datagram to ``$NOTIFY_SOCKET`` (``Type=notify``).

Telling systemd is never worth stopping the bridge for: a socket that is gone, refuses, or whose
queue is full is logged (at most once per ``FAILURE_LOG_INTERVAL`` seconds) and the call
returns false. With a watchdog configured, what systemd does not hear makes it restart the
daemon, which is the right outcome for a manager that went away.
"""

from __future__ import annotations

import logging
import os
import socket

from .logs import Throttled

log = logging.getLogger(__name__)

__all__ = ["FAILURE_LOG_INTERVAL", "notify"]

FAILURE_LOG_INTERVAL = 300.0  # seconds between two log lines about a notify socket that fails
_failures = Throttled(log, interval=FAILURE_LOG_INTERVAL)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, ``"WATCHDOG=1"``) to systemd's notify socket
    (``NOTIFY_SOCKET`` in the process environment; a leading ``@`` is the abstract namespace).

    Returns true when the datagram was sent; false when not run by systemd (no
    ``NOTIFY_SOCKET``) or it could not be sent (logged, throttled). Never raises, never blocks
    (the socket is non-blocking: a full queue is a failure, not a wait)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        _failures.warning("notify", "could not tell systemd %s through NOTIFY_SOCKET=%s (%s); "
                          "carrying on", state.split("\n", 1)[0], path,
                          exc.strerror or type(exc).__name__, extra={"event": "notify_failed"})
        return False
    return True
