"""Authentication: API keys and Clerk session JWTs → a Principal.

Route handlers call one of:

* ``await authenticate(request)`` — any caller (API key or session);
* ``await require_session(request)`` — session-only routes (an API key → 403);
* ``await require_admin(request)`` — admin routes (ADMIN_TOKEN, an admin API
  key, or ``org:admin`` in the admin organization; anyone else → 403).

401 is "who are you?" (no, malformed, expired, revoked or unverifiable
credentials); 403 is "not allowed" (closed account, wrong kind of
credential, no admin role, no org context).
"""

from __future__ import annotations

from aiohttp import web

from creditgate.auth.api_keys import (
    KEY_PREFIX,
    MAX_LIVE_KEYS,
    SCOPES,
    ApiKeyAuth,
    KeyInfo,
    NewKey,
    create_api_key,
    get_api_key,
    list_api_keys,
    revoke_api_key,
    revoke_key_by_id,
    revoke_named_keys,
)
from creditgate.auth.authenticator import (
    AUTH,
    AdminCaller,
    Authenticator,
    bearer_token,
)
from creditgate.auth.principal import USAGE_WRITE, Principal

__all__ = [
    "AUTH",
    "KEY_PREFIX",
    "MAX_LIVE_KEYS",
    "SCOPES",
    "USAGE_WRITE",
    "AdminCaller",
    "ApiKeyAuth",
    "Authenticator",
    "KeyInfo",
    "NewKey",
    "Principal",
    "authenticate",
    "bearer_token",
    "create_api_key",
    "get_api_key",
    "list_api_keys",
    "require_admin",
    "require_session",
    "require_usage_writer",
    "revoke_api_key",
    "revoke_key_by_id",
    "revoke_named_keys",
]


async def authenticate(request: web.Request) -> Principal:
    """The caller of ``request`` (API key or Clerk session); 401 / 403 otherwise."""
    return await request.app[AUTH].authenticate(request)


async def require_session(request: web.Request) -> Principal:
    """The caller of a session-only route (``/api/keys``, …): an API key is a 403."""
    return await request.app[AUTH].session(request)


async def require_admin(request: web.Request) -> AdminCaller:
    """Admit an admin (ADMIN_TOKEN, admin API key, or admin-org ``org:admin`` session).

    401 without valid credentials (a wrong ADMIN_TOKEN included); 403 for a
    caller who authenticates but is not an admin. Must be awaited; it takes
    only the request (the old ``require_admin(request, admin_token)`` shape
    fails loudly rather than passing un-awaited).
    """
    return await request.app[AUTH].admin(request)


async def require_usage_writer(request: web.Request) -> AdminCaller | Principal:
    """Admit a caller that may record usage (``POST /api/usage/record``).

    An admin (as ``require_admin``: any account) answers an ``AdminCaller``;
    an API key with the ``usage:write`` scope answers its Principal (its own
    account only). 401 without valid credentials; 403 for anyone else.
    """
    return await request.app[AUTH].usage_writer(request)
