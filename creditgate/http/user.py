"""The caller's own account: ``GET /api/user/balance``."""

from __future__ import annotations

from aiohttp import web

from creditgate import ledger
from creditgate.auth import authenticate
from creditgate.http.envelope import data_response
from creditgate.http.state import STATE


async def balance(request: web.Request) -> web.Response:
    """The balance object of DESIGN.md §9 for the caller's account."""
    st = request.app[STATE]
    principal = await authenticate(request)
    bal = await ledger.get_balance(st.db, principal.account_id)
    return data_response(request, bal.as_json())
