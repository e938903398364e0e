"""The low-balance alerts outbox: rows the crossing trigger queued, claimed and finished once.

A row is claimed with a lease (``FOR UPDATE SKIP LOCKED``: each alert goes to
one process); the claiming process delivers it and marks it ``sent``,
``failed`` or ``skipped`` (no notification URL). A process that dies
mid-delivery leaves the lease to run out, and another process claims the
alert again — the receiver may then see it twice, with the same
``webhook-id`` (Standard Webhooks delivery is at least once).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from creditgate.ledger.db import Db

FINISHED = ("sent", "failed", "skipped")


@dataclass(frozen=True, slots=True)
class Alert:
    """One crossing of an account's low-balance threshold."""

    id: uuid.UUID
    account_id: uuid.UUID
    threshold: int  # µc, when it crossed
    available: int  # µc, right after the charge that crossed
    balance: int  # µc, right after it
    crossed_at: datetime
    attempts: int  # claims so far, this one included

    @property
    def first_claim(self) -> bool:
        """True the first time any process claims it (the metric counts crossings here)."""
        return self.attempts == 1


_CLAIM = """
UPDATE low_balance_alerts a
SET status = 'sending', attempts = a.attempts + 1,
    lease_until = now() + $2::float8 * interval '1 second'
FROM (
    SELECT id FROM low_balance_alerts
    WHERE status = 'pending' OR (status = 'sending' AND lease_until < now())
    ORDER BY crossed_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
) due
WHERE a.id = due.id
RETURNING a.id, a.account_id, a.threshold, a.available, a.balance, a.crossed_at, a.attempts
"""


async def claim_alerts(db: Db, limit: int, lease_seconds: float) -> list[Alert]:
    """Claim up to ``limit`` due alerts (new ones, and those whose lease ran out)."""
    rows = await db.fetch(_CLAIM, limit, lease_seconds)
    return [Alert(**dict(r)) for r in rows]


async def finish_alert(db: Db, alert_id: uuid.UUID, status: str, error: str | None = None) -> bool:
    """Mark a claimed alert finished; False if it was not ours any more."""
    assert status in FINISHED, status
    done = await db.execute(
        "UPDATE low_balance_alerts SET status = $2, finished_at = now(), lease_until = NULL,"
        " last_error = $3 WHERE id = $1 AND status = 'sending'",
        alert_id,
        status,
        error,
    )
    return bool(done == "UPDATE 1")
