"""A streaming hold's progress: what it owes so far, for the sweeper if its process dies.

Not money: holds and entries stay append-only; ``sweep_expired_holds``
charges the last record of a hold whose process never settled it.
"""

from __future__ import annotations

import uuid

from creditgate.ledger.db import Db
from creditgate.ledger.holds import Usage

# Never lowers a record: a late, smaller write of a slow connection loses.
_PROGRESS = """
INSERT INTO hold_progress (hold_id, input_tokens, output_tokens, cost)
VALUES ($1, $2, $3, $4)
ON CONFLICT (hold_id) DO UPDATE
SET input_tokens = EXCLUDED.input_tokens, output_tokens = EXCLUDED.output_tokens,
    cost = EXCLUDED.cost, updated_at = now()
WHERE hold_progress.cost <= EXCLUDED.cost
"""


async def record_progress(db: Db, hold_id: uuid.UUID, usage: Usage) -> None:
    """Record (upsert, never lowering) what the hold's stream owes so far."""
    await db.execute(_PROGRESS, hold_id, usage.input_tokens, usage.output_tokens, usage.cost)
