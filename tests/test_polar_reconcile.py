"""Reconciliation of Polar's meter with the ledger's exports: zero in sync, exact when not."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from polar.v2026_10 import PolarAsync

from creditgate.billing.export import UsageExporter
from creditgate.billing.metrics import METER_DRIFT
from creditgate.billing.reconcile import reconcile
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


async def export_everything(db: asyncpg.Pool, polar: PolarAsync, cfg: PolarConfig) -> None:
    """Run the exporter until nothing is pending (the session's whole ledger)."""
    exporter = UsageExporter(polar, cfg)

    async def drained() -> bool:
        async with db.acquire() as conn:
            await exporter.export_once(conn)
            pending, _ = await exporter.update_gauges(conn)
        return pending == 0

    await eventually(drained, what="the whole ledger to be exported")


async def test_in_sync_means_zero_drift(
    db: asyncpg.Pool, polar: PolarAsync, cfg: PolarConfig, customer_factory
) -> None:
    c = await customer_factory(50)
    for cost in (1_500_000, 250_001, 7):
        await settle_debit(db, c.account.id, cost=cost)
    await export_everything(db, polar, cfg)
    report = await reconcile(db, polar, cfg)
    assert report.ok, report.as_table()
    assert report.drifting == []
    assert report.accounts_checked >= 1
    assert report.pending_events == 0
    assert METER_DRIFT._value.get() == 0


async def test_a_meter_that_differs_is_reported_with_its_exact_drift(
    db: asyncpg.Pool, fake: FakePolar, polar: PolarAsync, cfg: PolarConfig, customer_factory
) -> None:
    over, under = await customer_factory(50), await customer_factory(50)
    for c in (over, under):
        await settle_debit(db, c.account.id, cost=2_000_000)
    await export_everything(db, polar, cfg)
    fake.meter_offsets[str(over.account.id)] = 1234.0  # Polar counts more than we sent
    fake.meter_offsets[str(under.account.id)] = -250.0  # Polar has not counted it all yet

    lagging = dataclasses.replace(cfg, reconcile_lag_seconds=3600, reconcile_tolerance=10)
    report = await reconcile(db, polar, lagging)
    drift = {d.account: d for d in report.drifting}
    assert drift[str(over.account.id)].drift == 1234.0
    assert drift[str(over.account.id)].beyond_tolerance  # more than exported: never lag
    assert drift[str(under.account.id)].drift == -250.0
    assert not drift[str(under.account.id)].beyond_tolerance  # fresh: inside the lag
    assert not report.ok
    assert METER_DRIFT._value.get() == report.total_drift >= 1484.0

    # An hour and a half later the same shortfall is no longer lag.
    await db.execute(
        "UPDATE polar_export_totals SET minute = minute - interval '90 minutes'"
        " WHERE account_id = $1",
        under.account.id,
    )
    report = await reconcile(db, polar, lagging)
    drift = {d.account: d for d in report.drifting}
    assert drift[str(under.account.id)].drift == -250.0
    assert drift[str(under.account.id)].beyond_tolerance
    # Inside the tolerance it is not.
    tolerant = dataclasses.replace(lagging, reconcile_tolerance=300)
    report = await reconcile(db, polar, tolerant)
    assert not {d.account: d for d in report.drifting}[str(under.account.id)].beyond_tolerance


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


async def test_the_cli_exits_non_zero_on_drift_beyond_tolerance(
    db: asyncpg.Pool,
    services: Services,
    fake: FakePolar,
    polar: PolarAsync,
    cfg: PolarConfig,
    customer_factory,
    tmp_path: Path,
) -> None:
    c = await customer_factory(50)
    await settle_debit(db, c.account.id, cost=3_000_000)
    await export_everything(db, polar, cfg)
    config = tmp_path / "creditgate.toml"
    config.write_text(billing_toml("http://127.0.0.1:9/v1"))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": services.database_url,
        "CREDITGATE_CONFIG": str(config),
        "POLAR_ACCESS_TOKEN": TOKEN,
        "POLAR_BASE_URL": fake.url,
    }
    code, report = await run_cli(env, "--since", "2000-01-01")
    assert code == 0, report
    assert report["ok"] is True and report["drifting"] == []
    assert report["since"] == "2000-01-01T00:00:00+00:00"

    fake.meter_offsets[str(c.account.id)] = 42.0
    code, report = await run_cli(env)
    assert code == 1
    assert report["ok"] is False
    assert report["drifting"] == [
        {
            "accountId": str(c.account.id),
            "polar": 3_000_042.0,
            "exported": 3_000_000,
            "exportedSettled": 0,
            "drift": 42.0,
            "beyondTolerance": True,
        }
    ]
    code, report = await run_cli({**env, "POLAR_ACCESS_TOKEN": ""})
    assert code == 1 and report["error"]["code"] == "CONFIG_ERROR"


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
    fake.meter_offsets[str(c.account.id)] = 777.0
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
