"""The baseline of bench/fanout.py: the common Python recipe for PostgreSQL -> WebSocket.

encode/broadcaster with its postgres backend (asyncpg LISTEN) behind a Starlette WebSocket
endpoint, served by uvicorn with its defaults, fed by a plain NOTIFY trigger (``SETUP_SQL``:
``pg_notify('room_' || channel_id, row_to_json(NEW)::text)`` on every insert). A client connects
to ``/ws/{room}`` and receives each NOTIFY payload of the room as one text frame; nothing is
logged, sequenced or replayed. The endpoint is the broadcaster README's chat example, minus the
publishing half, plus the usual workaround for broadcaster's known race (encode/broadcaster
issue #22): two first subscribers of a channel at once run two LISTENs on its one asyncpg
connection and fail with "another operation is in progress", so entering a subscription is
serialized by a lock.

    BASELINE_DATABASE_URL=postgresql://... uvicorn --app-dir bench baseline_broadcaster:app

``GET /healthz`` answers 200 once the broadcaster's LISTEN connection is up.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
from broadcaster import Broadcast
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

# The baseline's own table (same columns as pgbridge's messages that the bench writes) and a
# plain NOTIFY trigger. Applied by bench/fanout.py to a database of its own.
SETUP_SQL = """
CREATE TABLE IF NOT EXISTS messages (
    id BIGSERIAL PRIMARY KEY,
    channel_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    content TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    metadata JSONB
);
CREATE OR REPLACE FUNCTION notify_message() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('room_' || NEW.channel_id, row_to_json(NEW)::text);
    RETURN NULL;
END
$$;
CREATE OR REPLACE TRIGGER messages_notify AFTER INSERT ON messages
    FOR EACH ROW EXECUTE FUNCTION notify_message();
"""

broadcast = Broadcast(os.environ.get("BASELINE_DATABASE_URL", "postgresql:///postgres"))
subscribing = asyncio.Lock()  # broadcaster issue #22 (see above)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await broadcast.connect()
    try:
        yield
    finally:
        await broadcast.disconnect()


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def room_ws(websocket: WebSocket) -> None:
    room = websocket.path_params["room"]
    await websocket.accept()
    async with anyio.create_task_group() as tasks:

        async def receiver() -> None:
            async for _ in websocket.iter_text():
                pass
            tasks.cancel_scope.cancel()

        tasks.start_soon(receiver)
        async with AsyncExitStack() as stack:
            async with subscribing:
                subscriber = await stack.enter_async_context(
                    broadcast.subscribe(channel=f"room_{room}"))
            async for event in subscriber:  # type: ignore[union-attr]
                await websocket.send_text(event.message)


app = Starlette(routes=[Route("/healthz", healthz), WebSocketRoute("/ws/{room}", room_ws)],
                lifespan=lifespan)
