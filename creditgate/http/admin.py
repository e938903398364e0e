"""Admin routes: ``POST /api/admin/credits`` (grant or adjust, exactly once per key)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from creditgate import ledger
from creditgate.auth import require_admin
from creditgate.errors import ValidationError
from creditgate.http.params import Problems, parse_text, parse_time
from creditgate.http.state import STATE
from creditgate.logs import log
from creditgate.webkit.envelope import read_json_object, written_response
from creditgate.webkit.openapi import (
    CREDITS,
    MICROS,
    NUM,
    STR,
    TIME,
    UUID,
    Endpoint,
    Schema,
    nullable,
    obj,
)

_FIELDS = {"account", "amount", "reason", "idempotencyKey", "expiresAt"}
MAX_REASON = 500
MAX_KEY = 200


def admin_idempotency_key(key: str) -> str:
    """The ledger key of an admin write: one namespace for the API and the CLI."""
    return f"admin:{key}"


def parse_amount(value: Any, problems: Problems, path: str = "amount") -> int | None:
    """Credits (a JSON number or decimal string, ≤ 6 decimals, not 0) as µc."""
    try:
        micros = ledger.credits_to_micros(value)
    except ValueError as e:
        problems.append({"path": path, "message": str(e)})
        return None
    if micros == 0:
        problems.append({"path": path, "message": "must not be zero"})
        return None
    return micros


def parse_expiry(value: Any, amount: int | None, problems: Problems) -> datetime | None:
    """``expiresAt``: only on a grant, and in the future."""
    if value is None:
        return None
    when = parse_time(value, "expiresAt", problems)
    if when is None:
        return None
    if amount is not None and amount < 0:
        problems.append({"path": "expiresAt", "message": "only a grant (amount > 0) can expire"})
    if when <= datetime.now(UTC):
        problems.append({"path": "expiresAt", "message": "must be in the future"})
    return when


async def credits(request: web.Request) -> web.Response:
    """Grant (amount > 0, optionally expiring) or adjust down (amount < 0) an account's credits.

    Body ``{account, amount, reason, idempotencyKey, expiresAt?}``; ``account``
    is an account id or its Clerk user/org id. Answers 201 with the entry and
    the balance right after it. The same key and body again answers the same
    (header ``Idempotent-Replayed: true``) and writes nothing; the same key
    with another body is a 409; an adjustment the account cannot cover a 402.
    """
    st = request.app[STATE]
    await require_admin(request)
    body = await read_json_object(request)
    problems: Problems = [
        {"path": name, "message": "unknown field"} for name in sorted(set(body) - _FIELDS)
    ]
    ref = parse_text(body.get("account"), "account", 255, problems)
    amount = parse_amount(body.get("amount"), problems)
    reason = parse_text(body.get("reason"), "reason", MAX_REASON, problems)
    key = parse_text(body.get("idempotencyKey"), "idempotencyKey", MAX_KEY, problems)
    expires_at = parse_expiry(body.get("expiresAt"), amount, problems)
    if problems:
        raise ValidationError("The credits request is invalid.", details=problems)
    assert ref is not None and amount is not None and reason is not None and key is not None
    account = await ledger.resolve_account(st.db, ref)
    posted = await ledger.post_entry(
        st.db,
        account_id=account.id,
        amount=amount,
        kind="grant" if amount > 0 else "adjustment",
        idempotency_key=admin_idempotency_key(key),
        reason=reason,
        expires_at=expires_at,
    )
    log.info(
        "admin credits posted",
        extra={
            "account_id": str(account.id),
            "entry_id": str(posted.entry_id),
            "amount_micros": posted.amount,
            "replayed": posted.replayed,
        },
    )
    return written_response(request, posted.as_json(), replayed=posted.replayed)


POSTED: Schema = obj(
    {
        "entryId": UUID,
        "accountId": UUID,
        "kind": {"enum": ["grant", "adjustment"]},
        "amount": CREDITS,
        "amountMicros": MICROS,
        "balance": CREDITS,
        "balanceMicros": MICROS,
        "expiresAt": nullable(TIME),
        "createdAt": TIME,
    },
    "entryId",
    "accountId",
    "kind",
    "amountMicros",
    "balanceMicros",
)
ENDPOINTS = (
    Endpoint(
        "POST",
        "/api/admin/credits",
        credits,
        "Grant (amount > 0) or adjust down (< 0) an account's credits, once per key",
        "admin",
        "admin",
        request=obj(
            {
                "account": {**STR, "description": "account id or Clerk user/org id"},
                "amount": {"oneOf": [NUM, STR], "description": "credits, at most 6 decimals"},
                "reason": {**STR, "minLength": 1, "maxLength": MAX_REASON},
                "idempotencyKey": {**STR, "minLength": 1, "maxLength": MAX_KEY},
                "expiresAt": nullable(TIME),
            },
            "account",
            "amount",
            "reason",
            "idempotencyKey",
        ),
        response=POSTED,
        status=201,
        errors=(402, 404, 409, 503),
    ),
)
