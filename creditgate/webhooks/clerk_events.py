"""What Clerk's lifecycle events do: create and close accounts.

``user.created`` / ``organization.created`` create the account exactly as a
first request would (``ledger.ensure_account``: one account whichever comes
first). ``user.deleted`` / ``organization.deleted`` close it: no new charges,
its history kept. A deletion that overtakes its creation leaves a closed
account, and the late creation does not reopen it.
"""

from __future__ import annotations

from typing import Any, Literal

import asyncpg

from creditgate import ledger
from creditgate.ledger.kinds import AccountKind
from creditgate.webkit.textguard import has_control

# Clerk event type → (account kind, what to do).
CLERK_EVENTS: dict[str, tuple[AccountKind, Literal["create", "close"]]] = {
    "user.created": ("user", "create"),
    "user.deleted": ("user", "close"),
    "organization.created": ("org", "create"),
    "organization.deleted": ("org", "close"),
}


def clerk_facts(event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    """The only fact a lifecycle event needs: the Clerk id (no names, no emails)."""
    clerk_id = data.get("id")
    if not isinstance(clerk_id, str) or not 1 <= len(clerk_id) <= 255 or has_control(clerk_id):
        raise ValueError("data.id must be a Clerk id")
    return {"id": clerk_id}


async def apply_clerk_event(
    conn: asyncpg.Connection, event_type: str, facts: dict[str, Any]
) -> str:
    """Create or close the account the event names; a short outcome."""
    kind, action = CLERK_EVENTS[event_type]
    if action == "create":
        account = await ledger.ensure_account(conn, kind, facts["id"])
        return f"account {account.id} ({account.status})"
    account = await ledger.close_account(conn, kind, facts["id"])
    return f"account {account.id} closed"
