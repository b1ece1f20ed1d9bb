"""When to tell systemd that the bridge is alive (``WATCHDOG=1``, sd_watchdog_enabled(3)).

Pure: the composition root (:mod:`daemon.app`) runs the task that asks these questions every
:func:`watchdog_interval` seconds and sends the answer (:func:`daemon.systemd.notify`).

Alive means more than "the event loop turns": the listener's NOTIFY round trip (a probe every
``PGBRIDGE_PROBE_INTERVAL`` seconds, :mod:`daemon.listener`) came back recently. A daemon whose
LISTEN connection stays deaf, or whose event loop is stuck, stops petting and systemd restarts
it ``WatchdogSec`` after the last ``WATCHDOG=1`` (deploy/pgbridge.service explains the numbers).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["probe_fresh", "probe_max_age", "watchdog_interval"]


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two ``WATCHDOG=1``: half of ``WATCHDOG_USEC`` (microseconds, set by
    systemd from the unit's ``WatchdogSec=``), as sd_watchdog_enabled(3) advises. ``None`` when
    no watchdog is asked of this process: ``WATCHDOG_USEC`` unset, not a positive integer, or
    ``WATCHDOG_PID`` set to another pid than ``pid`` (the variables were inherited)."""
    owner = env.get("WATCHDOG_PID", "").strip()
    if owner and owner != str(pid):
        return None
    raw = env.get("WATCHDOG_USEC", "").strip()
    if not raw.isdigit() or int(raw) <= 0:
        return None
    return int(raw) / 1e6 / 2


def probe_max_age(probe_interval: float, probe_timeout: float) -> float:
    """Seconds a successful NOTIFY round trip stays good news: ``2 * (interval + timeout)``.

    A healthy listener proves itself every ``interval`` seconds plus a round trip. One probe
    that fails is noticed ``interval + timeout`` after the last success; the listener then
    replaces its connection and probes again, which comes back within another ``interval +
    timeout``. So a listener that repairs itself never misses a pet; one that stays deaf stops
    them after this long. ``probe_interval`` is ``PGBRIDGE_PROBE_INTERVAL``, ``probe_timeout``
    the listener's (``max(2, min(interval, 10))`` seconds, :class:`daemon.app.Bridge`)."""
    return 2 * (probe_interval + probe_timeout)


def probe_fresh(probed_at: float | None, now: float, max_age: float) -> bool:
    """Whether to send ``WATCHDOG=1`` now: the last round trip came back (``probed_at``, a
    ``time.monotonic()`` value; ``None``: never) at most ``max_age`` seconds before ``now``."""
    return probed_at is not None and now - probed_at <= max_age
