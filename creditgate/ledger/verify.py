"""``creditgate verify``: recompute the ledger's derived state and check its invariants.

All checks read one snapshot (a REPEATABLE READ, read-only transaction), so
verify can run while servers write: every write is atomic, so a consistent
snapshot must add up exactly. Each check reports at most ``_MAX_PER_CHECK``
rows; the report says how many more there were.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from creditgate.ledger.db import Db, connection
from creditgate.ledger.guards import (
    CHANGED_TRIGGERS_SQL,
    REQUIRED_TRIGGERS,
    TRIGGER_ARGS,
    serving_role_warnings,
)

__all__ = ["REQUIRED_CONSTRAINTS", "REQUIRED_TRIGGERS", "Report", "verify_ledger"]

_MAX_PER_CHECK = 100

# The triggers the invariants rest on (missing, disabled or replaced: the
# database would no longer refuse what it must) are listed in guards.py; and
# these constraints.
REQUIRED_CONSTRAINTS = (
    ("account_balances", "available_within_overdraft"),
    ("ledger_entries", "ledger_entries_balance_after_recorded"),
    ("ledger_entries", "ledger_entries_debit_has_hold"),
    ("ledger_entries", "ledger_entries_expiry_names_its_lot"),
    ("account_balances", "refund_pending_not_negative"),
)


@dataclass(slots=True)
class Report:
    accounts: int = 0
    entries: int = 0
    holds: int = 0
    # µc of refunds not covered because their credits were already spent
    # (information: debt is not an inconsistency).
    refund_debt: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)
    # Not failures: the ledger adds up, but the deployment is weaker than it
    # should be (the serving role could change the guards itself).
    warnings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "accounts": self.accounts,
            "entries": self.entries,
            "holds": self.holds,
            "refundDebtMicros": self.refund_debt,
            "problems": self.problems,
            "warnings": self.warnings,
        }


class _Check(NamedTuple):
    problem: str
    sql: str  # its last parameter is the LIMIT
    args: tuple[Any, ...] = ()


_CONSTRAINT_ARGS = ([t for t, _ in REQUIRED_CONSTRAINTS], [n for _, n in REQUIRED_CONSTRAINTS])

# One row per offence; each query is self-contained.
_CHECKS: tuple[_Check, ...] = (
    _Check(
        "balance row differs from the ledger (balance = SUM(entries), reserved = SUM(live"
        " holds), available >= -overdraft_limit)",
        """
        SELECT b.account_id, b.balance, COALESCE(e.total, 0) AS entries_total,
               b.reserved, COALESCE(h.total, 0) AS live_holds_total, b.overdraft_limit
        FROM account_balances b
        LEFT JOIN (SELECT account_id, SUM(amount)::bigint AS total FROM ledger_entries
                   GROUP BY account_id) e USING (account_id)
        LEFT JOIN (SELECT account_id, SUM(amount)::bigint AS total FROM holds
                   WHERE ended_at IS NULL GROUP BY account_id) h USING (account_id)
        WHERE b.balance <> COALESCE(e.total, 0)
           OR b.reserved <> COALESCE(h.total, 0)
           OR b.balance - b.reserved < -b.overdraft_limit
        LIMIT $1
        """,
    ),
    _Check(
        "an account without exactly one balance row",
        """
        SELECT a.id AS account_id FROM accounts a
        LEFT JOIN account_balances b ON b.account_id = a.id
        WHERE b.account_id IS NULL
        LIMIT $1
        """,
    ),
    _Check(
        "hold ended without exactly the debits its outcome implies (settled: 1,"
        " released: 0, expired: at most 1)",
        """
        SELECT h.id AS hold_id, h.outcome, count(e.id) AS debits
        FROM holds h LEFT JOIN ledger_entries e ON e.hold_id = h.id
        GROUP BY h.id, h.outcome
        HAVING (h.outcome = 'settled' AND count(e.id) <> 1)
            OR (h.outcome = 'released' AND count(e.id) <> 0)
            OR (h.outcome = 'expired' AND count(e.id) > 1)
            OR (h.outcome IS NULL AND count(e.id) <> 0)
        LIMIT $1
        """,
    ),
    _Check(
        "debit not matching its hold (no hold, another account, or a kind other than debit)",
        """
        SELECT e.id AS entry_id, e.kind, e.hold_id
        FROM ledger_entries e LEFT JOIN holds h ON h.id = e.hold_id
        WHERE (e.kind = 'debit') <> (e.hold_id IS NOT NULL)
           OR (h.id IS NOT NULL AND h.account_id <> e.account_id)
        LIMIT $1
        """,
    ),
    _Check(
        "hold ended before it was created",
        "SELECT id AS hold_id FROM holds WHERE ended_at < created_at LIMIT $1",
    ),
    _Check(
        "running balance broken: balance_after of an entry is not the previous one plus its"
        " amount (or the last one is not the balance)",
        """
        SELECT account_id, id AS entry_id, seq, amount, balance_after, prev_balance_after
        FROM (
            SELECT e.account_id, e.id, e.seq, e.amount, e.balance_after,
                   lag(e.balance_after) OVER w AS prev_balance_after,
                   lag(e.seq) OVER w AS prev_seq,
                   row_number() OVER (PARTITION BY e.account_id ORDER BY e.seq DESC) AS from_end
            FROM ledger_entries e
            WINDOW w AS (PARTITION BY e.account_id ORDER BY e.seq)
        ) x
        LEFT JOIN account_balances b USING (account_id)
        WHERE (prev_seq IS NOT NULL AND balance_after IS NOT NULL
               AND prev_balance_after IS NOT NULL
               AND balance_after <> prev_balance_after + amount)
           OR (prev_seq IS NULL AND balance_after IS NOT NULL AND balance_after <> amount)
           OR (from_end = 1 AND balance_after IS NOT NULL AND balance_after <> b.balance)
        LIMIT $1
        """,
    ),
    _Check(
        "credit lot does not add up (remaining = initial - SUM(uses)) or does not match its grant",
        """
        SELECT l.id AS lot_id, l.initial, l.remaining, COALESCE(u.used, 0) AS used
        FROM credit_lots l
        LEFT JOIN (SELECT lot_id, SUM(amount)::bigint AS used FROM credit_lot_uses
                   GROUP BY lot_id) u ON u.lot_id = l.id
        LEFT JOIN ledger_entries g ON g.id = l.id
        WHERE l.remaining <> l.initial - COALESCE(u.used, 0)
           OR g.id IS NULL OR g.kind <> 'grant' OR g.account_id <> l.account_id
           OR g.amount <> l.granted OR g.expires_at IS DISTINCT FROM l.expires_at
        LIMIT $1
        """,
    ),
    _Check(
        "reversal record differs from its entry (a refund takes back exactly what it records)",
        """
        SELECT r.idempotency_key, r.reversed AS reversed_micros, e.amount AS entry_amount_micros
        FROM ledger_reversals r LEFT JOIN ledger_entries e ON e.id = r.entry_id
        WHERE r.entry_id IS NOT NULL
          AND (e.id IS NULL OR e.kind <> 'reversal' OR e.amount <> -r.reversed)
        LIMIT $1
        """,
    ),
    _Check(
        "expiring grant without its credit lot",
        """
        SELECT e.id AS entry_id FROM ledger_entries e
        LEFT JOIN credit_lots l ON l.id = e.id
        WHERE e.expires_at IS NOT NULL AND l.id IS NULL
        LIMIT $1
        """,
    ),
    _Check(
        "entry used credits of lots it may not (more than its amount, another account's lot,"
        " an expiry not exactly its own lot or before the lot was due)",
        """
        SELECT e.id AS entry_id, e.kind, e.amount, COALESCE(u.used, 0) AS used
        FROM ledger_entries e
        LEFT JOIN (SELECT cu.entry_id, SUM(cu.amount)::bigint AS used,
                          bool_or(l.account_id <> le.account_id) AS foreign_lot,
                          bool_or(le.kind = 'expiry' AND (cu.lot_id <> le.lot_id
                                  OR le.created_at < l.expires_at)) AS bad_expiry
                   FROM credit_lot_uses cu
                   JOIN credit_lots l ON l.id = cu.lot_id
                   JOIN ledger_entries le ON le.id = cu.entry_id
                   GROUP BY cu.entry_id) u ON u.entry_id = e.id
        WHERE (e.amount >= 0 AND u.used IS NOT NULL)
           OR (e.amount < 0 AND e.kind <> 'expiry' AND COALESCE(u.used, 0) > -e.amount)
           OR (e.kind = 'expiry' AND COALESCE(u.used, 0) <> -e.amount)
           OR u.foreign_lot OR u.bad_expiry
        LIMIT $1
        """,
    ),
    _Check(
        "live credit lots hold more than the balance (SUM(remaining) <= max(0, balance))",
        """
        SELECT l.account_id, SUM(l.remaining)::bigint AS in_lots, b.balance
        FROM credit_lots l JOIN account_balances b USING (account_id)
        WHERE l.remaining > 0
        GROUP BY l.account_id, b.balance
        HAVING SUM(l.remaining) > GREATEST(0, b.balance)
        LIMIT $1
        """,
    ),
    _Check(
        "an invariant's trigger is missing, not enabled, or not as the migrations installed it",
        CHANGED_TRIGGERS_SQL,
        TRIGGER_ARGS,
    ),
    _Check(
        "refunds pending do not add up (per account, the pending of its reversals ="
        " collected + written off + refund_pending; refund_pending <= reserved)",
        """
        SELECT b.account_id, b.refund_pending, COALESCE(r.pending, 0) AS reversals_pending,
               COALESCE(c.collected, 0) AS collected, COALESCE(c.written_off, 0) AS written_off
        FROM account_balances b
        LEFT JOIN (SELECT account_id, SUM(pending)::bigint AS pending FROM ledger_reversals
                   GROUP BY account_id) r USING (account_id)
        LEFT JOIN (SELECT account_id, SUM(collected)::bigint AS collected,
                          SUM(written_off)::bigint AS written_off
                   FROM refund_collections GROUP BY account_id) c USING (account_id)
        WHERE COALESCE(r.pending, 0)
              <> COALESCE(c.collected, 0) + COALESCE(c.written_off, 0) + b.refund_pending
           OR b.refund_pending > b.reserved
        LIMIT $1
        """,
    ),
    _Check(
        "refund collection differs from its entry",
        """
        SELECT c.id AS collection_id, c.collected, e.amount AS entry_amount_micros
        FROM refund_collections c LEFT JOIN ledger_entries e ON e.id = c.entry_id
        WHERE c.entry_id IS NOT NULL
          AND (e.id IS NULL OR e.kind <> 'reversal' OR e.amount <> -c.collected
               OR e.account_id <> c.account_id)
        LIMIT $1
        """,
    ),
    _Check(
        # Migration 0012: a debit's tokens by kind. Only counts (JSON numbers ≥ 0)
        # besides the reported cost; the totals are the entry's own columns; the
        # parts fit their totals. Casts run only on entries whose counts are numbers.
        "a debit's tokens by kind do not add up (totals not its input/output tokens,"
        " parts above their total, a count not a number ≥ 0, or on another kind)",
        """
        SELECT entry_id, kind, input_tokens, output_tokens, breakdown::text AS breakdown
        FROM (
            SELECT e.id AS entry_id, e.kind, e.input_tokens, e.output_tokens, e.breakdown,
                   (SELECT COALESCE(bool_and(jsonb_typeof(v) = 'number' AND v::text !~ '[-.eE]'),
                                    true)
                    FROM jsonb_each(e.breakdown) AS kv(k, v)
                    WHERE k <> 'upstream_cost') AS counts_ok
            FROM ledger_entries e
            WHERE e.breakdown IS NOT NULL
        ) x
        WHERE kind <> 'debit' OR NOT counts_ok
           OR breakdown -> 'input' IS DISTINCT FROM to_jsonb(input_tokens)
           OR breakdown -> 'output' IS DISTINCT FROM to_jsonb(output_tokens)
           OR CASE WHEN counts_ok THEN
                  COALESCE((breakdown ->> 'cached_input')::numeric, 0)
                  + COALESCE((breakdown ->> 'cache_write')::numeric, 0)
                  + COALESCE((breakdown ->> 'audio_input')::numeric, 0)
                      > (breakdown ->> 'input')::numeric
               OR COALESCE((breakdown ->> 'audio_output')::numeric, 0)
                  + COALESCE((breakdown ->> 'reasoning')::numeric, 0)
                      > (breakdown ->> 'output')::numeric
               OR COALESCE((breakdown ->> 'accepted_prediction')::numeric, 0)
                      > (breakdown ->> 'output')::numeric
               OR COALESCE((breakdown ->> 'rejected_prediction')::numeric, 0)
                      > (breakdown ->> 'output')::numeric
              ELSE false END
        LIMIT $1
        """,
    ),
    _Check(
        "key budget spend differs from its holds (per key and period: reserved = SUM(live"
        " holds), spent = SUM(their debits)), or a hold counted for another account's key",
        """
        WITH h AS (
            SELECT h.key_id, h.budget_period_start AS period_start,
                   COALESCE(SUM(h.amount) FILTER (WHERE h.ended_at IS NULL), 0)::bigint
                       AS reserved,
                   COALESCE(SUM(-e.amount), 0)::bigint AS spent,
                   bool_or(k.account_id IS DISTINCT FROM h.account_id) AS foreign_key
            FROM holds h
            LEFT JOIN ledger_entries e ON e.hold_id = h.id
            LEFT JOIN api_keys k ON k.id = h.key_id
            WHERE h.budget_period_start IS NOT NULL
            GROUP BY h.key_id, h.budget_period_start
        )
        SELECT COALESCE(s.key_id, h.key_id) AS key_id,
               COALESCE(s.period_start, h.period_start) AS period_start,
               s.spent, s.reserved, h.spent AS holds_spent, h.reserved AS holds_reserved
        FROM key_budget_spend s
        FULL JOIN h ON s.key_id = h.key_id AND s.period_start = h.period_start
        WHERE s.key_id IS NULL OR h.foreign_key
           OR s.spent <> COALESCE(h.spent, 0) OR s.reserved <> COALESCE(h.reserved, 0)
        LIMIT $1
        """,
    ),
    _Check(
        "an invariant's constraint is missing",
        """
        SELECT want.tbl AS table_name, want.name AS constraint_name
        FROM unnest($1::text[], $2::text[]) AS want(tbl, name)
        LEFT JOIN pg_constraint c ON c.conname = want.name
             AND c.conrelid = to_regclass(want.tbl)
        WHERE c.oid IS NULL
        LIMIT $3
        """,
        _CONSTRAINT_ARGS,
    ),
)


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, int | str | bool | None) else str(value)


async def verify_ledger(db: Db) -> Report:
    """Check every invariant of DESIGN.md §3 and ARCHITECTURE.md on one snapshot.

    Balances and reservations recomputed from entries and holds; each hold
    ended at most once with the debits its outcome implies; the running
    balance chained per account; credit lots adding up to their uses; and the
    triggers (enabled, as the migrations installed them) and constraints that
    enforce the rest still in place; every refund reversal's entry taking back
    exactly what its record says, and pending refunds adding up. A serving
    role able to change the triggers is a warning, not a problem.
    """
    report = Report()
    async with connection(db) as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM account_balances) AS accounts,"
            " (SELECT count(*) FROM ledger_entries) AS entries,"
            " (SELECT count(*) FROM holds) AS holds"
        )
        report.accounts, report.entries, report.holds = (
            counts["accounts"],
            counts["entries"],
            counts["holds"],
        )
        report.refund_debt = await conn.fetchval(
            "SELECT (SELECT COALESCE(SUM(debt), 0) FROM ledger_reversals)"
            " + (SELECT COALESCE(SUM(written_off), 0) FROM refund_collections)"
        )
        report.warnings = [w.as_json() for w in await serving_role_warnings(conn)]
        for problem, sql, args in _CHECKS:
            rows = await conn.fetch(sql, *args, _MAX_PER_CHECK + 1)
            for r in rows[:_MAX_PER_CHECK]:
                report.problems.append(
                    {"problem": problem, **{k: _jsonable(v) for k, v in dict(r).items()}}
                )
            if len(rows) > _MAX_PER_CHECK:
                report.problems.append({"problem": problem, "more": True})
    return report
