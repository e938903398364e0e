"""Authentication: API keys (and Clerk session JWTs) → a Principal."""

from __future__ import annotations

import hmac

from aiohttp import web

from creditgate.auth.api_keys import KEY_PREFIX, ApiKeyAuth, NewKey, create_api_key
from creditgate.auth.principal import Principal
from creditgate.errors import Unauthorized
from creditgate.http.ids import ACCOUNT_ID

__all__ = [
    "ApiKeyAuth",
    "NewKey",
    "Principal",
    "authenticate",
    "bearer_token",
    "create_api_key",
    "require_admin",
]


def bearer_token(request: web.Request) -> str | None:
    """The token of ``Authorization: Bearer …``, or None."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def authenticate(request: web.Request, keys: ApiKeyAuth) -> Principal:
    """The caller of ``request``: 401 without valid credentials."""
    token = bearer_token(request)
    if token is None:
        raise Unauthorized(
            "Missing credentials: send 'Authorization: Bearer <API key>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if token.startswith(KEY_PREFIX):
        principal = await keys.authenticate(token)
        request[ACCOUNT_ID] = principal.account_id
        return principal
    raise Unauthorized("Invalid API key.", headers={"WWW-Authenticate": "Bearer"})


def require_admin(request: web.Request, admin_token: str | None) -> None:
    """Admit an operator presenting ``ADMIN_TOKEN`` as a bearer token.

    401 without a token or with a wrong one (a caller who authenticates some
    other way but is not an admin gets 403 — the auth issue adds those).
    The comparison is constant-time.
    """
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("Admin routes need 'Authorization: Bearer <ADMIN_TOKEN>'.")
    if admin_token is None or not hmac.compare_digest(token.encode(), admin_token.encode()):
        raise Unauthorized("Invalid admin credentials.")
