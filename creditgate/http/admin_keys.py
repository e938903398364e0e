"""``GET /api/admin/accounts/{account}/keys``, ``PATCH`` / ``DELETE /api/admin/keys/{id}``.

An operator's view of API keys, without Clerk: list an account's live keys
(never their secrets), change any key's budget, and revoke any key by its id.
Admin-authenticated like every ``/api/admin`` route; the CLI's ``keys list`` /
``keys budget`` / ``keys revoke`` do the same.
"""

from __future__ import annotations

import uuid

from aiohttp import web

from creditgate import ledger
from creditgate.auth import AUTH, get_api_key, list_api_keys, require_admin, revoke_key_by_id
from creditgate.errors import NotFound, ValidationError
from creditgate.http.keys import BUDGET_IN, BUDGET_PERIOD, KEY_INFO, BudgetChange, parse_budget
from creditgate.http.state import STATE
from creditgate.logs import log
from creditgate.webkit.envelope import data_response, read_json_object
from creditgate.webkit.openapi import UUID, Endpoint, arr, obj


async def account_keys(request: web.Request) -> web.Response:
    """An account's live API keys, newest first; ``account`` is its id or Clerk id."""
    st = request.app[STATE]
    await require_admin(request)
    account = await ledger.resolve_account(st.db, request.match_info["account"])
    keys = await list_api_keys(st.db, account.id, budget_zone=st.settings.config.throttle.day_zone)
    return data_response(
        request, {"accountId": str(account.id), "keys": [k.as_json() for k in keys]}
    )


async def revoke_any_key(request: web.Request) -> web.Response:
    """Revoke any account's key by id (idempotent); 404 if there is no such key."""
    st = request.app[STATE]
    await require_admin(request)
    try:
        key_id = uuid.UUID(request.match_info["id"])
    except ValueError:
        raise NotFound("No such API key.") from None
    done = await revoke_key_by_id(st.db, key_id, budget_zone=st.settings.config.throttle.day_zone)
    if done is None:
        raise NotFound("No such API key.")
    account_id, revoked = done
    # This process stops accepting it at once; others within the cache TTL.
    request.app[AUTH].keys.forget(revoked.key_hash)
    log.info("api key revoked", extra={"key_id": str(key_id), "account_id": str(account_id)})
    return data_response(request, {**revoked.info.as_json(), "accountId": str(account_id)})


_PATCH_FIELDS = {"budget", "budgetPeriod"}


async def change_key(request: web.Request) -> web.Response:
    """Change any key's budget: ``budget`` (credits; null removes it) and
    ``budgetPeriod``; a field left out keeps its value. 404 if no such key."""
    st = request.app[STATE]
    await require_admin(request)
    try:
        key_id = uuid.UUID(request.match_info["id"])
    except ValueError:
        raise NotFound("No such API key.") from None
    body = await read_json_object(request)
    problems: list[dict[str, str]] = [
        {"path": f, "message": f"unknown field (allowed: {sorted(_PATCH_FIELDS)})"}
        for f in sorted(set(body) - _PATCH_FIELDS)
    ]
    if not set(body) & _PATCH_FIELDS:
        problems.append({"path": "", "message": "name budget and/or budgetPeriod"})
    zone = st.settings.config.throttle.day_zone
    found = await get_api_key(st.db, key_id, budget_zone=zone)
    if found is None:
        raise NotFound("No such API key.")
    _, info = found
    now = info.budget
    current = BudgetChange(now.budget, now.period) if now is not None else None
    change = parse_budget(body, problems, current=current or BudgetChange(None, None))
    if problems or change is None:
        raise ValidationError("Invalid key change.", details=problems)
    await ledger.set_key_budget(st.db, key_id, change.budget, change.period)
    found = await get_api_key(st.db, key_id, budget_zone=zone)
    assert found is not None
    account_id, info = found
    log.info("api key budget changed", extra={"key_id": str(key_id), "account_id": str(account_id)})
    return data_response(request, {**info.as_json(), "accountId": str(account_id)})


_REVOKED = {
    **KEY_INFO,
    "properties": {**KEY_INFO["properties"], "accountId": UUID},
    "required": [*KEY_INFO["required"], "accountId"],
}
ENDPOINTS = (
    Endpoint(
        "GET",
        "/api/admin/accounts/{account}/keys",
        account_keys,
        "An account's live API keys (never their secrets)",
        "admin",
        "admin",
        response=obj({"accountId": UUID, "keys": arr(KEY_INFO)}, "accountId", "keys"),
        errors=(404, 503),
    ),
    Endpoint(
        "PATCH",
        "/api/admin/keys/{id}",
        change_key,
        "Change any account's API key's budget (budget null removes it)",
        "admin",
        "admin",
        request=obj({"budget": BUDGET_IN, "budgetPeriod": BUDGET_PERIOD}),
        response=_REVOKED,
        errors=(400, 404, 503),
    ),
    Endpoint(
        "DELETE",
        "/api/admin/keys/{id}",
        revoke_any_key,
        "Revoke any account's API key by id (idempotent)",
        "admin",
        "admin",
        response=_REVOKED,
        errors=(404, 503),
    ),
)
