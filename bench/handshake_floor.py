#!/usr/bin/env python3
"""The floor under a handshake: what accepting a WebSocket connection and answering one request
on it costs a Python server, with nothing of pgbridge around it.

    python -m bench.handshake_floor [--connections 3000] [--event-loop asyncio,uvloop]
                                    [--rounds 2]

Three servers, each in its own process, answer the same clients: a ``GET`` with an upgrade, then
one masked text frame (a ``subscribe``-sized JSON object), answered with one text frame:

* ``socket``: an :class:`asyncio.Protocol` that answers with fixed bytes and parses nothing:
  the cost of accepting the TCP connection, two reads and two writes (kernel and event loop);
* ``sans-io``: websockets' sans-I/O :class:`~websockets.server.ServerProtocol` driven from an
  :class:`asyncio.Protocol`, as :mod:`daemon.connection` drives it;
* ``websockets``: websockets' asyncio server (``serve()``, a handler task per connection), as
  the daemon served connections before :mod:`daemon.connection`.

The client (this process) opens ``--connections`` connections, 50 at a time, and keeps them
open. Reported per server and event loop, each ``--rounds`` times: the server's CPU (user +
system, from ``/proc``) per connection from the first connect to the last reply, its RSS
growth per connection once the last reply arrived, and both as ratios to ``socket`` of the same
round. docs/topics/fan-out-cost.md compares the daemon's handshake + subscribe
(``bench/fanout.py --scenario idle``) with these.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from typing import Any

SERVERS = ("socket", "sans-io", "websockets")
REPLY = json.dumps({"type": "subscribed", "room": "0" * 26, "from": 0, "head": 0}).encode()
REQUEST = json.dumps({"type": "subscribe", "room": "0" * 26, "ref": "s1"}).encode()


def serve(kind: str, port: int) -> None:
    """Run server ``kind`` on ``port`` until killed; print ``ready`` once listening."""
    from websockets.frames import Frame, Opcode
    from websockets.http11 import Request
    from websockets.server import ServerProtocol

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if kind == "websockets":
            from websockets.asyncio.server import ServerConnection
            from websockets.asyncio.server import serve as ws_serve
            from websockets.exceptions import ConnectionClosed

            async def handler(ws: ServerConnection) -> None:
                try:
                    async for _ in ws:
                        await ws.send(REPLY, text=True)
                except ConnectionClosed:
                    pass

            await ws_serve(handler, "127.0.0.1", port, compression=None, ping_interval=None)
        elif kind == "sans-io":
            class SansIo(asyncio.Protocol):
                __slots__ = ("protocol", "transport")

                def connection_made(self, transport: Any) -> None:
                    self.transport = transport
                    self.protocol = ServerProtocol(max_size=65536)

                def data_received(self, data: bytes) -> None:
                    protocol = self.protocol
                    protocol.receive_data(data)
                    for event in protocol.events_received():
                        if isinstance(event, Request):
                            protocol.send_response(protocol.accept(event))
                        elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                            protocol.send_text(REPLY)
                    for chunk in protocol.data_to_send():
                        if chunk:
                            self.transport.write(chunk)

            await loop.create_server(SansIo, "127.0.0.1", port)
        else:
            answer = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n")
            frame = bytes([0x81, len(REPLY)]) + REPLY

            class Socket(asyncio.Protocol):
                __slots__ = ("answered", "transport")

                def connection_made(self, transport: Any) -> None:
                    self.transport = transport
                    self.answered = False

                def data_received(self, data: bytes) -> None:
                    self.transport.write(frame if self.answered else answer)
                    self.answered = True

            await loop.create_server(Socket, "127.0.0.1", port)
        print("ready", flush=True)
        await asyncio.Event().wait()

    if os.environ.get("FLOOR_LOOP") == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


async def open_clients(port: int, connections: int) -> list[asyncio.StreamWriter]:
    """``connections`` upgraded connections, each having sent REQUEST and read the reply."""
    key = base64.b64encode(os.urandom(16)).decode()
    upgrade = (f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    frame = bytes([0x81, 0x80 | len(REQUEST)]) + b"\0\0\0\0" + REQUEST  # masked with zeros
    writers: list[asyncio.StreamWriter] = []
    in_flight = asyncio.Semaphore(50)

    async def one() -> None:
        async with in_flight:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(upgrade)
            await reader.readuntil(b"\r\n\r\n")
            writer.write(frame)
            await reader.readexactly(2 + len(REPLY))
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(connections)))
    return writers


def measure(kind: str, loop: str, connections: int) -> tuple[float, float]:
    """(µs of server CPU, KB of server RSS) per connection."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(port)],
                              stdout=subprocess.PIPE, env={**os.environ, "FLOOR_LOOP": loop})
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"server {kind} did not start")
        time.sleep(0.3)
        cpu0, rss0 = cpu_seconds(server.pid), rss_kb(server.pid)

        async def run() -> tuple[float, float]:
            writers = await open_clients(port, connections)
            cpu1, rss1 = cpu_seconds(server.pid), rss_kb(server.pid)
            for writer in writers:
                writer.close()
            return cpu1, rss1

        cpu1, rss1 = asyncio.run(run())
        return 1e6 * (cpu1 - cpu0) / connections, (rss1 - rss0) * 1024 / 1000 / connections
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--event-loop", default="asyncio,uvloop",
                        help="comma-separated: asyncio, uvloop (skipped when not installed)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    loops = args.event_loop.split(",")
    if "uvloop" in loops:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            print("uvloop is not installed: skipped", file=sys.stderr)
            loops.remove("uvloop")
    print(f"handshake floor: {args.connections:,} connections, each an upgrade + one "
          f"request and reply; the server's CPU and RSS per connection, {os.cpu_count()} CPUs")
    print(f"{'server':12} {'loop':8} {'round':>5} {'µs/conn':>8} {'x socket':>8} "
          f"{'KB/conn':>8} {'x socket':>8}")
    for loop in loops:
        for round_ in range(1, args.rounds + 1):
            base_us, base_kb = measure("socket", loop, args.connections)
            for kind in SERVERS:
                us, kb = ((base_us, base_kb) if kind == "socket"
                          else measure(kind, loop, args.connections))
                print(f"{kind:12} {loop:8} {round_:>5} {us:8.0f} {us / base_us:8.2f} "
                      f"{kb:8.1f} {kb / base_kb:8.2f}", flush=True)


if __name__ == "__main__":
    main()
