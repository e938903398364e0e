"""``creditgate verify``: recompute the ledger's derived state and check its invariants.

All checks read one snapshot (a REPEATABLE READ, read-only transaction), so
verify can run while servers write: every write is atomic, so a consistent
snapshot must add up exactly. Each check reports at most ``_MAX_PER_CHECK``
rows; the report says how many more there were.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import asyncpg

from creditgate.ledger.db import Db, connection, transaction
from creditgate.ledger.guards import (
    CHANGED_TRIGGERS_SQL,
    REQUIRED_TRIGGERS,
    TRIGGER_ARGS,
    serving_role_warnings,
)

__all__ = [
    "REQUIRED_CONSTRAINTS",
    "REQUIRED_TRIGGERS",
    "Report",
    "verify_incremental",
    "verify_ledger",
]

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
    # Migration 0017: an entry's id, idempotency key and hold unique for all time.
    ("ledger_entries", "ledger_entries_key_fk"),
    ("ledger_entries", "ledger_entries_id_created"),
    ("ledger_entry_keys", "ledger_entry_keys_pkey"),
    ("ledger_entry_keys", "ledger_entry_keys_idempotency_key_key"),
    ("ledger_entry_keys", "ledger_entry_keys_hold_id_key"),
)

# The partitions' guards (migration 0017): the row triggers of the parent,
# cloned onto each partition and enabled there, and each partition's own
# TRUNCATE guard (a TRUNCATE of one partition does not fire the parent's).
_PARTITION_GUARDS_SQL = """
WITH parent AS (SELECT to_regclass('ledger_entries') AS oid),
parts AS (
    SELECT c.oid, c.relname
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid, parent
    WHERE i.inhparent = parent.oid
),
want AS (
    SELECT p.oid, p.relname, w.name
    FROM parts p CROSS JOIN unnest(ARRAY['ledger_entries_append_only',
        'ledger_entries_allocate_lots', 'ledger_entries_no_truncate']) AS w(name)
),
found AS (
    SELECT want.relname AS partition, want.name AS trigger_name,
           CASE WHEN t.oid IS NULL THEN 'missing'
                WHEN pt.oid IS NULL THEN 'missing on ledger_entries itself'
                WHEN t.tgenabled <> 'O'
                    THEN 'not enabled (tgenabled = ' || t.tgenabled::text || ')'
                WHEN want.name <> 'ledger_entries_no_truncate' AND t.tgparentid <> pt.oid
                    THEN 'not the clone of the parent''s trigger'
                WHEN want.name = 'ledger_entries_no_truncate'
                     AND (t.tgtype <> pt.tgtype OR t.tgfoid <> pt.tgfoid
                          OR t.tgqual IS NOT NULL)
                    THEN 'not the parent''s TRUNCATE guard'
           END AS state
    FROM want CROSS JOIN parent
    LEFT JOIN pg_trigger t ON t.tgrelid = want.oid AND t.tgname = want.name
    LEFT JOIN pg_trigger pt ON pt.tgrelid = parent.oid AND pt.tgname = want.name
)
SELECT * FROM found WHERE state IS NOT NULL
LIMIT $1
"""

# Every partition made is still attached (a detached month takes its entries
# out of the ledger; rows gone, sums wrong, replays still refused by their
# keys), every attached one was made by creditgate_ledger_partition, and
# the DEFAULT partition is there.
_PARTITIONS_ATTACHED_SQL = """
WITH attached AS (
    SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = to_regclass('ledger_entries')
)
SELECT r.name AS partition, 'made but not attached (detached or dropped)' AS state
FROM ledger_partitions r LEFT JOIN attached a ON a.relname = r.name
WHERE a.relname IS NULL
UNION ALL
SELECT a.relname, 'attached but not made by creditgate_ledger_partition'
FROM attached a LEFT JOIN ledger_partitions r ON r.name = a.relname
WHERE r.name IS NULL AND a.bound <> 'DEFAULT'
UNION ALL
SELECT 'ledger_entries_default', 'the DEFAULT partition is missing'
WHERE NOT EXISTS (SELECT 1 FROM attached WHERE bound = 'DEFAULT')
LIMIT $1
"""


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
    # "full": every entry and hold; "incremental": what is new since the
    # checkpoint (``entries``/``holds`` then count what was checked).
    mode: str = "full"
    # Entries the checkpoint covered before this run (incremental) and
    # whether this run moved it forward.
    checkpointed_entries: int = 0
    checkpoint_advanced: bool = False

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
            "mode": self.mode,
            "checkpointedEntries": self.checkpointed_entries,
            "checkpointAdvanced": self.checkpoint_advanced,
        }


class _Check(NamedTuple):
    problem: str
    sql: str  # its last parameter is the LIMIT
    args: tuple[Any, ...] = ()


_CONSTRAINT_ARGS = ([t for t, _ in REQUIRED_CONSTRAINTS], [n for _, n in REQUIRED_CONSTRAINTS])


def _breakdown_sql(entries: str, limit: str) -> str:
    """Migration 0012: a debit's tokens by kind, over ``entries`` (a table or
    CTE name). Only counts (JSON numbers ≥ 0) besides the reported cost; the
    totals are the entry's own columns; the parts fit their totals. Casts run
    only on entries whose counts are numbers."""
    return f"""
        SELECT entry_id, kind, input_tokens, output_tokens, breakdown::text AS breakdown
        FROM (
            SELECT e.id AS entry_id, e.kind, e.input_tokens, e.output_tokens, e.breakdown,
                   (SELECT COALESCE(bool_and(jsonb_typeof(v) = 'number' AND v::text !~ '[-.eE]'),
                                    true)
                    FROM jsonb_each(e.breakdown) AS kv(k, v)
                    WHERE k <> 'upstream_cost') AS counts_ok
            FROM {entries} e
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
        LIMIT {limit}
        """  # noqa: S608 - constant names, never a value


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
        "a debit's tokens by kind do not add up (totals not its input/output tokens,"
        " parts above their total, a count not a number ≥ 0, or on another kind)",
        _breakdown_sql("ledger_entries", "$1"),
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
    _Check(
        "an entry and its key row (ledger_entry_keys) differ: one without the other, or"
        " another idempotency key, hold or created_at",
        """
        SELECT COALESCE(e.id, k.id) AS entry_id, e.idempotency_key,
               k.idempotency_key AS key_idempotency_key, e.hold_id, k.hold_id AS key_hold_id,
               e.created_at, k.created_at AS key_created_at
        FROM ledger_entries e FULL JOIN ledger_entry_keys k ON k.id = e.id
        WHERE e.id IS NULL OR k.id IS NULL OR e.idempotency_key <> k.idempotency_key
           OR e.hold_id IS DISTINCT FROM k.hold_id OR e.created_at <> k.created_at
        LIMIT $1
        """,
    ),
    _Check(
        "two entries share a seq",
        "SELECT seq, count(*) AS entries FROM ledger_entries GROUP BY seq HAVING count(*) > 1"
        " LIMIT $1",
    ),
    _Check(
        "a partition of ledger_entries lacks a guard (the parent's row triggers, enabled, and"
        " its own TRUNCATE guard)",
        _PARTITION_GUARDS_SQL,
    ),
    _Check(
        "a partition of ledger_entries is not attached as made",
        _PARTITIONS_ATTACHED_SQL,
    ),
)


# What the incremental mode checks in place of the full scans. Every query
# names the entries it checks ``new_entries``: those the checkpoint does not
# cover (see 0014_verify_checkpoints.sql for why this finds each exactly).
# $1 is the checkpoint's tx_id; $2, where used, its holds_from.
_NEW_ENTRIES = """
    new_entries AS (
        SELECT e.* FROM ledger_entries e
        LEFT JOIN verify_account_checkpoints c USING (account_id)
        WHERE e.kind = 'debit' AND e.tx_id >= $1::xid8 AND e.seq > COALESCE(c.last_seq, 0)
        UNION ALL
        SELECT e.* FROM ledger_entries e
        LEFT JOIN verify_account_checkpoints c USING (account_id)
        WHERE e.kind <> 'debit' AND e.tx_id >= $1::xid8 AND e.seq > COALESCE(c.last_seq, 0)
    )"""


class _NewCheck(NamedTuple):
    problem: str  # the same words as the full check's, so reports read alike
    sql: str  # $1 tx_id, then $2 holds_from when uses_holds_from, then the LIMIT
    uses_holds_from: bool = False


_FULL = {c.problem: c for c in _CHECKS}
# Checks whose cost grows with accounts, live holds, lots or refunds — not
# with the entries' history — run unchanged in both modes.
_SHARED = [
    _FULL[p]
    for p in (
        "an account without exactly one balance row",
        "reversal record differs from its entry (a refund takes back exactly what it records)",
        "live credit lots hold more than the balance (SUM(remaining) <= max(0, balance))",
        "an invariant's trigger is missing, not enabled, or not as the migrations installed it",
        "refunds pending do not add up (per account, the pending of its reversals ="
        " collected + written off + refund_pending; refund_pending <= reserved)",
        "refund collection differs from its entry",
        "an invariant's constraint is missing",
        "a partition of ledger_entries lacks a guard (the parent's row triggers, enabled, and"
        " its own TRUNCATE guard)",
        "a partition of ledger_entries is not attached as made",
    )
]


def _same_problem(index: int) -> str:
    return _CHECKS[index].problem


_NEW_CHECKS: tuple[_NewCheck, ...] = (
    _NewCheck(
        _same_problem(0),
        f"""
        WITH {_NEW_ENTRIES}
        SELECT b.account_id, b.balance,
               COALESCE(c.balance, 0) + COALESCE(n.total, 0) AS entries_total,
               b.reserved, COALESCE(h.total, 0) AS live_holds_total, b.overdraft_limit
        FROM account_balances b
        LEFT JOIN verify_account_checkpoints c USING (account_id)
        LEFT JOIN (SELECT account_id, SUM(amount)::bigint AS total FROM new_entries
                   GROUP BY account_id) n USING (account_id)
        LEFT JOIN (SELECT account_id, SUM(amount)::bigint AS total FROM holds
                   WHERE ended_at IS NULL GROUP BY account_id) h USING (account_id)
        WHERE b.balance <> COALESCE(c.balance, 0) + COALESCE(n.total, 0)
           OR b.reserved <> COALESCE(h.total, 0)
           OR b.balance - b.reserved < -b.overdraft_limit
        LIMIT $2
        """,  # noqa: S608 - constant fragments, never a value
    ),
    _NewCheck(
        _same_problem(2),
        # Per touched hold, its debits by the unique hold_id index (a GROUP BY
        # over the join would have the planner walk every hold in id order).
        f"""
        WITH {_NEW_ENTRIES},
        touched AS MATERIALIZED (
            SELECT hold_id AS id FROM new_entries WHERE hold_id IS NOT NULL
            UNION SELECT id FROM holds WHERE created_at >= $2
            UNION SELECT id FROM holds WHERE ended_at IS NULL
        )
        SELECT h.id AS hold_id, h.outcome, d.debits
        FROM touched t JOIN holds h ON h.id = t.id
        CROSS JOIN LATERAL (SELECT count(*) AS debits FROM ledger_entries e
                            WHERE e.hold_id = h.id) d
        WHERE (h.outcome = 'settled' AND d.debits <> 1)
           OR (h.outcome = 'released' AND d.debits <> 0)
           OR (h.outcome = 'expired' AND d.debits > 1)
           OR (h.outcome IS NULL AND d.debits <> 0)
        LIMIT $3
        """,  # noqa: S608 - constant fragments, never a value
        uses_holds_from=True,
    ),
    _NewCheck(
        _same_problem(3),
        f"""
        WITH {_NEW_ENTRIES}
        SELECT e.id AS entry_id, e.kind, e.hold_id
        FROM new_entries e LEFT JOIN holds h ON h.id = e.hold_id
        WHERE (e.kind = 'debit') <> (e.hold_id IS NOT NULL)
           OR (h.id IS NOT NULL AND h.account_id <> e.account_id)
        LIMIT $2
        """,  # noqa: S608 - constant fragments, never a value
    ),
    _NewCheck(
        _same_problem(4),
        """
        SELECT id AS hold_id FROM holds
        WHERE created_at >= $2 AND ended_at < created_at AND $1::xid8 IS NOT NULL
        LIMIT $3
        """,
        uses_holds_from=True,
    ),
    _NewCheck(
        _same_problem(5),
        f"""
        WITH {_NEW_ENTRIES}
        SELECT account_id, id AS entry_id, seq, amount, balance_after, prev_balance_after
        FROM (
            SELECT n.account_id, n.id, n.seq, n.amount, n.balance_after,
                   CASE WHEN row_number() OVER w = 1 THEN COALESCE(c.balance, 0)
                        ELSE lag(n.balance_after) OVER w END AS prev_balance_after,
                   row_number() OVER (PARTITION BY n.account_id ORDER BY n.seq DESC) AS from_end
            FROM new_entries n
            LEFT JOIN verify_account_checkpoints c USING (account_id)
            WINDOW w AS (PARTITION BY n.account_id ORDER BY n.seq)
        ) x
        LEFT JOIN account_balances b USING (account_id)
        WHERE (balance_after IS NOT NULL AND prev_balance_after IS NOT NULL
               AND balance_after <> prev_balance_after + amount)
           OR (from_end = 1 AND balance_after IS NOT NULL AND balance_after <> b.balance)
        LIMIT $2
        """,  # noqa: S608 - constant fragments, never a value
    ),
    _NewCheck(
        _same_problem(6),
        f"""
        WITH {_NEW_ENTRIES},
        touched AS (
            SELECT cu.lot_id AS id FROM credit_lot_uses cu JOIN new_entries n ON n.id = cu.entry_id
            UNION SELECT id FROM new_entries WHERE expires_at IS NOT NULL
        )
        SELECT l.id AS lot_id, l.initial, l.remaining, COALESCE(u.used, 0) AS used
        FROM credit_lots l JOIN touched t ON t.id = l.id
        LEFT JOIN (SELECT lot_id, SUM(amount)::bigint AS used FROM credit_lot_uses
                   WHERE lot_id IN (SELECT id FROM touched) GROUP BY lot_id) u ON u.lot_id = l.id
        LEFT JOIN ledger_entries g ON g.id = l.id
        WHERE l.remaining <> l.initial - COALESCE(u.used, 0)
           OR g.id IS NULL OR g.kind <> 'grant' OR g.account_id <> l.account_id
           OR g.amount <> l.granted OR g.expires_at IS DISTINCT FROM l.expires_at
        LIMIT $2
        """,  # noqa: S608 - constant fragments, never a value
    ),
    _NewCheck(
        _same_problem(8),
        f"""
        WITH {_NEW_ENTRIES}
        SELECT e.id AS entry_id FROM new_entries e
        LEFT JOIN credit_lots l ON l.id = e.id
        WHERE e.expires_at IS NOT NULL AND l.id IS NULL
        LIMIT $2
        """,  # noqa: S608 - constant fragments, never a value
    ),
    _NewCheck(
        _same_problem(9),
        f"""
        WITH {_NEW_ENTRIES}
        SELECT e.id AS entry_id, e.kind, e.amount, COALESCE(u.used, 0) AS used
        FROM new_entries e
        LEFT JOIN (SELECT cu.entry_id, SUM(cu.amount)::bigint AS used,
                          bool_or(l.account_id <> le.account_id) AS foreign_lot,
                          bool_or(le.kind = 'expiry' AND (cu.lot_id <> le.lot_id
                                  OR le.created_at < l.expires_at)) AS bad_expiry
                   FROM credit_lot_uses cu
                   JOIN credit_lots l ON l.id = cu.lot_id
                   JOIN new_entries le ON le.id = cu.entry_id
                   GROUP BY cu.entry_id) u ON u.entry_id = e.id
        WHERE (e.amount >= 0 AND u.used IS NOT NULL)
           OR (e.amount < 0 AND e.kind <> 'expiry' AND COALESCE(u.used, 0) > -e.amount)
           OR (e.kind = 'expiry' AND COALESCE(u.used, 0) <> -e.amount)
           OR u.foreign_lot OR u.bad_expiry
        LIMIT $2
        """,  # noqa: S608 - constant fragments, never a value
    ),
)


def _problem_with(words: str) -> str:
    (problem,) = [c.problem for c in _CHECKS if words in c.problem]
    return problem


# Checks added after incremental verify was written, in its terms: a debit's
# tokens by kind on new entries only; a key budget's spend for each (key,
# period) that a new hold, a live hold or a new entry's hold belongs to,
# recounted over all that period's holds (index holds_key_budget_period).
_NEW_CHECKS += (
    _NewCheck(
        _problem_with("tokens by kind"),
        f"WITH {_NEW_ENTRIES} " + _breakdown_sql("new_entries", "$2"),
    ),
    _NewCheck(
        _problem_with("key budget spend"),
        f"""
        WITH {_NEW_ENTRIES},
        touched AS MATERIALIZED (
            SELECT hold_id AS id FROM new_entries WHERE hold_id IS NOT NULL
            UNION SELECT id FROM holds WHERE created_at >= $2
            UNION SELECT id FROM holds WHERE ended_at IS NULL
        ),
        pairs AS MATERIALIZED (
            SELECT DISTINCT h.key_id, h.budget_period_start AS period_start
            FROM touched t JOIN holds h ON h.id = t.id
            WHERE h.budget_period_start IS NOT NULL
        ),
        h AS (
            SELECT h.key_id, h.budget_period_start AS period_start,
                   COALESCE(SUM(h.amount) FILTER (WHERE h.ended_at IS NULL), 0)::bigint
                       AS reserved,
                   COALESCE(SUM(-e.amount), 0)::bigint AS spent,
                   bool_or(k.account_id IS DISTINCT FROM h.account_id) AS foreign_key
            FROM pairs p
            JOIN holds h ON h.key_id = p.key_id AND h.budget_period_start = p.period_start
            LEFT JOIN ledger_entries e ON e.hold_id = h.id
            LEFT JOIN api_keys k ON k.id = h.key_id
            GROUP BY h.key_id, h.budget_period_start
        )
        SELECT h.key_id, h.period_start, s.spent, s.reserved,
               h.spent AS holds_spent, h.reserved AS holds_reserved
        FROM h
        LEFT JOIN key_budget_spend s ON s.key_id = h.key_id AND s.period_start = h.period_start
        WHERE s.key_id IS NULL OR h.foreign_key
           OR s.spent <> h.spent OR s.reserved <> h.reserved
        LIMIT $3
        """,  # noqa: S608 - constant fragments, never a value
        uses_holds_from=True,
    ),
)

# The new entries against their key rows (the key rows without an entry are
# left to the full scan: they can refuse a key, never count one twice).
_NEW_CHECKS += (
    _NewCheck(
        _problem_with("its key row"),
        f"""
        WITH {_NEW_ENTRIES}
        SELECT n.id AS entry_id, n.idempotency_key, k.idempotency_key AS key_idempotency_key,
               n.hold_id, k.hold_id AS key_hold_id, n.created_at, k.created_at AS key_created_at
        FROM new_entries n LEFT JOIN ledger_entry_keys k ON k.id = n.id
        WHERE k.id IS NULL OR n.idempotency_key <> k.idempotency_key
           OR n.hold_id IS DISTINCT FROM k.hold_id OR n.created_at <> k.created_at
        LIMIT $2
        """,  # noqa: S608 - constant fragments, never a value
    ),
)

# Where the next incremental run starts: this snapshot's xmin (every entry of
# an older transaction is visible now), and its holds window. A hold this
# snapshot cannot see was created by a transaction running now or later, and
# its created_at is that transaction's start (DEFAULT now()); so the window
# opens at the oldest transaction start in this database, read just before
# the snapshot is taken ($1), or at the oldest live hold, whichever is older.
# Where some sessions' transactions cannot be seen (a role without
# pg_read_all_stats sees only its own), it opens HOLDS_MARGIN earlier instead.
HOLDS_MARGIN = "1 hour"
_OLDEST_TRANSACTION_SQL = f"""
SELECT CASE WHEN bool_and(query IS DISTINCT FROM '<insufficient privilege>')
            THEN LEAST(clock_timestamp(), min(xact_start))
            ELSE clock_timestamp() - interval '{HOLDS_MARGIN}' END
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
"""  # noqa: S608 - constant fragments, never a value
_HIGH_WATER_SQL = """
SELECT pg_snapshot_xmin(pg_current_snapshot()) AS tx_id,
       LEAST($1::timestamptz, (SELECT min(created_at) FROM holds WHERE ended_at IS NULL))
       AS holds_from
"""

# Per account, what the checkpoint will cover after this run.
_ADVANCE_INCREMENTAL_SQL = f"""
WITH {_NEW_ENTRIES}
SELECT n.account_id, max(n.seq) AS last_seq,
       (COALESCE(c.balance, 0) + SUM(n.amount))::bigint AS balance,
       COALESCE(c.entries, 0) + count(*) AS entries
FROM new_entries n LEFT JOIN verify_account_checkpoints c USING (account_id)
GROUP BY n.account_id, c.balance, c.entries
"""  # noqa: S608 - constant fragments, never a value
_ADVANCE_FULL_SQL = """
SELECT account_id, max(seq) AS last_seq, SUM(amount)::bigint AS balance, count(*) AS entries
FROM ledger_entries GROUP BY account_id
"""


class _Checkpoint(NamedTuple):
    tx_id: Any  # asyncpg's xid8 is an int
    holds_from: Any
    entries: int


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, int | str | bool | None) else str(value)


def _record(report: Report, problem: str, rows: list[asyncpg.Record]) -> None:
    for r in rows[:_MAX_PER_CHECK]:
        report.problems.append(
            {"problem": problem, **{k: _jsonable(v) for k, v in dict(r).items()}}
        )
    if len(rows) > _MAX_PER_CHECK:
        report.problems.append({"problem": problem, "more": True})


async def _read_checkpoint(conn: asyncpg.Connection) -> _Checkpoint | None:
    row = await conn.fetchrow("SELECT tx_id, holds_from, entries FROM verify_checkpoint")
    return None if row is None else _Checkpoint(row["tx_id"], row["holds_from"], row["entries"])


async def _common(conn: asyncpg.Connection, report: Report) -> None:
    report.accounts = await conn.fetchval("SELECT count(*) FROM account_balances")
    report.refund_debt = await conn.fetchval(
        "SELECT (SELECT COALESCE(SUM(debt), 0) FROM ledger_reversals)"
        " + (SELECT COALESCE(SUM(written_off), 0) FROM refund_collections)"
    )
    report.warnings = [w.as_json() for w in await serving_role_warnings(conn)]
    # Rows outside every month made (ledger/partitions.py): not wrong, but a
    # month cannot be made while the DEFAULT partition holds rows of it.
    if await conn.fetchval("SELECT to_regclass('ledger_entries_default') IS NOT NULL"):
        stray = await conn.fetchval("SELECT count(*) FROM ledger_entries_default")
        if stray:
            report.warnings.append(
                {
                    "warning": "entries in the DEFAULT partition: make their months'"
                    " partitions (docs/operations.md#ledger-partitions)",
                    "rows": stray,
                }
            )


async def _advance(
    db: Db,
    seen: _Checkpoint | None,
    new: _Checkpoint,
    accounts: list[asyncpg.Record],
    full: bool,
) -> bool:
    """Write the checkpoint of a clean run; False when another run moved it first."""
    try:
        async with transaction(db) as conn:
            current = await conn.fetchrow("SELECT tx_id FROM verify_checkpoint FOR UPDATE")
            # Compare-and-set: two runs at once both read ``seen``; the first
            # writes, the second leaves the checkpoint to it (its sums are of
            # its own snapshot, which would not match the rows the first wrote).
            if (current is None) != (seen is None) or (
                current is not None and seen is not None and current["tx_id"] != seen.tx_id
            ):
                return False
            await conn.execute(
                "INSERT INTO verify_account_checkpoints (account_id, last_seq, balance, entries)"
                " SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[])"
                " ON CONFLICT (account_id) DO UPDATE SET last_seq = EXCLUDED.last_seq,"
                " balance = EXCLUDED.balance, entries = EXCLUDED.entries",
                [r["account_id"] for r in accounts],
                [r["last_seq"] for r in accounts],
                [r["balance"] for r in accounts],
                [r["entries"] for r in accounts],
            )
            await conn.execute(
                "INSERT INTO verify_checkpoint (tx_id, holds_from, entries, full_scan)"
                " VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (singleton) DO UPDATE SET tx_id = EXCLUDED.tx_id,"
                " holds_from = EXCLUDED.holds_from, entries = EXCLUDED.entries,"
                " full_scan = EXCLUDED.full_scan, verified_at = now()",
                new.tx_id,
                new.holds_from,
                new.entries,
                full,
            )
    except asyncpg.InsufficientPrivilegeError:
        # The serving role may verify but never advances the checkpoint.
        return False
    return True


async def verify_ledger(db: Db, *, checkpoint: bool = False, writer: Db | None = None) -> Report:
    """Check every invariant of DESIGN.md §3 and ARCHITECTURE.md on one snapshot.

    Balances and reservations recomputed from entries and holds; each hold
    ended at most once with the debits its outcome implies; the running
    balance chained per account; credit lots adding up to their uses; and the
    triggers (enabled, as the migrations installed them) and constraints that
    enforce the rest still in place; every refund reversal's entry taking back
    exactly what its record says, and pending refunds adding up. A serving
    role able to change the triggers is a warning, not a problem.

    With ``checkpoint``, a clean run also records its snapshot as the
    checkpoint the next incremental run starts from — through ``writer`` when
    given (the schema owner's connection: only the owner may write it).
    """
    report = Report()
    async with connection(db) as conn:
        oldest = await conn.fetchval(_OLDEST_TRANSACTION_SQL)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            seen = await _read_checkpoint(conn)
            high = await conn.fetchrow(_HIGH_WATER_SQL, oldest)
            counts = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM ledger_entries) AS entries,"
                " (SELECT count(*) FROM holds) AS holds"
            )
            report.entries, report.holds = counts["entries"], counts["holds"]
            await _common(conn, report)
            for problem, sql, args in _CHECKS:
                _record(report, problem, await conn.fetch(sql, *args, _MAX_PER_CHECK + 1))
            accounts = await conn.fetch(_ADVANCE_FULL_SQL) if checkpoint and report.ok else []
        if checkpoint and report.ok:
            new = _Checkpoint(high["tx_id"], high["holds_from"], report.entries)
            report.checkpoint_advanced = await _advance(
                writer or conn, seen, new, accounts, full=True
            )
    return report


async def verify_incremental(db: Db, *, writer: Db | None = None) -> Report:
    """Check what is new since the last checkpoint; the first run is a full one.

    New entries are checked like the full scan checks every entry (running
    balance from the account's checkpointed balance, debits against their
    holds, credit lots they used or created), every balance row against its
    checkpointed sum plus its new entries, the holds new entries name and those
    created since the checkpoint's window, and the checks whose size does not
    grow with history (live holds, live lots, refunds, triggers, constraints)
    as in full. Old entries are not re-read: their triggers forbid any change,
    and ``verify --full`` re-reads them all. A clean run advances the
    checkpoint, through ``writer`` when given (only the owner may write it).
    """
    async with connection(db) as conn:
        seen = await _read_checkpoint(conn)
        if seen is None:
            return await verify_ledger(conn, checkpoint=True, writer=writer)
        report = Report(mode="incremental")
        oldest = await conn.fetchval(_OLDEST_TRANSACTION_SQL)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            seen = await _read_checkpoint(conn)  # as this snapshot sees it
            if seen is None:  # pragma: no cover - a checkpoint is never deleted
                raise RuntimeError("verify checkpoint vanished")
            high = await conn.fetchrow(_HIGH_WATER_SQL, oldest)
            report.checkpointed_entries = seen.entries
            await _common(conn, report)
            report.entries = await conn.fetchval(
                f"WITH {_NEW_ENTRIES} SELECT count(*) FROM new_entries",  # noqa: S608
                seen.tx_id,
            )
            report.holds = await conn.fetchval(
                "SELECT count(*) FROM holds WHERE created_at >= $1 OR ended_at IS NULL",
                seen.holds_from,
            )
            for problem, sql, uses_holds_from in _NEW_CHECKS:
                args = (seen.tx_id, seen.holds_from) if uses_holds_from else (seen.tx_id,)
                _record(report, problem, await conn.fetch(sql, *args, _MAX_PER_CHECK + 1))
            for problem, sql, static in _SHARED:
                _record(report, problem, await conn.fetch(sql, *static, _MAX_PER_CHECK + 1))
            accounts = await conn.fetch(_ADVANCE_INCREMENTAL_SQL, seen.tx_id) if report.ok else []
        if report.ok:
            new = _Checkpoint(high["tx_id"], high["holds_from"], seen.entries + report.entries)
            report.checkpoint_advanced = await _advance(
                writer or conn, seen, new, accounts, full=False
            )
    return report
