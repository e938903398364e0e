"""Posted money moves other than call debits: grants, adjustments, reversals."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

import asyncpg

from creditgate.errors import Conflict, InsufficientCredits
from creditgate.ledger.db import Db
from creditgate.ledger.money import micros_to_credits

ENTRY_KINDS = ("grant", "debit", "adjustment", "reversal", "expiry")


@dataclass(frozen=True, slots=True)
class Posted:
    entry_id: uuid.UUID
    account_id: uuid.UUID
    amount: int  # signed µc
    balance: int  # the account's balance after the entry (now, on a replay)
    replayed: bool

    def as_json(self) -> dict[str, object]:
        return {
            "entryId": str(self.entry_id),
            "accountId": str(self.account_id),
            "amount": micros_to_credits(self.amount),
            "amountMicros": self.amount,
            "balance": micros_to_credits(self.balance),
            "balanceMicros": self.balance,
            "replayed": self.replayed,
        }


_POST = """
WITH e AS (
    INSERT INTO ledger_entries (id, account_id, kind, amount, idempotency_key, fingerprint, reason)
    VALUES ($1, $2, $3, $4, $5, $6, $7)
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING account_id, amount
)
UPDATE account_balances a
SET balance = a.balance + e.amount, updated_at = now()
FROM e
WHERE a.account_id = e.account_id
RETURNING a.balance
"""


async def post_entry(
    db: Db,
    *,
    account_id: uuid.UUID,
    amount: int,
    kind: str,
    idempotency_key: str,
    reason: str,
) -> Posted:
    """Post a grant (amount > 0), adjustment or reversal, once per idempotency key.

    The same key with the same request returns the first result and writes
    nothing; with a different request it raises Conflict (409). A negative
    amount the account cannot cover raises InsufficientCredits (402).
    """
    assert kind in ("grant", "adjustment", "reversal"), kind
    assert amount != 0 and (kind != "grant" or amount > 0), (kind, amount)
    fingerprint = hashlib.sha256(f"{account_id}|{kind}|{amount}|{reason}".encode()).digest()
    entry_id = uuid.uuid4()
    try:
        balance = await db.fetchval(
            _POST, entry_id, account_id, kind, amount, idempotency_key, fingerprint, reason
        )
    except asyncpg.CheckViolationError:
        raise InsufficientCredits(
            f"an adjustment of {micros_to_credits(amount)} credits would take the account"
            " below its overdraft limit",
        ) from None
    if balance is not None:
        return Posted(entry_id, account_id, amount, balance, replayed=False)
    row = await db.fetchrow(
        """
        SELECT e.id, e.account_id, e.amount, e.fingerprint, a.balance
        FROM ledger_entries e JOIN account_balances a USING (account_id)
        WHERE e.idempotency_key = $1
        """,
        idempotency_key,
    )
    assert row is not None, "conflicting insert did not leave an entry"
    if row["fingerprint"] != fingerprint:
        raise Conflict("idempotency key already used with a different request")
    return Posted(row["id"], row["account_id"], row["amount"], row["balance"], replayed=True)
