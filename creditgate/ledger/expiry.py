"""Expiring credits: writing off what is left of a lot once it is due.

A grant posted with ``expires_at`` makes a *lot* (migration 0002). Negative
entries use lots soonest-expiring first (the database allocates them); what a
lot still holds when it is due is written off here as one ``expiry`` entry —
or several, when credits of the lot back live holds: those are never taken
(the reservation was made against them), and the rest is written off at a
later sweep once the holds have ended.

Safe in every process at once: each write-off locks the account's balance row
first and reads the lot after the lock, so two sweepers see each other's
result; the idempotency key ``expiry:<lot>:<remaining before>`` names the
state it moves from, so no write-off can happen twice.
"""

from __future__ import annotations

import hashlib
import uuid

from creditgate.ledger.db import Db, transaction
from creditgate.ledger.ids import time_ordered_id
from creditgate.ledger.posting import Entries, posting_statement

# The posting rule (ledger/posting.py); the row is already locked by
# expire_lot's transaction, the statement takes the lock again (a no-op) so
# the amount and balance_after come from the row it locked, like every entry.
_WRITE_OFF = posting_statement(
    lock_where="account_id = $2",
    entries=Entries(
        values={
            "id": "$1",
            "kind": "'expiry'",
            "amount": "-$3::bigint",
            "idempotency_key": "$4",
            "fingerprint": "$5",
            "lot_id": "$6",
            "reason": "'granted credits expired'",
        },
        on_conflict_do_nothing=True,
    ),
    result="SELECT -posted.amount FROM posted JOIN balanced USING (account_id)",
)


async def expire_lot(db: Db, lot_id: uuid.UUID) -> int:
    """Write off what lot ``lot_id`` still holds if it is due; returns the µc written off.

    Credits that back live holds stay (available = balance − reserved bounds
    the write-off); a later call takes them once the holds have ended.
    """
    async with transaction(db) as conn:
        account_id = await conn.fetchval("SELECT account_id FROM credit_lots WHERE id = $1", lot_id)
        if account_id is None:
            return 0
        bal = await conn.fetchrow(
            "SELECT balance, reserved FROM account_balances WHERE account_id = $1 FOR UPDATE",
            account_id,
        )
        # Read after the lock (a new statement, a new snapshot): the lot as the
        # last writer of this account left it.
        lot = await conn.fetchrow(
            "SELECT remaining, expires_at <= now() AS due FROM credit_lots WHERE id = $1", lot_id
        )
        assert bal is not None and lot is not None
        amount = min(lot["remaining"], max(0, bal["balance"] - bal["reserved"]))
        if not lot["due"] or amount <= 0:
            return 0
        key = f"expiry:{lot_id}:{lot['remaining']}"
        written = await conn.fetchval(
            _WRITE_OFF,
            time_ordered_id(),
            account_id,
            amount,
            key,
            hashlib.sha256(key.encode()).digest(),
            lot_id,
        )
        return int(written or 0)


async def sweep_expired_lots(db: Db, limit: int = 500) -> int:
    """Write off due lots (oldest first); returns the µc written off.

    Lots whose account has nothing available (every credit backs a live hold)
    are skipped until a hold ends, so they never crowd out the others.
    """
    rows = await db.fetch(
        """
        SELECT l.id FROM credit_lots l JOIN account_balances b USING (account_id)
        WHERE l.remaining > 0 AND l.expires_at <= now() AND b.balance > b.reserved
        ORDER BY l.expires_at
        LIMIT $1
        """,
        limit,
    )
    total = 0
    for r in rows:
        total += await expire_lot(db, r["id"])
    return total
