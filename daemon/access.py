"""Access that follows the database: who is connected, closing the connections of users who are
gone, and ending subscriptions the database no longer grants.

A loss of access reaches the daemon three ways (docs/topics/authorization.md):

1. **In the room's own events**: a membership deleted or given to another user or room, a room
   deleted or soft-deleted. :mod:`daemon.hub` ends the subscription in seq order, before any
   later event of the room.
2. **User hints** (sql/triggers/20_access.sql): a user deleted, soft-deleted or re-keyed. The
   listener runs :meth:`Access.check_users` in commit order with the events, so the user's
   connections are closed (4003) before anything committed after the change is published.
3. **A check of everything** (:meth:`Access.sweep`) every ``PGBRIDGE_ACCESS_CHECK_INTERVAL``
   seconds, and of every connected user after each listener reconnect: it finds what bypassed
   the triggers (hints sent while the listener was away, ``session_replication_role =
   replica``, ``TRUNCATE``). Late is the only way it can be wrong: it ends nothing that the
   database still grants.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from .errors import BridgeError
from .hub import Subscription
from .metrics import Metrics
from .periodic import every
from .store import Store

log = logging.getLogger(__name__)

__all__ = ["Access", "Session"]

BATCH = 5000  # users or (user, room) pairs per query of a sweep


class Session(Protocol):
    """A connection as :class:`Access` sees it (:class:`daemon.client.Client`);
    ``correlation_id`` is its connection's, for the lines about it."""

    user: str

    @property
    def correlation_id(self) -> str: ...

    def subscriptions(self) -> list[Subscription]:
        """The connection's current subscriptions."""

    def user_gone(self) -> None:
        """The user is deleted: send nothing more, close with 4003."""

    def revoke(self, sub: Subscription, reason: str) -> None:
        """End ``sub`` (``unsubscribed`` with ``reason``) if it is still current."""

    def retry_later(self) -> None:
        """Access could not be checked: close with 1013 (the client reconnects, and the
        handshake checks the user again)."""


class Access:
    """Connected sessions by user, and the checks that end access. ``interval`` in seconds
    (``PGBRIDGE_ACCESS_CHECK_INTERVAL``) between two sweeps."""

    def __init__(self, store: Store, metrics: Metrics, *, interval: float) -> None:
        self.store = store
        self.metrics = metrics
        self.interval = interval
        self._sessions: dict[str, set[Session]] = {}

    def opened(self, session: Session) -> None:
        self._sessions.setdefault(session.user, set()).add(session)

    def closed(self, session: Session) -> None:
        sessions = self._sessions.get(session.user)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._sessions[session.user]

    def connected(self, user: str) -> bool:
        return user in self._sessions

    def _close_gone(self, users: Iterable[str], why: str) -> None:
        for user in users:
            sessions = list(self._sessions.get(user, ()))
            if sessions:
                self.metrics.revocations.labels("user_deleted").inc(len(sessions))
            for session in sessions:  # a line each: the kick is about that connection
                log.info("user %s is deleted (%s): closing its connection with 4003", user, why,
                         extra={"event": "user_gone", "user": user,
                                "correlation_id": session.correlation_id})
                session.user_gone()

    async def check_users(self, users: Iterable[str] | None = None, *, fail_closed: bool,
                          why: str) -> None:
        """Close the connections of every user in ``users`` (``None``: every connected user)
        who no longer has a live row in the ``users`` table; ``why`` names the check in the
        log. Users not connected here cost nothing.

        When the database cannot answer: with ``fail_closed`` the connections of the users
        asked about are closed with 1013 (the handshake checks them again); without, the
        :class:`BridgeError` is raised and the caller must not publish until it retried.
        """
        wanted = list(self._sessions) if users is None else [
            user for user in set(users) if user in self._sessions]
        if not wanted:
            return
        try:
            gone = await self.store.gone_users(wanted)
        except BridgeError as exc:
            if not fail_closed:
                raise
            log.warning("could not check whether %d user(s) were deleted (%s); closing their "
                        "connections with 1013", len(wanted), exc,
                        extra={"event": "access_check_failed"})
            for user in wanted:
                for session in list(self._sessions.get(user, ())):
                    session.retry_later()
            return
        self._close_gone(gone, why)

    async def sweep(self) -> None:
        """Check every connected user and every subscription against the database; close
        the connections of deleted users and end (``membership_revoked``) subscriptions whose
        membership or room is gone. Raises :class:`BridgeError` when the database fails."""
        subs = [(session, sub) for sessions in self._sessions.values()
                for session in sessions for sub in session.subscriptions()]
        users = list(self._sessions)
        gone: set[str] = set()
        for i in range(0, len(users), BATCH):
            gone.update(await self.store.gone_users(users[i:i + BATCH]))
        pairs = list({(session.user, sub.room) for session, sub in subs
                      if session.user not in gone})
        lost: set[tuple[str, str]] = set()
        for i in range(0, len(pairs), BATCH):
            lost.update(await self.store.lost_memberships(pairs[i:i + BATCH]))
        self._close_gone(gone, "periodic check")
        for session, sub in subs:
            if (session.user, sub.room) in lost and not sub.ended:
                log.info("user %s lost room %s without an event saying so; ending the "
                         "subscription", session.user, sub.room,
                         extra={"event": "access_swept", "room": sub.room,
                                "correlation_id": session.correlation_id})
                self.metrics.revocations.labels("periodic_check").inc()
                session.revoke(sub, "membership_revoked")

    async def run(self) -> None:
        """Sweep every ``interval`` seconds until cancelled; a failed sweep is logged and
        retried at the next interval."""
        def failed(exc: BridgeError) -> None:
            log.warning("access check failed (%s); retrying in %.0f s", exc, self.interval,
                        extra={"event": "access_check_failed"})

        await every(self.interval, self.sweep, failed=failed)
