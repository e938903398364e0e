"""Taking credits back (a refunded purchase), as far as the account can cover it.

A refund can arrive after the credits were spent. Reversing all of them would
take ``available`` below zero — below the overdraft limit, which the balance
row's CHECK refuses, or into an overdraft meant for usage, not refunds. Spent
credits cannot be unspent. So a reversal, in one statement, once per
idempotency key:

* takes what is available now (``balance − reserved``, never less than 0) as
  a 'reversal' entry;
* marks the part backed by credits that calls in flight hold as **pending**
  (``account_balances.refund_pending``, never more than ``reserved``, so no
  new hold can use it): the database takes it (trigger
  ``account_balances_collect_refund``, migration 0008) in the statement that
  ends those holds, as far as their debits left it;
* records the rest — credits already spent — as **debt** on its
  ``ledger_reversals`` row.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

from creditgate.ledger.db import Db
from creditgate.ledger.errors import AccountNotFound, IdempotencyConflict
from creditgate.ledger.ids import time_ordered_id
from creditgate.ledger.posting import Entries, posting_statement


@dataclass(frozen=True, slots=True)
class Reversal:
    account_id: uuid.UUID
    entry_id: uuid.UUID | None  # None when nothing could be taken back
    requested: int  # µc asked to take back
    reversed: int  # µc taken back now (a 'reversal' entry of -reversed)
    pending: int  # µc reserved by calls in flight: taken as their holds end
    replayed: bool

    @property
    def debt(self) -> int:
        """µc the account could not cover at once: spent before the refund arrived."""
        return self.requested - self.reversed - self.pending


# Lock the balance row, take what is available (at most), claim what live
# holds reserve of the balance (pending), record the request (the idempotency
# gate: a repeat inserts nothing and so writes nothing), then the entry and
# the balance — one statement, one commit, by the posting rule
# (ledger/posting.py). Of the reserved credits, those backed by the balance
# after this reversal are LEAST(reserved, balance − covered); refund_pending
# of them are already claimed by earlier refunds.
_REVERSE = posting_statement(
    lock_where="account_id = $2",
    before_entries=[
        """b AS (
    SELECT account_id, covered,
           LEAST($3::bigint - covered,
                 GREATEST(0, LEAST(reserved, balance - covered) - refund_pending)) AS pending
    FROM (
        SELECT account_id, balance, reserved, refund_pending,
               LEAST($3::bigint, GREATEST(0, balance - reserved)) AS covered
        FROM locked
    ) c
)""",
        """r AS (
    INSERT INTO ledger_reversals
        (idempotency_key, account_id, reverses, requested, reversed, pending, entry_id, reason)
    SELECT $4, b.account_id, $5, $3, b.covered, b.pending,
           CASE WHEN b.covered > 0 THEN $1::uuid END, $6
    FROM b
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING account_id, reversed, pending, entry_id
)""",
    ],
    entries=Entries(
        source="(SELECT * FROM r WHERE r.entry_id IS NOT NULL) taken",
        values={
            "id": "taken.entry_id",
            "kind": "'reversal'",
            "amount": "-taken.reversed",
            "idempotency_key": "'reversal:' || $4",
            "fingerprint": "$7",
            "reason": "$6",
        },
    ),
    also_set=["refund_pending = locked.refund_pending + r.pending"],
    balance_join="JOIN r USING (account_id)",
    balance_where="r.reversed > 0 OR r.pending > 0",
    result="SELECT r.reversed, r.pending, r.entry_id FROM r",
)


async def reverse_up_to(
    db: Db,
    *,
    account_id: uuid.UUID,
    amount: int,
    idempotency_key: str,
    reverses: str,
    reason: str,
) -> Reversal:
    """Take back ``amount`` µc: available credits now, reserved ones as their holds end.

    What the account has already spent becomes debt (see the module doc).

    ``reverses`` names what is being reversed (e.g. the grant's idempotency
    key) so the reversals of one grant can be summed. Once per
    ``idempotency_key``: a repeat returns the first result and writes nothing;
    the same key with a different request raises IdempotencyConflict.
    """
    assert amount > 0, amount
    fingerprint = hashlib.sha256(f"{account_id}|reversal|{amount}|{reason}".encode()).digest()
    entry_id = time_ordered_id()
    row = await db.fetchrow(
        _REVERSE, entry_id, account_id, amount, idempotency_key, reverses, reason, fingerprint
    )
    if row is not None:
        return Reversal(
            account_id, row["entry_id"], amount, row["reversed"], row["pending"], replayed=False
        )
    first = await db.fetchrow(
        "SELECT account_id, reverses, requested, reversed, pending, entry_id, reason"
        " FROM ledger_reversals WHERE idempotency_key = $1",
        idempotency_key,
    )
    if first is None:
        raise AccountNotFound("no such account")
    if (first["account_id"], first["reverses"], first["requested"], first["reason"]) != (
        account_id,
        reverses,
        amount,
        reason,
    ):
        raise IdempotencyConflict("idempotency key already used with a different reversal")
    return Reversal(
        account_id, first["entry_id"], amount, first["reversed"], first["pending"], replayed=True
    )


async def requested_total(db: Db, reverses: str) -> int:
    """µc already requested back (reversed or recorded as debt) for ``reverses``."""
    total = await db.fetchval(
        "SELECT COALESCE(SUM(requested), 0)::bigint FROM ledger_reversals WHERE reverses = $1",
        reverses,
    )
    return int(total)


async def account_debt(db: Db, account_id: uuid.UUID) -> int:
    """µc of refunds the account could not cover (their credits were already spent).

    Debt at the refund's arrival plus what its holds' debits consumed of the
    pending part; a refund still pending is not debt (yet).
    """
    total = await db.fetchval(
        """
        SELECT (SELECT COALESCE(SUM(debt), 0) FROM ledger_reversals
                WHERE account_id = $1 AND requested > reversed + pending)
             + (SELECT COALESCE(SUM(written_off), 0) FROM refund_collections
                WHERE account_id = $1)
        """,
        account_id,
    )
    return int(total)


async def refund_pending(db: Db, account_id: uuid.UUID) -> int:
    """µc of refunds waiting for the account's live holds to end."""
    total = await db.fetchval(
        "SELECT refund_pending FROM account_balances WHERE account_id = $1", account_id
    )
    if total is None:
        raise AccountNotFound("no such account")
    return int(total)
