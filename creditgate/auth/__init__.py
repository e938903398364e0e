"""Authentication: API keys (and Clerk session JWTs) → a Principal."""

from __future__ import annotations

from aiohttp import web

from creditgate.auth.api_keys import KEY_PREFIX, ApiKeyAuth, NewKey, create_api_key
from creditgate.auth.principal import Principal
from creditgate.errors import Unauthorized
from creditgate.http.ids import ACCOUNT_ID

__all__ = ["ApiKeyAuth", "NewKey", "Principal", "authenticate", "bearer_token", "create_api_key"]


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
