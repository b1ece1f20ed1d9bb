"""The files the daemon serves over HTTP besides ``/ws``: the JavaScript client and the demo page.

The files live in ``clients/js/`` (``daemon/web`` in a wheel): ``pgbridge.js`` at
``/client.js`` and ``/pgbridge.js``, its declarations ``pgbridge.d.ts`` at ``/client.d.ts`` and
``/pgbridge.d.ts``, and, only while the demo is on (``PGBRIDGE_DEMO``; on by default with the
embedded database), the demo page at ``/`` with its script and style sheet. Each response has a
content type, an ``ETag`` (``If-None-Match`` is answered 304) and ``Cache-Control: no-cache``; the
client files may be imported by pages of any origin (``Access-Control-Allow-Origin: *``: public
code; whether such a page may connect is ``PGBRIDGE_ALLOWED_ORIGINS``'s call), and the
page has a Content-Security-Policy that lets it run only its own scripts and talk only to its
own origin. Pure apart from reading the files once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable

__all__ = ["Asset", "asset_for"]

JS = "text/javascript; charset=utf-8"
# path -> (file in clients/js, content type, served only while the demo is on)
ROUTES: dict[str, tuple[str, str, bool]] = {
    "/client.js": ("pgbridge.js", JS, False),
    "/pgbridge.js": ("pgbridge.js", JS, False),
    "/client.d.ts": ("pgbridge.d.ts", "application/typescript; charset=utf-8", False),
    "/pgbridge.d.ts": ("pgbridge.d.ts", "application/typescript; charset=utf-8", False),
    "/": ("demo.html", "text/html; charset=utf-8", True),
    "/demo.js": ("demo.js", JS, True),
    "/demo.css": ("demo.css", "text/css; charset=utf-8", True),
}
# The demo page may run its own scripts and styles and talk to its own origin (the WebSocket
# included), nothing else: messages are hostile text, shown with textContent only, and this is
# the second line of defence.
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str

    def headers(self) -> tuple[tuple[str, str], ...]:
        """Headers besides the content type and length (served with ``Cache-Control:
        no-cache``: revalidated with the ETag on every use)."""
        extra = [("ETag", self.etag), ("X-Content-Type-Options", "nosniff"),
                 ("Referrer-Policy", "no-referrer")]
        if self.content_type.startswith("text/html"):
            extra.append(("Content-Security-Policy", PAGE_POLICY))
        else:  # a page of another origin imports the client as a module (a CORS request);
            # public code, fetched without credentials
            extra.append(("Access-Control-Allow-Origin", "*"))
        return tuple(extra)

    def fresh(self, if_none_match: str | None) -> bool:
        """Whether the client's copy (``If-None-Match``) is this one (answer 304)."""
        if not if_none_match:
            return False
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in tags or self.etag in tags


def _web_dir() -> Traversable:
    packaged = resources.files("daemon") / "web"
    if packaged.is_dir():
        return packaged
    return resources.files("daemon").joinpath("..", "clients", "js")  # a source checkout


@cache
def _load(name: str, content_type: str) -> Asset:
    body = (_web_dir() / name).read_bytes()
    return Asset(body, content_type, f'"{hashlib.sha256(body).hexdigest()[:32]}"')


def asset_for(path: str, *, demo: bool) -> Asset | None:
    """The file served at ``path`` (``None``: not one of ours, or the demo is off)."""
    route = ROUTES.get(path)
    if route is None or (route[2] and not demo):
        return None
    return _load(route[0], route[1])
