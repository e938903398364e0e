"""Operator routes for limit overrides (admins: ``ADMIN_TOKEN``, an admin key, ``org:admin``).

``GET|PATCH /api/admin/accounts/{account}/limits`` and
``GET|PATCH /api/admin/keys/{key_id}/limits``. PATCH takes any of
``requestsPerMinute``, ``tokensPerMinute``, ``maxParallel``, ``messagesPerDay``:
an integer sets the override, ``null`` clears it (inherit again), a missing
field is left alone. Every process sees a change within the limits cache's
time (5 s).
"""

from __future__ import annotations

import uuid

from aiohttp import web

from creditgate import ledger
from creditgate.auth import require_admin
from creditgate.errors import NotFound
from creditgate.resources import RESOURCES
from creditgate.throttle.limits import JSON_NAMES, LIMIT_NAMES, MAX_VALUE
from creditgate.throttle.overrides import describe, key_account, parse_changes, set_overrides
from creditgate.webkit.envelope import data_response, read_json
from creditgate.webkit.openapi import STR, UUID, Endpoint, Schema, nullable, obj


async def account_limits(request: web.Request) -> web.Response:
    """The tier, overrides and effective limits of an account; PATCH changes its overrides."""
    st = request.app[RESOURCES]
    await require_admin(request)
    account = await ledger.resolve_account(st.db, request.match_info["account"])
    if request.method == "PATCH":
        changes = parse_changes(await read_json(request))
        await set_overrides(st.db, "accounts", account.id, changes)
    return data_response(request, await describe(st.db, st.settings.config, account.id))


async def key_limits(request: web.Request) -> web.Response:
    """The same for one API key: its overrides tighten its account's limits."""
    st = request.app[RESOURCES]
    await require_admin(request)
    try:
        key_id = uuid.UUID(request.match_info["key_id"])
    except ValueError:
        raise NotFound(f"no API key {request.match_info['key_id']!r}") from None
    account_id = await key_account(st.db, key_id)
    if request.method == "PATCH":
        changes = parse_changes(await read_json(request))
        await set_overrides(st.db, "api_keys", key_id, changes)
    return data_response(request, await describe(st.db, st.settings.config, account_id, key_id))


_VALUES = obj({JSON_NAMES[n]: {"type": "integer"} for n in LIMIT_NAMES}, *JSON_NAMES.values())
_OVERRIDES = obj(
    {
        JSON_NAMES[n]: nullable({"type": "integer", "minimum": 1, "maximum": MAX_VALUE[n]})
        for n in LIMIT_NAMES
    }
)
LIMITS: Schema = obj(
    {
        "accountId": UUID,
        "tier": STR,
        "tierLimits": _VALUES,
        "accountOverrides": _OVERRIDES,
        "accountLimits": _VALUES,
        "keyId": UUID,
        "keyOverrides": _OVERRIDES,
        "effective": _VALUES,
    },
    "accountId",
    "tier",
    "tierLimits",
    "accountOverrides",
    "accountLimits",
    "effective",
)


def _endpoints() -> tuple[Endpoint, ...]:
    out = []
    for path, handler, whose in (
        ("/api/admin/accounts/{account}/limits", account_limits, "an account"),
        ("/api/admin/keys/{key_id}/limits", key_limits, "an API key"),
    ):
        out.append(
            Endpoint(
                "GET", path, handler, f"The limits of {whose}", "admin", "admin",
                response=LIMITS, errors=(404, 503),
            )
        )  # fmt: skip
        out.append(
            Endpoint(
                "PATCH", path, handler,
                f"Set (integer) or clear (null) limit overrides of {whose}", "admin", "admin",
                request=_OVERRIDES, response=LIMITS, errors=(404, 503),
            )
        )  # fmt: skip
    return tuple(out)


ENDPOINTS = _endpoints()
