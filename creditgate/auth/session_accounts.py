"""The account a Clerk session acts for, created on its first authenticated use."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from creditgate.ledger import Account, ensure_account
from creditgate.ledger.db import Db
from creditgate.ledger.kinds import AccountKind


@dataclass(frozen=True, slots=True)
class _Cached:
    until: float
    account: Account


class SessionAccounts:
    """``(kind, Clerk id)`` → Account, cached in-process for ``ttl`` seconds.

    A miss reads the account and creates it (with its balance row) only when
    it does not exist yet — ``ensure_account`` is race-free, so two first
    requests of a new user, in one process or many, make one account. The
    cache is invalidated on every process by Postgres NOTIFY when an account
    is closed or re-tiered (``creditgate.invalidation``); ``ttl`` seconds
    bound it while that listener is disconnected, the same as API keys.
    """

    def __init__(self, db: Db, ttl: float = 5.0, max_entries: int = 50_000) -> None:
        self._db = db
        self._ttl = ttl
        self._max = max_entries
        self._cache: dict[tuple[AccountKind, str], _Cached] = {}

    async def get(self, kind: AccountKind, external_id: str) -> Account:
        """The account of this Clerk user (``kind='user'``) or organization (``'org'``)."""
        now = time.monotonic()
        hit = self._cache.get((kind, external_id))
        if hit is not None and hit.until >= now:
            return hit.account
        row = await self._db.fetchrow(
            "SELECT id, kind, external_id, tier, status FROM accounts"
            " WHERE kind = $1 AND external_id = $2",
            kind,
            external_id,
        )
        account = Account(**dict(row)) if row else await ensure_account(self._db, kind, external_id)
        if len(self._cache) >= self._max:
            self._cache.clear()  # bounded; a refill costs one query per account
        self._cache[(kind, external_id)] = _Cached(now + self._ttl, account)
        return account

    def forget_account(self, account_id: uuid.UUID) -> None:
        """Drop an account (closed or re-tiered elsewhere: ``creditgate.invalidation``)."""
        gone = [k for k, e in self._cache.items() if e.account.id == account_id]
        for k in gone:
            del self._cache[k]

    def forget_key(self, key_id: uuid.UUID) -> None:
        """Nothing here is per key."""

    def clear(self) -> None:
        """Drop everything (invalidations may have been missed)."""
        self._cache.clear()
