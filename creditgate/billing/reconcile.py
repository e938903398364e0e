"""Reconciliation: Polar's usage meter against what the ledger exported to it.

For every customer of the configured meter (``customer_meters.list``, paged)
and every account the exporter sent usage for, compare Polar's
``consumed_units`` with the ledger's acknowledged totals of the meter's
property (``credits`` in µc, or ``total_tokens``).

Polar recomputes meters in the background, seconds to hours behind
ingestion, so a meter may lag: it is within the allowed lag when it lies
between what was exported more than ``lag`` ago (minus the tolerance) and
everything exported (plus the tolerance). Anything outside is drift that the
lag cannot explain: the report fails and ``creditgate reconcile`` exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from polar.v2026_10 import PolarAsync

from creditgate.billing.client import call_with_retries
from creditgate.billing.export import backlog
from creditgate.billing.metrics import METER_DRIFT, METER_DRIFT_ACCOUNTS
from creditgate.config import PolarConfig
from creditgate.ledger.db import Db
from creditgate.logs import log

RECONCILE_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"creditgate.polar.reconcile").digest()[:8], "big", signed=True
)
_MAX_PAGES = 10_000  # 1M customers at 100 a page: a bound, not a limit anyone meets

_COLUMN = {"credits": "credits", "total_tokens": "tokens"}


class ReconcileUnavailable(Exception):
    """Reconciliation is not configured (no meter id)."""


@dataclass(frozen=True, slots=True)
class AccountDrift:
    account: str  # our account id, or Polar's external id when it names no account
    polar: float  # consumed units on Polar's meter
    exported: int  # units Polar acknowledged (since ``since``)
    exported_settled: int  # of which acknowledged longer than the lag ago
    beyond_tolerance: bool

    @property
    def drift(self) -> float:
        return self.polar - self.exported

    def as_json(self) -> dict[str, Any]:
        return {
            "accountId": self.account,
            "polar": self.polar,
            "exported": self.exported,
            "exportedSettled": self.exported_settled,
            "drift": self.drift,
            "beyondTolerance": self.beyond_tolerance,
        }


@dataclass(slots=True)
class ReconcileReport:
    checked_at: datetime
    since: datetime | None
    meter_id: str
    unit: str
    tolerance: int
    lag_seconds: int
    accounts_checked: int = 0
    drifting: list[AccountDrift] = field(default_factory=list)
    pending_events: int = 0
    parked_events: int = 0

    @property
    def ok(self) -> bool:
        return not any(d.beyond_tolerance for d in self.drifting)

    @property
    def total_drift(self) -> float:
        return sum(abs(d.drift) for d in self.drifting)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checkedAt": self.checked_at.isoformat(),
            "since": self.since.isoformat() if self.since else None,
            "meterId": self.meter_id,
            "unit": self.unit,
            "tolerance": self.tolerance,
            "lagSeconds": self.lag_seconds,
            "accountsChecked": self.accounts_checked,
            "totalDrift": self.total_drift,
            "accountsBeyondTolerance": sum(d.beyond_tolerance for d in self.drifting),
            "drifting": [d.as_json() for d in self.drifting],
            "pendingEvents": self.pending_events,
            "parkedEvents": self.parked_events,
        }

    def as_table(self) -> str:
        lines = [
            f"meter {self.meter_id} ({self.unit}), {self.accounts_checked} accounts checked,"
            f" tolerance {self.tolerance}, lag {self.lag_seconds}s",
            f"{'account':<38} {'polar':>16} {'exported':>16} {'drift':>14}  beyond",
        ]
        for d in self.drifting:
            lines.append(
                f"{d.account:<38} {d.polar:>16.0f} {d.exported:>16} {d.drift:>14.0f}"
                f"  {'YES' if d.beyond_tolerance else 'no (within lag)'}"
            )
        if not self.drifting:
            lines.append("(no drift)")
        lines.append(
            f"pending export: {self.pending_events}, parked: {self.parked_events}"
            f" — {'OK' if self.ok else 'DRIFT BEYOND TOLERANCE'}"
        )
        return "\n".join(lines)


async def polar_consumed(polar: PolarAsync, cfg: PolarConfig, meter_id: str) -> dict[str, float]:
    """External customer id → consumed units, for every customer of the meter."""
    consumed: dict[str, float] = {}
    page = 1
    while page <= _MAX_PAGES:
        result = await call_with_retries(
            cfg,
            lambda p=page: polar.customer_meters.list(meter_id=meter_id, page=p, limit=100),  # type: ignore[misc]
        )
        for item in result.items:
            external = getattr(item.customer, "external_id", None) or f"polar:{item.customer_id}"
            consumed[external] = consumed.get(external, 0.0) + float(item.consumed_units)
        if page >= result.pagination.max_page:
            break
        page += 1
    return consumed


async def exported_totals(
    db: Db, unit: str, since: datetime | None, lag_seconds: int
) -> dict[str, tuple[int, int]]:
    """Account id → (units acknowledged, of which longer than the lag ago), since ``since``."""
    column = _COLUMN[unit]  # from a fixed map, never from input
    rows = await db.fetch(
        f"""
        SELECT account_id,
               SUM({column})::bigint AS total,
               (SUM({column}) FILTER (
                   WHERE minute + interval '1 minute' <= now() - $2::integer * interval '1 second'
               ))::bigint AS settled
        FROM polar_export_totals
        WHERE $1::timestamptz IS NULL OR minute >= $1::timestamptz
        GROUP BY account_id
        """,  # noqa: S608 — the column comes from _COLUMN
        since,
        lag_seconds,
    )
    return {str(r["account_id"]): (r["total"], r["settled"] or 0) for r in rows}


async def reconcile(
    db: Db, polar: PolarAsync, cfg: PolarConfig, since: datetime | None = None
) -> ReconcileReport:
    """Compare Polar's meter with the ledger's exported totals; set the drift gauges."""
    if cfg.meter_id is None:
        raise ReconcileUnavailable("polar.meter_id is not configured")
    report = ReconcileReport(
        checked_at=datetime.now(UTC),
        since=since,
        meter_id=cfg.meter_id,
        unit=cfg.meter_property,
        tolerance=cfg.reconcile_tolerance,
        lag_seconds=cfg.reconcile_lag_seconds,
    )
    polar_side = await polar_consumed(polar, cfg, cfg.meter_id)
    ledger_side = await exported_totals(db, cfg.meter_property, since, cfg.reconcile_lag_seconds)
    accounts = sorted(set(polar_side) | set(ledger_side))
    report.accounts_checked = len(accounts)
    tol = cfg.reconcile_tolerance
    for account in accounts:
        consumed = polar_side.get(account, 0.0)
        exported, settled = ledger_side.get(account, (0, 0))
        if consumed == exported:
            continue
        beyond = consumed < settled - tol or consumed > exported + tol
        report.drifting.append(AccountDrift(account, consumed, exported, settled, beyond))
    report.parked_events = await db.fetchval("SELECT count(*) FROM polar_parked_events")
    report.pending_events, _ = await backlog(db)
    METER_DRIFT.set(report.total_drift)
    METER_DRIFT_ACCOUNTS.set(sum(d.beyond_tolerance for d in report.drifting))
    return report


async def run_periodically(database_url: str, polar: PolarAsync, cfg: PolarConfig) -> None:
    """Reconcile every ``reconcile_interval_seconds``, in one process at a time."""
    interval = cfg.reconcile_interval_seconds
    while True:
        await asyncio.sleep(interval)
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(database_url)
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RECONCILE_LOCK_KEY):
                continue  # another process reconciles
            report = await reconcile(conn, polar, cfg)
            log_fn = log.info if report.ok else log.error
            log_fn(
                "polar meter reconciled",
                extra={
                    "ok": report.ok,
                    "accounts_checked": report.accounts_checked,
                    "accounts_drifting": len(report.drifting),
                    "total_drift": report.total_drift,
                },
            )
        except Exception:
            log.warning("polar reconciliation failed", exc_info=True)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(conn.close(timeout=2))
