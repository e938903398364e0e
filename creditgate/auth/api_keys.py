"""API keys: ``cg_`` + 32 random bytes (URL-safe base64); only the SHA-256 is stored.

Lookups are cached in-process for ``ttl`` seconds (5 s by default). A
revocation, or a change to the key or its account, is pushed to every process
by Postgres NOTIFY (``creditgate.invalidation``) and takes effect within a
second; the TTL is the fallback while a process's listener is disconnected
(the process that revokes a key forgets it at once; an expiry is honoured to
the second, the cache entry never outliving it). The cache also answers
repeated bad keys without the database.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from creditgate.auth.last_used import LastUsedRecorder
from creditgate.auth.principal import USAGE_WRITE, Principal
from creditgate.errors import Conflict, Forbidden, Unauthorized
from creditgate.ledger.budgets import NO_BUDGET, KeyBudget, key_budgets, set_key_budget
from creditgate.ledger.db import Db, transaction
from creditgate.ledger.money import micros_to_credits

KEY_PREFIX = "cg_"
_KEY_LEN = len(KEY_PREFIX) + 43  # 32 bytes in unpadded base64
MAX_LIVE_KEYS = 20  # per account: not revoked and not expired
CACHE_TTL_SECONDS = 5.0  # the revocation delay while the invalidation listener is down
# "account": acts for its account; "usage:write": that, and records usage for
# it (POST /api/usage/record); "admin": also the admin routes, any account.
SCOPES = ("account", "admin", USAGE_WRITE)


@dataclass(frozen=True, slots=True)
class NewKey:
    id: uuid.UUID
    key: str  # the secret: shown once, never stored
    prefix: str
    account_id: uuid.UUID
    name: str = ""
    scope: str = "account"
    created_at: datetime | None = None
    expires_at: datetime | None = None
    budget: int | None = None  # µc; None: no budget
    budget_period: str | None = None  # "day" | "week" | "month"; None: lifetime

    def as_json(self) -> dict[str, Any]:
        """``{id, key, prefix, accountId}`` (the CLI's ``keys create`` output),
        with ``budgetMicros`` and ``budgetPeriod`` when the key has a budget."""
        out: dict[str, Any] = {
            "id": str(self.id),
            "key": self.key,
            "prefix": self.prefix,
            "accountId": str(self.account_id),
        }
        if self.budget is not None:
            out |= budget_fields(self.budget, self.budget_period)
        return out


def budget_fields(budget: int, period: str | None) -> dict[str, Any]:
    """A new budget as the API shows it (credits beside the exact µc)."""
    return {
        "budget": micros_to_credits(budget),
        "budgetMicros": budget,
        "budgetPeriod": period,
    }


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What a key's owner may see of it: never the secret or its hash."""

    id: uuid.UUID
    prefix: str
    name: str
    scope: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    # Its budget and what the current period used (None: no budget, or not read).
    budget: KeyBudget | None = None

    def as_json(self) -> dict[str, Any]:
        """The API's view of a key: every key has the budget fields (null without one)."""
        return {
            "id": str(self.id),
            "prefix": self.prefix,
            "name": self.name,
            "scope": self.scope,
            "createdAt": _iso(self.created_at),
            "lastUsedAt": _iso(self.last_used_at),
            "expiresAt": _iso(self.expires_at),
            "revokedAt": _iso(self.revoked_at),
            **(self.budget.as_json() if self.budget is not None else NO_BUDGET),
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def hash_key(key: str) -> bytes:
    """The SHA-256 a key is stored and looked up by."""
    return hashlib.sha256(key.encode()).digest()


async def create_api_key(
    db: Db,
    account_id: uuid.UUID,
    name: str = "",
    expires_at: datetime | None = None,
    *,
    scope: str = "account",
    max_live: int = MAX_LIVE_KEYS,
    budget: int | None = None,
    budget_period: str | None = None,
) -> NewKey:
    """Mint a key for the account; the returned secret is the only copy.

    ``budget`` (µc) caps what the key's calls may spend per ``budget_period``
    (``day``, ``week``, ``month``; None: for its lifetime); set in the same
    transaction as the key, so a key never exists without its cap.

    At most ``max_live`` live (unrevoked, unexpired) keys per account: one
    more is a Conflict (409). The account row is locked ``FOR NO KEY UPDATE``
    while counting, so concurrent creations for one account serialise and
    cannot overshoot, while the ledger's writes (which only take ``KEY
    SHARE`` locks on the account through their foreign keys) are not blocked.
    """
    assert scope in SCOPES, scope
    key = KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    assert len(key) == _KEY_LEN
    key_id = uuid.uuid4()
    prefix = key[: len(KEY_PREFIX) + 8]
    async with transaction(db) as conn:
        await conn.execute("SELECT 1 FROM accounts WHERE id = $1 FOR NO KEY UPDATE", account_id)
        live = await conn.fetchval(
            "SELECT count(*) FROM api_keys WHERE account_id = $1 AND revoked_at IS NULL"
            " AND (expires_at IS NULL OR expires_at > now())",
            account_id,
        )
        if live >= max_live:
            raise Conflict(
                f"This account already has {max_live} live API keys; revoke one first.",
                details={"limit": max_live},
            )
        created_at = await conn.fetchval(
            "INSERT INTO api_keys (id, account_id, key_hash, prefix, name, expires_at, scope)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING created_at",
            key_id,
            account_id,
            hash_key(key),
            prefix,
            name,
            expires_at,
            scope,
        )
        if budget is not None:
            await set_key_budget(conn, key_id, budget, budget_period)
    return NewKey(
        key_id,
        key,
        prefix,
        account_id,
        name,
        scope,
        created_at,
        expires_at,
        budget,
        budget_period if budget is not None else None,
    )


_KEY_COLUMNS = "id, prefix, name, scope, created_at, last_used_at, expires_at, revoked_at"


async def list_api_keys(
    db: Db, account_id: uuid.UUID, limit: int = 100, *, budget_zone: str = "UTC"
) -> list[KeyInfo]:
    """The account's keys that are not revoked (expired ones included), newest
    first, each with its budget's current period (periods in ``budget_zone``)."""
    rows = await db.fetch(
        f"SELECT {_KEY_COLUMNS} FROM api_keys"  # noqa: S608 - a constant column list
        " WHERE account_id = $1 AND revoked_at IS NULL"
        " ORDER BY created_at DESC, id LIMIT $2",
        account_id,
        limit,
    )
    found = await key_budgets(db, [r["id"] for r in rows], budget_zone) if rows else {}
    return [KeyInfo(**dict(r), budget=found.get(r["id"])) for r in rows]


async def get_api_key(
    db: Db, key_id: uuid.UUID, *, budget_zone: str = "UTC"
) -> tuple[uuid.UUID, KeyInfo] | None:
    """Key ``key_id`` of any account (an operator's view): (its account, the key)."""
    row = await db.fetchrow(
        f"SELECT account_id, {_KEY_COLUMNS} FROM api_keys WHERE id = $1",  # noqa: S608
        key_id,
    )
    if row is None:
        return None
    fields = dict(row)
    account_id = fields.pop("account_id")
    found = await key_budgets(db, [key_id], budget_zone)
    return account_id, KeyInfo(**fields, budget=found.get(key_id))


@dataclass(frozen=True, slots=True)
class Revoked:
    info: KeyInfo
    key_hash: bytes  # to forget the key in this process's cache at once


async def revoke_api_key(
    db: Db, account_id: uuid.UUID, key_id: uuid.UUID, *, budget_zone: str = "UTC"
) -> Revoked | None:
    """Revoke the account's key ``key_id``; None if the account has no such key.
    The answer shows the key as listed, its budget's period included.

    Scoped by account: another account's key id is "no such key". Revoking a
    revoked key again changes nothing and answers the same.
    """
    row = await db.fetchrow(
        f"""
        WITH revoked AS (
            UPDATE api_keys SET revoked_at = now()
            WHERE id = $1 AND account_id = $2 AND revoked_at IS NULL
            RETURNING {_KEY_COLUMNS}, key_hash
        )
        SELECT * FROM revoked
        UNION ALL
        SELECT {_KEY_COLUMNS}, key_hash FROM api_keys
        WHERE id = $1 AND account_id = $2 AND revoked_at IS NOT NULL
        """,  # noqa: S608 - a constant column list
        key_id,
        account_id,
    )
    if row is None:
        return None
    fields = dict(row)
    key_hash = fields.pop("key_hash")
    found = await key_budgets(db, [key_id], budget_zone)
    return Revoked(KeyInfo(**fields, budget=found.get(key_id)), key_hash)


@dataclass(frozen=True, slots=True)
class _Cached:
    until: float  # monotonic time the entry is trusted until
    principal: Principal | None  # None: no such key, revoked or expired
    closed: bool = False


class ApiKeyAuth:
    """Turns a bearer API key into a Principal, with a short in-process cache."""

    def __init__(self, db: Db, ttl: float = CACHE_TTL_SECONDS, max_entries: int = 50_000) -> None:
        self._db = db
        self._ttl = ttl
        self._max = max_entries
        self._cache: dict[bytes, _Cached] = {}
        self.last_used = LastUsedRecorder(db)

    async def authenticate(self, key: str) -> Principal:
        """The principal of a live key; Unauthorized (401) or Forbidden (403) otherwise."""
        if len(key) != _KEY_LEN or not key.startswith(KEY_PREFIX):
            raise Unauthorized("Invalid API key.")
        digest = hash_key(key)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is None or hit.until < now:
            hit = await self._lookup(digest, now)
        if hit.closed:
            raise Forbidden("This account is closed.")
        if hit.principal is None:
            raise Unauthorized("Invalid, revoked or expired API key.")
        assert hit.principal.key_id is not None
        self.last_used.note(hit.principal.key_id, now)
        return hit.principal

    def forget(self, key_hash: bytes) -> None:
        """Drop a key from this process's cache (after revoking it here)."""
        self._cache.pop(key_hash, None)

    def forget_key(self, key_id: uuid.UUID) -> None:
        """Drop key ``key_id`` (revoked or changed elsewhere: ``creditgate.invalidation``)."""
        self._drop(lambda p: p.key_id == key_id)

    def forget_account(self, account_id: uuid.UUID) -> None:
        """Drop every key of an account (closed, re-tiered elsewhere)."""
        self._drop(lambda p: p.account_id == account_id)

    def clear(self) -> None:
        """Drop everything (invalidations may have been missed)."""
        self._cache.clear()

    def _drop(self, matches: Callable[[Principal], bool]) -> None:
        # A scan: invalidations are rare, and this keeps the hot path one dict.
        # Unknown-key entries (principal None) stay: a key never comes back.
        gone = [h for h, e in self._cache.items() if e.principal and matches(e.principal)]
        for digest in gone:
            del self._cache[digest]

    async def _lookup(self, digest: bytes, now: float) -> _Cached:
        # The lookup is by the hash itself (a unique index); no secret is ever
        # compared byte by byte, so there is nothing to time.
        row = await self._db.fetchrow(
            """
            SELECT k.id, k.account_id, k.scope, a.tier, a.status,
                   (k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now()))
                       AS live,
                   EXTRACT(EPOCH FROM k.expires_at - now()) AS expires_in
            FROM api_keys k JOIN accounts a ON a.id = k.account_id
            WHERE k.key_hash = $1
            """,
            digest,
        )
        until = now + self._ttl
        if row is None or not row["live"]:
            entry = _Cached(until, None)
        else:
            if row["expires_in"] is not None:
                until = min(until, now + float(row["expires_in"]))
            principal = Principal(
                account_id=row["account_id"],
                tier=row["tier"],
                via="api_key",
                key_id=row["id"],
                admin=row["scope"] == "admin",
                scope=row["scope"],
            )
            entry = _Cached(until, principal, closed=row["status"] == "closed")
        if len(self._cache) >= self._max:
            self._cache.clear()  # crude but bounded; a refill costs one query per key
        self._cache[digest] = entry
        return entry


async def revoke_key_by_id(
    db: Db, key_id: uuid.UUID, *, budget_zone: str = "UTC"
) -> tuple[uuid.UUID, Revoked] | None:
    """Revoke key ``key_id`` whatever its account (an operator's revocation).

    Returns (its account id, the revocation), or None if there is no such key.
    Idempotent like ``revoke_api_key``.
    """
    account_id = await db.fetchval("SELECT account_id FROM api_keys WHERE id = $1", key_id)
    if account_id is None:
        return None
    revoked = await revoke_api_key(db, account_id, key_id, budget_zone=budget_zone)
    return None if revoked is None else (account_id, revoked)


async def revoke_named_keys(db: Db, account_id: uuid.UUID, name: str) -> int:
    """Revoke the account's live keys called ``name``; how many were revoked."""
    done = await db.execute(
        "UPDATE api_keys SET revoked_at = now()"
        " WHERE account_id = $1 AND name = $2 AND revoked_at IS NULL",
        account_id,
        name,
    )
    return int(done.split()[-1])
