"""Shared pieces of the billing and webhook tests: settings, the session's fake Polar, debits."""

from __future__ import annotations

import asyncio
import atexit
import time
import tomllib
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient

from creditgate import ledger
from creditgate.config import Config, Settings, parse_config
from tests.conftest import TEST_CONFIG, Services
from tests.logcapture import remember_secret
from tests.polar_fake import EVENT_NAME, METER_ID, TOKEN, FakePolar, sign_polar, webhook_body

PACK = "8a7f0d4e-1f6c-4a59-9d3b-0c1e2f3a4b5c"  # a one-time credit pack: 10 credits
PRO = "3c9e7b21-5d4f-4e8a-b6c1-7f2a9d0e1b3c"  # a monthly plan: 25 credits a period, tier pro
POLAR_WEBHOOK_SECRET = "whsec_polar_" + "k3yM4t3r1al" * 3  # Polar's: used whole
CLERK_WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a valid Svix secret

# No log line of the run may hold these (tests/test_zz_log_secrecy.py).
remember_secret(TOKEN, POLAR_WEBHOOK_SECRET, CLERK_WEBHOOK_SECRET)

BILLING_TOML = f"""
[tiers.pro]
requests_per_minute = 5000
tokens_per_minute = 10000000
max_parallel = 100
messages_per_day = 1000000

[products."{PACK}"]
kind = "pack"
credits = 10

[products."{PRO}"]
kind = "subscription"
credits = 25
tier = "pro"
name = "Pro"

[polar]
event_name = "{EVENT_NAME}"
meter_id = "{METER_ID}"
meter_property = "credits"
batch_size = 7
export_interval_seconds = 0.2
request_timeout_seconds = 0.5
max_attempts = 6
retry_initial_seconds = 0.01
retry_max_seconds = 0.2
reconcile_interval_seconds = 0
reconcile_lag_seconds = 0
success_url = "https://app.example.com/billing/done"
"""

_FAKE: FakePolar | None = None


def shared_fake_polar() -> FakePolar:
    """The session's one fake Polar (started on first use, stopped at exit)."""
    global _FAKE
    if _FAKE is None:
        _FAKE = FakePolar()
        _FAKE.start()
        atexit.register(_FAKE.stop)
    return _FAKE


def billing_toml(upstream_url: str, extra: str = "") -> str:
    """The test suite's config plus products, a pro tier and the [polar] table."""
    return TEST_CONFIG.format(upstream=upstream_url) + BILLING_TOML + extra


def billing_config() -> Config:
    """The parsed billing test config (the upstream is never called)."""
    raw = tomllib.loads(billing_toml("http://127.0.0.1:9/v1"), parse_float=Decimal)
    return parse_config(raw, {})


def billing_settings(
    services: Services, upstream_url: str, polar_url: str | None, **overrides: Any
) -> Settings:
    """Settings with Polar pointed at ``polar_url`` (None: Polar not configured)."""
    raw = tomllib.loads(billing_toml(upstream_url), parse_float=Decimal)
    values: dict[str, Any] = {
        "polar_access_token": TOKEN if polar_url else None,
        "polar_base_url": polar_url,
        "polar_webhook_secret": POLAR_WEBHOOK_SECRET,
        "clerk_webhook_secret": CLERK_WEBHOOK_SECRET,
    }
    values |= overrides
    return Settings(
        config=parse_config(raw, {}),
        database_url=services.database_url,
        redis_url=services.redis_url,
        **values,
    )


async def settle_debit(
    db: asyncpg.Pool | asyncpg.Connection,
    account_id: uuid.UUID,
    *,
    cost: int,
    input_tokens: int = 11,
    output_tokens: int = 7,
    model: str = "mock-model",
) -> uuid.UUID:
    """A settled call through the ledger's real API; returns its debit entry id."""
    hold = await ledger.reserve_hold(
        db,
        hold_id=uuid.uuid4(),
        account_id=account_id,
        amount=cost,
        ttl_seconds=900,
        model=model,
    )
    settled = await ledger.settle_hold(db, hold.id, ledger.Usage(input_tokens, output_tokens, cost))
    return settled.entry_id


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 30.0, what: str = "condition"
) -> None:
    """Wait until ``check()`` is true; fail after ``timeout`` seconds (a bound, not a timing)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def deliver(
    client: TestClient,
    event_type: str,
    data: dict[str, Any],
    *,
    webhook_id: str | None = None,
    secret: str = POLAR_WEBHOOK_SECRET,
    at: datetime | None = None,
) -> tuple[int, str]:
    """POST one signed delivery; (status, webhook-id)."""
    body = webhook_body(event_type, data)
    headers = sign_polar(body, secret, webhook_id=webhook_id, at=at)
    resp = await client.post("/api/webhooks/polar", data=body, headers=headers)
    return resp.status, headers["webhook-id"]


async def applied(db: asyncpg.Pool, webhook_id: str) -> asyncpg.Record:
    """The stored event once the worker has applied it."""

    async def done() -> bool:
        status = await db.fetchval(
            "SELECT status FROM webhook_events WHERE source = 'polar' AND webhook_id = $1",
            webhook_id,
        )
        return status is not None and status != "pending"

    await eventually(done, what=f"webhook {webhook_id} to be applied")
    row = await db.fetchrow(
        "SELECT status, outcome, attempts FROM webhook_events"
        " WHERE source = 'polar' AND webhook_id = $1",
        webhook_id,
    )
    assert row is not None
    return row
