"""``creditgate verify``: recompute every balance from the ledger and compare."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from creditgate.ledger.db import Db


@dataclass(slots=True)
class Report:
    accounts: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "accounts": self.accounts, "problems": self.problems}


async def verify_ledger(db: Db) -> Report:
    """Check every invariant of DESIGN.md §3 that the schema cannot state alone.

    * balance = SUM(entries) and reserved = SUM(live holds), per account;
    * a settled hold has one debit entry; a released hold has none;
    * available never below -overdraft_limit (the CHECK; re-checked here);
    * a refund reversal's entry takes back exactly what its record says.
    """
    report = Report()
    report.accounts = await db.fetchval("SELECT count(*) FROM account_balances")
    for r in await db.fetch(
        """
        SELECT b.account_id, b.balance, COALESCE(e.total, 0) AS entries_total,
               b.reserved, COALESCE(h.total, 0) AS holds_total, b.overdraft_limit
        FROM account_balances b
        LEFT JOIN (SELECT account_id, SUM(amount)::bigint AS total FROM ledger_entries
                   GROUP BY account_id) e USING (account_id)
        LEFT JOIN (SELECT account_id, SUM(amount)::bigint AS total FROM holds
                   WHERE ended_at IS NULL GROUP BY account_id) h USING (account_id)
        WHERE b.balance <> COALESCE(e.total, 0)
           OR b.reserved <> COALESCE(h.total, 0)
           OR b.balance - b.reserved < -b.overdraft_limit
        """
    ):
        report.problems.append(
            {
                "problem": "balance row differs from the ledger",
                "accountId": str(r["account_id"]),
                "balanceMicros": r["balance"],
                "entriesTotalMicros": r["entries_total"],
                "reservedMicros": r["reserved"],
                "liveHoldsTotalMicros": r["holds_total"],
            }
        )
    for r in await db.fetch(
        """
        SELECT h.id, h.outcome, count(e.id) AS debits
        FROM holds h LEFT JOIN ledger_entries e ON e.hold_id = h.id
        WHERE h.ended_at IS NOT NULL
        GROUP BY h.id, h.outcome
        HAVING (h.outcome = 'settled' AND count(e.id) <> 1)
            OR (h.outcome = 'released' AND count(e.id) <> 0)
        """
    ):
        report.problems.append(
            {
                "problem": "hold ended without exactly the debits its outcome implies",
                "holdId": str(r["id"]),
                "outcome": r["outcome"],
                "debits": r["debits"],
            }
        )
    for r in await db.fetch(
        """
        SELECT r.idempotency_key, r.reversed, e.amount, e.kind
        FROM ledger_reversals r LEFT JOIN ledger_entries e ON e.id = r.entry_id
        WHERE r.entry_id IS NOT NULL
          AND (e.id IS NULL OR e.kind <> 'reversal' OR e.amount <> -r.reversed)
        """
    ):
        report.problems.append(
            {
                "problem": "reversal record differs from its entry",
                "idempotencyKey": r["idempotency_key"],
                "reversedMicros": r["reversed"],
                "entryAmountMicros": r["amount"],
            }
        )
    return report
