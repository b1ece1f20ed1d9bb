"""The demo on the embedded database (nothing configured): a user and a room created once, and
the banner that tells how to watch and write them.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import psycopg
from psycopg import sql

from .auth import mint_token
from .db import translated
from .settings import DaemonSettings

__all__ = ["banner", "ensure_demo"]


async def ensure_demo(conninfo: str, schema: str) -> tuple[str, str]:
    """On the embedded database: a demo user and room (created once); returns their ids.
    Raises :class:`daemon.errors.DatabaseError`."""
    with translated(conninfo, doing="creating the demo user and room"):
        return await _ensure_demo(conninfo, schema)


async def _ensure_demo(conninfo: str, schema: str) -> tuple[str, str]:
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute("SELECT set_config('search_path', %s, false)",
                           [sql.Identifier(schema).as_string(conn)])
        async with conn.transaction():
            cur = await conn.execute(
                "INSERT INTO users (auth0_id, email, username, full_name) "
                "VALUES ('pgbridge|demo', 'demo@pgbridge.invalid', 'demo', 'Demo User') "
                "ON CONFLICT (auth0_id) DO UPDATE SET deleted_at = NULL RETURNING id")
            user = str((await cur.fetchone() or ("",))[0])
            cur = await conn.execute(
                "SELECT c.id FROM channels c JOIN channel_members m ON m.channel_id = c.id "
                "WHERE m.user_id = %s AND c.name = 'general' AND c.deleted_at IS NULL LIMIT 1",
                [user])
            row = await cur.fetchone()
            if row is None:
                cur = await conn.execute("INSERT INTO channels (name, description) VALUES "
                                         "('general', 'pgbridge demo room') RETURNING id")
                row = await cur.fetchone()
                assert row is not None
                await conn.execute("INSERT INTO channel_members (channel_id, user_id, role) "
                                   "VALUES (%s, %s, 'owner')", (row[0], user))
            return user, str(row[0])


def banner(settings: DaemonSettings, secret: str, *, port: int, conninfo: str, user: str,
           room: str) -> str:
    """What the bridge prints on the embedded database once it listens on ``port``: the demo
    page, a 24-hour token for ``user`` and the commands to watch and write ``room``."""
    token = mint_token(secret, user, ttl=86400, audience=settings.jwt_audience,
                       issuer=settings.jwt_issuer)
    url = f"ws://{settings.host}:{port}/ws"
    page = (f"http://{settings.host}:{port}/#token={token}&room={room}"
            if settings.demo else None)
    script = Path(sys.executable).with_name("pgbridge")
    pgbridge = "pgbridge" if shutil.which("pgbridge") == str(script) or not script.exists() \
        else str(script)
    return (
        "\npgbridge is running on the embedded PostgreSQL (nothing was configured).\n"
        + (f"  demo page:  {page}\n" if page else "")
        + f"  WebSocket:  {url}?token=<token>\n"
        f"  demo user:  {user}   room 'general': {room}\n"
        f"  token (24 h): {token}\n"
        f"  watch it:   {pgbridge} tail {room} --url {url} --token {token}\n"
        f"  write (psql): psql '{conninfo}' -c \"INSERT INTO messages (channel_id, user_id, "
        f"content) VALUES ('{room}', '{user}', 'hello')\"\n"
    )
