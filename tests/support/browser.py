"""A real browser for tests: headless Chromium through selenium's WebDriver, and a static HTTP
server for the pages it loads.

Chromium is ``PGBRIDGE_CHROMIUM`` (default ``/usr/bin/chromium``) driven by
``PGBRIDGE_CHROMEDRIVER`` (default ``/usr/bin/chromedriver``; Debian: ``apt-get install
chromium chromium-driver``). Both paths are given to selenium, so Selenium Manager never looks
for (or downloads) a browser or a driver. Without them a test skips, except under ``CI=true``
where it fails: CI must run the browser tests.

Selenium's calls block until the browser answers. A test whose bridge runs in the test's event
loop makes them through :func:`asyncio.to_thread` (:func:`async_chromium`, :func:`run_async`),
so that the bridge keeps serving while the browser waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socketserver
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

__all__ = ["CHROMIUM_FLAGS", "StaticServer", "async_chromium", "browser_paths", "chromium",
           "run_async"]

CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
)


def browser_paths() -> tuple[str, str]:
    """``(chromium, chromedriver)``; skips the test when either is missing (fails under
    ``CI=true``)."""
    chromium_path = os.environ.get("PGBRIDGE_CHROMIUM") or "/usr/bin/chromium"
    driver_path = os.environ.get("PGBRIDGE_CHROMEDRIVER") or "/usr/bin/chromedriver"
    missing = [f"{what} {path!r}" for what, path in (
        ("Chromium (PGBRIDGE_CHROMIUM)", chromium_path),
        ("chromedriver (PGBRIDGE_CHROMEDRIVER)", driver_path))
        if not (Path(path).is_file() and os.access(path, os.X_OK))]
    if missing:
        reason = (f"browser test needs {' and '.join(missing)}: not an executable file "
                  "(Debian: apt-get install chromium chromium-driver)")
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so browser tests may not be skipped")
        pytest.skip(reason)
    return chromium_path, driver_path


@contextlib.contextmanager
def chromium(*, script_timeout: float = 20.0, page_load_timeout: float = 30.0) -> Iterator[Any]:
    """A headless Chromium WebDriver with a fresh profile, quit (and its profile removed)
    when the block ends. Blocking: from async code use :func:`async_chromium`."""
    chromium_path, driver_path = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="pgbridge-chromium-")
    try:
        options = Options()
        options.binary_location = chromium_path
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        service = Service(executable_path=driver_path, log_output=subprocess.DEVNULL)
        driver = webdriver.Chrome(options=options, service=service)
        try:
            driver.set_script_timeout(script_timeout)
            driver.set_page_load_timeout(page_load_timeout)
            yield driver
        finally:
            driver.quit()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@contextlib.asynccontextmanager
async def async_chromium(**kwargs: float) -> AsyncIterator[Any]:
    """:func:`chromium`, started and quit in a worker thread (the event loop keeps running)."""
    manager = chromium(**kwargs)
    driver = await asyncio.to_thread(manager.__enter__)
    try:
        yield driver
    except BaseException as exc:
        if not await asyncio.to_thread(manager.__exit__, type(exc), exc, exc.__traceback__):
            raise
    else:
        await asyncio.to_thread(manager.__exit__, None, None, None)


async def run_async(driver: Any, script: str, *args: Any) -> Any:
    """``driver.execute_async_script(script, *args)`` in a worker thread: the script's result
    (what it passes to its callback, ``arguments[arguments.length - 1]``)."""
    return await asyncio.to_thread(driver.execute_async_script, script, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the threads of the requests
    block_on_close = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for the name of the address (socket.getfqdn): skipped
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class StaticServer:
    """Serves ``pages`` (path -> HTML) on 127.0.0.1, on a free port, from a thread; anything
    else is 404. Use as a context manager; ``origin`` is the pages' origin
    (``http://127.0.0.1:<port>``)."""

    def __init__(self, pages: Mapping[str, str | bytes]) -> None:
        bodies = {path: body.encode() if isinstance(body, str) else body
                  for path, body in pages.items()}
        self.requests: list[str] = []
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a connection the browser opened and never used ends on its own

            def do_GET(self) -> None:
                requests.append(self.path)
                body = bodies.get(self.path.split("?", 1)[0])
                status = HTTPStatus.OK if body is not None else HTTPStatus.NOT_FOUND
                payload = body if body is not None else b"not found\n"
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8"
                                 if body is not None else "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # tests read self.requests instead of stderr

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self.origin = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"static-http-{self.port}", daemon=True)
        self._started = False

    def url(self, path: str = "/") -> str:
        return f"{self.origin}{path}"

    def __enter__(self) -> StaticServer:
        self._thread.start()
        self._started = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving, close the listening socket and join the request threads."""
        if self._started:
            self._server.shutdown()
            self._thread.join()
            self._started = False
        self._server.server_close()
