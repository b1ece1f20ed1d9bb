"""Real TCP proxies: between a bridge and the test PostgreSQL, to make the database slow,
silent or gone for the bridge alone (the test's own connections go direct); and between a
browser and a bridge, to make the browser a client that stops reading."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any


class _Proxy:
    """Accepts connections on 127.0.0.1 (a free port, returned by :meth:`start`) and runs
    :meth:`_handle` for each; :meth:`close` resumes whatever was held up and ends them all."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def resume(self) -> None:
        raise NotImplementedError

    async def start(self) -> int:
        def spawn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            task = asyncio.create_task(self._handle(r, w))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self.server = await asyncio.start_server(spawn, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self.resume()
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class FreezingProxy(_Proxy):
    """TCP proxy to the test PostgreSQL.

    :meth:`freeze_listeners` black-holes the server→client direction of the connections that
    have LISTENed so far (called ``pgbridge_listen()``, as the daemon's listener does);
    :meth:`freeze_all` black-holes every connection, open or new, both ways (a network path that
    drops packets); :meth:`refuse` closes every connection and refuses new ones (a server that
    is down); :meth:`refuse_on` does that when a client sends a given statement, which never
    reaches the server (a link that breaks at one exact step); :meth:`resume` undoes them.
    """

    def __init__(self, upstream: dict[str, Any]) -> None:
        super().__init__()
        self.upstream = upstream
        self.listener_connections = 0
        self.new_listener = asyncio.Event()
        self.freeze_new_listeners = False  # also black-hole LISTEN connections made from now
        self._listeners: list[dict[str, bool]] = []
        self._states: list[dict[str, bool]] = []
        self.frozen_all = False
        self.refusing = False
        self._trip: bytes | None = None
        self.tripped = asyncio.Event()
        self._pumps: set[asyncio.Task[None]] = set()

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host = str(self.upstream.get("host") or "localhost")
        port = int(self.upstream.get("port") or 5432)
        if host.startswith("/"):
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(host, port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        up_reader, up_writer = await self._open_upstream()
        state = {"listener": False, "frozen": self.frozen_all}
        self._states.append(state)

        async def client_to_server() -> None:
            while data := await reader.read(65536):
                if self._trip is not None and self._trip in data:
                    self._trip = None
                    self.tripped.set()
                    self.refuse()
                    return
                if state["frozen"] and not state["listener"]:
                    continue  # a frozen connection's requests never arrive either
                if b'"pgbridge_listen"()' in data and not state["listener"]:
                    state["listener"] = True
                    state["frozen"] = self.freeze_new_listeners
                    self.listener_connections += 1
                    self._listeners.append(state)
                    self.new_listener.set()
                up_writer.write(data)
                await up_writer.drain()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                if state["frozen"]:
                    continue  # black hole: the bytes never arrive
                writer.write(data)
                await writer.drain()

        pumps = [asyncio.create_task(client_to_server()), asyncio.create_task(server_to_client())]
        self._pumps.update(pumps)
        try:
            with contextlib.suppress(Exception):
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            for w in (writer, up_writer):
                w.close()

    def freeze_listeners(self) -> None:
        for state in self._listeners:
            state["frozen"] = True
        self.new_listener.clear()

    def freeze_all(self) -> None:
        self.frozen_all = True
        for state in self._states:
            state["frozen"] = True

    def refuse(self) -> None:
        self.refusing = True
        for pump in self._pumps:
            pump.cancel()

    def refuse_on(self, statement: bytes) -> None:
        """:meth:`refuse` as soon as a client sends bytes containing ``statement`` (once);
        ``tripped`` is set then."""
        self.tripped.clear()
        self._trip = statement

    def resume(self) -> None:
        self.frozen_all = self.refusing = False
        for state in self._states:
            state["frozen"] = False



class PausingProxy(_Proxy):
    """TCP proxy to ``127.0.0.1:port`` (a bridge) whose server-to-client direction can be
    paused: it then stops reading from the server, so the server's socket fills up exactly as
    with a client that stops reading (its own receive buffer is kept small to make that quick).
    """

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port
        self.running = asyncio.Event()
        self.running.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        except OSError:
            sock.close()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(sock=sock, limit=16384)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       pausable: bool) -> None:
            with contextlib.suppress(OSError):
                while True:
                    if pausable:
                        await self.running.wait()
                    data = await src.read(16384)
                    if not data:
                        break
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))

    def pause(self) -> None:
        self.running.clear()

    def resume(self) -> None:
        self.running.set()

