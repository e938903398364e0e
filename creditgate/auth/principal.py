"""Who is calling: the account a request acts for, and what it may do."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Principal:
    account_id: uuid.UUID
    tier: str
    via: str  # "api_key" | "session"
    key_id: uuid.UUID | None = None
    user_id: str | None = None
    org_id: str | None = None
    org_role: str | None = None
    permissions: frozenset[str] = field(default_factory=frozenset)
