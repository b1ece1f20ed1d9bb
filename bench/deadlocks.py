#!/usr/bin/env python3
"""Multi-room transactions: how often they deadlock on the per-room counters, and what taking the
counters in a fixed order (sql/triggers/30_room_lock_order.sql) changes.

    python -m bench.deadlocks [--dsn DSN] [--rooms 12] [--member-of 6] [--users 48]
                              [--connections 8] [--reactions 6] [--reads 6] [--batch 4] [--pairs 8]
                              [--messages 20] [--rounds 3] [--deadlock-timeout MS]
                              [--seed N] [--keep]

Every captured change takes its room's counter row (change_sequences) until commit, so a
transaction that writes to several rooms takes them in the order its rows come, and two such
transactions can deadlock: PostgreSQL aborts one with SQLSTATE 40P01 after deadlock_timeout.

Scenarios, each run ``--rounds`` times per variant on fresh data (variants alternate, ABBA):

* ``one user per DELETE``: ``--users`` users, each a member of ``--member-of`` of the same
  ``--rooms`` rooms (memberships inserted in a random order per user, so each user's cascade
  meets the rooms in its own order), each with ``--reactions`` reactions and ``--reads`` reads on
  random messages of any room; then all of them hard-deleted by ``--connections`` concurrent
  connections, one user per transaction (``DELETE FROM users WHERE id = $1``). Variants: ``unordered`` (trigger
  users_lock_rooms disabled: the behaviour before 30_room_lock_order.sql) and ``ordered`` (as
  shipped: the BEFORE DELETE trigger takes the user's rooms in room_id order first).
* ``--batch users per DELETE``: the same, ``DELETE FROM users WHERE id = ANY($1)`` with
  ``--batch`` users per statement, which the trigger does not cover (each row's rooms are taken
  in order, but row after row); plus ``ordered + lock_rooms``: the transaction first calls
  ``pgbridge_lock_rooms`` with every room of the batch's users.
* ``bulk moves``: ``--pairs`` pairs of rooms with ``--messages`` messages each; for every pair,
  two concurrent transactions ``UPDATE messages SET channel_id = B WHERE channel_id = A`` and
  the opposite, all pairs at once; the rooms are refilled between rounds. Variants: plain, and
  ``pgbridge_lock_rooms(ARRAY[A, B])`` first in each transaction.

A deadlocked transaction (rolled back whole) is counted and run again after the others, alone
(retried at once it mostly deadlocks again); the table gives the transactions, how many of them
hit 40P01, and the time until every one committed, which includes deadlock_timeout of waiting
for each deadlock (``--deadlock-timeout`` sets it for the bench's sessions,
superuser only; default: the server's). After every run each room's seqs are checked to be
1..n without a gap. Last, what the trigger costs one deletion: server time per single-user
hard delete (a DO block with a COMMIT after each, synchronous_commit off so that the WAL flush
does not drown the difference), with and without the trigger.

The server is ``--dsn`` (needs CREATEDB; default DATABASE_URL / POSTGRES_*, else the embedded
PostgreSQL as setup_db.py) ; the bench creates a database of its own and drops it at the end
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from ulid import ULID

from bench.common import scratch_database
from bench.write_overhead import target
from daemon.db import describe
from daemon.schema import apply_schema

AsyncConn = psycopg.AsyncConnection[Any]
COST_USERS = 400  # users deleted per run when measuring what the trigger costs

# Every room a batch of users' hard delete writes to (what 30_room_lock_order.sql's trigger
# computes for one user), for the ``ordered + lock_rooms`` variant.
LOCK_USERS_ROOMS = """
SELECT pgbridge_lock_rooms(ARRAY(
    SELECT channel_id FROM channel_members WHERE user_id = ANY(%(users)s)
    UNION SELECT m.channel_id FROM reactions r JOIN messages m ON m.id = r.message_id
          WHERE r.user_id = ANY(%(users)s)
    UNION SELECT m.channel_id FROM message_reads mr JOIN messages m ON m.id = mr.message_id
          WHERE mr.user_id = ANY(%(users)s)))
"""


@dataclass
class Outcome:
    transactions: int = 0
    deadlocks: int = 0
    seconds: float = 0.0

    def add(self, other: Outcome) -> None:
        self.transactions += other.transactions
        self.deadlocks += other.deadlocks
        self.seconds += other.seconds


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", help="server conninfo or URL, a role with CREATEDB (default: "
                        "DATABASE_URL, POSTGRES_*, else the embedded PostgreSQL)")
    parser.add_argument("--rooms", type=int, default=12, help="rooms (12)")
    parser.add_argument("--member-of", type=int, default=6,
                        help="rooms each user is a member of, picked at random (6)")
    parser.add_argument("--users", type=int, default=48, help="users deleted per run (48)")
    parser.add_argument("--connections", type=int, default=8,
                        help="concurrent deleting connections (8)")
    parser.add_argument("--reactions", type=int, default=6,
                        help="reactions per user, on random messages of random rooms (6)")
    parser.add_argument("--reads", type=int, default=6,
                        help="message_reads per user, on random messages (6)")
    parser.add_argument("--batch", type=int, default=4,
                        help="users per DELETE statement in the batch scenario (4)")
    parser.add_argument("--pairs", type=int, default=8,
                        help="room pairs moved concurrently in the bulk-move scenario (8)")
    parser.add_argument("--messages", type=int, default=20,
                        help="messages per room of the bulk-move scenario (20)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per variant (3)")
    parser.add_argument("--deadlock-timeout", type=int, metavar="MS",
                        help="deadlock_timeout of the bench's sessions in ms (superuser only; "
                        "default: the server's setting)")
    parser.add_argument("--seed", type=int, default=13, help="random seed (13)")
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    args = parser.parse_args()
    for name in ("rooms", "member_of", "users", "connections", "batch", "pairs", "messages",
                 "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.member_of > args.rooms:
        parser.error("--member-of must not exceed --rooms")
    if args.reactions < 0 or args.reads < 0:
        parser.error("--reactions and --reads must not be negative")
    return args


class Bench:
    def __init__(self, conninfo: str, args: argparse.Namespace) -> None:
        self.conninfo = conninfo
        self.args = args
        self.rng = random.Random(args.seed)

    # --- set-up -------------------------------------------------------------------------------

    async def connect(self) -> AsyncConn:
        conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
        if self.args.deadlock_timeout is not None:
            await conn.execute(sql.SQL("SET deadlock_timeout = {}").format(
                sql.Literal(f"{self.args.deadlock_timeout}ms")))
        return conn

    async def trigger(self, conn: AsyncConn, enabled: bool) -> None:
        await conn.execute(sql.SQL("ALTER TABLE users {} TRIGGER users_lock_rooms").format(
            sql.SQL("ENABLE" if enabled else "DISABLE")))

    async def empty(self, conn: AsyncConn) -> None:
        await conn.execute("TRUNCATE users, channels, messages, channel_members, reactions, "
                           "message_reads, files, sync_state, user_settings, user_status, "
                           "change_events, change_sequences")

    async def new_users(self, conn: AsyncConn, n: int) -> list[str]:
        ids = [str(ULID()) for _ in range(n)]
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO users (id, auth0_id, email, username) VALUES (%s, %s, %s, 'bench')",
                [(u, f"bench|{u}", f"{u}@bench.invalid") for u in ids])
        return ids

    async def new_rooms(self, conn: AsyncConn, n: int) -> list[str]:
        ids = [str(ULID()) for _ in range(n)]
        async with conn.cursor() as cur:
            await cur.executemany("INSERT INTO channels (id, name) VALUES (%s, 'bench')",
                                  [(r,) for r in ids])
        return ids

    async def new_messages(self, conn: AsyncConn, author: str, rooms: list[str],
                           per_room: int) -> list[str]:
        rows = [(str(ULID()), room, author, room) for room in rooms for _ in range(per_room)]
        async with conn.cursor() as cur:
            # content = the message's home room, so bulk moves can be undone between rounds
            await cur.executemany("INSERT INTO messages (id, channel_id, user_id, content) "
                                  "VALUES (%s, %s, %s, %s)", rows)
        return [r[0] for r in rows]

    async def populate_users(self, conn: AsyncConn, n: int) -> list[str]:
        """Fresh rooms, messages and ``n`` users, each in ``--member-of`` rooms, with reactions
        and reads; returns the users (in a random order)."""
        a = self.args
        await self.empty(conn)
        rooms = await self.new_rooms(conn, a.rooms)
        [author] = await self.new_users(conn, 1)
        messages = await self.new_messages(conn, author, rooms, 4)
        users = await self.new_users(conn, n)
        members: list[tuple[str, str]] = []
        reactions: list[tuple[str, str, str]] = []
        reads: list[tuple[str, str]] = []
        for user in users:
            # each user's rows in a random order: the cascade finds them in that (physical)
            # order and writes the rooms' events in it
            members += [(room, user) for room in self.rng.sample(rooms, a.member_of)]
            reactions += [(str(ULID()), m, user)
                          for m in self.rng.sample(messages, min(a.reactions, len(messages)))]
            reads += [(m, user) for m in self.rng.sample(messages, min(a.reads, len(messages)))]
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO channel_members (channel_id, user_id) VALUES (%s, %s)", members)
            await cur.executemany("INSERT INTO reactions (id, message_id, user_id, emoji) "
                                  "VALUES (%s, %s, %s, ':+1:')", reactions)
            await cur.executemany(
                "INSERT INTO message_reads (message_id, user_id) VALUES (%s, %s)", reads)
        self.rng.shuffle(users)
        return users

    async def check_seqs(self, conn: AsyncConn) -> None:
        cur = await conn.execute(
            "SELECT count(*) FROM (SELECT e.room_id FROM change_events e "
            "JOIN change_sequences s USING (room_id) GROUP BY e.room_id, s.last_seq "
            "HAVING min(e.seq) <> 1 OR max(e.seq) <> count(*) OR max(e.seq) <> s.last_seq) bad")
        row = await cur.fetchone()
        if row is None or row[0]:
            raise SystemExit(f"bench: {row and row[0]} rooms have seqs that are not 1..n")

    # --- concurrent transactions --------------------------------------------------------------

    async def run_concurrently(self, jobs: list[Callable[[AsyncConn], Awaitable[None]]],
                               connections: int) -> Outcome:
        """Run ``jobs`` (each one transaction) on ``connections`` connections, all started
        together. A job that deadlocks (rolled back whole) is counted and run again after the
        others, alone: retried at once, it would mostly meet the same transactions again."""
        outcome = Outcome(transactions=len(jobs))
        queue = list(reversed(jobs))
        again: list[Callable[[AsyncConn], Awaitable[None]]] = []
        conns = [await self.connect() for _ in range(min(connections, len(jobs)))]

        async def worker(conn: AsyncConn) -> None:
            while queue:
                job = queue.pop()
                try:
                    async with conn.transaction():
                        await job(conn)
                except psycopg.errors.DeadlockDetected:
                    outcome.deadlocks += 1
                    again.append(job)
        try:
            started = time.perf_counter()
            await asyncio.gather(*(worker(c) for c in conns))
            for job in again:
                async with conns[0].transaction():
                    await job(conns[0])
            outcome.seconds = time.perf_counter() - started
        finally:
            for c in conns:
                await c.close()
        return outcome

    async def deletions(self, conn: AsyncConn, variant: str, batch: int) -> Outcome:
        await self.trigger(conn, variant != "unordered")
        users = await self.populate_users(conn, self.args.users)
        batches = [users[i:i + batch] for i in range(0, len(users), batch)]
        lock_first = variant == "ordered + lock_rooms"

        def job(ids: list[str]) -> Callable[[AsyncConn], Awaitable[None]]:
            async def run(c: AsyncConn) -> None:
                if lock_first:
                    await c.execute(LOCK_USERS_ROOMS, {"users": ids})
                if len(ids) == 1:
                    await c.execute("DELETE FROM users WHERE id = %s", [ids[0]])
                else:
                    await c.execute("DELETE FROM users WHERE id = ANY(%s)", [ids])
            return run

        outcome = await self.run_concurrently([job(b) for b in batches], self.args.connections)
        cur = await conn.execute("SELECT count(*) FROM users WHERE username = 'bench'")
        row = await cur.fetchone()
        assert row and row[0] == 1, "not every user was deleted"  # the author is left
        await self.check_seqs(conn)
        return outcome

    async def moves(self, conn: AsyncConn, variant: str, pairs: list[tuple[str, str]]) -> Outcome:
        await self.trigger(conn, True)
        # every message back to its home room (content), one room at a time
        await conn.execute("UPDATE messages SET channel_id = content WHERE channel_id <> content")
        lock_first = variant == "with pgbridge_lock_rooms"

        def job(src: str, dst: str) -> Callable[[AsyncConn], Awaitable[None]]:
            async def run(c: AsyncConn) -> None:
                if lock_first:
                    await c.execute("SELECT pgbridge_lock_rooms(%s)", [[src, dst]])
                await c.execute("UPDATE messages SET channel_id = %s WHERE channel_id = %s",
                                (dst, src))
            return run

        jobs = [job(a, b) for a, b in pairs] + [job(b, a) for a, b in pairs]
        outcome = await self.run_concurrently(jobs, len(jobs))
        await self.check_seqs(conn)
        return outcome

    # --- what the trigger costs ---------------------------------------------------------------

    async def deletion_cost(self, conn: AsyncConn, enabled: bool, in_rooms: bool) -> float:
        """Server time per single-user hard delete, microseconds (one DO block, COMMIT each)."""
        await self.trigger(conn, enabled)
        users = await self.populate_users(conn, COST_USERS)
        if not in_rooms:
            await conn.execute("DELETE FROM channel_members; DELETE FROM reactions; "
                               "DELETE FROM message_reads")
        await conn.execute("VACUUM ANALYZE")
        block = sql.SQL("DO $$ DECLARE u text; BEGIN FOREACH u IN ARRAY {}::text[] LOOP "
                        "DELETE FROM users WHERE id = u; COMMIT; END LOOP; END $$"
                        ).format(sql.Literal(users))
        await conn.execute("SET synchronous_commit = off")
        started = time.perf_counter()
        await conn.execute(block)
        await conn.execute("RESET synchronous_commit")
        return (time.perf_counter() - started) / len(users) * 1e6

    # --- the whole bench ----------------------------------------------------------------------

    async def run(self) -> None:
        a = self.args
        conn = await self.connect()
        try:
            await self.header(conn)
            rows: list[tuple[str, str, Outcome]] = []
            scenarios: list[tuple[str, int, list[str]]] = [
                ("one user per DELETE", 1, ["unordered", "ordered"]),
                (f"{a.batch} users per DELETE", a.batch,
                 ["unordered", "ordered", "ordered + lock_rooms"]),
            ]
            for title, batch, variants in scenarios:
                totals = {v: Outcome() for v in variants}
                for r in range(a.rounds):
                    for v in (variants if r % 2 == 0 else variants[::-1]):
                        totals[v].add(await self.deletions(conn, v, batch))
                rows += [(title, v, totals[v]) for v in variants]

            await self.empty(conn)
            rooms = await self.new_rooms(conn, 2 * a.pairs)
            [author] = await self.new_users(conn, 1)
            await self.new_messages(conn, author, rooms, a.messages)
            pairs = [(rooms[2 * i], rooms[2 * i + 1]) for i in range(a.pairs)]
            move_variants = ["plain", "with pgbridge_lock_rooms"]
            totals = {v: Outcome() for v in move_variants}
            for r in range(a.rounds):
                for v in (move_variants if r % 2 == 0 else move_variants[::-1]):
                    totals[v].add(await self.moves(conn, v, pairs))
            rows += [("bulk moves A->B || B->A", v, totals[v]) for v in move_variants]
            self.report(rows)

            costs: dict[tuple[bool, bool], list[float]] = {}
            for r in range(max(a.rounds, 5)):
                for in_rooms in (True, False):
                    for enabled in ((False, True) if r % 2 == 0 else (True, False)):
                        costs.setdefault((in_rooms, enabled), []).append(
                            await self.deletion_cost(conn, enabled, in_rooms))
            self.report_cost(costs)
            await self.trigger(conn, True)
        finally:
            await conn.close()

    async def header(self, conn: AsyncConn) -> None:
        a = self.args
        cur = await conn.execute("SELECT current_setting('server_version'), "
                                 "current_setting('deadlock_timeout'), "
                                 "current_setting('synchronous_commit')")
        row = await cur.fetchone()
        assert row
        print(f"pgbridge multi-room deadlocks: {a.users} users, each in {a.member_of} of "
              f"{a.rooms} rooms (+{a.reactions} reactions, +{a.reads} reads), "
              f"{a.connections} connections; "
              f"{a.pairs} room pairs x {a.messages} messages; {a.rounds} runs per variant")
        print(f"server: PostgreSQL {row[0]} at {describe(self.conninfo)} "
              f"(deadlock_timeout={row[1]}, synchronous_commit={row[2]})")

    def report(self, rows: list[tuple[str, str, Outcome]]) -> None:
        print(f"\n  {'scenario':<26} {'variant':<26} {'txns':>6} {'40P01':>6} {'per txn':>8} "
              f"{'time s':>7} {'txn/s':>7}")
        last = ""
        for title, variant, o in rows:
            rate = o.deadlocks / o.transactions if o.transactions else 0.0
            tps = o.transactions / o.seconds if o.seconds else 0.0
            print(f"  {title if title != last else '':<26} {variant:<26} {o.transactions:>6} "
                  f"{o.deadlocks:>6} {rate:>8.1%} {o.seconds:>7.2f} {tps:>7.0f}")
            last = title
        print("  (txns: transactions; 40P01: those aborted by a deadlock, then retried alone; "
              "time: all runs)\n  seqs checked after every run: 1..n without a gap in "
              "every room")

    def report_cost(self, costs: dict[tuple[bool, bool], list[float]]) -> None:
        a = self.args
        print(f"\nserver time per single-user hard delete ({COST_USERS} users in a DO block, "
              "COMMIT after each, synchronous_commit off), median and best of "
              f"{len(costs[(True, True)])} alternating runs")
        print(f"  {'user':<40} {'no trigger':>16} {'trigger':>16} {'added (median)':>18}")
        for in_rooms, label in ((True, f"in {a.member_of} rooms, {a.reactions} reactions, "
                                         f"{a.reads} reads"),
                                (False, "in no room, no reactions, no reads")):
            off, on = costs[(in_rooms, False)], costs[(in_rooms, True)]
            mid_off, mid_on = statistics.median(off), statistics.median(on)
            print(f"  {label:<40} {mid_off:>7.0f} ({min(off):>4.0f}) us {mid_on:>7.0f} "
                  f"({min(on):>4.0f}) us {mid_on - mid_off:>+8.0f} us ({(mid_on - mid_off) / mid_off:+.0%})")


def main() -> int:
    args = parse_args()
    with target(args.dsn) as conninfo, scratch_database(conninfo, "deadlocks",
                                                        keep=args.keep) as db:
        asyncio.run(apply_schema(db, schema="public"))
        asyncio.run(Bench(db, args).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
