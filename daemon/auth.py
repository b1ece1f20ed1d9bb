"""JWT tokens (HS256, PyJWT) and where their secret comes from.

A token's ``sub`` is a ``users.id``; ``exp`` is required (PROTOCOL.md, "Connecting").
"""

from __future__ import annotations

import logging
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


class AuthError(Exception):
    """A token was refused; ``str()`` says why (safe to show the client)."""


@dataclass(frozen=True)
class Claims:
    sub: str
    exp: float  # Unix time, seconds


def mint_token(secret: str, user_id: str, *, ttl: float = 3600.0) -> str:
    """A signed token for ``user_id`` valid for ``ttl`` seconds."""
    now = int(time.time())
    return jwt.encode({"sub": user_id, "iat": now, "exp": now + int(ttl)}, secret,
                      algorithm=ALGORITHM)


def verify_token(secret: str, token: str) -> Claims:
    """Check shape, signature, ``exp`` and ``sub``. Raises :class:`AuthError` (expired, bad
    signature, malformed, missing claim, longer than 4,096 characters, ``sub`` not shaped like a
    ``users.id``). Nothing of ``token`` is quoted in the message."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise AuthError(f"token longer than {MAX_TOKEN_LENGTH} characters")
    if not is_token(token):
        raise AuthError("malformed token: a JWT has only A-Z a-z 0-9 - _ . =")
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM],
                            options={"require": ["exp", "sub"]})
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidSignatureError:
        raise AuthError("bad token signature") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from None
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
