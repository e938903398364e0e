"""Each account's default model, cached per process (the proxy asks when a request names none).

Only requests without a ``model`` look here, so requests that name one pay
nothing. Entries live ``ttl`` seconds (5 s, like the API key and limits
caches): a change reaches every process within that time; the process that
made it forgets its entry at once.
"""

from __future__ import annotations

import time
import uuid

from creditgate.ledger.db import Db


class DefaultModels:
    """account id → its ``defaultModel`` (None when unset), cached for ``ttl`` seconds."""

    def __init__(self, db: Db, ttl: float = 5.0, max_entries: int = 50_000) -> None:
        self._db = db
        self._ttl = ttl
        self._max = max_entries
        self._cache: dict[uuid.UUID, tuple[float, str | None]] = {}

    async def get(self, account_id: uuid.UUID) -> str | None:
        """The account's default model, or None."""
        now = time.monotonic()
        hit = self._cache.get(account_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        model: str | None = await self._db.fetchval(
            "SELECT default_model FROM account_preferences WHERE account_id = $1", account_id
        )
        if len(self._cache) >= self._max:
            self._cache.clear()  # crude but bounded; a refill is one query per account
        self._cache[account_id] = (now + self._ttl, model)
        return model

    def forget(self, account_id: uuid.UUID) -> None:
        """Drop the account's entry (after changing it in this process)."""
        self._cache.pop(account_id, None)
