"""Who is calling: the account a request acts for, and what it may do."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

# The API key scope that may record usage that did not go through the proxy.
USAGE_WRITE = "usage:write"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller.

    ``account_id`` is the account every query and charge is scoped to: the
    key's account for an API key; for a Clerk session, the active
    organization's account when one is active, otherwise the user's.
    """

    account_id: uuid.UUID
    tier: str
    via: str  # "api_key" | "session"
    key_id: uuid.UUID | None = None
    user_id: str | None = None  # Clerk user id (sessions only)
    org_id: str | None = None  # the session's active Clerk organization
    org_role: str | None = None  # normalised with the "org:" prefix, e.g. "org:admin"
    permissions: frozenset[str] = field(default_factory=frozenset)
    admin: bool = False  # may call the admin routes (admin key, or admin of the admin org)
    # An API key's scope: "account", "admin" or "usage:write" (sessions: "account").
    scope: str = "account"

    def may_record_usage(self) -> bool:
        """May record usage for its own account (``POST /api/usage/record``)."""
        return self.admin or self.scope == USAGE_WRITE
