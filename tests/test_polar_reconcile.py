"""Reconciliation of Polar's meter with the ledger's exports, by window of event time:
zero in sync (billing-cycle resets included), exact per customer and window when not.

Each test places its events in its own past hours by injecting the exporter's
clock (the event timestamp sent is the exporter's "now" minus a second when
the debit is younger), and checks only windows around them: the fake Polar
and the database live for the whole session, so other tests' events exist too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from polar.v2026_10 import PolarAsync

from creditgate.billing.export import UsageExporter
from creditgate.billing.metrics import METER_DRIFT, METER_DRIFT_ACCOUNTS
from creditgate.billing.reconcile import TOTAL, Window, reconcile
from creditgate.config import PolarConfig
from tests.billing_support import (
    billing_settings,
    billing_toml,
    eventually,
    settle_debit,
)
from tests.conftest import Services
from tests.polar_fake import TOKEN, FakePolar


@pytest.fixture
def cfg(services: Services, fake: FakePolar) -> PolarConfig:
    return billing_settings(services, "http://127.0.0.1:9/v1", fake.url).config.polar


@pytest.fixture
async def polar(fake: FakePolar) -> AsyncIterator[PolarAsync]:
    async with PolarAsync(TOKEN, base_url=fake.url, timeout=2) as client:
        yield client


def past_hour(days: int) -> datetime:
    """A whole UTC hour ``days`` ago: each test's own stretch of event time."""
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return now - timedelta(days=days)


def at(instant: datetime) -> Callable[[], datetime]:
    return lambda: instant


async def export_everything(
    db: asyncpg.Pool,
    polar: PolarAsync,
    cfg: PolarConfig,
    clock: Callable[[], datetime] | None = None,
) -> None:
    """Run the exporter until nothing is pending (the session's whole ledger).

    With ``clock``, the exporter's now is that instant: every debit older than
    it is sent with the timestamp ``clock() - 1 s`` and recorded as exported then.
    """
    exporter = UsageExporter(polar, cfg, clock) if clock else UsageExporter(polar, cfg)

    async def drained() -> bool:
        async with db.acquire() as conn:
            await exporter.export_once(conn)
            pending, _ = await exporter.update_gauges(conn)
        return pending == 0

    await eventually(drained, what="the whole ledger to be exported")


def rows(report: Any, customer: str) -> list[tuple[datetime, int, float, bool]]:
    """(window start, ledger, Polar, beyond tolerance) of a customer's drift rows."""
    return [
        (d.start, d.ledger, d.polar, d.beyond_tolerance)
        for d in report.drifting
        if d.customer == customer
    ]


async def test_in_sync_means_zero_drift(
    db: asyncpg.Pool, polar: PolarAsync, cfg: PolarConfig, customer_factory
) -> None:
    c = await customer_factory(50)
    for cost in (1_500_000, 250_001, 7):
        await settle_debit(db, c.account.id, cost=cost)
    await export_everything(db, polar, cfg)
    now = datetime.now(UTC)
    report = await reconcile(db, polar, cfg, since=now - timedelta(minutes=5), until=now)
    assert rows(report, str(c.account.id)) == []
    assert report.accounts_checked >= 1
    assert report.pending_events == 0
    assert report.window.interval == "hour"
    assert report.window.start <= now - timedelta(minutes=5) and report.window.end >= now


async def test_after_a_billing_cycle_reset_the_drift_is_zero(
    db: asyncpg.Pool, fake: FakePolar, polar: PolarAsync, cfg: PolarConfig, customer_factory
) -> None:
    """Polar zeroes a subscription customer's ``consumed_units`` after each invoice;
    the quantities by event time do not change, so neither does reconciliation."""
    c = await customer_factory(50)
    customer = str(c.account.id)
    cycle = past_hour(days=10)
    await settle_debit(db, c.account.id, cost=2_000_000)
    await export_everything(db, polar, cfg, at(cycle + timedelta(minutes=10)))
    fake.reset_meter(customer)  # the invoice of the cycle
    await settle_debit(db, c.account.id, cost=300_000)
    await export_everything(db, polar, cfg, at(cycle + timedelta(minutes=70)))

    meters = await polar.customer_meters.list(external_customer_id=customer)
    assert [m.consumed_units for m in meters.items] == [300_000.0]  # the reset happened

    report = await reconcile(db, polar, cfg, since=cycle, until=cycle + timedelta(hours=2))
    assert rows(report, customer) == [], report.as_table()
    assert [d for d in report.totals if d.beyond_tolerance] == []
    assert report.ok, report.as_table()
    assert METER_DRIFT._value.get() == 0
    assert METER_DRIFT_ACCOUNTS._value.get() == 0


async def test_a_loss_before_a_cycle_reset_is_not_masked_by_the_reset(
    db: asyncpg.Pool, fake: FakePolar, polar: PolarAsync, cfg: PolarConfig, customer_factory
) -> None:
    """An event lost in one billing cycle is still reported after Polar resets the
    meter: the reset zeroes ``consumed_units``, never the quantities by event time."""
    c = await customer_factory(50)
    customer = str(c.account.id)
    cycle = past_hour(days=10)
    await settle_debit(db, c.account.id, cost=2_000_000)
    lost = await settle_debit(db, c.account.id, cost=77_777)
    fake.lose(str(lost))
    await export_everything(db, polar, cfg, at(cycle + timedelta(minutes=10)))
    fake.reset_meter(customer)  # the invoice of the cycle
    await settle_debit(db, c.account.id, cost=300_000)
    await export_everything(db, polar, cfg, at(cycle + timedelta(minutes=70)))

    meters = await polar.customer_meters.list(external_customer_id=customer)
    assert [m.consumed_units for m in meters.items] == [300_000.0]  # the reset happened

    report = await reconcile(db, polar, cfg, since=cycle, until=cycle + timedelta(hours=2))
    assert rows(report, customer) == [(cycle, 2_077_777, 2_000_000.0, True)], report.as_table()
    assert not report.ok
    assert METER_DRIFT._value.get() == 77_777
    assert METER_DRIFT_ACCOUNTS._value.get() == 1


async def test_a_lost_event_is_reported_for_exactly_its_customer_and_window(
    db: asyncpg.Pool, fake: FakePolar, polar: PolarAsync, cfg: PolarConfig, customer_factory
) -> None:
    hit, spared = await customer_factory(50), await customer_factory(50)
    base = past_hour(days=11)
    await settle_debit(db, hit.account.id, cost=1_000_000)
    await settle_debit(db, spared.account.id, cost=1_000_000)
    await export_everything(db, polar, cfg, at(base + timedelta(minutes=30)))
    lost = await settle_debit(db, hit.account.id, cost=424_242)
    await settle_debit(db, spared.account.id, cost=5)
    fake.lose(str(lost))
    await export_everything(db, polar, cfg, at(base + timedelta(hours=2, minutes=15)))
    assert fake.stored(str(lost)) is None  # acknowledged, never counted

    report = await reconcile(db, polar, cfg, since=base, until=base + timedelta(hours=4))
    assert rows(report, str(hit.account.id)) == [(base + timedelta(hours=2), 424_242, 0.0, True)], (
        report.as_table()
    )
    assert rows(report, str(spared.account.id)) == []
    drift = next(d for d in report.drifting if d.customer == str(hit.account.id))
    assert (drift.end, drift.difference) == (base + timedelta(hours=3), -424_242.0)
    assert [(d.customer, d.start, d.difference) for d in report.totals] == [
        (TOTAL, base + timedelta(hours=2), -424_242.0)
    ]
    assert not report.ok
    assert METER_DRIFT._value.get() == 424_242
    assert METER_DRIFT_ACCOUNTS._value.get() == 1
    assert str(hit.account.id) in report.as_table()

    # The windows before and after hold no drift.
    report = await reconcile(db, polar, cfg, since=base, until=base + timedelta(hours=2))
    assert report.ok and report.drifting == [], report.as_table()


async def test_a_window_edge_splits_events_by_their_timestamp_exactly(
    db: asyncpg.Pool, fake: FakePolar, polar: PolarAsync, cfg: PolarConfig, customer_factory
) -> None:
    c = await customer_factory(50)
    customer = str(c.account.id)
    edge = past_hour(days=12)
    before = await settle_debit(db, c.account.id, cost=111)
    # The exporter sends "now - 1 s" for a debit younger than that: these two
    # clocks put the events a microsecond before the hour and exactly on it.
    await export_everything(db, polar, cfg, at(edge + timedelta(seconds=1, microseconds=-1)))
    on = await settle_debit(db, c.account.id, cost=2_222)
    await export_everything(db, polar, cfg, at(edge + timedelta(seconds=1)))
    assert fake.stored(str(before))["timestamp"] == (edge - timedelta(microseconds=1)).isoformat()
    assert fake.stored(str(on))["timestamp"] == edge.isoformat()

    earlier = await reconcile(db, polar, cfg, since=edge - timedelta(hours=1), until=edge)
    later = await reconcile(db, polar, cfg, since=edge, until=edge + timedelta(hours=1))
    assert earlier.ok and later.ok and rows(earlier, customer) == rows(later, customer) == []

    # Losing Polar's copy of each in turn shows which window each one is in.
    # (A second customer, so the first one's events stay in sync.)
    d = await customer_factory(50)
    other = str(d.account.id)
    fake.lose(str(await settle_debit(db, d.account.id, cost=333)))
    await export_everything(db, polar, cfg, at(edge + timedelta(seconds=1, microseconds=-1)))
    fake.lose(str(await settle_debit(db, d.account.id, cost=4_444)))
    await export_everything(db, polar, cfg, at(edge + timedelta(seconds=1)))
    both = await reconcile(
        db, polar, cfg, since=edge - timedelta(hours=1), until=edge + timedelta(hours=1)
    )
    assert rows(both, other) == [
        (edge - timedelta(hours=1), 333, 0.0, True),
        (edge, 4_444, 0.0, True),
    ]
    assert rows(both, customer) == []
    only_later = await reconcile(db, polar, cfg, since=edge, until=edge + timedelta(minutes=1))
    assert rows(only_later, other) == [(edge, 4_444, 0.0, True)]


@pytest.mark.parametrize("second", [55.0, 59.9])
async def test_the_lag_is_counted_on_the_injected_clock(
    second: float,
    db: asyncpg.Pool,
    fake: FakePolar,
    polar: PolarAsync,
    cfg: PolarConfig,
    customer_factory,
) -> None:
    """A shortfall is within the lag until the export minute has ended the lag ago,
    whatever second of the minute the check runs at (issue 16's flaky test)."""
    c = await customer_factory(50)
    customer = str(c.account.id)
    minute = past_hour(days=13 + int(second)) + timedelta(minutes=17)
    exported_at = minute + timedelta(seconds=second)
    fake.lose(str(await settle_debit(db, c.account.id, cost=9_000)))
    await export_everything(db, polar, cfg, at(exported_at))
    window = Window.covering(minute - timedelta(hours=1), minute + timedelta(hours=1))

    lagging = dataclasses.replace(cfg, reconcile_lag_seconds=3600, reconcile_tolerance=10)
    same_minute = await reconcile(db, polar, cfg, window=window, clock=at(exported_at))
    assert rows(same_minute, customer) == [(minute.replace(minute=0), 9_000, 0.0, False)]
    assert same_minute.ok and METER_DRIFT._value.get() == 0
    next_minute = await reconcile(
        db, polar, cfg, window=window, clock=at(minute + timedelta(minutes=1))
    )
    assert rows(next_minute, customer) == [(minute.replace(minute=0), 9_000, 0.0, True)]
    assert METER_DRIFT._value.get() == 9_000

    # With an hour's lag: not before the minute's end plus an hour.
    later = at(minute + timedelta(minutes=1, hours=1) - timedelta(microseconds=1))
    report = await reconcile(db, polar, lagging, window=window, clock=later)
    assert rows(report, customer) == [(minute.replace(minute=0), 9_000, 0.0, False)]
    report = await reconcile(
        db, polar, lagging, window=window, clock=at(minute + timedelta(minutes=1, hours=1))
    )
    assert rows(report, customer) == [(minute.replace(minute=0), 9_000, 0.0, True)]


async def test_more_than_sent_is_never_lag_and_the_tolerance_applies(
    db: asyncpg.Pool, fake: FakePolar, polar: PolarAsync, cfg: PolarConfig, customer_factory
) -> None:
    c = await customer_factory(50)
    customer = str(c.account.id)
    base = past_hour(days=20)
    await settle_debit(db, c.account.id, cost=2_000_000)
    await export_everything(db, polar, cfg, at(base + timedelta(minutes=5)))
    fake.count_extra(customer, base + timedelta(minutes=6), 250)
    window = Window.covering(base, base + timedelta(hours=1))
    lagging = dataclasses.replace(cfg, reconcile_lag_seconds=10 * 86400)
    report = await reconcile(db, polar, lagging, window=window)
    assert rows(report, customer) == [(base, 2_000_000, 2_000_250.0, True)]
    tolerant = dataclasses.replace(lagging, reconcile_tolerance=250)
    report = await reconcile(db, polar, tolerant, window=window)
    assert rows(report, customer) == [(base, 2_000_000, 2_000_250.0, False)]
    assert report.ok


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "creditgate",
        "reconcile",
        "--json",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None and out, err.decode()
    return proc.returncode, orjson.loads(out)


@pytest.mark.parametrize("second", [55.0, 59.9])
async def test_the_cli_exits_non_zero_on_drift_beyond_tolerance(
    second: float,
    db: asyncpg.Pool,
    services: Services,
    fake: FakePolar,
    polar: PolarAsync,
    cfg: PolarConfig,
    customer_factory,
    tmp_path: Path,
) -> None:
    """The exports happen at hh:mm:55 and hh:mm:59.9 of a past minute (the
    exporter's clock injected): the report cannot depend on when the CLI runs."""
    c = await customer_factory(50)
    customer = str(c.account.id)
    minute = past_hour(days=30 + int(second)) + timedelta(minutes=42)
    exported_at = minute + timedelta(seconds=second)
    await settle_debit(db, c.account.id, cost=3_000_000)
    await export_everything(db, polar, cfg, at(exported_at))
    config = tmp_path / "creditgate.toml"
    config.write_text(billing_toml("http://127.0.0.1:9/v1"))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": services.database_url,
        "CREDITGATE_CONFIG": str(config),
        "POLAR_ACCESS_TOKEN": TOKEN,
        "POLAR_BASE_URL": fake.url,
    }
    since, until = minute.isoformat(), (minute + timedelta(minutes=1)).isoformat()
    code, report = await run_cli(env, "--since", since, "--until", until)
    assert code == 0, report
    assert report["ok"] is True and report["drifting"] == [] and report["totals"] == []
    assert report["since"] == since and report["until"] == until
    assert report["windowStart"] == minute.replace(minute=0).isoformat()
    assert report["interval"] == "hour"

    fake.lose(str(await settle_debit(db, c.account.id, cost=42)))
    await export_everything(db, polar, cfg, at(exported_at))
    code, report = await run_cli(env, "--since", since, "--until", until)
    assert code == 1
    assert report["ok"] is False
    hour = minute.replace(minute=0)
    assert report["drifting"] == [
        {
            "customer": customer,
            "accountId": customer,
            "windowStart": hour.isoformat(),
            "windowEnd": (hour + timedelta(hours=1)).isoformat(),
            "ledger": 3_000_042,
            "ledgerSettled": 3_000_042,
            "polar": 3_000_000.0,
            "difference": -42.0,
            "beyondTolerance": True,
            "exported": 3_000_042,
            "exportedSettled": 3_000_042,
            "drift": -42.0,
        }
    ]
    assert report["totalDrift"] == 42.0
    code, report = await run_cli(env, "--since", until, "--until", since)
    assert code == 1 and report["error"]["code"] == "VALIDATION_ERROR"
    code, report = await run_cli({**env, "POLAR_ACCESS_TOKEN": ""})
    assert code == 1 and report["error"]["code"] == "CONFIG_ERROR"


def test_the_window_hours_are_configured_within_polars_hourly_limit() -> None:
    import tomllib
    from decimal import Decimal

    from creditgate.config import ConfigError, parse_config

    def parsed(extra: str) -> PolarConfig:
        text = billing_toml("http://127.0.0.1:9/v1").replace("[polar]\n", "[polar]\n" + extra)
        return parse_config(tomllib.loads(text, parse_float=Decimal), {}).polar

    assert parsed("").reconcile_window_hours == 24
    assert parsed("reconcile_window_hours = 168\n").reconcile_window_hours == 168
    for bad in ("169", "0", '"24"'):
        with pytest.raises(ConfigError, match="reconcile_window_hours"):
            parsed(f"reconcile_window_hours = {bad}\n")


def test_the_trailing_window_ends_with_the_lag_and_slides() -> None:
    now = datetime(2026, 12, 4, 15, 20, 5, tzinfo=UTC)
    w = Window.trailing(now, lag_seconds=3 * 3600, hours=24)
    assert (w.start, w.end, w.interval) == (
        datetime(2026, 12, 3, 13, tzinfo=UTC),
        datetime(2026, 12, 4, 13, tzinfo=UTC),
        "hour",
    )
    later = Window.trailing(now + timedelta(hours=1), lag_seconds=3 * 3600, hours=24)
    assert later.start - w.start == later.end - w.end == timedelta(hours=1)
    assert Window.covering(now, now + timedelta(days=8)).interval == "day"
    assert len(Window.covering(now, now + timedelta(days=800)).chunks()) == 3


async def test_the_server_reconciles_periodically_and_sets_the_gauge(
    db: asyncpg.Pool,
    services: Services,
    upstream: Any,
    fake: FakePolar,
    polar: PolarAsync,
    cfg: PolarConfig,
    customer_factory,
) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from creditgate.http.app import create_app

    c = await customer_factory(50)
    await settle_debit(db, c.account.id, cost=1_000_000)
    await export_everything(db, polar, cfg)
    # Polar counts 777 more than was sent, this hour (inside the trailing window).
    fake.count_extra(str(c.account.id), datetime.now(UTC) - timedelta(seconds=5), 777)
    settings = billing_settings(services, str(upstream.make_url("/v1")), fake.url)
    settings = dataclasses.replace(
        settings,
        config=dataclasses.replace(
            settings.config, polar=dataclasses.replace(cfg, reconcile_interval_seconds=1)
        ),
    )
    async with TestClient(TestServer(create_app(settings))):

        async def gauge_set() -> bool:
            return METER_DRIFT._value.get() == 777.0

        await eventually(gauge_set, what="a periodic reconciliation")
