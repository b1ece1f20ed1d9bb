"""What every :class:`daemon.client.Client` works with, named explicitly: :class:`Collaborators`,
built once by :class:`daemon.server.Server` (the composition root, :mod:`daemon.app`, builds
the collaborators themselves) and shared by all connections; :class:`Rooms`, the one call a
subscribe makes to go live.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .acks import AckBuffer
from .auth import Claims
from .feed import Feeds
from .hub import Hub, Subscription
from .metrics import Metrics
from .outbox import Flusher
from .presence_feed import PresenceFeed
from .ratelimit import ClientLimits
from .settings import DaemonSettings
from .store import Store

__all__ = ["Collaborators", "Rooms"]


class Rooms(Protocol):
    """Where a subscription is registered for live events: :meth:`daemon.rooms.Rooms.add`
    (typed narrowly here so that the request side depends on this one method only)."""

    async def add(self, sub: Subscription) -> int:
        """Register ``sub`` (tracking its room if new) and return ``L``: events after ``L`` will
        be delivered to it live; ``(from, L]`` is the caller's to replay."""
        ...

    async def add_many(self, subs: list[Subscription]) -> list[int]:
        """:meth:`add` for many at once, in order (a feed's rooms)."""
        ...


@dataclass(frozen=True, kw_only=True, slots=True)
class Collaborators:
    """What every connection works with, shared by all of them (built once by
    :class:`daemon.server.Server`). ``settings``: the limits and timeouts it applies
    (``queue_size``, ``send_timeout``, ``send_buffer``, ``rate_limit``, ``rate_burst``,
    ``subscribe_rate``, ``subscribe_burst``, ``max_subscriptions``, ``heartbeat``);
    ``rooms``: where a subscription goes live; ``hub``: where it is removed; ``store``: the
    membership check, the replay and the liveness of the user; ``acks``: where acks are
    recorded; ``limits``: the per-user subscribe budget; ``presence_feed``: snapshots and
    typing; ``feeds``: the connections' feeds (daemon.feed); ``flusher``: the coalescing
    waits; ``verify_token``: checks a refreshed JWT (raises :class:`daemon.auth.AuthError`)."""

    settings: DaemonSettings
    metrics: Metrics
    hub: Hub
    rooms: Rooms
    store: Store
    acks: AckBuffer
    limits: ClientLimits
    presence_feed: PresenceFeed
    feeds: Feeds
    flusher: Flusher
    verify_token: Callable[[str], Claims]
