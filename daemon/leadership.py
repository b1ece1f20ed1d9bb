"""Who reads the log for every bridge of a database: the one that holds a PostgreSQL advisory
lock (docs/topics/broker.md, "One capture reader").

An instance is a candidate while :attr:`Leadership.allowed` is set (the broker is connected).
A candidate waits for the lock on a dedicated connection of its own (``pg_advisory_lock``:
blocked in the server, it costs the database no query while it waits), and once it holds it,
takes a **fencing token**: a new transaction id (``pg_current_xact_id()``), larger than any
earlier leader's, since it was taken after that one's. It then checks its connection every
:data:`HOLD_CHECK` seconds; when the connection fails, or :attr:`~Leadership.allowed` is
cleared, it steps down (closing the connection releases the lock).

How fast the lock passes on: when a leader's process dies, its server process sees the socket
close and releases the lock at once; a waiting candidate's ``pg_advisory_lock`` returns. When
the leader is cut off from the database without a closed socket, the server notices by the TCP
keepalives and user timeout its session set (:data:`KEEPALIVES`: 1 to 2 s), and the leader by
its next check (at most ``HOLD_CHECK + HOLD_TIMEOUT`` seconds). Whatever a deposed leader
still publishes meanwhile is harmless: the events it read are the log's own (a repeat is
dropped by seq, a later one is a gap healed from the log), and its heartbeats carry an older
epoch.

Any role that can connect can take any advisory lock: one that holds this one keeps every
bridge from leading, and they all read the log themselves, as without a broker (nothing is
lost; ``pgbridge_broker_state{state="fallback"}`` says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import psycopg

from .backoff import Backoff
from .db import describe
from .logs import incident

log = logging.getLogger(__name__)

__all__ = ["Leadership"]

# The lock: pg_advisory_lock(LOCK_CLASS, hashtext(<schema>)), one per schema of a database.
LOCK_CLASS = 0x70676272  # "pgbr"
HOLD_CHECK = 0.5  # seconds between two checks of the lock's connection
HOLD_TIMEOUT = 1.0  # seconds a check may take
CONNECT_TIMEOUT = 5.0
# The lock session's own TCP keepalives and user timeout, set on the server side: a leader cut
# off from the database loses the lock about 1 to 2 s later (its check every HOLD_CHECK seconds
# leaves data unacknowledged for at most 1 s; idle, 1 s then one probe of 1 s).
KEEPALIVES = ("SELECT set_config('tcp_keepalives_idle', '1', false), "
              "set_config('tcp_keepalives_interval', '1', false), "
              "set_config('tcp_keepalives_count', '1', false), "
              "set_config('tcp_user_timeout', '1000', false), "
              "set_config('application_name', 'pgbridge leader', false)")


class Leadership:
    """Campaign for the lock of ``schema`` at ``conninfo``, once ``ready`` is set (this
    instance's LISTEN proven) and while :attr:`allowed` is. :meth:`run` calls ``elected(epoch)``
    once it holds the lock, and ``lost(why)`` when it no longer does."""

    def __init__(self, conninfo: str, schema: str, *, ready: asyncio.Event,
                 elected: Callable[[int], Awaitable[None]],
                 lost: Callable[[str], Awaitable[None]]) -> None:
        self.conninfo = conninfo
        self.ready = ready  # set once this instance's LISTEN was proven (daemon.listener)
        self.schema = schema
        self.elected = elected
        self.lost = lost
        self.allowed = asyncio.Event()  # set while this instance may lead (broker connected)
        self._resign = asyncio.Event()
        self._why = ""

    def resign(self, why: str) -> None:
        """Step down now if leading (``why``: for the log); campaign again once allowed."""
        self._why = why
        self._resign.set()

    async def run(self) -> None:
        """Campaign until cancelled; connection failures are logged and retried with backoff."""
        backoff = Backoff(base=0.1, cap=2.0)
        await self.ready.wait()
        while True:
            await self.allowed.wait()
            self._resign.clear()
            try:
                await self._campaign(backoff)
            except (psycopg.Error, OSError) as exc:  # OSError includes TimeoutError
                delay = backoff.next()
                log.warning("leadership: connection to %s failed (%s); campaigning again in "
                            "%.2f s", describe(self.conninfo),
                            str(exc).strip().splitlines()[0] if str(exc) else type(exc).__name__,
                            delay, extra={"event": "broker_campaign_failed"})
                await asyncio.sleep(delay)
            except Exception:  # a bug: the lock is released (its connection closed); go on
                delay = backoff.next()
                incident(log, "broker_campaign_crashed", "leadership failed; campaigning "
                         "again in %.2f s", delay)
                await asyncio.sleep(delay)

    async def _campaign(self, backoff: Backoff) -> None:
        conn = await asyncio.wait_for(
            psycopg.AsyncConnection.connect(self.conninfo, autocommit=True), CONNECT_TIMEOUT)
        leading = False
        why = "its connection to the database failed"
        waiting: asyncio.Task[int] | None = None
        try:
            await conn.execute(KEEPALIVES)
            waiting = asyncio.create_task(self._lock(conn))
            waiting.add_done_callback(_retrieved)  # a wait the close ended is no error
            resigned = asyncio.create_task(self._resign.wait())
            try:
                await asyncio.wait({waiting, resigned}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                resigned.cancel()
            if not waiting.done() or self._resign.is_set():  # resigned while waiting
                waiting.cancel()  # psycopg cancels the query; closing the connection frees
                await asyncio.wait({waiting}, timeout=HOLD_TIMEOUT)  # a lock just taken
                return
            epoch = waiting.result()
            leading = True
            backoff.reset()
            await self.elected(epoch)
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HOLD_CHECK):
                        await self._resign.wait()
                if self._resign.is_set():
                    why = self._why
                    break
                await asyncio.wait_for(conn.execute("SELECT 1"), HOLD_TIMEOUT)
        except TimeoutError:
            why = f"its connection to the database did not answer within {HOLD_TIMEOUT:g} s"
            raise
        except asyncio.CancelledError:
            leading = False  # the bridge stops: no step down to tell, no fallback to start
            raise
        finally:
            if waiting is not None and not waiting.done():
                waiting.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)
            if leading:
                await self.lost(why)

    async def _lock(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> int:
        await conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, self.schema))
        cur = await conn.execute("SELECT pg_current_xact_id()::text")
        row = await cur.fetchone()
        assert row is not None
        return int(str(row[0]))


def _retrieved(task: asyncio.Task[int]) -> None:
    if not task.cancelled():
        task.exception()
