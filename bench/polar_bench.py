"""Polar adapter throughput and latency, against the tests' local Polar.

* **Export**: N settled debits, exported by the real ``UsageExporter``
  through polar-sdk to the local Polar (batches of 100), round after round
  until none is left: events per second, and the time per round.
* **Webhook receipt**: signed ``order.paid`` deliveries POSTed one at a time
  to a running creditgate app: the time until its 202 (verify + store), while
  the worker applies the earlier ones in the same process.

The local Polar answers in well under a millisecond, so the export figure is
creditgate's side of the cost (Postgres + SDK + HTTP); against the real Polar
the round trip adds to every round, and Polar's API limit (500 requests/min)
caps export at 50,000 events/min with batches of 100.

Uses a throwaway database on ``DATABASE_URL``'s server and ``REDIS_URL`` (or
embedded ones). Run from the repo root:

    .venv/bin/python bench/polar_bench.py [--events 5000] [--webhooks 500]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import tomllib
import uuid
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
from aiohttp.test_utils import TestClient, TestServer
from polar.v2026_10 import PolarAsync

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from creditgate import ledger, migrations
from creditgate.billing.export import UsageExporter
from creditgate.config import Settings, parse_config
from creditgate.http.app import create_app
from tests.billing_support import PACK, POLAR_WEBHOOK_SECRET, billing_toml
from tests.polar_fake import TOKEN, FakePolar, order_payload, sign_polar, webhook_body


def _db_url(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def _ms(samples: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(samples, n=100)
    return {
        "p50_ms": round(statistics.median(samples) * 1000, 3),
        "p90_ms": round(qs[89] * 1000, 3),
        "p99_ms": round(qs[98] * 1000, 3),
    }


async def bench_export(
    db_url: str, fake: FakePolar, settings: Settings, n: int
) -> dict[str, object]:
    conn = await asyncpg.connect(db_url)
    account = await ledger.ensure_account(conn, "user", f"user_bench_{uuid.uuid4().hex}")
    await ledger.post_entry(
        conn,
        account_id=account.id,
        amount=10**12,
        kind="grant",
        idempotency_key=f"bench:{uuid.uuid4()}",
        reason="bench",
    )
    for _ in range(n):
        hold = await ledger.reserve_hold(
            conn, hold_id=uuid.uuid4(), account_id=account.id, amount=1000, ttl_seconds=900
        )
        await ledger.settle_hold(conn, hold.id, ledger.Usage(100, 20, 900))
    async with PolarAsync(TOKEN, base_url=fake.url, timeout=10) as polar:
        exporter = UsageExporter(polar, settings.config.polar)
        rounds: list[float] = []
        started = time.perf_counter()
        deadline = started + 600
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            if await exporter.export_once(conn) == 0:
                if (await exporter.update_gauges(conn))[0] == 0:
                    break
                await asyncio.sleep(0.01)  # an older transaction elsewhere: wait for it
                continue
            rounds.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
    await conn.close()
    return {
        "events": n,
        "seconds": round(elapsed, 3),
        "events_per_s": round(n / elapsed),
        "rounds": len(rounds),
        "round": _ms(rounds) if len(rounds) > 1 else None,
    }


async def bench_webhooks(db_url: str, settings: Settings, n: int) -> dict[str, float]:
    conn = await asyncpg.connect(db_url)
    account = await ledger.ensure_account(conn, "user", f"user_bench_{uuid.uuid4().hex}")
    await conn.close()
    samples: list[float] = []
    async with TestClient(TestServer(create_app(settings))) as client:
        account_id = str(account.id)
        for i in range(n + 50):
            body = webhook_body(
                "order.paid",
                order_payload(order_id=str(uuid.uuid4()), account_id=account_id, product_id=PACK),
            )
            headers = sign_polar(body, POLAR_WEBHOOK_SECRET)
            t0 = time.perf_counter()
            resp = await client.post("/api/webhooks/polar", data=body, headers=headers)
            elapsed = time.perf_counter() - t0
            assert resp.status == 202, await resp.text()
            if i >= 50:  # warm-up
                samples.append(elapsed)
    return _ms(samples)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--webhooks", type=int, default=500)
    args = parser.parse_args()

    stops = []
    base = os.environ.get("DATABASE_URL")
    redis_url = os.environ.get("REDIS_URL")
    data = Path(tempfile.mkdtemp(prefix="cg-polar-bench-"))
    if not base:
        from creditgate.embedded import EmbeddedPostgres

        pg = EmbeddedPostgres(data)
        stops.append(pg.stop)
        base = pg.url
    if not redis_url:
        from creditgate.embedded import EmbeddedRedis

        rd = EmbeddedRedis(data)
        stops.append(rd.stop)
        redis_url = rd.url
    name = f"cg_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(base)
    await admin.execute(f'CREATE DATABASE "{name}"')
    db_url = _db_url(base, name)
    fake = FakePolar()
    fake.start()
    try:
        conn = await asyncpg.connect(db_url)
        await migrations.migrate(conn)
        await conn.close()
        raw = tomllib.loads(billing_toml("http://127.0.0.1:9/v1"), parse_float=Decimal)
        config = parse_config(raw, {})
        config = dataclasses.replace(
            config, polar=dataclasses.replace(config.polar, batch_size=100)
        )
        settings = Settings(
            config=config,
            database_url=db_url,
            redis_url=redis_url,
            polar_access_token=None,  # no background exporter competing with the bench
            polar_webhook_secret=POLAR_WEBHOOK_SECRET,
        )
        result = {
            "export": await bench_export(db_url, fake, settings, args.events),
            "webhook_receipt": await bench_webhooks(db_url, settings, args.webhooks),
        }
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    finally:
        fake.stop()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        for stop in reversed(stops):
            stop()


if __name__ == "__main__":
    asyncio.run(main())
