"""Broker mode (issue 29): instances of the daemon sharing a NATS server, against a real
nats-server of the test's own (:mod:`tests.support.nats`), a real PostgreSQL (a fresh database
per test: the capture reader's advisory lock is per database) and ``python -m daemon``
subprocesses (:func:`tests.support.procs.daemon_process`), SIGKILLed and started again on their
ports.

An instance's state is read where operators read it, ``GET /metrics``:
``pgbridge_broker_state{state="leader"|"follower"|"fallback"}`` is 1 for the current one. A
cluster is *settled* when exactly one live instance is ``leader`` and every other live one is
``follower``.

Each daemon's log is written to ``tmp_path`` (``<instance>-<run>.log``) when the test ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from daemon.broker_wire import BrokerKeys, Heartbeat, read_heartbeat
from daemon.schema import apply_schema
from daemon.signing import NotifyKey
from tests.support.helpers import (
    connect,
    events,
    head,
    make_room,
    make_user,
    notify_trust,
    post,
    recv,
    send,
    split_message,
    subscribe,
)
from tests.support.nats import NatsServer
from tests.support.procs import DaemonProcess, daemon_process, free_port, until

Conn = psycopg.AsyncConnection[Any]
PHASE = 45  # messages written in each state of the cluster (1.5 s at 30 a second)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
STATES = ("leader", "follower", "fallback")


# --- metrics ------------------------------------------------------------------------------------

async def scrape(port: int) -> Samples | None:
    """Every sample of ``GET /metrics`` on 127.0.0.1:``port`` by name and sorted labels, or
    ``None`` when nothing answers there (a killed instance)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), 2.0)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5.0)
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
    status, _, body = raw.partition(b"\r\n\r\n")
    if b" 200 " not in status.split(b"\r\n")[0]:
        return None
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def state_of(samples: Samples | None) -> str | None:
    """The broker state a scrape reports (the one gauge at 1), ``None`` when it reports none
    or more than one."""
    if samples is None:
        return None
    on = [s for s in STATES if samples.get(("pgbridge_broker_state", (("state", s),))) == 1]
    return on[0] if len(on) == 1 else None


def sample(samples: Samples | None, name: str) -> float | None:
    return None if samples is None else samples.get((name, ()))


def settled(states: dict[str, str | None]) -> bool:
    """One leader, every other instance a follower."""
    found = list(states.values())
    return found.count("leader") == 1 and found.count("follower") == len(found) - 1


def a_leader(states: dict[str, str | None]) -> bool:
    return "leader" in states.values()


def all_fallback(states: dict[str, str | None]) -> bool:
    return set(states.values()) == {"fallback"}


# --- a cluster of restartable instances ---------------------------------------------------------

class Instance:
    """One daemon of the cluster on a fixed ``port``, with ``PGBRIDGE_BROKER`` = the test's NATS
    server. Each :meth:`start` is a new :func:`daemon_process` (kept in ``runs``); ``up`` is
    true from its health until the test kills it (clients then choose another instance)."""

    def __init__(self, name: str, db: str, cwd: Path, broker: NatsServer,
                 stack: AsyncExitStack) -> None:
        self.name = name
        self.db = db
        self.cwd = cwd
        self.broker = broker
        self.stack = stack
        self.port = free_port()
        self.runs: list[DaemonProcess] = []
        self.up = False

    def __repr__(self) -> str:
        return f"<{self.name} :{self.port}{'' if self.up else ' down'}>"

    @property
    def daemon(self) -> DaemonProcess:
        return self.runs[-1]

    async def start(self) -> None:
        """Start a daemon on the port and return once ``/healthz`` answers 200."""
        daemon = await self.stack.enter_async_context(daemon_process(
            self.db, self.port, self.cwd, PGBRIDGE_BROKER=self.broker.url,
            PGBRIDGE_POOL_SIZE="4"))
        self.runs.append(daemon)
        self.up = True

    async def kill(self) -> None:
        """SIGKILL it and wait until it is gone."""
        self.up = False
        await self.daemon.kill()

    async def scrape(self) -> Samples | None:
        return await scrape(self.port) if self.up else None

    async def state(self) -> str | None:
        return state_of(await self.scrape())

    def save_logs(self, into: Path) -> list[Path]:
        paths = []
        for n, run in enumerate(self.runs, 1):
            path = into / f"{self.name}-{n}.log"
            path.write_text(run.dump() + "\n")
            paths.append(path)
        return paths


class Cluster:
    """The instances of one test, on one database and one broker."""

    def __init__(self, n: int, db: str, cwd: Path, broker: NatsServer,
                 stack: AsyncExitStack) -> None:
        self.instances = [Instance(f"i{k}", db, cwd, broker, stack) for k in range(1, n + 1)]

    def live(self) -> list[Instance]:
        return [i for i in self.instances if i.up]

    def check(self) -> None:
        """Fail the test when an instance the test did not kill has exited."""
        for i in self.live():
            code = i.daemon.proc.returncode if i.daemon.proc is not None else None
            if code is not None:
                pytest.fail(f"{i} exited with {code} though the test did not kill it; its "
                            f"last log lines:\n{i.daemon.tail()}")

    async def states(self) -> dict[str, str | None]:
        live = self.live()
        found = await asyncio.gather(*(i.state() for i in live))
        return {i.name: s for i, s in zip(live, found, strict=True)}

    async def await_states(self, want: Callable[[dict[str, str | None]], bool], what: str,
                           timeout: float = 30.0) -> tuple[dict[str, str | None], float]:
        """Await live instances' states (name -> state) that satisfy ``want``; return them and
        the seconds it took. On a timeout the last states seen are in the failure."""
        started = time.monotonic()
        seen: list[dict[str, str | None]] = [{}]

        async def reached() -> bool:
            self.check()
            seen[0] = await self.states()
            return want(seen[0])

        try:
            await until(reached, what, timeout=timeout, every=0.05)
        except BaseException as exc:
            if isinstance(exc, pytest.fail.Exception):
                pytest.fail(f"{exc.msg}; the last states seen: {seen[0]}")
            raise
        return seen[0], time.monotonic() - started

    async def settle(self, what: str, timeout: float = 30.0) -> tuple[Instance, float]:
        """Await one leader and followers among the live instances; return the leader and the
        seconds it took."""
        states, took = await self.await_states(
            settled, f"one leader and followers ({what})", timeout)
        (leader,) = [i for i in self.live() if states[i.name] == "leader"]
        return leader, took

    def broker_up(self, value: int) -> Callable[[], Awaitable[bool]]:
        """A condition for :func:`until`: every live instance reports ``pgbridge_broker_up``
        = ``value``."""
        async def condition() -> bool:
            found = await asyncio.gather(*(i.scrape() for i in self.live()))
            return all(sample(s, "pgbridge_broker_up") == value for s in found)

        return condition

    async def start(self) -> None:
        for instance in self.instances:
            await instance.start()

    def save_logs(self, into: Path) -> None:
        paths = [p for i in self.instances for p in i.save_logs(into)]
        print("daemon logs:", *map(str, paths))


@asynccontextmanager
async def cluster_of(n: int, db: str, tmp_path: Path,
                     broker: NatsServer) -> AsyncIterator[Cluster]:
    """``n`` instances started on ``db`` with ``broker``; killed (and their logs saved in
    ``tmp_path``) at the end of the block."""
    async with AsyncExitStack() as stack:
        cluster = Cluster(n, db, tmp_path, broker, stack)
        try:
            await cluster.start()
            yield cluster
        finally:
            cluster.save_logs(tmp_path)


async def listening_backends(conn: Conn) -> int:
    """Connections of the database that LISTEN through ``pgbridge_listen()`` (idle after it)."""
    cur = await conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND backend_type = 'client backend' AND query LIKE '%%pgbridge_listen\"()%%' "
        "AND state = 'idle' AND pid <> pg_backend_pid()")
    return int((await cur.fetchone() or (0,))[0])


async def one_listener(conn: Conn, what: str) -> None:
    """Await exactly one LISTENing connection in the database (the leader's: followers have
    none)."""
    async def one() -> bool:
        return await listening_backends(conn) == 1

    await until(one, f"exactly one LISTENing connection ({what})")


async def schema_db(fresh_db: str) -> str:
    await apply_schema(fresh_db, schema="public")
    return fresh_db


# --- a client that follows rooms across instances -----------------------------------------------

class Resumer:
    """A user's client following ``rooms`` (room -> the seq it starts after) on some live
    instance of ``cluster``, from ``home`` first: when its connection ends it connects to
    another live instance (the one with fewest of ``peers``) and subscribes to each room with
    ``since`` = the last seq it holds. ``got[room]`` is every seq received, in arrival order,
    over all its connections; ``anomalies`` every frame that was not what the protocol
    promises (an error, an ``unsubscribed``, a ``from`` other than the ``since`` sent, a seq
    other than the next one)."""

    def __init__(self, name: str, user: str, rooms: dict[str, int], cluster: Cluster,
                 home: Instance, peers: list[Resumer]) -> None:
        self.name = name
        self.user = user
        self.first = dict(rooms)
        self.cluster = cluster
        self.peers = peers
        self.got: dict[str, list[int]] = {room: [] for room in rooms}
        self.anomalies: list[str] = []
        self.instance: Instance | None = home
        self.subscribed: set[str] = set()
        self.connections = 0
        self.closing = False
        self.ws: ClientConnection | None = None
        self.task: asyncio.Task[None] | None = None

    def last(self, room: str) -> int:
        seqs = self.got[room]
        return seqs[-1] if seqs else self.first[room]

    def following(self, instance: Instance | None = None) -> bool:
        """Connected (to ``instance`` when given) and subscribed to every room."""
        return (self.instance is not None and self.instance.up
                and (instance is None or self.instance is instance)
                and self.subscribed == set(self.got))

    def holds(self, heads: dict[str, int]) -> bool:
        return all(self.last(room) >= seq for room, seq in heads.items())

    async def start(self) -> None:
        """Connect and subscribe (returns once every room is subscribed)."""
        self.task = asyncio.create_task(self._run())

        async def ready() -> bool:
            if self.task is not None and self.task.done():
                self.task.result()
                pytest.fail(f"client {self.name} ended")
            return self.following()

        await until(ready, f"client {self.name} subscribed")

    async def close(self) -> None:
        self.closing = True
        if self.ws is not None:
            await self.ws.close()
        if self.task is not None:
            done, _ = await asyncio.wait({self.task}, timeout=10)
            if not done:  # still looking for a live instance
                self.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.task

    def _targets(self, lost: Instance | None) -> list[Instance]:
        """Live instances to try, the one just lost excluded, fewest clients first."""
        live = [i for i in self.cluster.live() if i is not lost]
        return sorted(live, key=lambda i: sum(p.instance is i for p in self.peers))

    async def _connect(self, lost: Instance | None) -> ClientConnection:
        """A connection to ``home`` the first time, else to another live instance."""
        first = self.instance if lost is None else None
        while True:
            for target in [first] if first is not None else self._targets(lost):
                try:
                    ws = await connect(target.port, self.user)
                except (OSError, InvalidHandshake, TimeoutError, ConnectionClosed):
                    continue
                self.instance = target
                return ws
            first = self.instance = None
            await asyncio.sleep(0.05)  # the client's back-off: no live instance answered

    async def _run(self) -> None:
        lost: Instance | None = None
        while not self.closing:
            self.subscribed = set()
            self.ws = ws = await self._connect(lost)
            self.connections += 1
            sent: dict[str, int] = {}
            try:
                for room in self.got:
                    sent[room] = self.last(room)
                    await send(ws, type="subscribe", room=room, since=sent[room], ref=room)
                async for raw in ws:
                    for frame in split_message(raw):
                        self._take(frame, sent)
            except ConnectionClosed:
                pass
            lost = self.instance

    def _take(self, frame: dict[str, Any], sent: dict[str, int]) -> None:
        kind, room = frame.get("type"), frame.get("room")
        if kind == "event" and room in self.got:
            seq = frame["seq"]
            if seq != self.last(room) + 1:
                self.anomalies.append(f"{room}: seq {seq} after {self.last(room)} "
                                      f"(connection {self.connections} to {self.instance})")
            self.got[room].append(seq)
        elif kind == "subscribed" and room in sent:
            if frame["from"] != sent[room]:
                self.anomalies.append(f"{room}: subscribed from {frame['from']}, "
                                      f"since {sent[room]} sent")
            self.subscribed.add(room)
        else:
            self.anomalies.append(f"unexpected frame on {self.instance}: {frame}")


def check_exact(client: Resumer, heads: dict[str, int]) -> list[str]:
    """What is wrong with ``client.got``: per room, every seq after its first ``since`` up to the
    head must be there once, in order."""
    problems = []
    for room, seqs in client.got.items():
        want = list(range(client.first[room] + 1, heads[room] + 1))
        if seqs == want:
            continue
        repeated = len(seqs) - len(set(seqs))
        missing = sorted(set(want) - set(seqs))
        at = next((k for k, (a, b) in enumerate(zip(seqs, want, strict=False)) if a != b),
                  min(len(seqs), len(want)))
        problems.append(f"{client.name} {room}: {len(seqs)} events for {len(want)} seqs, "
                        f"{repeated} repeated, missing {missing[:10]}, first difference at "
                        f"index {at}: got {seqs[max(0, at - 3):at + 4]} "
                        f"want {want[max(0, at - 3):at + 4]}")
    return problems


async def caught_up(cluster: Cluster, clients: list[Resumer], conn: Conn, rooms: list[str],
                    what: str, timeout: float = 60.0) -> dict[str, int]:
    """Await every client holding each room's head as of now; return those heads."""
    heads = {room: await head(conn, room) for room in rooms}

    async def holding() -> bool:
        cluster.check()
        for client in clients:
            if client.task is not None and client.task.done():
                client.task.result()
                pytest.fail(f"client {client.name} ended")
        return all(c.holds(heads) for c in clients)

    try:
        await until(holding, f"every client holding the heads {what}", timeout=timeout,
                    every=0.05)
    except BaseException:
        for c in clients:
            print(c.name, c.instance, {r: (c.last(r), heads[r]) for r in rooms}, c.anomalies[:5])
        raise
    return heads


class Writer:
    """Inserts messages round-robin into ``rooms`` at about ``rate`` per second, on a connection
    of its own, until :meth:`stop`."""

    def __init__(self, db: str, user: str, rooms: list[str], rate: float) -> None:
        self.db, self.user, self.rooms, self.rate = db, user, rooms, rate
        self.written = 0
        self.stopping = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.db, autocommit=True) as conn:
            while not self.stopping.is_set():
                room = self.rooms[self.written % len(self.rooms)]
                await post(conn, room, self.user, f"w{self.written}")
                self.written += 1
                with contextlib.suppress(TimeoutError):  # the pace of a steady stream
                    await asyncio.wait_for(self.stopping.wait(), 1 / self.rate)

    async def more(self, n: int, what: str, cluster: Cluster) -> None:
        """Await ``n`` more messages written (the stream flowing through a state of the
        cluster for a while)."""
        target = self.written + n

        async def written() -> bool:
            cluster.check()
            assert self.task is not None
            if self.task.done():
                self.task.result()
                pytest.fail("the writer stopped")
            return self.written >= target

        await until(written, f"{n} more messages written {what}")

    async def stop(self) -> None:
        self.stopping.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)


async def members(conn: Conn, n_users: int, n_rooms: int) -> tuple[list[str], list[str], str]:
    """``n_users`` users and a writer, every one a member of each of ``n_rooms`` new rooms."""
    users = [await make_user(conn, f"u{k}") for k in range(n_users)]
    writer = await make_user(conn, "writer")
    rooms = [await make_room(conn, *users, writer, name=f"r{k}") for k in range(n_rooms)]
    return users, rooms, writer


# --- the NATS server itself ---------------------------------------------------------------------

async def test_nats_server_restarts_on_its_port(nats_server: NatsServer) -> None:
    """The support the tests below stand on: a client of the test's nats-server is cut off by
    a SIGKILL and, the server started again on the same port, reconnects and is served."""
    port = nats_server.port
    assert port not in (None, 4222)
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    async def quiet(_: Exception) -> None:
        pass

    nc = await nats.connect(nats_server.url, reconnect_time_wait=0.1,
                            max_reconnect_attempts=-1, reconnected_cb=on_reconnect,
                            error_cb=quiet)
    try:
        sub = await nc.subscribe("t")
        await nc.publish("t", b"1")
        assert (await sub.next_msg(5)).data == b"1"
        await nats_server.kill()
        assert not nats_server.running
        await nats_server.start()
        assert nats_server.port == port
        await asyncio.wait_for(reconnected.wait(), 20)
        await nc.publish("t", b"2")
        assert (await sub.next_msg(5)).data == b"2"
    finally:
        await nc.close()


# --- broker mode --------------------------------------------------------------------------------

@pytest.mark.slow
async def test_one_leader_and_followers(fresh_db: str, nats_server: NatsServer,
                                        tmp_path: Path) -> None:
    """Three instances, one database, one broker: one becomes the leader (the only one still
    LISTENing), the others followers; an event reaches subscribers on all three, and an event
    of a room only followers hold reaches them too (the leader relays both)."""
    db = await schema_db(fresh_db)
    async with (await psycopg.AsyncConnection.connect(db, autocommit=True) as conn,
                cluster_of(3, db, tmp_path, nats_server) as cluster):
        leader, took = await cluster.settle("three instances started")
        print(f"settled in {took:.2f} s, leader {leader}")
        await one_listener(conn, "three instances settled")

        # ``shared`` is held on every instance; ``followed`` on the followers only (the
        # leader tracks it because they ask it to)
        users, (shared, followed), writer = await members(conn, 3, 2)
        base = {room: await head(conn, room) for room in (shared, followed)}
        plan = {i: [shared] if i is leader else [shared, followed] for i in cluster.instances}
        sockets = {}
        for user, (instance, rooms) in zip(users, plan.items(), strict=True):
            sockets[instance] = ws = await connect(instance.port, user)
            for room in rooms:
                await subscribe(ws, room, since=base[room])
        relayed = sample(await leader.scrape(), "pgbridge_broker_relayed_total") or 0.0
        ids = {room: await post(conn, room, writer, "to every instance")
               for room in (shared, followed)}
        for instance, ws in sockets.items():
            want = {(room, base[room] + 1, ids[room]) for room in plan[instance]}
            got = {(e["room"], e["seq"], e["id"]) for e in await events(ws, len(want))}
            assert got == want, (instance, got, want)
            await ws.close()
        after = sample(await leader.scrape(), "pgbridge_broker_relayed_total")
        assert after is not None and after >= relayed + 2, (relayed, after)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_every_seq_once_in_order_across_kills_and_a_broker_restart(
        fresh_db: str, nats_server: NatsServer, tmp_path: Path) -> None:
    """Three instances and six resuming clients (two per instance, each following three
    rooms) while a writer inserts ~30 messages a second: each instance is SIGKILLed in turn,
    the leader first (its clients resume on another instance with ``since``, a new leader is
    awaited, the instance is started again on its port), and the nats-server is SIGKILLed and
    started again midway; :data:`PHASE` messages are written in each of these states. Every
    client ends with every seq of each room once, in order; no broker message was forged; each
    new leader's epoch is larger than the earlier ones'."""
    db = await schema_db(fresh_db)
    takeovers: list[float] = []
    async with (await psycopg.AsyncConnection.connect(db, autocommit=True) as conn,
                cluster_of(3, db, tmp_path, nats_server) as cluster):
        leader, took = await cluster.settle("three instances started")
        print(f"settled in {took:.2f} s, leader {leader}")
        users, rooms, writer_user = await members(conn, 6, 3)
        base = {room: await head(conn, room) for room in rooms}
        clients: list[Resumer] = []
        for k, user in enumerate(users):
            home = cluster.instances[k % 3]
            clients.append(Resumer(f"c{k}", user, base, cluster, home, clients))
        writer = Writer(db, writer_user, rooms, rate=30.0)
        try:
            for client in clients:
                await client.start()
            writer.start()
            await writer.more(PHASE, "with every instance up", cluster)
            await caught_up(cluster, clients, conn, rooms, "with the writer running")

            order = [leader] + [i for i in cluster.instances if i is not leader]
            for step, victim in enumerate(order):
                if step == 1:  # midway: the broker goes away and comes back on its port
                    gone = time.monotonic()
                    await nats_server.kill()
                    await until(cluster.broker_up(0), "every instance seeing the broker gone")
                    await writer.more(PHASE, "with the broker down", cluster)
                    await nats_server.start()
                    _, took = await cluster.settle("after the nats-server restart")
                    await until(cluster.broker_up(1), "every instance connected to the broker")
                    print(f"settled {took:.2f} s after the nats-server restart "
                          f"({time.monotonic() - gone:.2f} s from its kill)")
                    await caught_up(cluster, clients, conn, rooms, "after the nats-server restart")
                was_leader = await victim.state() == "leader"
                moved = [c for c in clients if c.instance is victim]
                killed = time.monotonic()
                await victim.kill()
                if was_leader:
                    states, took = await cluster.await_states(
                        a_leader, f"a new leader after {victim} was killed")
                    takeovers.append(took)
                    _, took_all = await cluster.settle(f"after {victim} was killed")
                    print(f"{victim} (leader) killed: a new leader after {took:.2f} s "
                          f"({states}), settled after {took + took_all:.2f} s")

                async def resumed(moved: list[Resumer] = moved) -> bool:
                    return all(c.following() for c in moved)

                await until(resumed, f"the clients of {victim} resumed elsewhere")
                print(f"{len(moved)} clients of {victim} resumed elsewhere "
                      f"{time.monotonic() - killed:.2f} s after the kill")
                await writer.more(PHASE, f"with {victim} down", cluster)
                await caught_up(cluster, clients, conn, rooms, f"with {victim} down")
                await victim.start()
                await cluster.settle(f"{victim} started again")
                await writer.more(PHASE, f"after {victim} started again", cluster)
                await caught_up(cluster, clients, conn, rooms, f"after {victim} started again")

            await writer.stop()
            heads = await caught_up(cluster, clients, conn, rooms, "at the end", timeout=90.0)

            await one_listener(conn, "at the end")
            for instance in cluster.instances:
                forged = sample(await instance.scrape(), "pgbridge_broker_forged_total")
                assert forged == 0, (instance, forged)
        finally:
            if writer.task is not None and not writer.task.done():
                await writer.stop()
            for client in clients:
                await client.close()
        print(f"{writer.written} messages written; heads {heads}; takeovers "
              f"{[round(t, 2) for t in takeovers]} s; connections per client "
              f"{[c.connections for c in clients]}")
        problems = [p for c in clients for p in check_exact(c, heads)]
        assert not problems, "\n".join(problems)
        anomalies = [f"{c.name}: {a}" for c in clients for a in c.anomalies]
        assert not anomalies, "\n".join(anomalies[:30])
        assert takeovers, "no leader was killed"
        # the fencing token: each new leader's epoch is larger than every earlier one's
        leaders = sorted((r["ts"], r["epoch"], i.name) for i in cluster.instances
                         for run in i.runs for r in run.with_event("broker_leader"))
        assert len(leaders) >= 1 + len(takeovers), leaders
        epochs = [epoch for _, epoch, _ in leaders]
        assert all(a < b for a, b in itertools.pairwise(epochs)), leaders
        assert all(c.connections >= 2 for c in clients), [c.connections for c in clients]


@pytest.mark.slow
async def test_falls_back_when_the_broker_is_down(fresh_db: str, nats_server: NatsServer,
                                                  tmp_path: Path) -> None:
    """The broker SIGKILLed under two running instances: both fall back to reading the log
    themselves and events still arrive; the broker started again on its port, they return to
    leader and follower (one LISTENing again) and events keep arriving, each once, in order."""
    db = await schema_db(fresh_db)
    async with (await psycopg.AsyncConnection.connect(db, autocommit=True) as conn,
                cluster_of(2, db, tmp_path, nats_server) as cluster):
        leader, _ = await cluster.settle("two instances started")
        (follower,) = [i for i in cluster.instances if i is not leader]
        users, rooms, writer = await members(conn, 2, 1)
        base = {room: await head(conn, room) for room in rooms}
        clients: list[Resumer] = []
        for user, home in zip(users, cluster.instances, strict=True):
            clients.append(Resumer(f"c-{home.name}", user, base, cluster, home, clients))
        try:
            for client in clients:
                await client.start()

            async def write(n: int, what: str) -> None:
                for k in range(n):
                    await post(conn, rooms[0], writer, f"{what} {k}")
                await caught_up(cluster, clients, conn, rooms, what, timeout=30.0)

            await write(3, "with the broker up")
            fell_back = sample(await follower.scrape(), "pgbridge_broker_fallbacks_total") or 0.0

            await nats_server.kill()

            await cluster.await_states(all_fallback, "both in fallback with the broker down")
            await until(cluster.broker_up(0), "both instances reporting the broker down")
            now = sample(await follower.scrape(), "pgbridge_broker_fallbacks_total")
            assert now is not None and now > fell_back, (fell_back, now)
            await write(5, "with the broker down")
            assert set((await cluster.states()).values()) == {"fallback"}

            await nats_server.start()
            _, took = await cluster.settle("the broker back")
            print(f"settled {took:.2f} s after the broker came back")
            await until(cluster.broker_up(1), "both instances connected to the broker again")

            await one_listener(conn, "the broker back")
            await write(5, "with the broker back")
            heads = {room: await head(conn, room) for room in rooms}
        finally:
            for client in clients:
                await client.close()
        assert all(c.connections == 1 for c in clients), [c.connections for c in clients]
        problems = [p for c in clients for p in check_exact(c, heads)]
        assert not problems, "\n".join(problems)
        anomalies = [f"{c.name}: {a}" for c in clients for a in c.anomalies]
        assert not anomalies, "\n".join(anomalies)


async def streaming(cluster: Cluster, conn: Conn, n_rooms: int) -> tuple[
        list[Resumer], list[str], Writer]:
    """One resuming client per instance following ``n_rooms`` new rooms, subscribed, and a
    writer started on them at 30 messages a second."""
    users, rooms, writer_user = await members(conn, len(cluster.instances), n_rooms)
    base = {room: await head(conn, room) for room in rooms}
    clients: list[Resumer] = []
    for user, home in zip(users, cluster.instances, strict=True):
        clients.append(Resumer(f"c-{home.name}", user, base, cluster, home, clients))
    writer = Writer(cluster.instances[0].db, writer_user, rooms, rate=30.0)
    for client in clients:
        await client.start()
    writer.start()
    return clients, rooms, writer


async def finish(clients: list[Resumer], writer: Writer) -> None:
    if writer.task is not None and not writer.task.done():
        await writer.stop()
    for client in clients:
        await client.close()


def assert_exact(clients: list[Resumer], heads: dict[str, int]) -> None:
    problems = [p for c in clients for p in check_exact(c, heads)]
    assert not problems, "\n".join(problems)
    anomalies = [f"{c.name}: {a}" for c in clients for a in c.anomalies]
    assert not anomalies, "\n".join(anomalies[:30])


@pytest.mark.slow
async def test_followers_fall_back_while_the_leader_is_frozen(
        fresh_db: str, nats_server: NatsServer, tmp_path: Path) -> None:
    """The leader SIGSTOPped (alive, its lock held, silent): the followers hear no heartbeat,
    fall back, and their clients keep getting events; SIGCONT: the cluster settles again and
    every client, the frozen leader's too, has every seq once, in order, on its one
    connection."""
    db = await schema_db(fresh_db)
    async with (await psycopg.AsyncConnection.connect(db, autocommit=True) as conn,
                cluster_of(3, db, tmp_path, nats_server) as cluster):
        leader, _ = await cluster.settle("three instances started")
        followers = [i for i in cluster.instances if i is not leader]
        clients, rooms, writer = await streaming(cluster, conn, 2)
        try:
            await writer.more(PHASE, "with every instance up", cluster)
            await caught_up(cluster, clients, conn, rooms, "with every instance up")
            assert leader.daemon.proc is not None
            leader.daemon.proc.send_signal(signal.SIGSTOP)
            frozen = time.monotonic()
            try:
                async def fell_back() -> bool:
                    found = await asyncio.gather(*(i.state() for i in followers))
                    return set(found) == {"fallback"}

                await until(fell_back, "both followers in fallback with the leader frozen")
                print(f"followers in fallback {time.monotonic() - frozen:.2f} s after the "
                      f"leader {leader} was frozen")
                await writer.more(PHASE, "with the leader frozen", cluster)
                await caught_up(cluster, [c for c in clients if c.instance is not leader],
                                conn, rooms, "on the followers with the leader frozen")
            finally:
                leader.daemon.proc.send_signal(signal.SIGCONT)
            new, took = await cluster.settle("the leader thawed")
            print(f"settled {took:.2f} s after the thaw, leader {new}")
            await writer.more(PHASE, "after the thaw", cluster)
            await writer.stop()
            heads = await caught_up(cluster, clients, conn, rooms, "at the end")
        finally:
            await finish(clients, writer)
        assert_exact(clients, heads)
        assert all(c.connections == 1 for c in clients), [c.connections for c in clients]


@pytest.mark.slow
async def test_a_leader_whose_lock_connection_is_terminated_steps_down(
        fresh_db: str, nats_server: NatsServer, tmp_path: Path) -> None:
    """The backend that holds the leader's advisory lock terminated (pg_terminate_backend):
    the lock passes to a waiting instance, which leads with a larger epoch; the old leader
    steps down; the cluster settles and every client has every seq once, in order."""
    db = await schema_db(fresh_db)
    async with (await psycopg.AsyncConnection.connect(db, autocommit=True) as conn,
                cluster_of(3, db, tmp_path, nats_server) as cluster):
        leader, _ = await cluster.settle("three instances started")
        clients, rooms, writer = await streaming(cluster, conn, 2)
        try:
            await writer.more(PHASE, "with every instance up", cluster)
            await caught_up(cluster, clients, conn, rooms, "with every instance up")
            (epoch,) = [r["epoch"] for r in leader.daemon.with_event("broker_leader")]
            cur = await conn.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
            (holder,) = await cur.fetchall()
            terminated = time.monotonic()
            await conn.execute("SELECT pg_terminate_backend(%s)", holder)
            await leader.daemon.wait_event("broker_stepped_down")
            stepped_down = time.monotonic() - terminated

            def elected() -> list[tuple[str, int]]:
                return [(r["ts"], r["epoch"]) for i in cluster.instances
                        for r in i.daemon.with_event("broker_leader") if r["epoch"] > epoch]

            async def a_new_epoch() -> bool:
                return bool(elected())

            await until(a_new_epoch, f"a leader with an epoch after {epoch}")
            new, _ = await cluster.settle("the lock connection terminated")
            print(f"the old leader {leader} stepped down {stepped_down:.2f} s after its lock "
                  f"connection was terminated; new epochs {elected()}; settled with {new} "
                  f"after {time.monotonic() - terminated:.2f} s")
            await writer.more(PHASE, "after the lock passed on", cluster)
            await writer.stop()
            heads = await caught_up(cluster, clients, conn, rooms, "at the end")
        finally:
            await finish(clients, writer)
        assert_exact(clients, heads)
        assert all(c.connections == 1 for c in clients), [c.connections for c in clients]


@pytest.mark.slow
async def test_forged_broker_messages_are_dropped_and_counted(
        fresh_db: str, nats_server: NatsServer, tmp_path: Path) -> None:
    """Anyone who can reach NATS can publish: on a room's subject, junk, a genuine event with
    one byte changed, a genuine event of another room, and on the leader's subject junk, are
    dropped and counted by the follower (``pgbridge_broker_forged_total``); a genuine event
    replayed is a repeat, dropped. The follower's client gets each event once."""
    db = await schema_db(fresh_db)
    async with (await psycopg.AsyncConnection.connect(db, autocommit=True) as conn,
                cluster_of(2, db, tmp_path, nats_server) as cluster):
        leader, _ = await cluster.settle("two instances started")
        (follower,) = [i for i in cluster.instances if i is not leader]
        (user, other_user), (room, other), writer = await members(conn, 2, 2)
        base = await head(conn, room)
        spy = await nats.connect(nats_server.url)
        try:
            heard = await spy.subscribe("pgbridge.*.room.*")
            ws = await connect(follower.port, user)
            await subscribe(ws, room, since=base)
            # held on the leader too: it relays both rooms whether or not the follower's
            # request to track ``room`` was answered yet
            bystander = await connect(leader.port, other_user)
            await subscribe(bystander, room)
            await subscribe(bystander, other)
            first = await post(conn, room, writer, "genuine")
            assert [(e["seq"], e["id"]) for e in await events(ws, 1)] == [(base + 1, first)]
            genuine = await heard.next_msg(10)
            assert genuine.subject.endswith(f".room.{room}"), genuine.subject
            await post(conn, other, writer, "another room")
            elsewhere = await heard.next_msg(10)
            assert elsewhere.subject.endswith(f".room.{other}"), elsewhere.subject
            prefix = genuine.subject.rsplit(".room.", 1)[0]
            forged_before = sample(await follower.scrape(), "pgbridge_broker_forged_total")
            assert forged_before == 0, forged_before

            data = genuine.data
            tampered = data[:-2] + bytes([data[-2] ^ 1]) + data[-1:]
            forgeries = [(genuine.subject, b"junk"), (genuine.subject, tampered),
                         (genuine.subject, elsewhere.data), (f"{prefix}.leader", b"junk")]
            for subject, payload in forgeries:
                await spy.publish(subject, payload)
            await spy.publish(genuine.subject, data)  # a replay: a repeat, not a forgery
            await spy.flush()

            async def counted() -> bool:
                found = sample(await follower.scrape(), "pgbridge_broker_forged_total")
                return found is not None and found >= len(forgeries)

            await until(counted, f"{len(forgeries)} forgeries counted by the follower")
            second = await post(conn, room, writer, "after the forgeries")
            assert [(e["seq"], e["id"]) for e in await events(ws, 1)] == [(base + 2, second)]
            await send(ws, type="ping", ref="p")
            assert await recv(ws) == {"type": "pong", "ref": "p"}  # nothing else queued
            forged = sample(await follower.scrape(), "pgbridge_broker_forged_total")
            assert forged == len(forgeries), forged
            await ws.close()
            await bystander.close()
        finally:
            await spy.close()


async def new_heartbeat(spy: nats.NATS, key: NotifyKey,
                        timeout: float = 20.0) -> tuple[Heartbeat, str]:
    """The first leader's heartbeat signed with ``key`` heard on any install's leader subject,
    and its subjects' prefix (those of an older key are passed over)."""
    beats = await spy.subscribe("pgbridge.*.leader")
    try:
        async with asyncio.timeout(timeout):
            while True:
                msg = await beats.next_msg(timeout)
                beat = read_heartbeat(BrokerKeys.of(key).control, msg.data)
                if beat is not None:
                    return beat, msg.subject.removesuffix(".leader")
    except TimeoutError:
        pytest.fail(f"no heartbeat signed with the key {key.fingerprint} in {timeout:g} s")
    finally:
        await beats.unsubscribe()


# A new signing key, made as sql/schema.sql makes the first one.
NEW_KEY = """
DO $$
DECLARE
    k bytea := uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid());
    ipad bytea := k || decode(repeat('00', 32), 'hex');
    opad bytea := ipad;
BEGIN
    FOR i IN 0..63 LOOP
        ipad := set_byte(ipad, i, get_byte(ipad, i) # 54);
        opad := set_byte(opad, i, get_byte(opad, i) # 92);
    END LOOP;
    INSERT INTO change_notify_key (key, ipad, opad) VALUES (k, ipad, opad);
END
$$"""


@pytest.mark.slow
async def test_a_rotated_key_moves_the_cluster_to_its_subjects(
        fresh_db: str, nats_server: NatsServer, tmp_path: Path) -> None:
    """The signing key rotated under a running cluster (its row replaced in one transaction, as
    sql/schema.sql makes it) while a writer inserts: a leader beats on the new key's subjects
    and every instance follows it, the cluster settles with one LISTENing connection, events
    are relayed on the new subjects, no genuine NOTIFY or broker message is counted as forged,
    and every client has every seq once, in order, on its one connection."""
    db = await schema_db(fresh_db)
    async with (await psycopg.AsyncConnection.connect(db, autocommit=True) as conn,
                cluster_of(3, db, tmp_path, nats_server) as cluster):
        await cluster.settle("three instances started")
        clients, rooms, writer = await streaming(cluster, conn, 2)
        spy = await nats.connect(nats_server.url)
        try:
            await writer.more(PHASE, "with the first key", cluster)
            await caught_up(cluster, clients, conn, rooms, "with the first key")
            _, old = await notify_trust(conn)
            async with conn.transaction():  # writes in between would find no key: they fail
                await conn.execute("DELETE FROM change_notify_key")
                await conn.execute(NEW_KEY)
            _, new = await notify_trust(conn)
            assert new.fingerprint != old.fingerprint
            rotated = time.monotonic()
            beat, prefix = await new_heartbeat(spy, new)
            relayed = await spy.subscribe(f"{prefix}.room.*")

            async def on_the_new_leader() -> bool:  # which beats on the new key's subjects
                cluster.check()
                return all(any(r.get("event") in ("broker_leader", "broker_following")
                               and r.get("epoch") == beat.epoch for r in i.daemon.records)
                           for i in cluster.instances)

            await until(on_the_new_leader, f"every instance on the leader of epoch {beat.epoch}")
            await cluster.settle("after the key rotation")
            print(f"settled {time.monotonic() - rotated:.2f} s after the rotation")
            await one_listener(conn, "after the key rotation")
            await writer.more(PHASE, "with the new key", cluster)
            await relayed.next_msg(10)
            await writer.stop()
            heads = await caught_up(cluster, clients, conn, rooms, "at the end")
            # a genuine payload is never taken for a forgery, before, during or after
            forged = {i.name: [sample(samples, name) for name in (
                "pgbridge_forged_notifies_total", "pgbridge_broker_forged_total")]
                for i in cluster.instances for samples in [await i.scrape()]}
        finally:
            await finish(clients, writer)
            await spy.close()
        assert_exact(clients, heads)
        assert all(counts == [0, 0] for counts in forged.values()), forged
        assert all(c.connections == 1 for c in clients), [c.connections for c in clients]
