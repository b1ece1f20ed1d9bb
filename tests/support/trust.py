"""Fixtures of the database-trust tests (``tests/integration/conftest.py`` imports them): the
three roles of a production set-up, the owner (the test's superuser, runs setup), the
application (``setup_db.py --grant-app``) and the bridge (``--grant-bridge``), plus a role with
no privilege at all, and a database with the schema applied and the roles granted
(tests/integration/test_db_trust.py, test_listen_trust.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from daemon.app import Bridge
from daemon.roles import Grants
from daemon.schema import apply_schema_sync
from tests.support.helpers import connect, make_room, make_user, subscribe

AsyncConn = psycopg.AsyncConnection[Any]


@dataclass(frozen=True)
class Roles:
    app: str
    bridge: str
    nobody: str


@dataclass(frozen=True)
class TrustDB:
    """A database with the schema applied and the roles granted; conninfos per role."""

    owner: str
    app: str
    bridge: str
    nobody: str

    def as_role(self, who: str) -> str:
        return str(getattr(self, who))


@pytest.fixture
def make_role(pg_server_conninfo: str) -> Iterator[Callable[..., str]]:
    """Factory: a new login role (unique name, not superuser, no privilege granted), with the
    extra ``CREATE ROLE`` options given (``"CONNECTION LIMIT 1"``); dropped after the test."""
    created: list[str] = []

    def make(options: str = "") -> str:
        name = f"pgbridge_r_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(pg_server_conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER {}").format(
                sql.Identifier(name), sql.SQL(options)))  # type: ignore[arg-type]
        created.append(name)
        return name

    yield make
    with psycopg.connect(pg_server_conninfo, autocommit=True) as conn:
        for name in created:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def roles(pg_server_conninfo: str) -> Iterator[Roles]:
    suffix = uuid.uuid4().hex[:8]
    names = Roles(app=f"pgbridge_app_{suffix}", bridge=f"pgbridge_bridge_{suffix}",
                  nobody=f"pgbridge_nobody_{suffix}")
    with psycopg.connect(pg_server_conninfo, autocommit=True) as conn:
        for name in (names.app, names.bridge, names.nobody):
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    yield names
    with psycopg.connect(pg_server_conninfo, autocommit=True) as conn:
        for name in (names.app, names.bridge, names.nobody):
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def trust_db(create_database: Callable[[], str], roles: Roles) -> Iterator[TrustDB]:
    url = create_database()
    report = apply_schema_sync(url, grants=Grants(app=(roles.app,), bridge=(roles.bridge,)))
    assert report.warnings == []
    yield TrustDB(owner=url, app=make_conninfo(url, user=roles.app),
                  bridge=make_conninfo(url, user=roles.bridge),
                  nobody=make_conninfo(url, user=roles.nobody))
    with psycopg.connect(url, autocommit=True) as conn:  # so that the roles can be dropped
        conn.execute(sql.SQL("DROP OWNED BY {}, {}, {}").format(
            *map(sql.Identifier, (roles.app, roles.bridge, roles.nobody))))


@asynccontextmanager
async def connected(conninfo: str) -> AsyncIterator[AsyncConn]:
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        yield conn


@pytest.fixture(params=["app", "nobody"])
def attacker(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def setup_room(trust_db: TrustDB, bridge: Bridge) -> tuple[str, str, Any, int]:
    """A user (made by the application role), the only member of a new room, subscribed."""
    async with connected(trust_db.app) as app:
        user = await make_user(app)
        room = await make_room(app, user)
    ws = await connect(bridge.port, user)
    start = int((await subscribe(ws, room))["from"])
    return user, room, ws, start
