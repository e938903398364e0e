"""The limits one request is held to: its tier, its account's and its key's overrides.

Resolution, per limit: the account's override if set, else the tier's value;
then a key override applies only where it is *stricter* than the account's
value. A stricter key gets buckets of its own, checked together with (never
instead of) the account's, so a key can never be looser than its account: its
requests always also count against the account.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from creditgate.config import LIMIT_NAMES as LIMIT_NAMES  # re-exported: the throttle's names
from creditgate.config import MAX_PER_MINUTE, Tier
from creditgate.config import LimitName as LimitName
from creditgate.throttle.resp import encode_args

# Whose limits a scope holds: the account's, or a key's stricter ones.
ScopeName = Literal["account", "key"]
# The same names in the camelCase of creditgate's JSON routes.
JSON_NAMES = dict(
    zip(
        LIMIT_NAMES,
        ("requestsPerMinute", "tokensPerMinute", "maxParallel", "messagesPerDay"),
        strict=True,
    )
)
MAX_VALUE: dict[LimitName, int] = {
    "requests_per_minute": MAX_PER_MINUTE,
    "tokens_per_minute": MAX_PER_MINUTE,
    "max_parallel": 1_000_000,
    "messages_per_day": 2**31 - 1,
}


@dataclass(frozen=True, slots=True)
class Overrides:
    """Operator-set limits of an account or an API key; None inherits."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_parallel: int | None = None
    messages_per_day: int | None = None

    def get(self, name: LimitName) -> int | None:
        value: int | None = getattr(self, name)
        return value

    def as_json(self) -> dict[str, int | None]:
        return {JSON_NAMES[n]: self.get(n) for n in LIMIT_NAMES}

    @classmethod
    def from_row(cls, row: Any, prefix: str = "") -> Overrides:
        """From a database row whose columns are the limit names (with ``prefix``)."""
        return cls(*(row[prefix + name] for name in LIMIT_NAMES))


NO_OVERRIDES = Overrides()


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose limits: the account's, or a key's stricter ones; and their Redis keys."""

    name: ScopeName
    hash_key: str  # buckets and the day's count (see admit.lua)
    lease_key: str  # parallel leases
    values: tuple[int, int, int, int]  # in LIMIT_NAMES order; 0 = not limited here


@dataclass(frozen=True, slots=True)
class Limits:
    """The resolved limits of (account, key): what the throttle checks and takes."""

    account_id: uuid.UUID
    key_id: uuid.UUID | None
    tier: str
    account: Tier  # the account's values (tier with the account's overrides)
    key: Overrides  # the key's values that are stricter than the account's
    scopes: tuple[Scope, ...] = field(default=(), compare=False)
    # The script's keys and per-scope limit arguments, built (and encoded) once.
    keys: tuple[str, ...] = field(default=(), compare=False)
    scope_args: tuple[int, ...] = field(default=(), compare=False)
    keys_resp: bytes = field(default=b"", compare=False)  # numkeys, then the keys
    scope_args_resp: bytes = field(default=b"", compare=False)

    def value(self, name: LimitName) -> int:
        """The effective value of limit ``name``: the stricter of key and account."""
        key_value = self.key.get(name)
        account_value: int = getattr(self.account, name)
        return account_value if key_value is None else key_value

    def effective_json(self) -> dict[str, int]:
        return {JSON_NAMES[n]: self.value(n) for n in LIMIT_NAMES}

    @property
    def lease_keys(self) -> list[str]:
        return [s.lease_key for s in self.scopes if s.values[2] > 0]


def _first(value: int | None, default: int) -> int:
    return default if value is None else value


def resolve(
    account_id: uuid.UUID,
    key_id: uuid.UUID | None,
    tier: Tier,
    account: Overrides = NO_OVERRIDES,
    key: Overrides = NO_OVERRIDES,
) -> Limits:
    """The limits a request of this account (through this key) is held to."""
    values = {n: _first(account.get(n), getattr(tier, n)) for n in LIMIT_NAMES}
    account_tier = Tier(tier.name, **values)
    stricter = {n: v for n in LIMIT_NAMES if (v := key.get(n)) is not None and v < values[n]}
    # Every key of one account shares the hash tag {account id}: one Cluster slot.
    tag = f"cg:{{{account_id}}}"
    scopes = [Scope("account", tag, f"{tag}:par", _values(values))]
    if stricter:
        prefix = f"{tag}:k:{key_id}"
        scopes.append(Scope("key", prefix, f"{prefix}:par", _values(stricter)))
    keys = tuple(k for s in scopes for k in (s.hash_key, s.lease_key))
    scope_args = tuple(v for s in scopes for v in s.values)
    return Limits(
        account_id,
        key_id,
        tier.name,
        account_tier,
        Overrides(**stricter),
        tuple(scopes),
        keys,
        scope_args,
        encode_args((len(keys), *keys)),
        encode_args(scope_args),
    )


def _values(by_name: dict[LimitName, int]) -> tuple[int, int, int, int]:
    a, b, c, d = (by_name.get(n, 0) for n in LIMIT_NAMES)
    return (a, b, c, d)
