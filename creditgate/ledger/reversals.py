"""Taking credits back (a refunded purchase), as far as the account can cover it.

A refund can arrive after the credits were spent. Reversing all of them would
take ``available`` below zero — below the overdraft limit, which the balance
row's CHECK refuses, or into an overdraft meant for usage, not refunds. Spent
credits cannot be unspent: a reversal takes what is still available
(``balance − reserved``, never less than 0) and records the rest as **debt**
on its ``ledger_reversals`` row, in the same single statement, once per
idempotency key.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

from creditgate.errors import Conflict, NotFound
from creditgate.ledger.db import Db


@dataclass(frozen=True, slots=True)
class Reversal:
    account_id: uuid.UUID
    entry_id: uuid.UUID | None  # None when nothing could be taken back
    requested: int  # µc asked to take back
    reversed: int  # µc taken back (a 'reversal' entry of -reversed)
    replayed: bool

    @property
    def debt(self) -> int:
        """µc the account could not cover: spent before the refund arrived."""
        return self.requested - self.reversed


# Lock the balance row, take what is available (at most), record the
# request (the idempotency gate: a repeat inserts nothing and so writes
# nothing), then the entry and the balance — one statement, one commit.
_REVERSE = """
WITH b AS (
    SELECT account_id, balance, reserved, overdraft_limit,
           LEAST($3::bigint, GREATEST(0, balance - reserved)) AS covered
    FROM account_balances
    WHERE account_id = $2
    FOR UPDATE
),
r AS (
    INSERT INTO ledger_reversals
        (idempotency_key, account_id, reverses, requested, reversed, entry_id, reason)
    SELECT $4, b.account_id, $5, $3, b.covered, CASE WHEN b.covered > 0 THEN $1::uuid END, $6
    FROM b
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING account_id, reversed, entry_id
),
e AS (
    INSERT INTO ledger_entries
        (id, account_id, kind, amount, idempotency_key, fingerprint, reason, balance_after)
    SELECT r.entry_id, r.account_id, 'reversal', -r.reversed, 'reversal:' || $4, $7, $6,
           b.balance - r.reversed
    FROM r, b
    WHERE r.entry_id IS NOT NULL
    RETURNING account_id, amount
),
u AS (
    -- The CHECK's columns from the locked row, never from the snapshot (see
    -- holds._SETTLE: PostgreSQL checks the snapshot version's row first).
    UPDATE account_balances a
    SET balance = b.balance + e.amount, reserved = b.reserved,
        overdraft_limit = b.overdraft_limit, updated_at = now()
    FROM e, b
    WHERE a.account_id = e.account_id
    RETURNING a.account_id
)
SELECT r.reversed, r.entry_id FROM r
"""


async def reverse_up_to(
    db: Db,
    *,
    account_id: uuid.UUID,
    amount: int,
    idempotency_key: str,
    reverses: str,
    reason: str,
) -> Reversal:
    """Take back up to ``amount`` µc; what the account cannot cover becomes debt.

    ``reverses`` names what is being reversed (e.g. the grant's idempotency
    key) so the reversals of one grant can be summed. Once per
    ``idempotency_key``: a repeat returns the first result and writes nothing;
    the same key with a different request raises Conflict.
    """
    assert amount > 0, amount
    fingerprint = hashlib.sha256(f"{account_id}|reversal|{amount}|{reason}".encode()).digest()
    entry_id = uuid.uuid4()
    row = await db.fetchrow(
        _REVERSE, entry_id, account_id, amount, idempotency_key, reverses, reason, fingerprint
    )
    if row is not None:
        return Reversal(account_id, row["entry_id"], amount, row["reversed"], replayed=False)
    first = await db.fetchrow(
        "SELECT account_id, reverses, requested, reversed, entry_id, reason"
        " FROM ledger_reversals WHERE idempotency_key = $1",
        idempotency_key,
    )
    if first is None:
        raise NotFound("no such account")
    if (first["account_id"], first["reverses"], first["requested"], first["reason"]) != (
        account_id,
        reverses,
        amount,
        reason,
    ):
        raise Conflict("idempotency key already used with a different reversal")
    return Reversal(account_id, first["entry_id"], amount, first["reversed"], replayed=True)


async def requested_total(db: Db, reverses: str) -> int:
    """µc already requested back (reversed or recorded as debt) for ``reverses``."""
    total = await db.fetchval(
        "SELECT COALESCE(SUM(requested), 0)::bigint FROM ledger_reversals WHERE reverses = $1",
        reverses,
    )
    return int(total)


async def account_debt(db: Db, account_id: uuid.UUID) -> int:
    """µc of refunds the account could not cover (their credits were already spent)."""
    total = await db.fetchval(
        "SELECT COALESCE(SUM(debt), 0)::bigint FROM ledger_reversals"
        " WHERE account_id = $1 AND requested > reversed",
        account_id,
    )
    return int(total)
