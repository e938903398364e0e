"""``POST /api/keys``, ``GET /api/keys``, ``DELETE /api/keys/{id}``: a session's API keys.

Session-only (an API key cannot mint or revoke keys: 403). Keys belong to the
caller's account — the active organization's when the session has one. Another
account's key id answers 404, exactly like an id that does not exist.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from creditgate import ledger
from creditgate.auth import (
    AUTH,
    MAX_LIVE_KEYS,
    SCOPES,
    create_api_key,
    list_api_keys,
    require_session,
    revoke_api_key,
)
from creditgate.auth.api_keys import budget_fields
from creditgate.errors import Forbidden, NotFound, ValidationError
from creditgate.http.state import STATE
from creditgate.ledger.budgets import BUDGET_PERIODS
from creditgate.webkit.envelope import data_response, read_json_object
from creditgate.webkit.openapi import (
    CREDITS,
    CREDITS_TEXT,
    MICROS,
    NUM,
    STR,
    TIME,
    UUID,
    Endpoint,
    Schema,
    arr,
    nullable,
    obj,
)
from creditgate.webkit.textguard import has_control

MAX_NAME_LEN = 100
_FIELDS = {"name", "expiresAt", "scope", "budget", "budgetPeriod"}


@dataclass(frozen=True, slots=True)
class BudgetChange:
    """A key's budget as asked: µc (None: no budget) and its period (None: lifetime)."""

    budget: int | None
    period: str | None


def parse_budget(
    body: dict[str, Any], problems: list[dict[str, str]], *, current: BudgetChange | None = None
) -> BudgetChange | None:
    """``budget`` (credits, ≥ 0, the money grammar) and ``budgetPeriod``
    (``day``, ``week``, ``month`` or null: a lifetime cap) of a key.

    Without ``current`` (a new key) absent fields mean no budget. With it (an
    admin's change) an absent field keeps its current value; ``budget: null``
    removes the budget. Problems are appended; None when there are any.
    """
    base = current or BudgetChange(None, None)
    budget, period = base.budget, base.period
    ok = True
    if "budget" in body:
        raw = body["budget"]
        if raw is None:
            budget = None
        else:
            try:
                budget = ledger.credits_to_micros(raw)
            except ValueError as e:
                problems.append({"path": "budget", "message": str(e)})
                ok = False
            else:
                if budget < 0:
                    problems.append({"path": "budget", "message": "must be 0 or more credits"})
                    ok = False
    if "budgetPeriod" in body:
        period = body["budgetPeriod"]
        if period is not None and period not in BUDGET_PERIODS:
            problems.append(
                {
                    "path": "budgetPeriod",
                    "message": "'day', 'week', 'month', or null for a lifetime budget",
                }
            )
            ok = False
        elif period is not None and budget is None and ok:
            problems.append({"path": "budgetPeriod", "message": "needs a budget"})
            ok = False
    if not ok:
        return None
    return BudgetChange(budget, period if budget is not None else None)


def _parse_create(body: dict[str, Any]) -> tuple[str, datetime | None, str, BudgetChange | None]:
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
    budget = parse_budget(body, problems)
    if problems:
        raise ValidationError("Invalid API key request.", details=problems)
    assert isinstance(name, str)
    return name.strip(), expires_at, scope, budget


async def create_key(request: web.Request) -> web.Response:
    """Mint a key for the caller's account; the secret is in this answer only."""
    principal = await require_session(request)
    name, expires_at, scope, budget = _parse_create(await read_json_object(request))
    if scope == "admin" and not principal.admin:
        raise Forbidden("Only an admin may create an admin API key.")
    key = await create_api_key(
        request.app[STATE].db,
        principal.account_id,
        name,
        expires_at,
        scope=scope,
        max_live=MAX_LIVE_KEYS,
        budget=budget.budget if budget else None,
        budget_period=budget.period if budget else None,
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
            "budget": None,
            "budgetMicros": None,
            "budgetPeriod": None,
            **(budget_fields(key.budget, key.budget_period) if key.budget is not None else {}),
        },
        status=201,
    )


async def list_keys(request: web.Request) -> web.Response:
    """The caller's account's keys that are not revoked, newest first (no secrets)."""
    principal = await require_session(request)
    st = request.app[STATE]
    keys = await list_api_keys(
        st.db, principal.account_id, budget_zone=st.settings.config.throttle.day_zone
    )
    return data_response(request, {"keys": [k.as_json() for k in keys]})


async def revoke_key(request: web.Request) -> web.Response:
    """Revoke one of the caller's account's keys (idempotent)."""
    principal = await require_session(request)
    try:
        key_id = uuid.UUID(request.match_info["id"])
    except ValueError:
        raise NotFound("No such API key.") from None
    st = request.app[STATE]
    revoked = await revoke_api_key(
        st.db, principal.account_id, key_id, budget_zone=st.settings.config.throttle.day_zone
    )
    if revoked is None:
        raise NotFound("No such API key.")
    # This process stops accepting it at once; others within the cache TTL.
    request.app[AUTH].keys.forget(revoked.key_hash)
    return data_response(request, revoked.info.as_json())


BUDGET_PERIOD: Schema = {
    "enum": [*BUDGET_PERIODS, None],
    "description": "day, week (Monday first) or month in [throttle] day_zone; null: lifetime",
}
# A budget as a caller writes it: credits as a JSON number or decimal string.
BUDGET_IN: Schema = {
    "oneOf": [NUM, CREDITS_TEXT, {"type": "null"}],
    "description": "credits ≥ 0, at most 6 decimals; null: no budget",
}
# Every key shows these; all null for a key without a budget.
BUDGET_FIELDS: dict[str, Schema] = {
    "budget": nullable(CREDITS),
    "budgetMicros": nullable(MICROS),
    "budgetPeriod": BUDGET_PERIOD,
    "spent": nullable(CREDITS),
    "spentMicros": nullable(MICROS),
    "reserved": nullable(CREDITS),
    "reservedMicros": nullable(MICROS),
    "remaining": nullable(CREDITS),
    "remainingMicros": nullable(MICROS),
    "resetsAt": nullable(TIME),
}
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
        **BUDGET_FIELDS,
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
        "budget": nullable(CREDITS),
        "budgetMicros": nullable(MICROS),
        "budgetPeriod": BUDGET_PERIOD,
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
                "budget": BUDGET_IN,
                "budgetPeriod": BUDGET_PERIOD,
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
