"""Accounts: one per Clerk user or organization, each with one balance row."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg

from creditgate.ledger.db import Db, transaction
from creditgate.ledger.errors import AccountNotFound, InvalidArgument, OverdraftInUse
from creditgate.ledger.kinds import AccountKind
from creditgate.ledger.money import micros_to_credits

KINDS = ("user", "org")


@dataclass(frozen=True, slots=True)
class Account:
    id: uuid.UUID
    kind: str
    external_id: str
    tier: str
    status: str

    def as_json(self) -> dict[str, str]:
        return {
            "id": str(self.id),
            "kind": self.kind,
            "externalId": self.external_id,
            "tier": self.tier,
            "status": self.status,
        }


async def ensure_account(
    db: Db, kind: AccountKind, external_id: str, tier: str = "free"
) -> Account:
    """The account of this Clerk user/org, created (with its balance row) if new.

    Safe under concurrency: two first requests of a new account create one.
    """
    assert kind in KINDS, kind
    row = await db.fetchrow(
        """
        INSERT INTO accounts (id, kind, external_id, tier) VALUES ($1, $2, $3, $4)
        ON CONFLICT (kind, external_id) DO NOTHING
        RETURNING id, kind, external_id, tier, status
        """,
        uuid.uuid4(),
        kind,
        external_id,
        tier,
    )
    if row is None:
        row = await db.fetchrow(
            "SELECT id, kind, external_id, tier, status FROM accounts"
            " WHERE kind = $1 AND external_id = $2",
            kind,
            external_id,
        )
    assert row is not None
    return Account(**dict(row))


async def get_account(db: Db, account_id: uuid.UUID) -> Account | None:
    """The account with this id, or None."""
    row = await db.fetchrow(
        "SELECT id, kind, external_id, tier, status FROM accounts WHERE id = $1", account_id
    )
    return Account(**dict(row)) if row else None


async def resolve_account(db: Db, ref: str) -> Account:
    """The account named by its id or by its Clerk user/org id; AccountNotFound otherwise."""
    try:
        account_id = uuid.UUID(ref)
    except ValueError:
        rows = await db.fetch(
            "SELECT id, kind, external_id, tier, status FROM accounts WHERE external_id = $1", ref
        )
        if len(rows) > 1:
            raise InvalidArgument(
                f"{ref!r} names both a user and an org account; use the account id"
            ) from None
        if rows:
            return Account(**dict(rows[0]))
    else:
        account = await get_account(db, account_id)
        if account is not None:
            return account
    raise AccountNotFound(f"no account {ref!r}")


async def close_account(db: Db, kind: AccountKind, external_id: str) -> Account:
    """Close the account of this Clerk user/org: no new charges, history kept.

    An account not seen yet is created closed, so a deletion that arrives
    before the creation (webhooks are not ordered) still wins: Clerk never
    reuses an id.
    """
    assert kind in KINDS, kind
    row = await db.fetchrow(
        """
        INSERT INTO accounts (id, kind, external_id, status) VALUES ($1, $2, $3, 'closed')
        ON CONFLICT (kind, external_id) DO UPDATE SET status = 'closed'
        RETURNING id, kind, external_id, tier, status
        """,
        uuid.uuid4(),
        kind,
        external_id,
    )
    assert row is not None
    return Account(**dict(row))


async def set_account_tier(db: Db, account_id: uuid.UUID, tier: str) -> bool:
    """Set the account's tier (its plan's limits); False if it already had it."""
    status = await db.execute(
        "UPDATE accounts SET tier = $2 WHERE id = $1 AND tier IS DISTINCT FROM $2",
        account_id,
        tier,
    )
    return bool(status != "UPDATE 0")


async def set_overdraft_limit(db: Db, account_id: uuid.UUID, limit: int) -> int:
    """Let the account's available balance go down to ``-limit`` µc; returns the limit.

    Setting the same value again changes nothing (idempotent by nature). A
    limit below what the account already uses of its overdraft is refused
    (OverdraftInUse): the CHECK on the balance row would not hold.
    """
    assert limit >= 0, limit
    try:
        # Locked first, so the UPDATE's snapshot is the row's latest version and
        # the CHECK judges the limit against what the account uses now.
        async with transaction(db) as conn:
            await conn.execute(
                "SELECT 1 FROM account_balances WHERE account_id = $1 FOR UPDATE", account_id
            )
            row = await conn.fetchrow(
                "UPDATE account_balances SET overdraft_limit = $2, updated_at = now()"
                " WHERE account_id = $1 RETURNING overdraft_limit",
                account_id,
                limit,
            )
    except asyncpg.CheckViolationError as e:
        if e.constraint_name != "available_within_overdraft":
            raise
        available = await db.fetchval(
            "SELECT balance - reserved FROM account_balances WHERE account_id = $1", account_id
        )
        raise OverdraftInUse(
            f"The account already has {micros_to_credits(available)} credits available;"
            " its overdraft limit cannot be set below what it uses now.",
            details={"availableMicros": available, "overdraftLimitMicros": limit},
        ) from None
    if row is None:
        raise AccountNotFound(f"no account {account_id}")
    return int(row["overdraft_limit"])


@dataclass(frozen=True, slots=True)
class AccountRow:
    """An account with its balance, as ``accounts list`` shows it."""

    account: Account
    balance: int
    reserved: int

    def as_json(self) -> dict[str, object]:
        """The account object plus its balance and available credits."""
        available = self.balance - self.reserved
        return {
            **self.account.as_json(),
            "balance": micros_to_credits(self.balance),
            "balanceMicros": self.balance,
            "available": micros_to_credits(available),
            "availableMicros": available,
        }


async def list_accounts(
    db: Db, limit: int = 100, after: uuid.UUID | None = None
) -> list[AccountRow]:
    """Up to ``limit`` accounts ordered by id, those after ``after`` (keyset paging)."""
    rows = await db.fetch(
        """
        SELECT a.id, a.kind, a.external_id, a.tier, a.status, b.balance, b.reserved
        FROM accounts a JOIN account_balances b ON b.account_id = a.id
        WHERE $1::uuid IS NULL OR a.id > $1
        ORDER BY a.id
        LIMIT $2
        """,
        after,
        limit,
    )
    out = []
    for r in rows:
        fields = dict(r)
        balance, reserved = fields.pop("balance"), fields.pop("reserved")
        out.append(AccountRow(Account(**fields), balance, reserved))
    return out
