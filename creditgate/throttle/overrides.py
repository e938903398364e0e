"""Per-account and per-API-key limit overrides: stored in Postgres, cached per process.

Overrides live beside what they override: nullable limit columns on
``accounts`` and on ``api_keys`` (migration 0004). Operators set them with
``creditgate limits set`` or ``PATCH /api/admin/…/limits``. Each process
caches the resolved limits of an (account, key) for ``ttl`` seconds; a change
is pushed to every process by Postgres NOTIFY (``creditgate.invalidation``),
the TTL bounding it only while a process's listener is disconnected.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from creditgate.config import Config
from creditgate.ledger.db import Db
from creditgate.throttle.errors import InvalidLimits, UnknownTarget
from creditgate.throttle.limits import (
    JSON_NAMES,
    LIMIT_NAMES,
    MAX_VALUE,
    NO_OVERRIDES,
    Limits,
    Overrides,
    resolve,
)

_COLUMNS = ", ".join(LIMIT_NAMES)
_SELECT = """
    SELECT a.id AS account_id, a.tier,
           a.requests_per_minute AS account_requests_per_minute,
           a.tokens_per_minute AS account_tokens_per_minute,
           a.max_parallel AS account_max_parallel,
           a.messages_per_day AS account_messages_per_day,
           k.id AS key_id,
           k.requests_per_minute AS key_requests_per_minute,
           k.tokens_per_minute AS key_tokens_per_minute,
           k.max_parallel AS key_max_parallel,
           k.messages_per_day AS key_messages_per_day
    FROM accounts a LEFT JOIN api_keys k ON k.id = $2 AND k.account_id = a.id
    WHERE a.id = $1
"""


async def load_limits(
    db: Db,
    config: Config,
    account_id: uuid.UUID,
    key_id: uuid.UUID | None,
) -> Limits:
    """The resolved limits of an account (and key), read from the database now."""
    return _resolve_row(await _fetch(db, account_id, key_id), config)


async def _fetch(db: Db, account_id: uuid.UUID, key_id: uuid.UUID | None) -> Any:
    row = await db.fetchrow(_SELECT, account_id, key_id)
    if row is None:
        raise UnknownTarget(f"no account {account_id}")
    return row


def _resolve_row(row: Any, config: Config) -> Limits:
    tier = config.tiers.get(row["tier"]) or config.tiers["free"]
    account_id, key_id = row["account_id"], row["key_id"]
    key = Overrides.from_row(row, "key_") if row["key_id"] is not None else NO_OVERRIDES
    return resolve(
        account_id,
        key_id,
        tier,
        Overrides.from_row(row, "account_"),
        key,
    )


class LimitsCache:
    """Resolved limits per (account, key), cached for ``ttl`` seconds, loaded once at a time."""

    def __init__(
        self,
        db: Db,
        config: Config,
        *,
        ttl: float = 5.0,
        max_entries: int = 50_000,
    ) -> None:
        self._db = db
        self._config = config
        self._ttl = ttl
        self._max = max_entries
        self._cache: dict[tuple[uuid.UUID, uuid.UUID | None], tuple[float, Limits]] = {}
        self._loading: dict[tuple[uuid.UUID, uuid.UUID | None], asyncio.Future[Limits]] = {}

    async def get(self, account_id: uuid.UUID, key_id: uuid.UUID | None) -> Limits:
        """The limits of requests of ``account_id`` made with ``key_id`` (None: a session)."""
        ident = (account_id, key_id)
        hit = self._cache.get(ident)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        pending = self._loading.get(ident)
        if pending is not None:  # one query per key however many requests wait on it
            return await asyncio.shield(pending)
        future: asyncio.Future[Limits] = asyncio.get_running_loop().create_future()
        self._loading[ident] = future
        try:
            limits = await load_limits(self._db, self._config, account_id, key_id)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here, so an unawaited one is not reported
            raise
        finally:
            del self._loading[ident]
        future.set_result(limits)
        if len(self._cache) >= self._max:
            self._cache.clear()  # crude but bounded; a refill is one query per key
        self._cache[ident] = (time.monotonic() + self._ttl, limits)
        return limits

    def forget_account(self, account_id: uuid.UUID) -> None:
        """Drop an account's limits, every key's included (``creditgate.invalidation``)."""
        for ident in [i for i in self._cache if i[0] == account_id]:
            del self._cache[ident]

    def forget_key(self, key_id: uuid.UUID) -> None:
        """Drop a key's limits (its overrides changed)."""
        for ident in [i for i in self._cache if i[1] == key_id]:
            del self._cache[ident]

    def clear(self) -> None:
        """Drop everything (invalidations may have been missed)."""
        self._cache.clear()


# ------------------------------------------------------------ operator writes


def parse_changes(body: Any) -> dict[str, int | None]:
    """``{requestsPerMinute: 10, maxParallel: null, …}`` → column changes, or InvalidLimits."""
    if not isinstance(body, dict):
        raise InvalidLimits(
            "Send a JSON object of limits.",
            details=[{"path": "", "message": "expected an object"}],
        )
    by_json = {j: n for n, j in JSON_NAMES.items()}
    problems: list[dict[str, str]] = []
    changes: dict[str, int | None] = {}
    for field_name, value in body.items():
        name = by_json.get(field_name)
        if name is None:
            problems.append(
                {"path": field_name, "message": f"unknown limit; one of {sorted(by_json)}"}
            )
        elif value is None:
            changes[name] = None
        elif isinstance(value, bool) or not isinstance(value, int):
            problems.append({"path": field_name, "message": "must be an integer or null"})
        elif not 1 <= value <= MAX_VALUE[name]:
            problems.append({"path": field_name, "message": f"must be from 1 to {MAX_VALUE[name]}"})
        else:
            changes[name] = value
    if problems:
        raise InvalidLimits("Invalid limits.", details=problems)
    if not changes:
        raise InvalidLimits(
            "No limits to change.",
            details=[{"path": "", "message": f"name at least one of {sorted(by_json)}"}],
        )
    return changes


async def set_overrides(
    db: Db, table: str, row_id: uuid.UUID, changes: dict[str, int | None]
) -> Overrides:
    """Apply ``changes`` (None clears) to the account's or key's overrides; the new ones."""
    assert table in ("accounts", "api_keys"), table
    assert changes and set(changes) <= set(LIMIT_NAMES), changes
    names = list(changes)
    # Column names come from the fixed LIMIT_NAMES list; values are parameters.
    assignments = ", ".join(f"{n} = ${i}" for i, n in enumerate(names, start=2))
    row = await db.fetchrow(
        f"UPDATE {table} SET {assignments} WHERE id = $1 RETURNING {_COLUMNS}",  # noqa: S608
        row_id,
        *(changes[n] for n in names),
    )
    if row is None:
        raise UnknownTarget(f"no {'account' if table == 'accounts' else 'API key'} {row_id}")
    return Overrides.from_row(row)


async def key_account(db: Db, key_id: uuid.UUID) -> uuid.UUID:
    """The account an API key belongs to; UnknownTarget for an unknown key."""
    account_id: uuid.UUID | None = await db.fetchval(
        "SELECT account_id FROM api_keys WHERE id = $1", key_id
    )
    if account_id is None:
        raise UnknownTarget(f"no API key {key_id}")
    return account_id


async def describe(
    db: Db, config: Config, account_id: uuid.UUID, key_id: uuid.UUID | None = None
) -> dict[str, Any]:
    """What an operator sees: tier, overrides and the effective limits of an account or key."""
    row = await _fetch(db, account_id, key_id)
    if key_id is not None and row["key_id"] is None:
        raise UnknownTarget(f"no API key {key_id} on account {account_id}")
    limits = _resolve_row(row, config)
    tier = config.tiers.get(limits.tier) or config.tiers["free"]
    out: dict[str, Any] = {
        "accountId": str(account_id),
        "tier": tier.name,
        "tierLimits": {JSON_NAMES[n]: getattr(tier, n) for n in LIMIT_NAMES},
        "accountOverrides": Overrides.from_row(row, "account_").as_json(),
        "accountLimits": {JSON_NAMES[n]: getattr(limits.account, n) for n in LIMIT_NAMES},
    }
    if key_id is not None:
        out["keyId"] = str(key_id)
        out["keyOverrides"] = Overrides.from_row(row, "key_").as_json()
    out["effective"] = limits.effective_json()
    return out
