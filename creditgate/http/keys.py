"""``POST /api/keys``, ``GET /api/keys``, ``DELETE /api/keys/{id}``: a session's API keys.

Session-only (an API key cannot mint or revoke keys: 403). Keys belong to the
caller's account — the active organization's when the session has one. Another
account's key id answers 404, exactly like an id that does not exist.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from creditgate.auth import (
    AUTH,
    MAX_LIVE_KEYS,
    SCOPES,
    create_api_key,
    list_api_keys,
    require_session,
    revoke_api_key,
)
from creditgate.errors import Forbidden, NotFound, ValidationError
from creditgate.http.state import STATE
from creditgate.webkit.envelope import data_response, read_json_object
from creditgate.webkit.openapi import STR, TIME, UUID, Endpoint, Schema, arr, nullable, obj
from creditgate.webkit.textguard import has_control

MAX_NAME_LEN = 100
_FIELDS = {"name", "expiresAt", "scope"}


def _parse_create(body: dict[str, Any]) -> tuple[str, datetime | None, str]:
    problems: list[dict[str, str]] = [
        {"path": f, "message": f"unknown field (allowed: {sorted(_FIELDS)})"}
        for f in sorted(set(body) - _FIELDS)
    ]
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append({"path": "name", "message": "required: a non-empty string"})
    elif len(name.strip()) > MAX_NAME_LEN:
        problems.append({"path": "name", "message": f"at most {MAX_NAME_LEN} characters"})
    elif has_control(name):
        problems.append({"path": "name", "message": "must not contain control characters"})
    expires_at = None
    raw_expiry = body.get("expiresAt")
    if raw_expiry is not None:
        try:
            if not isinstance(raw_expiry, str):
                raise ValueError
            expires_at = datetime.fromisoformat(raw_expiry)
            if expires_at.tzinfo is None:
                raise ValueError
        except ValueError:
            problems.append(
                {
                    "path": "expiresAt",
                    "message": "an ISO 8601 time with a zone, e.g. 2030-01-01T00:00:00Z",
                }
            )
        else:
            if expires_at <= datetime.now(UTC):
                problems.append({"path": "expiresAt", "message": "must be in the future"})
    scope = body.get("scope", "account")
    if scope not in SCOPES:
        problems.append(
            {"path": "scope", "message": "'account' (default), 'usage:write' or 'admin'"}
        )
    if problems:
        raise ValidationError("Invalid API key request.", details=problems)
    assert isinstance(name, str)
    return name.strip(), expires_at, scope


async def create_key(request: web.Request) -> web.Response:
    """Mint a key for the caller's account; the secret is in this answer only."""
    principal = await require_session(request)
    name, expires_at, scope = _parse_create(await read_json_object(request))
    if scope == "admin" and not principal.admin:
        raise Forbidden("Only an admin may create an admin API key.")
    key = await create_api_key(
        request.app[STATE].db,
        principal.account_id,
        name,
        expires_at,
        scope=scope,
        max_live=MAX_LIVE_KEYS,
    )
    return data_response(
        request,
        {
            "id": str(key.id),
            "key": key.key,
            "prefix": key.prefix,
            "name": key.name,
            "scope": key.scope,
            "accountId": str(key.account_id),
            "createdAt": key.created_at.isoformat().replace("+00:00", "Z")
            if key.created_at
            else None,
            "expiresAt": key.expires_at.isoformat().replace("+00:00", "Z")
            if key.expires_at
            else None,
        },
        status=201,
    )


async def list_keys(request: web.Request) -> web.Response:
    """The caller's account's keys that are not revoked, newest first (no secrets)."""
    principal = await require_session(request)
    keys = await list_api_keys(request.app[STATE].db, principal.account_id)
    return data_response(request, {"keys": [k.as_json() for k in keys]})


async def revoke_key(request: web.Request) -> web.Response:
    """Revoke one of the caller's account's keys (idempotent)."""
    principal = await require_session(request)
    try:
        key_id = uuid.UUID(request.match_info["id"])
    except ValueError:
        raise NotFound("No such API key.") from None
    revoked = await revoke_api_key(request.app[STATE].db, principal.account_id, key_id)
    if revoked is None:
        raise NotFound("No such API key.")
    # This process stops accepting it at once; others within the cache TTL.
    request.app[AUTH].keys.forget(revoked.key_hash)
    return data_response(request, revoked.info.as_json())


KEY_INFO: Schema = obj(
    {
        "id": UUID,
        "prefix": STR,
        "name": STR,
        "scope": {"enum": list(SCOPES)},
        "createdAt": TIME,
        "lastUsedAt": nullable(TIME),
        "expiresAt": nullable(TIME),
        "revokedAt": nullable(TIME),
    },
    "id",
    "prefix",
    "name",
    "scope",
    "createdAt",
)
NEW_KEY: Schema = obj(
    {
        "id": UUID,
        "key": {**STR, "description": "the secret: shown in this answer only"},
        "prefix": STR,
        "name": STR,
        "scope": {"enum": list(SCOPES)},
        "accountId": UUID,
        "createdAt": nullable(TIME),
        "expiresAt": nullable(TIME),
    },
    "id",
    "key",
    "prefix",
    "accountId",
)
ENDPOINTS = (
    Endpoint(
        "POST",
        "/api/keys",
        create_key,
        f"Create an API key (at most {MAX_LIVE_KEYS} live per account)",
        "keys",
        "session",
        request=obj(
            {
                "name": {**STR, "minLength": 1, "maxLength": MAX_NAME_LEN},
                "expiresAt": nullable(TIME),
                "scope": {"enum": list(SCOPES)},
            },
            "name",
        ),
        response=NEW_KEY,
        status=201,
        errors=(409, 503),
    ),
    Endpoint(
        "GET",
        "/api/keys",
        list_keys,
        "The caller's live API keys (never their secrets)",
        "keys",
        "session",
        response=obj({"keys": arr(KEY_INFO)}, "keys"),
        errors=(503,),
    ),
    Endpoint(
        "DELETE",
        "/api/keys/{id}",
        revoke_key,
        "Revoke one of the caller's API keys (idempotent)",
        "keys",
        "session",
        response=KEY_INFO,
        errors=(404, 503),
    ),
)
