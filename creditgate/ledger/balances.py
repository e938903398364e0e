"""Reading an account's money: balance, reservations, credits granted."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from creditgate.ledger.db import Db
from creditgate.ledger.errors import AccountNotFound
from creditgate.ledger.money import micros_to_credits


@dataclass(frozen=True, slots=True)
class Balance:
    account_id: uuid.UUID
    balance: int
    reserved: int
    overdraft_limit: int
    # Credits granted in the live subscription's current period; all time
    # without one (DESIGN.md §9).
    credit_limit: int
    tier: str
    plan: str | None  # the live subscription's plan name

    @property
    def available(self) -> int:
        return self.balance - self.reserved

    def as_json(self) -> dict[str, object]:
        """The balance object of DESIGN.md §9."""
        out: dict[str, object] = {"accountId": str(self.account_id)}
        for name, micros in (
            ("balance", self.balance),
            ("reserved", self.reserved),
            ("available", self.available),
            ("creditLimit", self.credit_limit),
        ):
            out[name] = micros_to_credits(micros)
            out[f"{name}Micros"] = micros
        out["tier"] = self.tier
        out["plan"] = self.plan
        return out


# Subscription statuses in which the plan (and its tier) applies. past_due is
# Polar's recoverable payment failure: the plan holds while Polar retries.
LIVE_PLAN_STATUSES = ("active", "trialing", "past_due")


async def get_balance(db: Db, account_id: uuid.UUID) -> Balance:
    """The account's balance row, plan and credits granted; AccountNotFound if no account."""
    row = await db.fetchrow(
        """
        SELECT b.balance, b.reserved, b.overdraft_limit, a.tier,
               s.plan,
               (SELECT COALESCE(SUM(e.amount), 0)::bigint FROM ledger_entries e
                WHERE e.account_id = b.account_id AND e.kind IN ('grant', 'reversal')
                  AND (s.current_period_start IS NULL
                       OR e.created_at >= s.current_period_start))
                   AS credit_limit
        FROM account_balances b JOIN accounts a ON a.id = b.account_id
        LEFT JOIN LATERAL (
            SELECT plan, current_period_start
            FROM subscriptions
            WHERE account_id = b.account_id AND status = ANY($2::text[])
            ORDER BY current_period_start DESC NULLS LAST, source_modified_at DESC
            LIMIT 1
        ) s ON true
        WHERE b.account_id = $1
        """,
        account_id,
        list(LIVE_PLAN_STATUSES),
    )
    if row is None:
        raise AccountNotFound("no such account")
    return Balance(
        account_id,
        row["balance"],
        row["reserved"],
        row["overdraft_limit"],
        max(0, row["credit_limit"]),
        row["tier"],
        row["plan"],
    )
