"""API keys: ``cg_`` + 32 random bytes (URL-safe base64); only the SHA-256 is stored.

Lookups are cached in-process for ``ttl`` seconds, so a revoked or expired key
stops working everywhere within that time (no cross-process messaging
needed); the cache also answers repeated bad keys without the database.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import datetime

from creditgate.auth.principal import Principal
from creditgate.errors import Forbidden, Unauthorized
from creditgate.ledger.db import Db

KEY_PREFIX = "cg_"
_KEY_LEN = len(KEY_PREFIX) + 43  # 32 bytes in unpadded base64


@dataclass(frozen=True, slots=True)
class NewKey:
    id: uuid.UUID
    key: str  # the secret: shown once, never stored
    prefix: str
    account_id: uuid.UUID

    def as_json(self) -> dict[str, str]:
        return {
            "id": str(self.id),
            "key": self.key,
            "prefix": self.prefix,
            "accountId": str(self.account_id),
        }


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


async def create_api_key(
    db: Db, account_id: uuid.UUID, name: str = "", expires_at: datetime | None = None
) -> NewKey:
    """Mint a key for the account; the returned secret is the only copy."""
    key = KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    assert len(key) == _KEY_LEN
    key_id = uuid.uuid4()
    prefix = key[: len(KEY_PREFIX) + 8]
    await db.execute(
        "INSERT INTO api_keys (id, account_id, key_hash, prefix, name, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        key_id,
        account_id,
        hash_key(key),
        prefix,
        name,
        expires_at,
    )
    return NewKey(key_id, key, prefix, account_id)


@dataclass(frozen=True, slots=True)
class _Cached:
    until: float  # monotonic time the entry is trusted until
    principal: Principal | None  # None: no such key, revoked or expired
    closed: bool = False


class ApiKeyAuth:
    """Turns a bearer API key into a Principal, with a short in-process cache."""

    def __init__(self, db: Db, ttl: float = 5.0, max_entries: int = 50_000) -> None:
        self._db = db
        self._ttl = ttl
        self._max = max_entries
        self._cache: dict[bytes, _Cached] = {}

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
        return hit.principal

    async def _lookup(self, digest: bytes, now: float) -> _Cached:
        # The lookup is by the hash itself (a unique index); no secret is ever
        # compared byte by byte, so there is nothing to time.
        row = await self._db.fetchrow(
            """
            SELECT k.id, k.account_id, a.tier, a.status,
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
            )
            entry = _Cached(until, principal, closed=row["status"] == "closed")
        if len(self._cache) >= self._max:
            self._cache.clear()  # crude but bounded; a refill costs one query per key
        self._cache[digest] = entry
        return entry
