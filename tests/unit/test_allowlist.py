"""Unit tests of :mod:`daemon.origins`, which browser origins may connect, no I/O: parsing
``PGBRIDGE_ALLOWED_ORIGINS`` with :func:`~daemon.origins.parse_allowlist` (entries normalised
like serialized origins, wildcards and ``*``, refusals, and the setting's
:class:`~daemon.errors.ConfigError`), and :func:`~daemon.origins.origin_allowed` (the bridge's
own origin: ``PGBRIDGE_PUBLIC_ORIGIN``, or ``Host`` when it cannot be rebound; exact and subdomain
entries, ``*``). Named ``test_allowlist`` because
``tests/integration/test_origins.py`` (the handshake against a running bridge) already holds
the basename."""

from __future__ import annotations

import pytest

from daemon.errors import ConfigError
from daemon.origins import Allowlist, origin_allowed, parse_allowlist, parse_public_origins
from daemon.settings import DaemonSettings


@pytest.mark.parametrize(("value", "exact"), [
    ("https://app.example", ("https", "app.example", 443)),
    ("HTTPS://App.EXAMPLE", ("https", "app.example", 443)),
    ("https://app.example:443", ("https", "app.example", 443)),
    ("http://app.example:80", ("http", "app.example", 80)),
    ("http://app.example:8080", ("http", "app.example", 8080)),
    ("http://127.0.0.1:5173", ("http", "127.0.0.1", 5173)),
    ("http://[::1]:8080", ("http", "[::1]", 8080)),
    ("http://[::1]", ("http", "[::1]", 80)),
    ("  https://app.example  ", ("https", "app.example", 443)),
    # an app's webview (Capacitor, Electron) has a scheme of its own and no port
    ("capacitor://localhost", ("capacitor", "localhost", 0)),
])
def test_allowlist_entries_are_normalised_like_serialized_origins(
        value: str, exact: tuple[str, str, int]) -> None:
    """An entry compares as RFC 6454 serializes an origin: scheme and host in lowercase, the
    default port the same as none, IPv6 in brackets. A case or port spelling mismatch would
    refuse the very page the operator listed."""
    assert parse_allowlist(value) == Allowlist(exact=frozenset({exact}))


def test_allowlist_lists_wildcards_and_any() -> None:
    allowlist = parse_allowlist(" https://app.example , HTTPS://*.Example.ORG,, "
                                "http://*.dev.test:8080,")
    assert allowlist.exact == {("https", "app.example", 443)}
    assert set(allowlist.subdomains) == {("https", ".example.org", 443),
                                         ("http", ".dev.test", 8080)}
    assert not allowlist.any
    assert parse_allowlist("*").any
    assert parse_allowlist("https://app.example, *").any
    for unset in (None, "", "  ", ",", " , "):
        assert parse_allowlist(unset) == Allowlist(), unset  # own origin only


@pytest.mark.parametrize("value", [
    "null", "NULL", " null ", "https://app.example, null",
    "https://a.example/x", "https://a.example/", "https://*.example.org/",
    "https://user:pw@a.example", "https://user@a.example",
    "https://a.example?x=1", "https://a.example#top",
    "a.example", "//a.example", "a.example:443", "*.example.org",
    "https://a.example:0", "https://.example", "https://a..example", "https://*..example",
    "https://a.example.", "garbage, *", "*, garbage",  # every entry is checked, * or not
    "https://a.example:", "https://a.example:99999", "https://a.example:http",
    "https://*", "https://*.", "https://*.:443", "https://*.*.example.org",
    "https://a.*.example.org", "https://*example.org", "https://**.example.org",
    "https://exa mple.org", "https://münchen.example", "https://a_b.example",
    "https://[::1", "https://[zz]:443",
    "https://app.example, garbage",
])
def test_allowlist_refuses_what_is_not_an_origin(value: str) -> None:
    """A path, credentials, a query, a missing scheme or a misplaced ``*`` is a typo that
    would otherwise silently admit nothing (or something else): refused at startup. ``null``
    is refused because every sandboxed frame and file:// page of any site sends it."""
    with pytest.raises(ValueError, match=r"null|not an origin"):
        parse_allowlist(value)


def test_null_in_the_allowlist_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^PGBRIDGE_ALLOWED_ORIGINS") as refused:
        DaemonSettings.from_env({"PGBRIDGE_ALLOWED_ORIGINS": "null"})
    assert "null" in str(refused.value)
    with pytest.raises(ConfigError, match=r"^PGBRIDGE_ALLOWED_ORIGINS.*a\.example/x"):
        DaemonSettings.from_env({"PGBRIDGE_ALLOWED_ORIGINS": "https://a.example/x"})
    settings = DaemonSettings.from_env({"PGBRIDGE_ALLOWED_ORIGINS": "https://App.example"})
    assert settings.allowed_origins.exact == {("https", "app.example", 443)}
    assert DaemonSettings.from_env({}).allowed_origins == Allowlist()


@pytest.mark.parametrize(("origin", "host", "allowed"), [
    (None, "127.0.0.1:8080", True),  # not a browser
    (None, None, True),
    ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
    ("http://127.0.0.1", "127.0.0.1", True),
    ("http://127.0.0.1", "127.0.0.1:80", True),
    ("http://127.0.0.1:80", "127.0.0.1", True),
    ("http://127.9.8.7:8080", "127.9.8.7:8080", True),  # 127.0.0.0/8
    ("http://192.0.2.7:8080", "192.0.2.7:8080", True),  # an IP literal cannot be rebound
    ("http://localhost:8080", "localhost:8080", True),
    ("http://LOCALHOST:8080", "localhost:8080", True),
    ("http://[::1]:8080", "[::1]:8080", True),
    ("http://[2001:db8::7]", "[2001:db8::7]", True),
    # a name is the bridge's own only when PGBRIDGE_PUBLIC_ORIGIN says so (DNS rebinding)
    ("https://bridge.example", "bridge.example", False),
    ("https://bridge.example", "bridge.example:443", False),
    ("http://attacker.example:8080", "attacker.example:8080", False),
    ("http://127.0.0.1.nip.io:8080", "127.0.0.1.nip.io:8080", False),
    ("http://localhost.attacker.example:8080", "localhost.attacker.example:8080", False),
    ("http://2130706433:8080", "2130706433:8080", False),  # a name, to the rule
    ("http://localhost:8080", "127.0.0.1:8080", False),  # another origin, same machine
    ("http://127.0.0.1:8081", "127.0.0.1:8080", False),
    ("http://bridge.example", "bridge.example:443", False),
    ("https://bridge.example", "bridge.example:80", False),
    ("http://127.0.0.1:8080", None, False),  # no Host: no own origin
    ("http://127.0.0.1:8080", "evil@127.0.0.1:8080", False),
    ("http://127.0.0.1:8080", "127.0.0.1:8080/x", False),
    ("http://evil@127.0.0.1:8080", "127.0.0.1:8080", False),
    ("http://127.0.0.1:8080/", "127.0.0.1:8080", False),
    ("null", "127.0.0.1:8080", False),
    ("null", None, False),
    ("file://", "127.0.0.1:8080", False),
    # only a web page's origin can be the bridge's own
    ("file://127.0.0.1:8080", "127.0.0.1:8080", False),
    ("ftp://127.0.0.1:8080", "127.0.0.1:8080", False),
    ("file:///home/u/chat.html", "127.0.0.1:8080", False),
    ("", "127.0.0.1:8080", False),
    ("https://evil.example", "127.0.0.1:8080", False),
])
def test_own_origin_is_the_host_header(origin: str | None, host: str | None,
                                       allowed: bool) -> None:
    """With the default (empty) allowlist and no public origin, only non-browsers and pages of
    the bridge's own origin (the host and port the browser connected to, as ``Host`` names
    them) get in, and only when that host is an IP literal or ``localhost``."""
    assert origin_allowed(origin, host, Allowlist()) is allowed


@pytest.mark.parametrize(("origin", "allowed"), [
    ("https://app.example", True),
    ("https://app.example:443", True),
    ("HTTPS://APP.example", True),
    ("http://app.example", False),  # another scheme
    ("https://app.example:8443", False),  # another port
    ("https://www.app.example", False),  # an exact entry admits no subdomain
    ("https://a.example.org", True),
    ("https://a.b.example.org", True),
    ("https://A.Example.Org", True),
    ("https://example.org", False),  # the apex is not a subdomain
    ("https://evilexample.org", False),
    ("https://a.example.org.evil", False),
    ("https://example.org.a.example", False),
    ("http://a.example.org", False),
    ("https://a.example.org:8443", False),
    ("http://x.dev.test:8080", True),
    ("http://x.dev.test", False),
    ("null", False),
    ("file://", False),
    ("https://evil.example", False),
])
def test_allowlist_admits_exact_origins_and_subdomains(origin: str, allowed: bool) -> None:
    allowlist = parse_allowlist("https://app.example, https://*.example.org, "
                                "http://*.dev.test:8080")
    assert origin_allowed(origin, "bridge.internal:8080", allowlist) is allowed


def test_allowlist_keeps_the_own_origin() -> None:
    allowlist = parse_allowlist("https://app.example")
    assert origin_allowed("http://127.0.0.1:8080", "127.0.0.1:8080", allowlist)
    assert not origin_allowed("http://127.0.0.1:8080", "127.0.0.1:9090", allowlist)


@pytest.mark.parametrize("origin", [
    "null", "file://", "https://evil.example", "http://localhost:1", "not an origin", ""])
def test_any_admits_every_origin_null_included(origin: str) -> None:
    assert origin_allowed(origin, "127.0.0.1:8080", parse_allowlist("*"))
    assert origin_allowed(origin, None, parse_allowlist("https://app.example,*"))


def test_dns_rebinding_is_refused_without_a_public_origin() -> None:
    """The attack of issue 25 (8): a page of ``attacker.example:PORT``, its name rebound to the
    bridge's address, sends ``Origin`` = ``Host`` = ``attacker.example:PORT``. Before, the two
    agreeing made it the bridge's own origin."""
    for allowlist in (Allowlist(), parse_allowlist("https://app.example")):
        assert not origin_allowed("http://attacker.example:8080", "attacker.example:8080",
                                  allowlist)
        assert not origin_allowed("http://attacker.example:8080", "attacker.example:8080",
                                  allowlist, public=parse_public_origins(
                                      "https://chat.example.com"))


@pytest.mark.parametrize(("origin", "host", "allowed"), [
    ("https://chat.example.com", "chat.example.com", True),
    ("https://chat.example.com", "127.0.0.1:8080", True),  # behind a proxy that sets its own
    ("https://chat.example.com", None, True),
    ("https://CHAT.example.com:443", "chat.example.com", True),
    ("http://chat.example.com", "chat.example.com", False),  # another scheme
    ("https://chat.example.com:8443", "chat.example.com:8443", False),  # another port
    ("https://www.chat.example.com", "www.chat.example.com", False),
    ("https://attacker.example", "attacker.example", False),
    ("http://127.0.0.1:8080", "127.0.0.1:8080", True),  # loopback stays the bridge's own
    ("http://localhost:8080", "localhost:8080", True),
])
def test_a_public_origin_is_the_bridge_s_own(origin: str, host: str | None,
                                             allowed: bool) -> None:
    public = parse_public_origins("https://chat.example.com, http://chat.example.com:8080/")
    assert origin_allowed(origin, host, Allowlist(), public=public) is allowed


@pytest.mark.parametrize(("value", "parsed"), [
    (None, set()), ("", set()), (" , ", set()),
    ("https://chat.example.com", {("https", "chat.example.com", 443)}),
    ("https://Chat.Example.com:443/", {("https", "chat.example.com", 443)}),
    ("https://a.example, http://b.example:8080",
     {("https", "a.example", 443), ("http", "b.example", 8080)}),
])
def test_public_origins_are_parsed_like_origins(value: str | None,
                                                parsed: set[tuple[str, str, int]]) -> None:
    assert parse_public_origins(value) == parsed


@pytest.mark.parametrize("value", [
    "chat.example.com", "*", "null", "https://*.example.com", "https://chat.example.com/x",
    "wss://chat.example.com", "capacitor://localhost", "https://chat.example.com, garbage",
    "https://user@chat.example.com", "https://chat.example.com:0",
])
def test_a_bad_public_origin_is_a_one_line_config_error_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^PGBRIDGE_PUBLIC_ORIGIN: .*not a web origin") as bad:
        DaemonSettings.from_env({"PGBRIDGE_PUBLIC_ORIGIN": value})
    assert "\n" not in str(bad.value)
    settings = DaemonSettings.from_env({"PGBRIDGE_PUBLIC_ORIGIN": "https://Chat.example.com"})
    assert settings.public_origins == {("https", "chat.example.com", 443)}
    assert DaemonSettings.from_env({}).public_origins == frozenset()
