#!/usr/bin/env python3
"""The floor under fan-out: what one write to a loopback TCP socket costs the writing process,
with nothing of pgbridge around it.

    python -m bench.send_floor [--connections 1000] [--rounds 200] [--size 400]
                               [--frames 1,2,5]

``--connections`` sockets are accepted from a reader process that drains them all; the writer
sends, round after round (2 ms apart, so every write finds its socket empty as a fan-out's
does), one message of ``--size`` x F bytes to each socket, with ``TCP_NODELAY`` as asyncio sets
it, for each F of ``--frames`` (frames per message, as coalescing makes them). Reported per F:
the writer's CPU (user + system, getrusage) per ``send()`` and per frame carried. docs/topics/fan-out-cost.md
compares the daemon's CPU per delivery (bench/fanout.py) with this: what is left
above it is the daemon's own work.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import selectors
import socket
import sys
import time


def drain(port: int, connections: int, expected: int, done: mp.synchronize.Event) -> None:
    """Connect ``connections`` sockets and read until ``expected`` bytes arrived in all."""
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    selector = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    got = 0
    while got < expected:
        for key, _ in selector.select(1.0):
            try:
                got += len(key.fileobj.recv(1 << 20))  # type: ignore[union-attr]
            except BlockingIOError:
                pass
    done.set()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(connections: int, rounds: int, size: int, frames: int) -> float:
    """µs of this process's CPU per send() of ``size * frames`` bytes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(connections)
    port = listener.getsockname()[1]
    message = b"x" * (size * frames)
    done = mp.get_context("spawn").Event()
    reader = mp.get_context("spawn").Process(
        target=drain, args=(port, connections, connections * rounds * len(message), done))
    reader.start()
    socks = [listener.accept()[0] for _ in range(connections)]
    for sock in socks:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = cpu_seconds()
    for _ in range(rounds):
        for sock in socks:
            sock.sendall(message)
        time.sleep(0.002)
    used = cpu_seconds() - start
    done.wait(60)
    reader.join(10)
    for sock in socks:
        sock.close()
    listener.close()
    return used / (connections * rounds) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--size", type=int, default=400, help="bytes of one frame (400)")
    parser.add_argument("--frames", default="1,2,5", help="frames per message to try (1,2,5)")
    args = parser.parse_args()
    try:
        counts = [int(v) for v in args.frames.split(",")]
    except ValueError:
        parser.error("--frames: comma-separated integers")
    if min([args.connections, args.rounds, args.size, *counts]) < 1:
        parser.error("--connections, --rounds, --size and --frames must be positive")
    print(f"send floor: {args.connections} loopback connections, {args.rounds} rounds, "
          f"{args.size}-byte frames, TCP_NODELAY")
    for frames in counts:
        per_send = measure(args.connections, args.rounds, args.size, frames)
        print(f"  {frames} frame(s) per message: {per_send:6.2f} µs of CPU per send(), "
              f"{per_send / frames:6.2f} µs per frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
