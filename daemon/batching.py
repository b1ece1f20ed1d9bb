"""Many lookups, one query: :class:`Batched` answers concurrent ``await lookup(key)`` calls with
one call of a bulk function, group-commit style.

Why (docs/topics/fan-out-cost.md): a round trip through psycopg costs the daemon about 200 µs of
CPU, whatever the statement does, and every handshake and every subscribe needs one (is the
token's user live; may this user read this room). When connections arrive by the thousand, as
after a restart of the bridge or of a load balancer, those round trips were most of the cost of
a connection. Batched, a burst of N lookups costs about one round trip per
:data:`MAX_KEYS` of them, and a lone lookup is not delayed: it starts at once, and only the
lookups that arrive while a query runs wait for it, to go together in the next one.

Nothing is cached: every answer comes from a query that started after it was asked for, so a
revocation committed before a lookup was asked is always seen (docs/design.md, "Rooms, users,
authorization").
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Generic, TypeVar

__all__ = ["MAX_KEYS", "Batched"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

MAX_KEYS = 500  # keys per bulk query: the statements unnest arrays of them


class Batched(Generic[K, V]):
    """``await batched(key)`` -> ``fetch(keys)[key]``, with the keys asked for while a
    ``fetch`` runs gathered into the next one (at most ``max_keys`` each; duplicates asked
    once). ``fetch`` must answer every key it is given; its exception (a
    :class:`daemon.errors.BridgeError`) is raised to every caller of that batch. A caller that
    is cancelled leaves the others unaffected."""

    def __init__(self, fetch: Callable[[Sequence[K]], Awaitable[Mapping[K, V]]], *,
                 max_keys: int = MAX_KEYS) -> None:
        self._fetch = fetch
        self._max_keys = max_keys
        self._waiting: list[tuple[K, asyncio.Future[V]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def __call__(self, key: K) -> V:
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._waiting.append((key, future))
        if self._runner is None:
            # shared by every caller: none of the first one's context (its correlation id,
            # daemon/logs.py)
            self._runner = asyncio.create_task(self._run(), name="batched-lookup",
                                               context=contextvars.Context())
        return await future

    async def _run(self) -> None:
        batch: list[tuple[K, asyncio.Future[V]]] = []
        try:
            while self._waiting:
                batch = [(key, future) for key, future in self._waiting[:self._max_keys]
                         if not future.done()]
                del self._waiting[:self._max_keys]
                if not batch:
                    continue
                try:
                    answers = await self._fetch(list(dict.fromkeys(key for key, _ in batch)))
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for key, future in batch:
                    if future.done():
                        continue
                    if key in answers:
                        future.set_result(answers[key])
                    else:
                        future.set_exception(LookupError(f"no answer for {key!r}"))
                batch = []
        finally:
            self._runner = None
            for _, future in batch + self._waiting:  # only when this task was cancelled
                future.cancel()
            self._waiting.clear()
