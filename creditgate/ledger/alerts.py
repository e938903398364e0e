"""The low-balance threshold, kept on the account's balance row (migration 0006).

The crossing itself is decided by the trigger ``account_balances_low_balance``
in the transaction that posts the money: when a charge leaves ``available =
balance − reserved`` below the threshold and the row is not already flagged,
it flags the row and queues one ``low_balance_alerts`` row; money moving
back to or above the threshold clears the flag. The flag is on the row every
money write locks, so concurrent writers in any number of processes see each
crossing exactly once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from creditgate.ledger.db import Db, transaction
from creditgate.ledger.errors import AccountNotFound


@dataclass(frozen=True, slots=True)
class Threshold:
    threshold: int | None  # µc; None: no low-balance alerts
    below: bool  # available is below it since the last crossing


async def set_low_balance_threshold(
    db: Db, account_id: uuid.UUID, threshold: int | None
) -> Threshold:
    """Set (or clear, with None) the account's low-balance threshold in µc.

    A changed threshold is armed afresh: the next charge that leaves available
    below it alerts, even if available is below it already. The same value
    again changes nothing. Touches no money: ``balance``, ``reserved`` and the
    overdraft limit stay as they are, so the trigger does not fire.
    """
    assert threshold is None or threshold >= 0, threshold
    # Locked first, as set_overdraft_limit does: the UPDATE then works on the
    # row's latest version however busy the account is.
    async with transaction(db) as conn:
        await conn.execute(
            "SELECT 1 FROM account_balances WHERE account_id = $1 FOR UPDATE", account_id
        )
        row = await conn.fetchrow(
            """
            UPDATE account_balances
            SET low_balance_below = CASE WHEN low_balance_threshold IS DISTINCT FROM $2
                                         THEN false ELSE low_balance_below END,
                low_balance_threshold = $2
            WHERE account_id = $1
            RETURNING low_balance_threshold, low_balance_below
            """,
            account_id,
            threshold,
        )
    if row is None:
        raise AccountNotFound("no such account")
    return Threshold(row["low_balance_threshold"], row["low_balance_below"])


async def get_low_balance_threshold(db: Db, account_id: uuid.UUID) -> Threshold:
    """The account's threshold and whether it is below it now."""
    row = await db.fetchrow(
        "SELECT low_balance_threshold, low_balance_below FROM account_balances"
        " WHERE account_id = $1",
        account_id,
    )
    if row is None:
        raise AccountNotFound("no such account")
    return Threshold(row["low_balance_threshold"], row["low_balance_below"])
