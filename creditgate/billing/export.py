"""The usage outbox: every settled debit reaches Polar's ``events.ingest`` exactly once.

The ledger is the outbox. One row, ``polar_export_cursor``, says how far Polar
has acknowledged, as a position in ``(tx_id, seq)`` order — the writing
transaction's id, then the entry's sequence number. Only entries of
transactions older than every running one (``tx_id < xmin`` of a fresh
snapshot) are read, so no entry can ever commit behind the cursor.

One round: read a batch past the cursor → send it (tenacity: backoff with
jitter, 429 Retry-After honoured) → move the cursor, in one transaction, only
after Polar acknowledged. A process killed between sending and recording sends
the batch again, and Polar drops the repeats: each event's ``external_id`` is
its ledger entry id, which Polar deduplicates forever.

A batch Polar refuses as invalid (422) is split in halves until the bad event
stands alone; it is parked (``polar_parked_events``, logged, counted), never
retried forever, and the rest goes through.

One process exports at a time: the one holding a session-level advisory lock
on its own connection. When that process dies its connection closes, the lock
is released, and another process's next attempt takes it over.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import orjson
from polar import PolarClientError, PolarDeserializationError, PolarError
from polar.v2026_10 import PolarAsync
from polar.v2026_10.inputs import EventCreateExternalCustomer, EventMetadataInput

from creditgate.billing.client import TRANSIENT, call_with_retries
from creditgate.billing.metrics import (
    USAGE_EXPORT_FAILURES,
    USAGE_EXPORTED,
    USAGE_OLDEST_PENDING,
    USAGE_PARKED,
    USAGE_PENDING,
)
from creditgate.config import PolarConfig
from creditgate.ledger.db import Db
from creditgate.ledger.history import KINDS
from creditgate.logs import log

# pg_advisory_lock key: the first 8 bytes of sha256("creditgate.polar.export").
EXPORT_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"creditgate.polar.export").digest()[:8], "big", signed=True
)
EXPORT_APPLICATION_NAME = "creditgate-export"

_PENDING = """
SELECT e.id, e.seq, e.tx_id, e.account_id, -e.amount AS credits, e.model,
       COALESCE(e.input_tokens, 0) AS input_tokens,
       COALESCE(e.output_tokens, 0) AS output_tokens,
       e.estimated, e.created_at, e.breakdown
FROM ledger_entries e
WHERE e.kind = 'debit'
  AND (e.tx_id, e.seq) > ($1::xid8, $2::bigint)
  AND e.tx_id < pg_snapshot_xmin(pg_current_snapshot())
  AND NOT EXISTS (SELECT 1 FROM polar_parked_events p WHERE p.entry_id = e.id)
ORDER BY e.tx_id, e.seq
LIMIT $3
"""

# The kinds of a debit's breakdown that are parts of its two totals.
TOKEN_KINDS = frozenset(KINDS) - {"input", "output"}

# Seconds between two backlog counts while the export catches up.
GAUGE_INTERVAL = 5.0

_BACKLOG = """
SELECT count(*) AS pending,
       COALESCE(EXTRACT(EPOCH FROM now() - min(e.created_at)), 0)::float8 AS oldest_s
FROM ledger_entries e, polar_export_cursor c
WHERE e.kind = 'debit'
  AND (e.tx_id, e.seq) > (c.tx_id, c.seq)
  AND NOT EXISTS (SELECT 1 FROM polar_parked_events p WHERE p.entry_id = e.id)
"""


async def backlog(db: Db) -> tuple[int, float]:
    """Settled debits Polar has not acknowledged (parked ones aside), and the
    age in seconds of the oldest."""
    row = await db.fetchrow(_BACKLOG)
    assert row is not None
    return int(row["pending"]), float(row["oldest_s"])


@dataclass(frozen=True, slots=True)
class PendingDebit:
    """A settled debit waiting for Polar's acknowledgement."""

    entry_id: uuid.UUID
    seq: int
    tx_id: int
    account_id: uuid.UUID
    credits: int  # µc debited
    model: str | None
    input_tokens: int
    output_tokens: int
    estimated: bool
    created_at: datetime
    # The debit's tokens by kind (ledger_entries.breakdown), None for debits
    # that kept only the two totals.
    breakdown: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, r: asyncpg.Record) -> PendingDebit:
        return cls(
            entry_id=r["id"],
            seq=r["seq"],
            tx_id=int(r["tx_id"]),
            account_id=r["account_id"],
            credits=r["credits"],
            model=r["model"],
            input_tokens=r["input_tokens"],
            output_tokens=r["output_tokens"],
            estimated=r["estimated"],
            created_at=r["created_at"],
            breakdown=orjson.loads(r["breakdown"]) if r["breakdown"] is not None else None,
        )


def utcnow() -> datetime:
    """The wall clock, in UTC (the default clock of the exporter and reconciliation)."""
    return datetime.now(UTC)


def event_time(debit: PendingDebit, now: datetime) -> datetime:
    """The timestamp Polar is sent for ``debit`` when sent at ``now``.

    Polar refuses timestamps in the future; a clock a little ahead of
    Polar's must not make a valid event look invalid (and get it parked).
    The exporter records this exact value's minute (``event_minute``), so
    reconciliation places the event in the same window Polar does.
    """
    return min(debit.created_at, now - timedelta(seconds=1))


def usage_event(debit: PendingDebit, name: str, now: datetime) -> EventCreateExternalCustomer:
    """The Polar event for one debit (issue 7's metadata)."""
    metadata: dict[str, str | int | bool] = {
        "credits": debit.credits,  # µc
        "input_tokens": debit.input_tokens,
        "output_tokens": debit.output_tokens,
        "total_tokens": debit.input_tokens + debit.output_tokens,
        "estimated": debit.estimated,
    }
    for kind, n in (debit.breakdown or {}).items():
        # The kinds that are parts of the totals (cached_input_tokens,
        # reasoning_tokens, …), non-zero ones only, for meters by kind; never
        # the upstream's own cost (a reseller's margin is not Polar's data).
        if kind in TOKEN_KINDS and isinstance(n, int) and not isinstance(n, bool):
            metadata[f"{kind}_tokens"] = n
    if debit.model:
        metadata["model"] = debit.model[:500]  # Polar's limit for a string value
    timestamp = event_time(debit, now)
    return {
        "name": name,
        "external_customer_id": str(debit.account_id),
        "external_id": str(debit.entry_id),
        "timestamp": timestamp.isoformat(),
        "metadata": cast(EventMetadataInput, metadata),
    }


def _refuses_events(exc: PolarClientError) -> bool:
    """Whether a 422 names events of the batch (``loc`` under ``body.events``):
    only then is an event to blame, and worth parking once isolated."""
    detail = getattr(exc.error, "detail", None)
    if not isinstance(detail, list) or not detail:
        return False
    for problem in detail:
        loc = problem.get("loc") if isinstance(problem, dict) else getattr(problem, "loc", None)
        if not isinstance(loc, list | tuple) or list(loc[:2]) != ["body", "events"]:
            return False
    return True


def _describe_refusal(exc: PolarClientError) -> str:
    return str(exc.error)[:2000]


@dataclass(slots=True)
class _Outcome:
    acknowledged: list[PendingDebit]
    parked: list[tuple[PendingDebit, str]]


class ExportConflict(Exception):
    """The cursor moved under us: another exporter is running (it should not)."""


class UsageExporter:
    """Sends settled debits to Polar in commit-safe order, exactly once."""

    def __init__(
        self, polar: PolarAsync, cfg: PolarConfig, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self._polar = polar
        self._cfg = cfg
        self._clock = clock  # injected by tests to place events in time

    # ------------------------------------------------------------ one round

    async def export_once(self, conn: asyncpg.Connection) -> int:
        """Export one batch past the cursor; the number of debits it settled (0: none).

        Raises a Polar error when Polar could not be reached or refused the
        whole request for another reason than validation; nothing is recorded
        then, and the next round sends the same batch again.
        """
        cursor = await conn.fetchrow("SELECT tx_id, seq FROM polar_export_cursor")
        assert cursor is not None, "migration 0005 inserts the cursor row"
        rows = await conn.fetch(_PENDING, cursor["tx_id"], cursor["seq"], self._cfg.batch_size)
        if not rows:
            return 0
        debits = [PendingDebit.from_row(r) for r in rows]
        now = self._clock()  # one instant per round: the timestamps sent are the ones recorded
        outcome = await self._send(debits, now)
        await self._record(conn, (int(cursor["tx_id"]), cursor["seq"]), debits[-1], outcome, now)
        USAGE_EXPORTED.inc(len(outcome.acknowledged))
        for debit, error in outcome.parked:
            USAGE_PARKED.inc()
            log.error(
                "usage event refused by Polar; parked",
                extra={
                    "entry_id": str(debit.entry_id),
                    "account_id": str(debit.account_id),
                    "polar_error": error,
                },
            )
        return len(debits)

    async def _send(self, debits: list[PendingDebit], now: datetime) -> _Outcome:
        events: list[Any] = [usage_event(d, self._cfg.event_name, now) for d in debits]
        try:
            result = await call_with_retries(
                self._cfg, lambda: self._polar.events.ingest(events=events)
            )
        except PolarClientError as e:
            if e.status_code != 422 or not _refuses_events(e):
                raise  # the request itself is refused (e.g. its organization): retried later
            if len(debits) == 1:
                return _Outcome([], [(debits[0], _describe_refusal(e))])
            # One invalid event fails the whole batch: split it to find which.
            half = len(debits) // 2
            left = await self._send(debits[:half], now)
            right = await self._send(debits[half:], now)
            return _Outcome(left.acknowledged + right.acknowledged, left.parked + right.parked)
        if result.inserted + result.duplicates != len(debits):
            log.warning(
                "polar acknowledged a different number of events than sent",
                extra={
                    "sent": len(debits),
                    "inserted": result.inserted,
                    "duplicates": result.duplicates,
                },
            )
        return _Outcome(list(debits), [])

    async def _record(
        self,
        conn: asyncpg.Connection,
        before: tuple[int, int],
        last: PendingDebit,
        outcome: _Outcome,
        now: datetime,
    ) -> None:
        # Keyed by account and the minute of the event timestamp sent, so
        # reconciliation can window the ledger's side by event time as Polar does.
        totals: dict[tuple[uuid.UUID, datetime], list[int]] = defaultdict(lambda: [0, 0, 0])
        for d in outcome.acknowledged:
            minute = event_time(d, now).replace(second=0, microsecond=0)
            t = totals[(d.account_id, minute)]
            t[0] += 1
            t[1] += d.credits
            t[2] += d.input_tokens + d.output_tokens
        async with conn.transaction():
            moved = await conn.execute(
                "UPDATE polar_export_cursor SET tx_id = $1, seq = $2, updated_at = now()"
                " WHERE tx_id = $3 AND seq = $4",
                last.tx_id,
                last.seq,
                *before,
            )
            if moved != "UPDATE 1":
                raise ExportConflict("the export cursor moved during a round")
            if totals:
                keys = list(totals)
                # ``minute`` is when Polar acknowledged (the lag is counted from
                # it), on the same clock as the event times.
                await conn.execute(
                    """
                    INSERT INTO polar_export_totals AS t
                        (account_id, minute, event_minute, events, credits, tokens)
                    SELECT a, date_trunc('minute', $5::timestamptz), e, n, c, k
                    FROM unnest($1::uuid[], $2::timestamptz[], $3::bigint[], $4::bigint[],
                                $6::bigint[])
                        AS u(a, e, n, c, k)
                    ON CONFLICT (account_id, minute, event_minute) DO UPDATE
                    SET events = t.events + EXCLUDED.events,
                        credits = t.credits + EXCLUDED.credits,
                        tokens = t.tokens + EXCLUDED.tokens
                    """,
                    [a for a, _ in keys],
                    [m for _, m in keys],
                    [totals[k][0] for k in keys],
                    [totals[k][1] for k in keys],
                    now,
                    [totals[k][2] for k in keys],
                )
            if outcome.parked:
                await conn.execute(
                    """
                    INSERT INTO polar_parked_events (entry_id, account_id, error)
                    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[])
                    ON CONFLICT (entry_id) DO NOTHING
                    """,
                    [d.entry_id for d, _ in outcome.parked],
                    [d.account_id for d, _ in outcome.parked],
                    [error for _, error in outcome.parked],
                )

    async def update_gauges(self, conn: asyncpg.Connection) -> tuple[int, float]:
        """Set the pending-events and oldest-age gauges; return them."""
        pending, oldest = await backlog(conn)
        USAGE_PENDING.set(pending)
        USAGE_OLDEST_PENDING.set(oldest)
        return pending, oldest

    # ------------------------------------------------------------ forever

    async def run(self, database_url: str) -> None:
        """Export for as long as this process runs, whenever it holds the export lock.

        Every process runs this; the one that takes the lock exports, the
        others ask again every few seconds on their own idle connection.
        """
        retry_lock = max(1.0, self._cfg.export_interval_seconds)
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    database_url,
                    server_settings={
                        "application_name": f"{EXPORT_APPLICATION_NAME}:{os.getpid()}"
                    },
                )
                # Polling rather than a blocking pg_advisory_lock(): shutdown
                # never has to cancel a lock wait, and a takeover within
                # seconds is soon enough for an outbox.
                while True:
                    if await conn.fetchval("SELECT pg_try_advisory_lock($1)", EXPORT_LOCK_KEY):
                        break
                    await asyncio.sleep(retry_lock)
                log.info("usage export lock taken; exporting", extra={"pid": os.getpid()})
                await self._export_while_holding(conn)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ExportConflict):
                log.warning("usage export lost its database connection", exc_info=True)
            except Exception:
                # Never the end of exporting: this process takes the lock again.
                log.error("usage export failed unexpectedly; restarting it", exc_info=True)
            finally:
                if conn is not None:
                    # The lock goes with the session.
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=2))
            await asyncio.sleep(retry_lock)

    async def _export_while_holding(self, conn: asyncpg.Connection) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        gauges_due = 0.0  # loop time of the next gauge update while catching up
        while True:
            try:
                settled = await self.export_once(conn)
                failures = 0
            except (PolarError, PolarDeserializationError) as e:
                failures += 1
                reason = "transient" if isinstance(e, TRANSIENT) else "refused"
                USAGE_EXPORT_FAILURES.labels(reason).inc()
                log.warning(
                    "usage export round failed; will retry",
                    extra={
                        "error": type(e).__name__,
                        "status": getattr(e, "status_code", None),
                        "failures": failures,
                    },
                )
                settled = 0
            # The backlog count reads every pending debit: after each round
            # once caught up, but at most every GAUGE_INTERVAL while catching
            # up (per batch it made a long catch-up quadratic).
            if settled < self._cfg.batch_size or loop.time() >= gauges_due:
                await self.update_gauges(conn)
                gauges_due = loop.time() + GAUGE_INTERVAL
            if settled < self._cfg.batch_size:
                # Caught up (or Polar is failing: back off up to the retry ceiling).
                pause = self._cfg.export_interval_seconds
                if failures:
                    pause = min(self._cfg.retry_max_seconds, pause * 2**failures)
                await asyncio.sleep(pause)
