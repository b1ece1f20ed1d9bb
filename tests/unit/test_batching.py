"""Batched lookups (daemon/batching.py): one bulk call for the lookups asked while the previous
one ran, none delayed, none lost, errors to each caller of their batch."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import pytest

from daemon.batching import Batched
from daemon.errors import DatabaseError


class Bulk:
    """A bulk function that answers ``key * 2`` once :attr:`gate` opens, recording its calls."""

    def __init__(self, *, fail: set[int] | None = None) -> None:
        self.calls: list[list[int]] = []
        self.gate = asyncio.Event()
        self.fail = fail or set()

    async def __call__(self, keys: Sequence[int]) -> Mapping[int, int]:
        self.calls.append(list(keys))
        await self.gate.wait()
        if self.fail & set(keys):
            raise DatabaseError("the database went away")
        return {key: key * 2 for key in keys if key >= 0}


async def test_a_lone_lookup_starts_at_once_and_those_asked_meanwhile_go_together() -> None:
    bulk = Bulk()
    lookup: Batched[int, int] = Batched(bulk)
    first = asyncio.create_task(lookup(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert bulk.calls == [[1]]  # not waiting for company
    later = [asyncio.create_task(lookup(k)) for k in (2, 3, 2, 4)]
    await asyncio.sleep(0)
    assert bulk.calls == [[1]]  # they wait for the query in flight
    bulk.gate.set()
    assert await first == 2
    assert [await task for task in later] == [4, 6, 4, 8]
    assert bulk.calls == [[1], [2, 3, 4]]  # duplicates asked once


async def test_batches_hold_at_most_max_keys() -> None:
    bulk = Bulk()
    bulk.gate.set()
    lookup: Batched[int, int] = Batched(bulk, max_keys=3)
    assert await asyncio.gather(*(lookup(k) for k in range(7))) == [k * 2 for k in range(7)]
    assert [len(call) for call in bulk.calls] == [3, 3, 1]


async def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_goes_on() -> None:
    bulk = Bulk(fail={5})
    lookup: Batched[int, int] = Batched(bulk)
    failing = [asyncio.create_task(lookup(k)) for k in (5, 6)]
    await asyncio.sleep(0)
    after = asyncio.create_task(lookup(7))
    await asyncio.sleep(0)
    bulk.gate.set()
    for task in failing:
        with pytest.raises(DatabaseError):
            await task
    assert await after == 14
    with pytest.raises(LookupError):  # a key the bulk function left out is an error, not a hang
        await lookup(-1)


async def test_a_cancelled_caller_leaves_the_others_answered() -> None:
    bulk = Bulk()
    lookup: Batched[int, int] = Batched(bulk)
    first = asyncio.create_task(lookup(1))
    await asyncio.sleep(0)
    gone, kept = asyncio.create_task(lookup(2)), asyncio.create_task(lookup(3))
    await asyncio.sleep(0)
    gone.cancel()
    bulk.gate.set()
    assert (await first, await kept) == (2, 6)
    assert bulk.calls == [[1], [3]]
    with pytest.raises(asyncio.CancelledError):
        await gone
