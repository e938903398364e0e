"""Reconciliation: Polar's usage meter against what the ledger exported to it, by event time.

Both sides are read over the same window of *event time* — the timestamp
each usage event was sent with:

* Polar: ``meters.quantities`` of the meter, per customer (external id) and
  in total, in hourly (or, for windows over 7 days, daily) buckets. These are
  computed from the events themselves, so a billing cycle's meter reset (which
  zeroes a customer meter's ``consumed_units``) changes nothing here.
* The ledger: ``polar_export_totals``, the exporter's acknowledged units per
  account, export minute and event minute (``event_minute`` is the minute of
  the exact timestamp sent).

A window is whole buckets in UTC: ``since`` is rounded down and ``until`` up
to the bucket, because Polar answers whole buckets only. Each (customer,
bucket) where the two differ is a row of the report.

Polar recomputes meters in the background, seconds to hours behind
ingestion, so a bucket may lag: it is within the allowed lag when Polar's
figure lies between the units acknowledged more than ``lag`` ago (minus the
tolerance) and all the units acknowledged (plus the tolerance). Anything
outside is drift the lag cannot explain: the report fails and
``creditgate reconcile`` exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import asyncpg
from polar.v2026_10 import PolarAsync

from creditgate.billing.client import call_with_retries
from creditgate.billing.export import backlog, utcnow
from creditgate.billing.metrics import METER_DRIFT, METER_DRIFT_ACCOUNTS
from creditgate.config import PolarConfig
from creditgate.ledger.db import Db
from creditgate.logs import log

RECONCILE_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"creditgate.polar.reconcile").digest()[:8], "big", signed=True
)
_MAX_PAGES = 10_000  # 1M customers at 100 a page: a bound, not a limit anyone meets
_CONCURRENCY = 8  # quantities requests in flight at once (one per customer)

_COLUMN = {"credits": "credits", "total_tokens": "tokens"}

Interval = Literal["hour", "day"]
_STEP: dict[Interval, timedelta] = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
# Polar answers hourly buckets for up to 7 days and daily ones for up to 366.
_HOURLY_SPAN = timedelta(days=7)
_DAILY_CHUNK = timedelta(days=366)
TOTAL = "*"  # the customer column of the all-customers row


class ReconcileUnavailable(Exception):
    """Reconciliation is not configured (no meter id)."""


def _floor(at: datetime, interval: Interval) -> datetime:
    at = at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return at.replace(hour=0) if interval == "day" else at


def _ceil(at: datetime, interval: Interval) -> datetime:
    floor = _floor(at, interval)
    return floor if floor == at else floor + _STEP[interval]


@dataclass(frozen=True, slots=True)
class Window:
    """``[start, end)`` of event time, whole ``interval`` buckets in UTC."""

    start: datetime
    end: datetime
    interval: Interval

    @classmethod
    def covering(cls, since: datetime, until: datetime) -> Window:
        """The smallest window of whole buckets containing ``[since, until)``.

        Hourly up to 7 days, daily beyond (Polar's limits for one request).
        """
        if until <= since:
            until = since + timedelta(microseconds=1)
        start, end = _floor(since, "hour"), _ceil(until, "hour")
        if end - start <= _HOURLY_SPAN:
            return cls(start, end, "hour")
        return cls(_floor(since, "day"), _ceil(until, "day"), "day")

    @classmethod
    def trailing(cls, now: datetime, lag_seconds: int, hours: int) -> Window:
        """The server's window: ``hours`` of event time ending with the hour in
        which the lag ends, so it slides as time passes."""
        end = _ceil(now - timedelta(seconds=lag_seconds), "hour")
        return cls(end - timedelta(hours=hours), end, "hour")

    def chunks(self) -> list[tuple[datetime, datetime]]:
        """The window cut into pieces Polar answers in one request each."""
        size = _HOURLY_SPAN if self.interval == "hour" else _DAILY_CHUNK
        out, at = [], self.start
        while at < self.end:
            out.append((at, min(at + size, self.end)))
            at += size
        return out


@dataclass(frozen=True, slots=True)
class Side:
    """One side of one (customer, bucket) cell: the ledger's units and Polar's."""

    ledger: int = 0  # units acknowledged by Polar with an event time in the bucket
    settled: int = 0  # of which acknowledged longer than the lag ago
    polar: float = 0.0  # Polar's quantity for the bucket


@dataclass(frozen=True, slots=True)
class WindowDrift:
    """A customer (or ``*``: all of them) whose units differ in one bucket."""

    customer: str  # our account id, Polar's external id, or ``polar:<id>`` without one
    start: datetime
    end: datetime
    ledger: int
    ledger_settled: int
    polar: float
    beyond_tolerance: bool

    @property
    def difference(self) -> float:
        return self.polar - self.ledger

    @property
    def unexplained(self) -> float:
        """Units the lag cannot explain: Polar below the settled units, or above all."""
        if not self.beyond_tolerance:
            return 0.0
        return max(self.ledger_settled - self.polar, 0.0) + max(self.polar - self.ledger, 0.0)

    def as_json(self) -> dict[str, Any]:
        return {
            "customer": self.customer,
            "windowStart": self.start.isoformat(),
            "windowEnd": self.end.isoformat(),
            "ledger": self.ledger,
            "ledgerSettled": self.ledger_settled,
            "polar": self.polar,
            "difference": self.difference,
            "beyondTolerance": self.beyond_tolerance,
            # The names before issue 20, kept for scripts that read them.
            "accountId": self.customer,
            "exported": self.ledger,
            "exportedSettled": self.ledger_settled,
            "drift": self.difference,
        }


@dataclass(slots=True)
class ReconcileReport:
    checked_at: datetime
    since: datetime | None
    until: datetime | None
    window: Window
    meter_id: str
    unit: str
    tolerance: int
    lag_seconds: int
    accounts_checked: int = 0
    drifting: list[WindowDrift] = field(default_factory=list)  # per customer, non-zero only
    totals: list[WindowDrift] = field(default_factory=list)  # all customers, non-zero only
    pending_events: int = 0
    parked_events: int = 0

    @property
    def ok(self) -> bool:
        return not any(d.beyond_tolerance for d in self.drifting + self.totals)

    @property
    def total_drift(self) -> float:
        """Units outside the lag, summed over customers and buckets (the gauge)."""
        return sum(d.unexplained for d in self.drifting)

    @property
    def accounts_beyond(self) -> int:
        return len({d.customer for d in self.drifting if d.beyond_tolerance})

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checkedAt": self.checked_at.isoformat(),
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "windowStart": self.window.start.isoformat(),
            "windowEnd": self.window.end.isoformat(),
            "interval": self.window.interval,
            "meterId": self.meter_id,
            "unit": self.unit,
            "tolerance": self.tolerance,
            "lagSeconds": self.lag_seconds,
            "accountsChecked": self.accounts_checked,
            "totalDrift": self.total_drift,
            "accountsBeyondTolerance": self.accounts_beyond,
            "drifting": [d.as_json() for d in self.drifting],
            "totals": [d.as_json() for d in self.totals],
            "pendingEvents": self.pending_events,
            "parkedEvents": self.parked_events,
        }

    def as_table(self) -> str:
        w = self.window
        lines = [
            f"meter {self.meter_id} ({self.unit}), event time {w.start.isoformat()} to"
            f" {w.end.isoformat()} by {w.interval}, {self.accounts_checked} customers checked,"
            f" tolerance {self.tolerance}, lag {self.lag_seconds}s",
            f"{'customer':<38} {'window start (UTC)':<20} {'ledger':>16} {'polar':>16}"
            f" {'difference':>14}  beyond",
        ]
        for d in self.drifting + self.totals:
            lines.append(
                f"{d.customer:<38} {d.start.strftime('%Y-%m-%d %H:%M'):<20} {d.ledger:>16}"
                f" {d.polar:>16.0f} {d.difference:>14.0f}"
                f"  {'YES' if d.beyond_tolerance else 'no (within lag)'}"
            )
        if not self.drifting and not self.totals:
            lines.append("(no drift)")
        lines.append(
            f"pending export: {self.pending_events}, parked: {self.parked_events}"
            f" — {'OK' if self.ok else 'DRIFT BEYOND TOLERANCE'}"
        )
        return "\n".join(lines)


# ---------------------------------------------------------------- Polar's side

# How a customer is named in a quantities request: by external id or Polar id.
_Filter = tuple[Literal["external_customer_id", "customer_id"], str]


async def polar_customers(polar: PolarAsync, cfg: PolarConfig, meter_id: str) -> dict[str, _Filter]:
    """Every customer of the meter (``customer_meters.list``, paged): only who
    they are — their ``consumed_units`` reset every billing cycle, so they are
    not compared."""
    customers: dict[str, _Filter] = {}
    page = 1
    while page <= _MAX_PAGES:
        result = await call_with_retries(
            cfg,
            lambda p=page: polar.customer_meters.list(meter_id=meter_id, page=p, limit=100),  # type: ignore[misc]
        )
        for item in result.items:
            external = getattr(item.customer, "external_id", None)
            if external:
                customers[external] = ("external_customer_id", external)
            else:
                customers[f"polar:{item.customer_id}"] = ("customer_id", item.customer_id)
        if page >= result.pagination.max_page:
            break
        page += 1
    return customers


async def polar_quantities(
    polar: PolarAsync, cfg: PolarConfig, meter_id: str, window: Window, who: _Filter | None
) -> dict[datetime, float]:
    """Bucket start → Polar's quantity, over ``window``, for one customer or (None) all."""
    out: dict[datetime, float] = {}
    for start, end in window.chunks():
        # Polar's series runs from start to end inclusive, each bucket holding
        # [t, t + interval): ending a microsecond early asks for no bucket past
        # the window, and buckets outside it are ignored anyway.
        kwargs: dict[str, Any] = {
            "start_timestamp": start.isoformat(),
            "end_timestamp": (end - timedelta(microseconds=1)).isoformat(),
            "interval": window.interval,
            "timezone": "UTC",
        }
        if who is not None:
            kwargs[who[0]] = who[1]
        result = await call_with_retries(
            cfg,
            lambda kw=kwargs: polar.meters.quantities(meter_id, **kw),  # type: ignore[misc]
        )
        for q in result.quantities:
            at = datetime.fromisoformat(q.timestamp.replace("Z", "+00:00")).astimezone(UTC)
            if start <= at < end and q.quantity:
                out[at] = out.get(at, 0.0) + float(q.quantity)
    return out


# ---------------------------------------------------------------- the ledger's side


async def exported_by_window(
    db: Db, unit: str, window: Window, now: datetime, lag_seconds: int
) -> dict[str, dict[datetime, tuple[int, int]]]:
    """Account id → bucket start → (units acknowledged with an event time in the
    bucket, of which acknowledged longer than the lag before ``now``)."""
    column = _COLUMN[unit]  # from a fixed map, never from input
    rows = await db.fetch(
        f"""
        SELECT account_id,
               date_trunc($3::text, event_minute, 'UTC') AS bucket,
               SUM({column})::bigint AS total,
               (SUM({column}) FILTER (
                   WHERE minute + interval '1 minute'
                         <= $4::timestamptz - $5::integer * interval '1 second'
               ))::bigint AS settled
        FROM polar_export_totals
        WHERE event_minute >= $1::timestamptz AND event_minute < $2::timestamptz
        GROUP BY 1, 2
        """,  # noqa: S608 — the column comes from _COLUMN
        window.start,
        window.end,
        window.interval,
        now,
        lag_seconds,
    )
    out: dict[str, dict[datetime, tuple[int, int]]] = {}
    for r in rows:
        bucket = r["bucket"].astimezone(UTC)
        out.setdefault(str(r["account_id"]), {})[bucket] = (r["total"], r["settled"] or 0)
    return out


async def _first_event_minute(db: Db) -> datetime | None:
    at: datetime | None = await db.fetchval("SELECT min(event_minute) FROM polar_export_totals")
    return at


async def resolve_window(
    db: Db, since: datetime | None, until: datetime | None, now: datetime
) -> Window:
    """The CLI's window: ``--since`` (default: the first exported event) to
    ``--until`` (default: now), in whole buckets. It starts no earlier than
    the first exported event: before it the ledger has nothing to compare."""
    end = until or now
    first = await _first_event_minute(db)
    start = since or first or end - timedelta(days=1)
    if first is not None and start < first < end:
        start = first
    return Window.covering(start, max(end, start))


# ---------------------------------------------------------------- comparison


def _compare(
    customer: str,
    ledger: dict[datetime, tuple[int, int]],
    polar: dict[datetime, float],
    window: Window,
    tolerance: int,
) -> list[WindowDrift]:
    rows = []
    for bucket in sorted(set(ledger) | set(polar)):
        exported, settled = ledger.get(bucket, (0, 0))
        counted = polar.get(bucket, 0.0)
        if counted == exported:
            continue
        beyond = counted < settled - tolerance or counted > exported + tolerance
        end = min(bucket + _STEP[window.interval], window.end)
        rows.append(WindowDrift(customer, bucket, end, exported, settled, counted, beyond))
    return rows


def _unaccounted(everyone: dict[datetime, float], customers: Any) -> bool:
    """Whether Polar's total differs from the sum of the customers asked about."""
    summed: dict[datetime, float] = {}
    for quantities in customers:
        for bucket, q in quantities.items():
            summed[bucket] = summed.get(bucket, 0.0) + q
    buckets = set(everyone) | set(summed)
    return any(everyone.get(b, 0.0) != summed.get(b, 0.0) for b in buckets)


async def reconcile(
    db: Db,
    polar: PolarAsync,
    cfg: PolarConfig,
    since: datetime | None = None,
    *,
    until: datetime | None = None,
    window: Window | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> ReconcileReport:
    """Compare Polar's meter quantities with the ledger's exported units over
    one window of event time, per customer and bucket and in total; set the
    drift gauges. ``window`` overrides ``since``/``until``; ``clock`` is "now"
    for the lag and the default window."""
    if cfg.meter_id is None:
        raise ReconcileUnavailable("polar.meter_id is not configured")
    meter_id = cfg.meter_id
    now = clock()
    if window is None:
        window = await resolve_window(db, since, until, now)
    report = ReconcileReport(
        checked_at=now,
        since=since,
        until=until,
        window=window,
        meter_id=meter_id,
        unit=cfg.meter_property,
        tolerance=cfg.reconcile_tolerance,
        lag_seconds=cfg.reconcile_lag_seconds,
    )
    ledger = await exported_by_window(
        db, cfg.meter_property, window, now, cfg.reconcile_lag_seconds
    )
    gate = asyncio.Semaphore(_CONCURRENCY)

    async def counted(who: _Filter | None) -> dict[datetime, float]:
        async with gate:
            return await polar_quantities(polar, cfg, meter_id, window, who)

    async def count_all(customers: dict[str, _Filter]) -> dict[str, dict[datetime, float]]:
        names = sorted(customers)
        found = await asyncio.gather(*(counted(customers[c]) for c in names))
        return dict(zip(names, found, strict=True))

    # Every customer the ledger exported for in the window, and the total.
    polar_side = await count_all({a: ("external_customer_id", a) for a in ledger})
    everyone = await counted(None)
    if _unaccounted(everyone, polar_side.values()):
        # Polar counts units of customers the ledger sent nothing for in the
        # window: ask for every customer of the meter to name them.
        others = await polar_customers(polar, cfg, meter_id)
        polar_side |= await count_all({k: v for k, v in others.items() if k not in polar_side})
    names = sorted(polar_side)
    per_customer = [polar_side[n] for n in names]
    tol = cfg.reconcile_tolerance
    ledger_total: dict[datetime, tuple[int, int]] = {}
    for buckets in ledger.values():
        for bucket, (exported, settled) in buckets.items():
            e, s = ledger_total.get(bucket, (0, 0))
            ledger_total[bucket] = (e + exported, s + settled)
    for name, quantities in zip(names, per_customer, strict=True):
        report.drifting += _compare(name, ledger.get(name, {}), quantities, window, tol)
    report.totals = _compare(TOTAL, ledger_total, everyone, window, tol)
    report.accounts_checked = len(names)
    report.parked_events = await db.fetchval("SELECT count(*) FROM polar_parked_events")
    report.pending_events, _ = await backlog(db)
    METER_DRIFT.set(report.total_drift)
    METER_DRIFT_ACCOUNTS.set(report.accounts_beyond)
    return report


async def run_periodically(
    database_url: str, polar: PolarAsync, cfg: PolarConfig, clock: Callable[[], datetime] = utcnow
) -> None:
    """Reconcile the trailing window every ``reconcile_interval_seconds``, in
    one process at a time."""
    interval = cfg.reconcile_interval_seconds
    while True:
        await asyncio.sleep(interval)
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(database_url)
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RECONCILE_LOCK_KEY):
                continue  # another process reconciles
            window = Window.trailing(clock(), cfg.reconcile_lag_seconds, cfg.reconcile_window_hours)
            report = await reconcile(conn, polar, cfg, window=window, clock=clock)
            log_fn = log.info if report.ok else log.error
            log_fn(
                "polar meter reconciled",
                extra={
                    "ok": report.ok,
                    "window_start": window.start.isoformat(),
                    "window_end": window.end.isoformat(),
                    "accounts_checked": report.accounts_checked,
                    "accounts_drifting": report.accounts_beyond,
                    "total_drift": report.total_drift,
                },
            )
        except Exception:
            log.warning("polar reconciliation failed", exc_info=True)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(conn.close(timeout=2))
