"""Which browser origins may open a connection (``PGBRIDGE_PUBLIC_ORIGIN``,
``PGBRIDGE_ALLOWED_ORIGINS``).

Pure. Tokens travel in URLs (``?token=``: browsers cannot set headers on a WebSocket), so a
page on another site that obtains one could open a connection from a victim's browser
(cross-site WebSocket hijacking). Browsers always send ``Origin`` with a WebSocket handshake,
so the handshake admits:

* no ``Origin`` at all: not a browser (``pgbridge tail``, a server-side client);
* the bridge's own origin: an origin of ``PGBRIDGE_PUBLIC_ORIGIN`` (where the bridge is
  published, :func:`parse_public_origins`), or an ``http``/``https`` ``Origin`` that names the
  host and port of the request's ``Host`` when that host cannot be rebound: a loopback name or
  address (``localhost``, ``127.0.0.0/8``, ``[::1]``) or any IP literal;
* an origin of the allowlist: ``scheme://host[:port]`` exactly, ``scheme://*.domain[:port]``
  for any subdomain of ``domain`` (not ``domain`` itself), or ``*`` for any origin, ``null``
  (sandboxed frames, ``file://`` pages) included.

Everything else, ``null`` included unless ``*`` is set, is refused with 403 before the upgrade.
Origins compare as RFC 6454 serializes them: scheme and host in lowercase, a default port
(80 for http/ws, 443 for https/wss) the same as none. An entry may name another scheme
(``capacitor://localhost``, an app's webview); without a port it matches only without one.

Why not any ``Origin`` equal to ``Host``: with DNS rebinding, a page of ``attacker.example:PORT``
whose name the attacker then points at the bridge's address sends ``Origin`` =
``http://attacker.example:PORT`` and ``Host`` = ``attacker.example:PORT``: the two agree, yet the
page is the attacker's. A name counts as the bridge's own only when it is configured; an IP
literal or a loopback name is not resolved through anybody's DNS, so it cannot be rebound.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["Allowlist", "PublicOrigins", "origin_allowed", "parse_allowlist",
           "parse_public_origins"]

_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
_HOST = re.compile(r"^(\[[0-9a-f:.]+\]|[a-z0-9-]+(\.[a-z0-9-]+)*)$")  # no empty label
_WEB = ("http", "https")
NO_PORT = 0  # the port of an origin whose scheme has no default and that names none


@dataclass(frozen=True, slots=True)
class Allowlist:
    """``any``: every origin; ``exact``: normalized origins; ``subdomains``: ``(scheme,
    .domain, port)`` for ``scheme://*.domain:port`` entries."""

    any: bool = False
    exact: frozenset[tuple[str, str, int]] = frozenset()
    subdomains: tuple[tuple[str, str, int], ...] = ()


def _split(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of a serialized origin, or ``None`` when it is not one (a path,
    credentials, a query, a fragment, an empty host or label, a port out of range)."""
    if (not origin.isascii() or "://" not in origin or origin.endswith(":")
            or any(c in origin for c in "?#\\ \t")):
        return None
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if parts.path or parts.username is not None or not parts.hostname:
        return None
    if port is None:
        port = _DEFAULT_PORTS.get(scheme, NO_PORT)
    elif port == 0:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if not _HOST.match(host):
        return None
    return scheme, host, port


def parse_allowlist(value: str | None) -> Allowlist:
    """Parse ``PGBRIDGE_ALLOWED_ORIGINS`` (comma-separated; unset or empty: own origin only).
    Raises :class:`ValueError` naming the first entry that is not an origin."""
    if value is None or not value.strip():
        return Allowlist()
    exact: set[tuple[str, str, int]] = set()
    subdomains: list[tuple[str, str, int]] = []
    any_origin = False
    for raw in (entry.strip() for entry in value.split(",")):
        if not raw:
            continue
        if raw == "*":
            any_origin = True
            continue
        if raw.lower() == "null":
            raise ValueError("'null' is the origin of every sandboxed frame and file:// page "
                             "on any site; list real origins, or '*' during development")
        wildcard = "://*." in raw
        parsed = _split(raw.replace("://*.", "://", 1) if wildcard else raw)
        if parsed is None:
            raise ValueError(f"{raw!r} is not an origin: scheme://host[:port], "
                             "scheme://*.domain[:port] or *")
        scheme, host, port = parsed
        if wildcard:
            subdomains.append((scheme, "." + host, port))
        else:
            exact.add(parsed)
    if any_origin:
        return Allowlist(any=True)
    return Allowlist(exact=frozenset(exact), subdomains=tuple(subdomains))


# The bridge's public origins (``PGBRIDGE_PUBLIC_ORIGIN``): normalized ``(scheme, host, port)``.
PublicOrigins = frozenset[tuple[str, str, int]]


def parse_public_origins(value: str | None) -> PublicOrigins:
    """Parse ``PGBRIDGE_PUBLIC_ORIGIN``: the origins the bridge is published at, comma-separated
    ``http(s)://host[:port]`` (a trailing ``/`` is allowed); unset or empty: none. Raises
    :class:`ValueError` naming the first entry that is not such an origin."""
    if value is None or not value.strip():
        return frozenset()
    origins: set[tuple[str, str, int]] = set()
    for raw in (entry.strip() for entry in value.split(",")):
        if not raw:
            continue
        parsed = _split(raw[:-1] if raw.endswith("/") and not raw.endswith("://") else raw)
        if parsed is None or parsed[0] not in _WEB:
            raise ValueError(f"{raw!r} is not a web origin: http(s)://host[:port], "
                             "e.g. https://chat.example.com")
        origins.add(parsed)
    return frozenset(origins)


def _unrebindable(host: str) -> bool:
    """Whether a normalized host (``_split``'s) is one no DNS answer can point elsewhere: an IP
    literal (v4, or v6 in brackets) or ``localhost``."""
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
    except ValueError:
        return False
    return True


def origin_allowed(origin: str | None, host: str | None, allowlist: Allowlist, *,
                   public: PublicOrigins = frozenset()) -> bool:
    """Whether a handshake with this ``Origin`` header (``None``: absent) may proceed.
    ``host`` is the request's ``Host`` header (``None``: absent); it names the bridge's own
    origin only when its host is an IP literal or ``localhost``. ``public``: the origins of
    ``PGBRIDGE_PUBLIC_ORIGIN`` (:func:`parse_public_origins`), the bridge's own by
    configuration."""
    if origin is None or allowlist.any:
        return True
    parsed = _split(origin.strip())
    if parsed is None:  # "null" and anything malformed
        return False
    scheme, origin_host, port = parsed
    if parsed in public:
        return True
    if host is not None and scheme in _WEB and _unrebindable(origin_host):
        own = _split(f"{scheme}://{host.strip()}")
        if own is not None and own[1:] == (origin_host, port):
            return True
    if parsed in allowlist.exact:
        return True
    return any(scheme == s and port == p and origin_host.endswith(suffix)
               for s, suffix, p in allowlist.subdomains)
