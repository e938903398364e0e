"""Retention of operational tables (issue 19): what may be forgotten, and when.

Each rule names one table, the rows it may delete — finished ones, older than
the table's period in ``[retention]`` — and nothing else. Money is never
pruned: ledger entries, holds, lots, reversals, usage records and everything
``verify`` reads are kept (docs/operations.md, "Retention", says why holds
stay). Progress rows of ended holds are already deleted by the hold sweeper.

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
    condition: str
    # The row's key, to delete a batch by (a constant column list).
    key: str

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
