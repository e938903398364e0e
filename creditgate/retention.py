"""Retention of operational tables (issue 19): what may be forgotten, and when.

Each rule names one table, the rows it may delete — finished ones, older than
the table's period in ``[retention]`` — and nothing else. Money is never
pruned: ledger entries, lots, reversals, usage records, settled or charged
holds and everything ``verify`` sums are kept (docs/operations.md,
"Retention", says why). Holds that moved no money (released, or expired
uncharged) go through the owner's function of migration 0018, which the
serving role may call and which checks each row again. Progress rows of ended
holds are already deleted by the hold sweeper.

Deletes run in batches of ``batch_size`` rows, each its own short statement,
so a large backlog never holds locks for long; running it in several
processes at once is harmless (a row is deleted once, the others find it
gone).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from creditgate.config import RetentionConfig

__all__ = ["RULES", "Rule", "prune"]


@dataclass(frozen=True, slots=True)
class Rule:
    """One table's retention: its finished rows older than ``days`` go."""

    table: str
    # The config field holding this rule's period, in days (0: keep forever).
    setting: str
    # What a row must be to go; $1 is the cutoff time. Constant SQL text.
    condition: str = ""
    # The row's key, to delete a batch by (a constant column list).
    key: str = ""
    # Instead of condition and key: the database function that decides,
    # deletes (or counts) a batch, called as fn(cutoff, batch, dry_run).
    function: str = ""

    def __post_init__(self) -> None:
        assert bool(self.function) != bool(self.condition and self.key), self.table

    def days(self, config: RetentionConfig) -> int:
        """This rule's period under ``config``."""
        value: int = getattr(config, self.setting)
        return value


RULES: tuple[Rule, ...] = (
    # A webhook delivery is remembered so a redelivery is recognised; once
    # processed (or given up) and older than any redelivery, it may go.
    # Pending ones (still to apply) are never touched.
    Rule(
        "webhook_events",
        "webhook_events_days",
        "status IN ('processed', 'failed') AND received_at < $1",
        "source, webhook_id",
    ),
    # The notification outbox: alerts delivered, given up or skipped (no URL).
    Rule(
        "low_balance_alerts",
        "low_balance_alerts_days",
        "status IN ('sent', 'failed', 'skipped') AND finished_at < $1",
        "id",
    ),
    # Holds released or expired with nothing charged: the record that a call
    # was reserved and charged nothing. Deleted by migration 0018's function,
    # which keeps any hold an entry names and any that ended within 7 days.
    Rule("holds", "unbilled_holds_days", function="creditgate_prune_unbilled_holds"),
)


async def prune(
    conn: asyncpg.Pool | asyncpg.Connection,
    config: RetentionConfig,
    *,
    now: datetime,
    dry_run: bool = False,
) -> dict[str, int]:
    """Delete (or, with ``dry_run``, count) what each rule names; rows per table.

    ``now`` is the clock the periods count back from (injected: the server
    passes the current time, tests a fixed one).
    """
    done: dict[str, int] = {}
    for rule in RULES:
        days = rule.days(config)
        if days == 0:
            continue
        cutoff = now - timedelta(days=days)
        if rule.function:
            done[rule.table] = await _by_function(conn, rule.function, cutoff, config, dry_run)
            continue
        if dry_run:
            done[rule.table] = await conn.fetchval(
                f"SELECT count(*) FROM {rule.table} WHERE {rule.condition}",  # noqa: S608 - constants
                cutoff,
            )
            continue
        total = 0
        while True:
            deleted = await conn.fetchval(
                f"""
                WITH gone AS (
                    DELETE FROM {rule.table} WHERE ({rule.key}) IN (
                        SELECT {rule.key} FROM {rule.table} WHERE {rule.condition} LIMIT $2
                    )
                    RETURNING 1
                )
                SELECT count(*) FROM gone
                """,  # noqa: S608 - every fragment is a constant of this module
                cutoff,
                config.batch_size,
            )
            total += deleted
            if deleted < config.batch_size:
                break
        done[rule.table] = total
    return done


async def _by_function(
    conn: asyncpg.Pool | asyncpg.Connection,
    function: str,
    cutoff: datetime,
    config: RetentionConfig,
    dry_run: bool,
) -> int:
    """A rule carried out by its database function: batch by batch, or counted."""
    call = f"SELECT {function}($1, $2, $3)"  # a constant of this module
    if dry_run:
        counted: int = await conn.fetchval(call, cutoff, 0, True)
        return counted
    total = 0
    while True:
        deleted: int = await conn.fetchval(call, cutoff, config.batch_size, False)
        total += deleted
        if deleted < config.batch_size:
            return total
