"""JWT tokens (HS256, PyJWT) and where their secret comes from.

A token's ``sub`` is a ``users.id``; ``exp`` is required; ``exp``, ``nbf`` and ``iat`` are JSON
numbers no later than 9999-12-31; ``aud`` and ``iss`` must match ``PGBRIDGE_JWT_AUDIENCE`` and
``PGBRIDGE_JWT_ISSUER`` when those are set, and a token with an ``aud`` is refused when no
audience is set (PROTOCOL.md, "Connecting").
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

from .errors import ConfigError
from .protocol import MAX_TOKEN_LENGTH, is_id, is_token
from .settings import DaemonSettings, DatabaseSettings

log = logging.getLogger(__name__)

__all__ = ["AuthError", "Claims", "mint_token", "resolve_secret", "verify_token"]

ALGORITHM = "HS256"
# RFC 7519 NumericDate claims; 253402300799 is 9999-12-31T23:59:59Z, the last instant an RFC
# 3339 timestamp can name: a later exp (1e300) is a token that never expires, not a date.
TIME_CLAIMS = ("exp", "nbf", "iat")
LATEST_TIME = 253402300799


class AuthError(Exception):
    """A token was refused; ``str()`` says why (safe to show the client)."""


@dataclass(frozen=True)
class Claims:
    sub: str
    exp: float  # Unix time, seconds


def mint_token(secret: str, user_id: str, *, ttl: float = 3600.0, audience: str | None = None,
               issuer: str | None = None) -> str:
    """A signed token for ``user_id`` valid for ``ttl`` seconds, with ``aud``/``iss`` when
    given (pass ``PGBRIDGE_JWT_AUDIENCE``/``PGBRIDGE_JWT_ISSUER`` so the bridge accepts it)."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": user_id, "iat": now, "exp": now + int(ttl)}
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def _numeric_date(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value <= LATEST_TIME)


def verify_token(secret: str, token: str, *, audience: str | None = None,
                 issuer: str | None = None) -> Claims:
    """Check shape, signature, claims and ``sub``. ``audience``/``issuer``: the ``aud``/``iss``
    required (``PGBRIDGE_JWT_AUDIENCE``/``PGBRIDGE_JWT_ISSUER``); ``None`` requires none, and
    then a token that has an ``aud`` is refused (it was minted for someone else).

    Raises :class:`AuthError` (expired, not yet valid, bad signature, malformed, a missing
    claim, ``exp``/``nbf``/``iat`` not a number up to 9999-12-31, wrong ``aud`` or ``iss``,
    longer than 4,096 characters, ``sub`` not shaped like a ``users.id``). Nothing of ``token``
    is quoted in the message."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise AuthError(f"token longer than {MAX_TOKEN_LENGTH} characters")
    if not is_token(token):
        raise AuthError("malformed token: a JWT has only A-Z a-z 0-9 - _ . =")
    required = ["exp", "sub"] + (["aud"] if audience else []) + (["iss"] if issuer else [])
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], audience=audience,
                            issuer=issuer, options={"require": required})
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidSignatureError:
        raise AuthError("bad token signature") from None
    except jwt.InvalidAudienceError:
        raise AuthError("invalid token: its aud is not PGBRIDGE_JWT_AUDIENCE" if audience
                        else "invalid token: it has an aud and this bridge expects none "
                        "(set PGBRIDGE_JWT_AUDIENCE)") from None
    except jwt.InvalidIssuerError:
        raise AuthError("invalid token: its iss is not PGBRIDGE_JWT_ISSUER") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    # PyJWT reads the time claims with int(), which takes "9999999999", 1e300 and true: a
    # token it accepted may still hold a time that is no date (one decode, about 100 µs, per
    # handshake: checked on what it returns rather than by decoding twice).
    bad = [name for name in TIME_CLAIMS if name in claims and not _numeric_date(claims[name])]
    if bad:
        raise AuthError(f"invalid token: {bad[0]} must be a number of seconds since 1970 "
                        "(9999-12-31 at most)")
    sub = claims.get("sub")
    if not is_id(sub):
        raise AuthError("invalid token: sub must be a users.id")
    return Claims(sub=sub, exp=float(claims["exp"]))


def resolve_secret(daemon: DaemonSettings, database: DatabaseSettings) -> str:
    """The signing secret: ``PGBRIDGE_JWT_SECRET``; with the embedded database and no secret
    set, a development secret generated once and kept in ``DATA_DIR/jwt_secret`` (mode 0600).

    Raises :class:`ConfigError` when a database is configured and the variable is missing or
    shorter than 32 characters.
    """
    if daemon.jwt_secret:
        if len(daemon.jwt_secret) < 32:
            raise ConfigError("PGBRIDGE_JWT_SECRET must be at least 32 characters (generate "
                              "one: python -c 'import secrets; print(secrets.token_urlsafe(48))')")
        return daemon.jwt_secret
    if not database.embedded:
        raise ConfigError("PGBRIDGE_JWT_SECRET is not set: it is required with a configured "
                          "database (generate one: python -c 'import secrets; "
                          "print(secrets.token_urlsafe(48))')")
    path = Path(database.data_dir) / "jwt_secret"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    path.touch(mode=0o600)
    path.write_text(secret)
    log.info("generated a development JWT secret in %s", path, extra={"event": "dev_secret"})
    return secret
