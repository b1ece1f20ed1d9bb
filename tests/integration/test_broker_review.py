"""A second review of the broker mode (issue 29, docs/topics/broker.md), on the code as fixed
after the first attacks (tests/integration/test_broker_attacks.py).

Real parts only: nats-servers of this file's own on free ports (never the machine's 4222), a
fresh database per test, real instances (``python -m daemon`` subprocesses, or
:class:`daemon.app.Bridge` in this process where the test must see an instance's state), and an
attacker that is a plain ``nats-py`` client of the same server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest
from nats.aio.msg import Msg

from daemon.app import Bridge
from daemon.leadership import LOCK_CLASS
from daemon.schema import apply_schema
from tests.integration.test_broker_attacks import (
    _nats_server_path,
    await_state,
    broker_url,
    instance,
)
from tests.support.fixtures import running_bridge
from tests.support.procs import free_port, until

pytestmark = pytest.mark.slow  # each test runs instances and a nats-server of its own

__all__ = ["broker_url"]  # the fixture, shared with the first attacks

Conn = psycopg.AsyncConnection[Any]


class NatsServer:
    """A nats-server on ``port`` that can be stopped and started again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        assert self.port != 4222
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[bytes] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            _nats_server_path(), "-a", "127.0.0.1", "-p", str(self.port),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        assert self.proc.stderr is not None
        async with asyncio.timeout(20):
            async for line in self.proc.stderr:
                if b"Server is ready" in line:
                    break
            else:
                pytest.fail("nats-server exited before it was ready")
        self._drain = asyncio.create_task(self.proc.stderr.read())

    async def stop(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@contextlib.asynccontextmanager
async def nats_server() -> AsyncIterator[NatsServer]:
    server = NatsServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# --- a flood of junk on one subject ---------------------------------------------------------

async def test_a_flood_of_junk_on_the_signal_subject_does_not_depose_a_live_leader(
        fresh_db: str, broker_url: str, tmp_path: Path) -> None:
    """Anyone on the NATS server may publish on ``<prefix>.signal``, which every instance
    hears. Past 50 failed checks in 0.25 s an instance drops *every* broker message unchecked
    until the window ends (docs/topics/broker.md, "Trust"): its leader's heartbeats included.
    A steady flood of junk (about 2,000 messages a second, each failing its check) then hides
    the heartbeats of a leader that beats all along, and the follower falls back and reads the
    log itself: an attacker moves the load the broker saves back onto the database. The
    follower must keep following while its leader beats."""
    await apply_schema(fresh_db, schema="public")
    spy = await nats.connect(broker_url)
    beats: list[str] = []  # the subjects of the heartbeats heard

    async def beat(msg: Msg) -> None:
        beats.append(msg.subject)

    await spy.subscribe("pgbridge.*.leader", cb=beat)
    try:
        pa, pb = free_port(), free_port()
        async with instance(fresh_db, pa, tmp_path, broker_url), \
                instance(fresh_db, pb, tmp_path, broker_url) as follower:
            await await_state(pa, "leader")
            await await_state(pb, "follower")
            signal = beats[-1].rpartition(".")[0] + ".signal"

            async def flood() -> None:
                while True:
                    for _ in range(100):
                        await spy.publish(signal, b"f" * 64 + b'{"junk":1}')
                    await spy.flush()
                    await asyncio.sleep(0.05)

            flooding = asyncio.create_task(flood())
            try:
                start, fell = len(beats), follower.count("broker_fallback")

                async def fell_or_held() -> bool:  # 40 heartbeats: 10 s of a live leader
                    return follower.count("broker_fallback") > fell or len(beats) - start >= 40

                await until(fell_or_held, "a fallback or 40 heartbeats", timeout=60)
            finally:
                flooding.cancel()
            why = [r.get("reason") for r in follower.with_event("broker_fallback")][fell:]
            assert not why, f"the follower fell back while its leader beat: {why}"
    finally:
        await spy.close()


async def test_a_flood_of_junk_costs_the_database_a_bounded_number_of_catch_ups(
        fresh_db: str, broker_url: str) -> None:
    """Each window of shedding ends with ``Broker._on_shed``: every room's log read and every
    connected user checked (docs/topics/broker.md, "Trust"). A steady flood of junk from any
    NATS client ends a window four times a second, for as long as it lasts, on every
    follower: the database reads every follower's rooms and checks its users four times a
    second (plus a fallback's catch-up each time the heartbeats are shed too), far more than
    the instances would cost it reading the log themselves. About 5 s of flood (20 heartbeats
    of the leader) must cost a follower a bounded number of catch-ups, not one per window."""
    from tests.support.helpers import connect, make_room, make_user, subscribe

    await apply_schema(fresh_db, schema="public")
    settings = {"broker": (broker_url,), "pool_size": 4}
    spy = await nats.connect(broker_url)
    beats: list[str] = []

    async def beat(msg: Msg) -> None:
        beats.append(msg.subject)

    await spy.subscribe("pgbridge.*.leader", cb=beat)
    try:
        async with await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) as conn, \
                running_bridge(fresh_db, **settings) as a, \
                running_bridge(fresh_db, **settings) as b:
            async def settled() -> bool:
                return {_broker(a).state, _broker(b).state} == {"leader", "follower"} and bool(
                    beats)

            await until(settled, "a leader and a follower", timeout=30)
            follower = a if _broker(a).state == "follower" else b
            user = await make_user(conn)
            ws = await connect(follower.port, user)
            await subscribe(ws, await make_room(conn, user))

            def catch_ups() -> float:
                return follower.metrics.registry.get_sample_value(
                    "pgbridge_log_read_seconds_count", {"purpose": "catch_up"}) or 0.0

            assert _broker(follower).state == "follower"
            before = catch_ups()
            signal = beats[-1].rpartition(".")[0] + ".signal"

            async def flood() -> None:
                while True:
                    for _ in range(100):
                        await spy.publish(signal, b"f" * 64 + b'{"junk":1}')
                    await spy.flush()
                    await asyncio.sleep(0.05)

            flooding = asyncio.create_task(flood())
            try:
                start = len(beats)

                async def five_seconds() -> bool:
                    return len(beats) - start >= 20

                await until(five_seconds, "20 heartbeats during the flood", timeout=60)
            finally:
                flooding.cancel()
            spent = catch_ups() - before
            await ws.close()
            assert spent <= 3, f"{spent:g} catch-ups of the follower's rooms in 5 s of junk"
    finally:
        await spy.close()


# --- a rotated key ----------------------------------------------------------------------------

async def _rotate(url: str) -> str:
    """Rotate the schema's key as docs/topics/security.md says (delete its row, run setup
    again); the new key's fingerprint."""
    from daemon.signing import NotifyKey

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as owner:
        await owner.execute("DELETE FROM change_notify_key")
    await apply_schema(url, schema="public")
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as owner:
        cur = await owner.execute("SELECT key FROM change_notify_key")
        return NotifyKey(bytes((await cur.fetchone() or (b"",))[0])).fingerprint


def _broker(bridge: Bridge) -> Any:
    assert bridge.broker is not None
    return bridge.broker


async def test_a_key_rotated_while_the_broker_is_down_moves_every_subject(
        fresh_db: str, tmp_path: Path) -> None:
    """The key is rotated while the NATS server is down (or the instances are cut off from
    it): each instance, reading the log itself meanwhile, reads the new key and moves to its
    subjects. Once the server is back, the instances must end as a leader and a follower on
    the new subjects. ``Broker._key_forever`` subscribes the leader, signal and typing
    subjects again only when connected at that moment; otherwise nats-py, reconnecting,
    subscribes the old ones again, and an instance that does not win the lock never hears the
    new leader's heartbeats (nor the other instances' typing signals): it reads the log
    itself for ever."""
    await apply_schema(fresh_db, schema="public")
    async with nats_server() as server:
        settings = {"broker": (server.url,), "pool_size": 4}
        async with running_bridge(fresh_db, **settings) as a, \
                running_bridge(fresh_db, **settings) as b:
            async def settled() -> bool:
                return {_broker(a).state, _broker(b).state} == {"leader", "follower"}

            await until(settled, "a leader and a follower", timeout=30)
            await server.stop()

            async def both_fell_back() -> bool:
                return _broker(a).state == _broker(b).state == "fallback"

            await until(both_fell_back, "both instances to read the log themselves")
            fingerprint = await _rotate(fresh_db)

            async def rekeyed() -> bool:  # the listener re-reads the key every 5 s
                return all(_broker(x).relay.key is not None
                           and _broker(x).relay.key.fingerprint == fingerprint for x in (a, b))

            await until(rekeyed, "both instances on the new key's subjects", timeout=30)
            await server.start()
            try:
                await until(settled, "a leader and a follower on the new subjects", timeout=20)
            except pytest.fail.Exception:
                pytest.fail(f"no leader and follower after the server came back: "
                            f"{_broker(a).state} and {_broker(b).state}; subscribed to "
                            f"{sorted(s.subject for s in _broker(a)._control)} and "
                            f"{sorted(s.subject for s in _broker(b)._control)}, the new "
                            f"subjects are {_broker(a).relay.subjects.prefix}.*")


# --- the leader's pins ------------------------------------------------------------------------

async def _advisory_waiters(conn: Conn) -> int:
    cur = await conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        "AND classid::bigint = %s", (LOCK_CLASS,))
    return int((await cur.fetchone() or (0,))[0])


async def _heads_waiting(conn: Conn) -> bool:
    """A statement reading rooms' heads waits for a lock (:meth:`daemon.store.Store.heads`)."""
    cur = await conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND query LIKE 'SELECT room_id, last_seq FROM change_sequences%%'")
    return int((await cur.fetchone() or (0,))[0]) >= 1


async def test_a_room_its_own_client_leaves_while_the_leader_pins_it_is_pinned(
        fresh_db: str, broker_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A follower asks for rooms R and S; the leader tracks R for a client of its own, not S,
    so it reads S's head (``Rooms._on_pin``) and then pins both. Its client leaving R while
    that read waits drops R from its hub (not pinned yet): the pin must track R again, as
    ``_on_track_many`` does, not raise ``KeyError`` in the rooms' processor (an incident,
    and no answer: the follower's request fails and it reads the log itself meanwhile)."""
    from tests.support.helpers import connect, make_room, make_user, send, subscribe

    await apply_schema(fresh_db, schema="public")
    settings = {"broker": (broker_url,), "pool_size": 4}
    async with await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) as conn, \
            await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) as holder, \
            await psycopg.AsyncConnection.connect(fresh_db) as locker:
        reader, other = await make_user(conn), await make_user(conn)
        r = await make_room(conn, reader, other)
        s = await make_room(conn, reader)
        await holder.execute("SELECT pg_advisory_lock(%s, hashtext('public'))", (LOCK_CLASS,))
        async with running_bridge(fresh_db, **settings) as a:  # first in the lock's queue
            async def one() -> bool:
                return await _advisory_waiters(conn) == 1

            await until(one, "the first instance to wait for the lock")
            async with running_bridge(fresh_db, **settings) as b:
                async def two() -> bool:
                    return await _advisory_waiters(conn) == 2

                await until(two, "the second instance to wait for the lock")
                own = await connect(a.port, other)
                await subscribe(own, r)  # the leader-to-be tracks R for its own client
                feed = await connect(b.port, reader)
                await send(feed, type="feed", ref="f")  # R and S, in one turn of its rooms
                while (await _recv_json(feed))["type"] != "feed":
                    pass
                await locker.execute("LOCK TABLE change_sequences IN ACCESS EXCLUSIVE MODE")
                caplog.clear()
                await holder.execute("SELECT pg_advisory_unlock(%s, hashtext('public'))",
                                     (LOCK_CLASS,))
                await until(lambda: _heads_waiting(conn), "the leader to read S's head")
                assert _broker(a).state == "leader" and r in a.hub
                await own.close()

                async def dropped() -> bool:
                    return r not in a.hub

                await until(dropped, "the leader to drop R (its client left)")
                await locker.rollback()  # the read of S's head goes on

                async def pinned() -> bool:
                    return (r in a.hub and s in a.hub) or any(
                        getattr(rec, "event", None) == "listener_crashed"
                        for rec in caplog.records)

                await until(pinned, "R and S pinned, or an incident")
                crashed = [rec.getMessage() for rec in caplog.records
                           if getattr(rec, "event", None) == "listener_crashed"]
                assert not crashed, f"the leader's rooms failed on the pin: {crashed}"
                await feed.close()


async def test_a_leader_that_steps_down_while_it_pins_leaves_no_room_tracked_for_nobody(
        fresh_db: str, broker_url: str) -> None:
    """The leader reads the head of a room a follower asks for (``Rooms._on_pin``); it steps
    down meanwhile (its lock's connection fails), and unsubscribing its track subject cancels
    the request's callback. The read then ends and ``_on_pin`` tracks the room, but pins it
    only if the request still waits: the room stays tracked with no subscriber and no pin,
    and nothing ever drops it (the instance reads its log on every catch-up, and, following
    the next leader, subscribes to it and has it pinned there too, for ever)."""
    from tests.support.helpers import connect, make_room, make_user, send

    await apply_schema(fresh_db, schema="public")
    settings = {"broker": (broker_url,), "pool_size": 4}
    async with await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) as conn, \
            await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) as holder, \
            await psycopg.AsyncConnection.connect(fresh_db) as locker:
        reader = await make_user(conn)
        s = await make_room(conn, reader)
        await holder.execute("SELECT pg_advisory_lock(%s, hashtext('public'))", (LOCK_CLASS,))
        async with running_bridge(fresh_db, **settings) as a:  # first in the lock's queue
            async def one() -> bool:
                return await _advisory_waiters(conn) == 1

            await until(one, "the first instance to wait for the lock")
            async with running_bridge(fresh_db, **settings) as b:
                async def two() -> bool:
                    return await _advisory_waiters(conn) == 2

                await until(two, "the second instance to wait for the lock")
                feed = await connect(b.port, reader)
                await send(feed, type="feed", ref="f")  # S, on the follower-to-be
                while (await _recv_json(feed))["type"] != "feed":
                    pass
                await locker.execute("LOCK TABLE change_sequences IN ACCESS EXCLUSIVE MODE")
                await holder.execute("SELECT pg_advisory_unlock(%s, hashtext('public'))",
                                     (LOCK_CLASS,))
                await until(lambda: _heads_waiting(conn), "the leader to read S's head")
                assert _broker(a).state == "leader" and s not in a.hub
                cur = await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = "
                    "'advisory' AND granted AND classid::bigint = %s", (LOCK_CLASS,))
                assert (await cur.fetchone() or (False,))[0]

                async def stepped_down() -> bool:
                    return _broker(a).state != "leader"

                await until(stepped_down, "the leader to step down")
                await locker.rollback()  # the read of S's head goes on
                done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
                await a.rooms.catch_up(done)  # queued behind the pin: the pin is over
                await done
                await feed.close()
                assert s not in a.hub, (
                    f"S is tracked for nobody by the instance that stepped down (now "
                    f"{_broker(a).state}; pinned: {a.hub.pinned()})")


async def test_a_followers_refresh_is_not_taken_for_writers_ringing(
        fresh_db: str, broker_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A follower asks its leader for every room it holds every 10 s and takes each answered
    head as a change (``Interest.take_heads``: ``Rooms.changed(Pointer)``), which also counts
    a ring of the doorbell (``Polls.rang``): to the follower's doorbell, a follower of 60
    rooms with events hears writers ring 6 times a second while nobody writes. Once it reads
    the log itself (its leader gone), it asks every writer of the schema to stop ringing
    (``doorbell_quiet``, "asked by this bridge"): every instance then polls. Here the doorbell
    asks for quiet above 5 events a second, and nothing is written after the rooms' first
    events."""
    from tests.support.helpers import connect, make_room, make_user, post, send

    await apply_schema(fresh_db, schema="public")
    async with await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) as conn:
        reader = await make_user(conn)
        rooms = [await make_room(conn, reader) for _ in range(60)]
        for room in rooms:
            await post(conn, room, reader, "one")
        async with contextlib.AsyncExitStack() as later, contextlib.AsyncExitStack() as first:
            a = await first.enter_async_context(
                running_bridge(fresh_db, broker=(broker_url,), pool_size=4))
            await until(lambda: _state_is(a, "leader"), "a leader")
            b = await later.enter_async_context(running_bridge(
                fresh_db, broker=(broker_url,), pool_size=4, doorbell_quiet_above=5.0))
            await until(lambda: _state_is(b, "follower"), "a follower")
            feed = await connect(b.port, reader)
            await send(feed, type="feed", ref="f")
            while (await _recv_json(feed))["type"] != "feed":
                pass
            pins = _broker(a).interest._pinned_at

            async def pinned() -> bool:
                return all(room in pins for room in rooms)

            await until(pinned, "the leader to pin the follower's rooms")
            asked_at = pins[rooms[0]]

            async def refreshed() -> bool:  # the follower's refresh, 10 s later
                return pins[rooms[-1]] > asked_at

            await until(refreshed, "the follower's refresh", timeout=30)
            caplog.set_level(logging.INFO, logger="daemon.polls")
            caplog.clear()
            bell = b.rooms.bell
            called = bell._last_call
            await first.aclose()  # the leader stops: the follower reads the log itself

            async def rang_the_lease() -> bool:  # its doorbell's first call since
                return bell._last_call > called

            await until(rang_the_lease, "the follower's doorbell to call")
            await feed.close()
    asked = [r.getMessage() for r in caplog.records
             if getattr(r, "event", None) == "doorbell_quiet"]
    assert not asked, f"the follower asked writers to stop ringing: {asked}"


async def _recv_json(ws: Any) -> dict[str, Any]:
    from tests.support.helpers import recv

    return await recv(ws, 30)


async def test_a_key_rotated_under_a_running_cluster_loses_nothing_and_settles(
        fresh_db: str, broker_url: str) -> None:
    """docs/topics/broker.md, "Trust": a rotated key moves its bridges to new subjects (the
    leader's listener reads the key every 5 s; its followers, no longer hearing it, fall back
    and read the new key too). While a writer posts, a client on each instance must get every
    seq once and in order, and the instances must end as a leader and a follower, both on
    the new key's subjects."""
    from tests.support.helpers import connect, make_room, make_user, post, recv, subscribe

    await apply_schema(fresh_db, schema="public")
    settings = {"broker": (broker_url,), "pool_size": 4}
    async with await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) as conn, \
            running_bridge(fresh_db, **settings) as a, running_bridge(fresh_db, **settings) as b:
        def states() -> set[str]:
            return {_broker(a).state, _broker(b).state}

        async def settled() -> bool:
            return states() == {"leader", "follower"}

        await until(settled, "a leader and a follower", timeout=30)
        user, other = await make_user(conn), await make_user(conn)
        room = await make_room(conn, user, other)
        socks = [await connect(x.port, user) for x in (a, b)]
        starts = [int((await subscribe(ws, room))["from"]) for ws in socks]
        got: list[list[int]] = [[], []]

        async def read(ws: Any, into: list[int]) -> None:
            while True:
                frame = await recv(ws, 120)
                if frame["type"] == "event":
                    into.append(int(frame["seq"]))

        readers = [asyncio.create_task(read(ws, into)) for ws, into in zip(socks, got,
                                                                             strict=True)]
        fingerprint = await _rotate(fresh_db)
        sent = 0

        async def moved() -> bool:
            nonlocal sent
            await post(conn, room, other, f"m{sent}")
            sent += 1
            return await settled() and all(
                _broker(x).relay.key is not None
                and _broker(x).relay.key.fingerprint == fingerprint for x in (a, b))

        try:
            await until(moved, "a leader and a follower on the new key", timeout=60, every=0.1)
        except pytest.fail.Exception:
            pytest.fail(f"not settled on the new key: {_broker(a).state} "
                        f"{_broker(a).relay.key.fingerprint} and {_broker(b).state} "
                        f"{_broker(b).relay.key.fingerprint} (new: {fingerprint})")
        await post(conn, room, other, "last")
        sent += 1

        async def all_in() -> bool:
            return all(len(seqs) >= sent or task.done()
                       for seqs, task in zip(got, readers, strict=True))

        await until(all_in, f"{sent} events at each client", timeout=30)
        for task in readers:
            task.cancel()
        for seqs, start in zip(got, starts, strict=True):
            assert seqs == list(range(start + 1, start + sent + 1)), seqs
        for ws in socks:
            await ws.close()
        # the triggers signed every NOTIFY: none is a forgery (an instance whose listener
        # started again with the old key, LISTENing on the new key's channels, counts them)
        forged = [x.metrics.registry.get_sample_value("pgbridge_forged_notifies_total")
                  for x in (a, b)]
        assert forged == [0.0, 0.0], f"NOTIFYs of the new key counted as forged: {forged}"


# --- what a follower may have missed ----------------------------------------------------------

async def test_a_slow_consumers_drop_on_a_follower_checks_its_users_too(
        fresh_db: str, broker_url: str) -> None:
    """nats-py drops messages for a subscription whose callback falls behind, and reports it
    (``error_cb(SlowConsumerError)``). On the signal subject a dropped message may be a user's
    hint (deleted) or the leader's "missed": the follower cannot know, so it must do what a
    LISTEN reconnect does, check every connected user and read every room's log (as
    ``Broker._on_shed`` does), not only read the logs. Here the deletion sends no hint at all
    (the triggers off for its transaction: the hint NATS dropped), and the drop is reported
    as nats-py reports it (filling a subscription's 64 MB of pending messages is out of a
    test's reach). The deleted user's socket on the follower must close with 4003 before an
    event committed after the report reaches it (the periodic access check set to an hour:
    not what saves it)."""
    from nats.errors import SlowConsumerError
    from websockets.exceptions import ConnectionClosed

    from tests.support.helpers import connect, make_room, make_user, post, recv, subscribe

    await apply_schema(fresh_db, schema="public")
    settings = {"broker": (broker_url,), "pool_size": 4, "access_check_interval": 3600.0}
    async with await psycopg.AsyncConnection.connect(fresh_db, autocommit=True) as conn, \
            running_bridge(fresh_db, **settings) as a, running_bridge(fresh_db, **settings) as b:
        async def settled() -> bool:
            return {_broker(a).state, _broker(b).state} == {"leader", "follower"}

        await until(settled, "a leader and a follower", timeout=30)
        follower = a if _broker(a).state == "follower" else b
        victim, other = await make_user(conn), await make_user(conn)
        room = await make_room(conn, victim, other)
        ws = await connect(follower.port, victim)
        await subscribe(ws, room)
        await post(conn, room, other, "before")
        assert (await recv(ws))["data"]["content"] == "before"
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute("UPDATE users SET deleted_at = now() WHERE id = %s", [victim])
        signal = _broker(follower)._control[1]
        assert signal.subject.endswith(".signal")
        await _broker(follower).relay.on_error(SlowConsumerError(
            subject=signal.subject, reply="", sid=signal._id, sub=signal))
        await post(conn, room, other, "after the deletion")
        try:
            frame = await recv(ws, timeout=10)
        except ConnectionClosed as exc:
            assert exc.rcvd is not None and exc.rcvd.code == 4003, exc
        else:
            pytest.fail(f"the deleted user's socket on the follower got {frame}")


# --- a clean stop -----------------------------------------------------------------------------

async def test_a_leader_stopped_cleanly_does_not_say_its_database_connection_failed(
        fresh_db: str, broker_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Stopping the leader cleanly (SIGTERM) cancels its campaign, whose ``finally`` tells
    ``lost()`` its default reason: the log of every clean stop says "no longer the capture
    reader: its connection to the database failed" and "reading the log itself" (a fallback
    counted, a capture task started during the stop), which an operator reads as a database
    fault."""
    await apply_schema(fresh_db, schema="public")
    async with running_bridge(fresh_db, broker=(broker_url,), pool_size=4) as a:
        await until(lambda: _state_is(a, "leader"), "a leader")
        caplog.clear()
    said = [r.getMessage() for r in caplog.records
            if getattr(r, "event", None) in {"broker_stepped_down", "broker_fallback"}]
    assert not said, said


async def _state_is(bridge: Bridge, state: str) -> bool:
    return bool(_broker(bridge).state == state)
