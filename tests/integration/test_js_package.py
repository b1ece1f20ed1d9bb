"""The npm package (clients/js, ``@pgbridge/client``) as a user gets it: ``npm pack`` gives a
tarball of the client's files only; installed with ``ws`` into an empty project, its types pass
``tsc --strict`` (an event narrowed on ``table`` has the row's columns) and a Node program that
imports it receives the events of a room from a real daemon, including after starting against a
port nobody listened on yet (``error`` ``connect_failed`` ``refused`` first); a certificate it
does not trust and a host that does not resolve are ``connect_failed`` ``tls`` and
``unreachable``.

Needs Node >= 20 and npm, and the npm registry (``ws`` and ``typescript`` are installed from
it): without them the tests skip, and fail under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.test_js_client import node
from tests.support.fixtures import ROOT, running_bridge
from tests.support.helpers import make_room, make_user, post, token
from tests.support.procs import free_port

AsyncConn = psycopg.AsyncConnection[Any]
SHIPPED = {"package.json", "README.md", "pgbridge.js", "pgbridge.d.ts", "rows.d.ts", "react.js",
           "react.d.ts"}


def unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true, so this may not be skipped")
    pytest.skip(reason)


def npm() -> str:
    node()
    path = shutil.which("npm")
    if not path:
        unavailable("the npm package's tests need npm (found none on PATH)")
    assert path
    return path


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    """An empty project with the packed tarball, ``ws``, ``@types/ws`` and ``typescript``
    installed; and the files of the tarball."""
    npm_path = npm()
    packs = tmp_path_factory.mktemp("pack")
    done = run(npm_path, "pack", "--json", "--pack-destination", str(packs),
               cwd=ROOT / "clients" / "js")
    assert done.returncode == 0, done.stderr[-3000:]
    [packed] = json.loads(done.stdout)
    tarball = packs / packed["filename"]
    assert tarball.is_file()
    app = tmp_path_factory.mktemp("app")
    (app / "package.json").write_text(json.dumps({"name": "app", "private": True,
                                                  "type": "module"}))
    done = run(npm_path, "install", "--no-audit", "--no-fund", str(tarball), "ws@8",
               "typescript@5", "@types/ws@8", cwd=app)
    if done.returncode != 0:
        unavailable(f"npm install from the registry failed: {done.stderr[-1500:]}")
    shutil.copy(ROOT / "tests" / "support" / "js_package_client.mjs", app / "client.mjs")
    yield app, [f["path"] for f in packed["files"]]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_npm_pack_ships_only_the_client(project: tuple[Path, list[str]]) -> None:
    app, files = project
    assert set(files) <= SHIPPED, set(files) - SHIPPED
    assert {"package.json", "README.md", "pgbridge.js", "pgbridge.d.ts", "rows.d.ts"} <= set(files)
    installed = app / "node_modules" / "@pgbridge" / "client"
    assert json.loads((installed / "package.json").read_text())["name"] == "@pgbridge/client"
    assert not (installed / "test").exists() and not (installed / "scripts").exists()


CONSUMER = """\
import { PgBridge, type BridgeEvent, type Row, type ConnectFailure } from "@pgbridge/client";
import type { MessagesRow, TableName } from "@pgbridge/client/rows";
import WebSocket from "ws";

const bridge = new PgBridge("ws://127.0.0.1:1/ws", { token: "t", WebSocket });
bridge.addEventListener("error", (e) => {
  const cause: ConnectFailure | undefined = e.detail.cause;
  void cause;
});
bridge.subscribe("room", {
  onEvent(event: BridgeEvent) {
    if (event.table === "messages") {
      const body: string = event.data.content;
      const row: Row<"messages"> = event.data;
      const same: MessagesRow = row;
      const deleted: string | null = event.data.deleted_at;
      void body; void same; void deleted;
    } else if (event.table === "channel_members") {
      const role: "owner" | "admin" | "member" | "guest" = event.data.role;
      void role;
    }
    // @ts-expect-error: not narrowed, `data` may be a row without `content`
    void event.data.content;
  },
});
const table: TableName = "reactions";
void table;

// the ./react entry's types resolve from the tarball too (type-checked only: React is not
// installed, react.d.ts needs none of its types)
import { useRoom, type MessageRow } from "@pgbridge/client/react";
export function lastContent(b: PgBridge): string | undefined {
  const { messages } = useRoom(b, "room", { snapshot: 20 });
  const last: MessageRow | undefined = messages[messages.length - 1];
  return last?.content;
}
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_packed_types_narrow_an_event_on_its_table(project: tuple[Path, list[str]]) -> None:
    app, _files = project
    (app / "consumer.ts").write_text(CONSUMER)
    done = run(node(), str(app / "node_modules" / "typescript" / "bin" / "tsc"), "--noEmit",
               "--strict", "--module", "nodenext", "--moduleResolution", "nodenext", "--target",
               "es2022", "--lib", "es2022,dom", "--skipLibCheck", "false", "consumer.ts",
               cwd=app)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


async def lines(proc: asyncio.subprocess.Process) -> Any:
    assert proc.stdout is not None
    async for raw in proc.stdout:
        yield json.loads(raw)


async def next_line(stream: Any, kind: str, timeout: float = 30.0) -> dict[str, Any]:
    async def find() -> dict[str, Any]:
        async for line in stream:
            if line["kind"] == kind:
                return dict(line)
        pytest.fail(f"the Node program ended before a {kind!r} line")

    return await asyncio.wait_for(find(), timeout)


async def start_client(app: Path, url: str, user: str, room: str,
                       count: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        node(), "client.mjs", url, token(user), room, str(count), cwd=app,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def finish(proc: asyncio.subprocess.Process) -> str:
    assert proc.stderr is not None
    err = await asyncio.wait_for(proc.stderr.read(), 30)
    assert await asyncio.wait_for(proc.wait(), 30) == 0, err.decode()
    return err.decode()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_the_installed_package_receives_a_rooms_events(
        project: tuple[Path, list[str]], db_url: str, conn: AsyncConn) -> None:
    app, _files = project
    user = await make_user(conn)
    room = await make_room(conn, user)
    async with running_bridge(db_url) as bridge:
        proc = await start_client(app, f"ws://127.0.0.1:{bridge.port}/ws", user, room, 3)
        try:
            stream = lines(proc)
            start = (await next_line(stream, "subscribed"))["from"]
            for text in ("one", "two", "three"):
                await post(conn, room, user, text)
            got = [await next_line(stream, "event") for _ in range(3)]
            await finish(proc)
        finally:
            if proc.returncode is None:
                proc.kill()
    assert [(g["seq"], g["table"], g["op"], g["content"]) for g in got] == [
        (start + 1, "messages", "INSERT", "one"), (start + 2, "messages", "INSERT", "two"),
        (start + 3, "messages", "INSERT", "three")]


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_bridge_not_listening_is_error_refused_then_connects_once_it_starts(
        project: tuple[Path, list[str]], db_url: str, conn: AsyncConn) -> None:
    app, _files = project
    user = await make_user(conn)
    room = await make_room(conn, user)
    port = free_port()
    proc = await start_client(app, f"ws://127.0.0.1:{port}/ws", user, room, 1)
    try:
        stream = lines(proc)
        error = await next_line(stream, "error")
        assert (error["code"], error["cause"], error["errno"], error["fatal"]) == (
            "connect_failed", "refused", "ECONNREFUSED", False), error
        assert error["attempt"] == 0
        assert (await next_line(stream, "state"))["state"] == "reconnecting"
        async with running_bridge(db_url, port=port):
            await next_line(stream, "subscribed")
            mid = await post(conn, room, user, "after the outage")
            event = await next_line(stream, "event")
            await finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert (event["table"], event["content"]) == ("messages", "after the outage"), (event, mid)


def self_signed(directory: Path) -> ssl.SSLContext:
    """A server TLS context with a certificate for 127.0.0.1 that nobody trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgbridge test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


async def serve_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("failure", ["tls", "unreachable"])
async def test_a_connection_that_cannot_be_made_says_why(
        project: tuple[Path, list[str]], tmp_path: Path, failure: str) -> None:
    """A certificate the client does not trust: ``tls``; a host name that does not resolve
    (``.invalid``, RFC 2606): ``unreachable``. Not fatal: it goes on retrying."""
    app, _files = project
    server = None
    if failure == "tls":
        server = await asyncio.start_server(serve_nothing, "127.0.0.1", 0,
                                            ssl=self_signed(tmp_path))
        url = f"wss://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws"
    else:
        url = "ws://pgbridge-test.invalid/ws"
    proc = await start_client(app, url, "01JD3V6Z7W2Q4X8Y9A0B1C2D3E", "01JD3V6Z7W2Q4X8Y9A0B1C2D3E",
                              1)
    try:
        stream = lines(proc)
        first, second = [await next_line(stream, "error") for _ in range(2)]
    finally:
        proc.kill()
        await proc.wait()
        if server is not None:
            server.close()
            await server.wait_closed()
    assert (first["code"], first["cause"], first["fatal"]) == ("connect_failed", failure,
                                                               False), first
    assert (second["cause"], second["attempt"]) == (failure, 1), second
    assert first["errno"], first  # the system error code the `ws` package gave
