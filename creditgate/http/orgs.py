"""``POST /api/orgs/create``: the account of the session's active organization."""

from __future__ import annotations

import re

from aiohttp import web

from creditgate.auth import require_session
from creditgate.errors import Forbidden, ValidationError
from creditgate.webkit.envelope import data_response
from creditgate.webkit.openapi import STR, UUID, Endpoint, obj

ORG_ID = re.compile(r"org_[A-Za-z0-9]+")


async def create_org(request: web.Request) -> web.Response:
    """Idempotent: the org account exists once this answers (authenticating made it).

    403 without an active organization in the session; 400 when the session's
    organization id is not ``org_`` followed by letters and digits.
    """
    principal = await require_session(request)
    if principal.org_id is None:
        raise Forbidden("No active organization in this session; select one in Clerk first.")
    if ORG_ID.fullmatch(principal.org_id) is None:
        raise ValidationError(
            "The session's organization id is not a Clerk organization id.",
            details=[
                {"path": "org_id", "message": "expected 'org_' followed by letters and digits"}
            ],
        )
    # Authentication resolved (and, on first use, created) the org's account.
    return data_response(
        request, {"orgId": principal.org_id, "accountId": str(principal.account_id)}
    )


ENDPOINTS = (
    Endpoint(
        "POST",
        "/api/orgs/create",
        create_org,
        "The account of the session's active organization (idempotent)",
        "account",
        "session",
        response=obj({"orgId": STR, "accountId": UUID}, "orgId", "accountId"),
        errors=(400, 503),
    ),
)
