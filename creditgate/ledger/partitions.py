"""The ledger's monthly partitions (migration 0017): made ahead, checked by ``verify``.

``ledger_entries`` is range-partitioned on ``created_at``, one partition a
month (UTC). The partitions of this month and the next ``MONTHS_AHEAD`` are
made by ``creditgate migrate`` and re-checked by every server on its
retention interval (hourly by default): ``ensure_ahead`` calls
``creditgate_ledger_partitions_ahead``, a SECURITY DEFINER function owned by
the schema owner, so the serving role — which owns nothing and may not
create, detach or truncate a partition — can still keep months ready. It
only ever adds empty partitions of the current and future months, each with
its own TRUNCATE guard, and records them in ``ledger_partitions``.

A row whose month has no partition (a year of servers down, a clock far
off) lands in ``ledger_entries_default`` rather than failing its insert;
``verify`` warns while that partition holds any row, and a month cannot be
made while the default holds rows of it (move them as the owner first).

Making a partition takes an ACCESS EXCLUSIVE lock on ``ledger_entries`` for
a moment: it waits at most ``LOCK_TIMEOUT`` (behind a long reader such as
``verify --full``) and is tried again at the next interval, so it never
queues the hot path behind a long wait. With 12 months ahead it happens once
a month, and a month is made eleven months before it is needed.
"""

from __future__ import annotations

import asyncpg

from creditgate.ledger.db import Db, transaction

__all__ = ["LOCK_TIMEOUT", "MONTHS_AHEAD", "ensure_ahead"]

# Months made ahead of the current one.
MONTHS_AHEAD = 12
LOCK_TIMEOUT = "2s"


async def ensure_ahead(db: Db, months: int = MONTHS_AHEAD) -> int:
    """Make the partitions of this month and the next ``months``; how many were new.

    Cheap when they exist (one look at ``ledger_partitions`` per month, no
    DDL, no lock on the ledger). Raises asyncpg's LockNotAvailableError when
    the ledger stayed locked past ``LOCK_TIMEOUT`` (try again later).
    """
    async with transaction(db) as conn:
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        made: int = await conn.fetchval("SELECT creditgate_ledger_partitions_ahead($1)", months)
    return made


async def default_rows(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    """Rows in the DEFAULT partition (0 when every row has its month)."""
    n: int = await conn.fetchval("SELECT count(*) FROM ledger_entries_default")
    return n
