"""The caller's own account: ``GET /api/user/balance`` and ``GET /api/user/usage``."""

from __future__ import annotations

from aiohttp import web

from creditgate import ledger
from creditgate.auth import authenticate
from creditgate.errors import ValidationError
from creditgate.http.params import Problems, parse_int, parse_kinds, parse_time
from creditgate.http.state import STATE
from creditgate.ledger.errors import InvalidArgument
from creditgate.ledger.history import KINDS, MAX_PAGE, camel, decode_cursor
from creditgate.webkit.envelope import data_response
from creditgate.webkit.openapi import (
    BOOL,
    CREDITS,
    INT,
    MICROS,
    STR,
    TIME,
    UUID,
    Endpoint,
    Param,
    Schema,
    arr,
    nullable,
    obj,
)

_USAGE_PARAMS = ("limit", "cursor", "kind", "since", "until")


async def balance(request: web.Request) -> web.Response:
    """The balance object of DESIGN.md §9 for the caller's account (replica when configured)."""
    st = request.app[STATE]
    principal = await authenticate(request)
    try:
        # The replica when one is configured: a view, seconds stale at most
        # by its lag; the reserve decides money on the primary.
        bal = await ledger.get_balance(st.read_db, principal.account_id)
    except ledger.AccountNotFound:
        if st.read_db is st.db:
            raise
        # An account created moments ago may not have reached the replica.
        bal = await ledger.get_balance(st.db, principal.account_id)
    return data_response(request, bal.as_json())


async def usage(request: web.Request) -> web.Response:
    """The caller's ledger entries, newest first: ``{entries, nextCursor}`` (DESIGN.md §9).

    Query: ``limit`` (1..200, default 50), ``cursor`` (a previous
    ``nextCursor``), ``kind`` (comma-separated or repeated), ``since``
    (inclusive) and ``until`` (exclusive) as ISO 8601 times. Only the caller's
    account is ever read, from the read replica when one is configured.
    """
    st = request.app[STATE]
    principal = await authenticate(request)
    q = request.query
    problems: Problems = []
    for name in _USAGE_PARAMS:
        if name != "kind" and len(q.getall(name, [])) > 1:
            problems.append({"path": name, "message": "given more than once"})
    limit = 50
    if "limit" in q:
        limit = parse_int(q["limit"], "limit", problems, low=1, high=MAX_PAGE) or 50
    cursor = q.get("cursor")
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except InvalidArgument as e:
            problems.extend(e.details)
    kinds = parse_kinds(q.getall("kind", []), ledger.ENTRY_KINDS, problems)
    since = parse_time(q["since"], "since", problems) if "since" in q else None
    until = parse_time(q["until"], "until", problems) if "until" in q else None
    if since is not None and until is not None and since >= until:
        problems.append({"path": "until", "message": "must be later than since"})
    if problems:
        raise ValidationError("The usage query has invalid parameters.", details=problems)
    page = await ledger.list_entries(
        st.read_db,  # the replica when configured (docs/deploying.md: its lag)
        principal.account_id,
        limit=limit,
        cursor=cursor,
        kinds=kinds,
        since=since,
        until=until,
    )
    return data_response(request, page.as_json())


BALANCE: Schema = obj(
    {
        "accountId": UUID,
        "balance": CREDITS,
        "balanceMicros": MICROS,
        "reserved": CREDITS,
        "reservedMicros": MICROS,
        "available": CREDITS,
        "availableMicros": MICROS,
        "creditLimit": CREDITS,
        "creditLimitMicros": MICROS,
        "tier": STR,
        "plan": nullable(STR),
    },
    "accountId",
    "balance",
    "balanceMicros",
    "reserved",
    "reservedMicros",
    "available",
    "availableMicros",
    "creditLimit",
    "creditLimitMicros",
    "tier",
    "plan",
)
# A debit's tokens by kind: the totals, and the kinds that are parts of them
# (only the non-zero ones are sent). The usage-record route accepts the same.
TOKEN_BREAKDOWN: Schema = {
    **obj({camel(k): {**INT, "minimum": 0} for k in KINDS}, "input", "output"),
    "description": "tokens by kind: input and output are totals; cachedInput, cacheWrite and"
    " audioInput are parts of input; audioOutput, reasoning, acceptedPrediction and"
    " rejectedPrediction parts of output",
}
ENTRY: Schema = obj(
    {
        "id": UUID,
        "kind": {"enum": list(ledger.ENTRY_KINDS)},
        "amount": CREDITS,
        "amountMicros": MICROS,
        "model": nullable(STR),
        "inputTokens": nullable(INT),
        "outputTokens": nullable(INT),
        "requestId": nullable(STR),
        "estimated": BOOL,
        "tokens": nullable(TOKEN_BREAKDOWN),
        "expiresAt": nullable(TIME),
        "createdAt": TIME,
        "source": {
            "enum": list(ledger.history.SOURCES),
            "description": "where the entry came from",
        },
        "description": {**STR, "description": "a grant's reason, or what the entry is"},
    },
    "id",
    "kind",
    "amount",
    "amountMicros",
    "createdAt",
    "source",
    "description",
)
ENDPOINTS = (
    Endpoint(
        "GET",
        "/api/user/balance",
        balance,
        "The caller's balance, reservations and credits granted",
        "account",
        "caller",
        response=BALANCE,
        errors=(503,),
    ),
    Endpoint(
        "GET",
        "/api/user/usage",
        usage,
        "The caller's ledger entries, newest first, cursor-paged",
        "account",
        "caller",
        response=obj({"entries": arr(ENTRY), "nextCursor": nullable(STR)}, "entries", "nextCursor"),
        errors=(400, 503),
        params=(
            Param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}),
            Param("cursor", STR, description="a previous answer's nextCursor"),
            Param("kind", STR, description="entry kinds, comma-separated"),
            Param("since", TIME, description="inclusive"),
            Param("until", TIME, description="exclusive"),
        ),
    ),
)
