"""Per-key budgets: a cap on what an API key's calls may spend, per period or for life.

The budget itself is a setting (``key_budgets``); what a key has used is money
(``key_budget_spend``: one row per key and period start, ``spent`` = the
debits of its settled holds, ``reserved`` = its live holds). Enforcement is not
here but in the reserve statements (``holds._RESERVE``,
``group_commit._RESERVE_BATCH``): the key's row is taken in the same statement
as the account's balance, under the balance row's lock, so no interleaving of
processes can pass the budget. Settle, release, expiry and the late debit move
the hold's amount in the same statement that ends the hold.

Periods are calendar periods in a time zone (``[throttle] day_zone``): the
database computes the current period's start from its own clock
(``creditgate_budget_period_start``, migration 0013), so a new period starts a
new row at the exact instant, with no cron. A hold counts in the period it was
reserved in, even if it settles after that period ended.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from creditgate.ledger.db import Db
from creditgate.ledger.money import micros_to_credits

BUDGET_PERIODS = ("day", "week", "month")

# The current period of each budget, from the database clock (or ``$3`` when
# given: tests and reports at an explicit instant).
_STATE = """
SELECT b.key_id, b.budget, b.period,
       creditgate_budget_period_start(b.period, $2, t.at) AS period_start,
       creditgate_budget_period_end(b.period, $2, t.at) AS resets_at,
       COALESCE(s.spent, 0) AS spent, COALESCE(s.reserved, 0) AS reserved
FROM key_budgets b
CROSS JOIN (SELECT COALESCE($3::timestamptz, now()) AS at) t
LEFT JOIN key_budget_spend s
    ON s.key_id = b.key_id
   AND s.period_start = creditgate_budget_period_start(b.period, $2, t.at)
WHERE b.key_id = ANY($1::uuid[])
"""


@dataclass(frozen=True, slots=True)
class KeyBudget:
    """A key's budget and what its current period has used."""

    key_id: uuid.UUID
    budget: int  # µc
    period: str | None  # "day" | "week" | "month"; None: a lifetime cap
    spent: int  # µc debited for calls of this period
    reserved: int  # µc held by its calls in flight
    resets_at: datetime | None  # the next period's start; None for a lifetime cap

    @property
    def remaining(self) -> int:
        """What a new call of this key may still hold (never below 0)."""
        return max(0, self.budget - self.spent - self.reserved)

    def as_json(self) -> dict[str, Any]:
        """The API's view: credits beside the exact µc, as elsewhere."""
        return {
            "budget": micros_to_credits(self.budget),
            "budgetMicros": self.budget,
            "budgetPeriod": self.period,
            "spent": micros_to_credits(self.spent),
            "spentMicros": self.spent,
            "reserved": micros_to_credits(self.reserved),
            "reservedMicros": self.reserved,
            "remaining": micros_to_credits(self.remaining),
            "remainingMicros": self.remaining,
            "resetsAt": _iso(self.resets_at),
        }


# What a key without a budget shows, so every key has the same fields.
NO_BUDGET: dict[str, Any] = {
    "budget": None,
    "budgetMicros": None,
    "budgetPeriod": None,
    "spent": None,
    "spentMicros": None,
    "reserved": None,
    "reservedMicros": None,
    "remaining": None,
    "remainingMicros": None,
    "resetsAt": None,
}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


async def set_key_budget(db: Db, key_id: uuid.UUID, budget: int | None, period: str | None) -> None:
    """Set (or, with ``budget`` None, remove) key ``key_id``'s budget.

    What the key spent in the current period so far stays counted; changing
    the period starts counting in the new period's row. Spend of calls made
    while the key had no budget is not counted.
    """
    assert period is None or period in BUDGET_PERIODS, period
    if budget is None:
        await db.execute("DELETE FROM key_budgets WHERE key_id = $1", key_id)
        return
    assert budget >= 0, budget
    await db.execute(
        """
        INSERT INTO key_budgets (key_id, budget, period) VALUES ($1, $2, $3)
        ON CONFLICT (key_id) DO UPDATE
            SET budget = EXCLUDED.budget, period = EXCLUDED.period, updated_at = now()
        """,
        key_id,
        budget,
        period,
    )


async def key_budgets(
    db: Db, key_ids: Sequence[uuid.UUID], zone: str, at: datetime | None = None
) -> dict[uuid.UUID, KeyBudget]:
    """The budgets among ``key_ids`` with their current period (at ``at``, default now)."""
    rows = await db.fetch(_STATE, list(key_ids), zone, at)
    return {
        r["key_id"]: KeyBudget(
            r["key_id"], r["budget"], r["period"], r["spent"], r["reserved"], r["resets_at"]
        )
        for r in rows
    }


async def key_budget(
    db: Db, key_id: uuid.UUID, zone: str, at: datetime | None = None
) -> KeyBudget | None:
    """Key ``key_id``'s budget and current period, or None when it has none."""
    return (await key_budgets(db, [key_id], zone, at)).get(key_id)


async def period_bounds(
    db: Db, period: str | None, zone: str, at: datetime
) -> tuple[datetime, datetime | None]:
    """(start, next start) of the budget period containing ``at``: the database's
    own rule, the one the reserve statement applies to its clock."""
    row = await db.fetchrow(
        "SELECT creditgate_budget_period_start($1, $2, $3) AS s,"
        " creditgate_budget_period_end($1, $2, $3) AS e",
        period,
        zone,
        at,
    )
    assert row is not None
    return row["s"], row["e"]
