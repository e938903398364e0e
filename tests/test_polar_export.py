"""The usage outbox against a local Polar, through the real polar-sdk: exactly once, in order."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from polar import PolarError, PolarServerError
from polar.base import PolarRateLimitError
from polar.v2026_10 import PolarAsync
from tenacity import RetryCallState

from creditgate.billing.client import _WaitHonouringRetryAfter
from creditgate.billing.export import GAUGE_INTERVAL, PendingDebit, UsageExporter, usage_event
from creditgate.billing.metrics import USAGE_PARKED
from creditgate.config import PolarConfig
from tests.billing_support import (
    billing_settings,
    eventually,
    settle_debit,
)
from tests.conftest import Services
from tests.polar_fake import TOKEN, Failure, FakePolar


@pytest.fixture
def cfg(services: Services, fake: FakePolar) -> PolarConfig:
    return billing_settings(services, "http://127.0.0.1:9/v1", fake.url).config.polar


@pytest.fixture
async def exporter(fake: FakePolar, cfg: PolarConfig) -> AsyncIterator[UsageExporter]:
    async with PolarAsync(TOKEN, base_url=fake.url, timeout=cfg.request_timeout_seconds) as polar:
        yield UsageExporter(polar, cfg)


async def unexported(db: asyncpg.Pool, ids: list[uuid.UUID]) -> int:
    """How many of these entries are still past the cursor (and not parked)."""
    count = await db.fetchval(
        """
        SELECT count(*) FROM ledger_entries e, polar_export_cursor c
        WHERE e.id = ANY($1::uuid[]) AND (e.tx_id, e.seq) > (c.tx_id, c.seq)
          AND NOT EXISTS (SELECT 1 FROM polar_parked_events p WHERE p.entry_id = e.id)
        """,
        ids,
    )
    return int(count)


async def drain(db: asyncpg.Pool, exporter: UsageExporter, ids: list[uuid.UUID]) -> None:
    """Run export rounds (as the background task would) until these entries are past the cursor."""

    async def caught_up() -> bool:
        # A round that gave up is followed by one sending the same batch again.
        async with db.acquire() as conn:
            with contextlib.suppress(PolarError):
                await exporter.export_once(conn)
        return await unexported(db, ids) == 0

    await eventually(caught_up, what="the export to catch up")


def assert_exported_once(fake: FakePolar, account_id: uuid.UUID, ids: list[uuid.UUID]) -> None:
    for entry_id in ids:
        event = fake.stored(str(entry_id))
        assert event is not None, f"{entry_id} never reached Polar"
        assert event["name"] == "llm_usage"
        assert event["external_customer_id"] == str(account_id)
        assert "customer_id" not in event


async def test_usage_event_carries_the_debit_and_a_past_timestamp() -> None:
    now = datetime.now(UTC)
    debit = PendingDebit(
        entry_id=uuid.uuid4(),
        seq=1,
        tx_id=1,
        account_id=uuid.uuid4(),
        credits=1234,
        model="m" * 600,
        input_tokens=100,
        output_tokens=20,
        estimated=True,
        created_at=now + timedelta(seconds=5),  # a database clock ahead of ours
    )
    event = usage_event(debit, "llm_usage", now)
    assert event["external_id"] == str(debit.entry_id)
    assert event["external_customer_id"] == str(debit.account_id)
    assert dict(event["metadata"]) == {
        "credits": 1234,
        "input_tokens": 100,
        "output_tokens": 20,
        "total_tokens": 120,
        "estimated": True,
        "model": "m" * 500,
    }
    assert datetime.fromisoformat(event["timestamp"]) < now


async def test_each_settled_debit_reaches_polar_once_with_its_usage(
    db: asyncpg.Pool, fake: FakePolar, exporter: UsageExporter, customer_factory
) -> None:
    c = await customer_factory(100)
    costs = [1000 + i for i in range(10)]  # more than one batch (batch_size = 7)
    ids = [await settle_debit(db, c.account.id, cost=cost) for cost in costs]
    await drain(db, exporter, ids)
    assert_exported_once(fake, c.account.id, ids)
    for entry_id, cost in zip(ids, costs, strict=True):
        assert fake.times_received(str(entry_id)) == 1
        assert fake.stored(str(entry_id))["metadata"] == {
            "credits": cost,
            "input_tokens": 11,
            "output_tokens": 7,
            "total_tokens": 18,
            "estimated": False,
            "model": "mock-model",
        }
    async with db.acquire() as conn:
        pending, _ = await exporter.update_gauges(conn)
    assert pending == 0
    totals = await db.fetchrow(
        "SELECT SUM(events) AS n, SUM(credits) AS c FROM polar_export_totals WHERE account_id = $1",
        c.account.id,
    )
    assert (totals["n"], totals["c"]) == (10, sum(costs))


async def test_catching_up_counts_the_backlog_at_most_every_few_seconds(
    db: asyncpg.Pool, fake: FakePolar, cfg: PolarConfig, customer_factory
) -> None:
    c = await customer_factory(100)
    ids = [await settle_debit(db, c.account.id, cost=100) for _ in range(70)]  # 10 batches
    # Idle rounds far apart, so every count seen is a catching-up one or the last.
    patient = dataclasses.replace(cfg, export_interval_seconds=60.0)
    counts: list[str] = []
    async with (
        PolarAsync(TOKEN, base_url=fake.url, timeout=cfg.request_timeout_seconds) as polar,
        db.acquire() as conn,
    ):
        conn.add_query_logger(lambda r: counts.append(r.query) if "count(*)" in r.query else None)
        loop = asyncio.get_running_loop()
        started = loop.time()
        task = asyncio.create_task(UsageExporter(polar, patient)._export_while_holding(conn))
        try:
            await eventually(lambda: _none_left(db, ids), what="the export to catch up")
            await eventually(lambda: _seen(counts), what="the gauges once caught up")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        elapsed = loop.time() - started
    assert_exported_once(fake, c.account.id, ids)
    # The first round's, one per GAUGE_INTERVAL while catching up, the last:
    # never one per batch (10 here).
    assert len(counts) <= 2 + int(elapsed / GAUGE_INTERVAL)


async def _none_left(db: asyncpg.Pool, ids: list[uuid.UUID]) -> bool:
    return await unexported(db, ids) == 0


async def _seen(counts: list[str]) -> bool:
    return bool(counts)


async def test_every_kind_of_polar_failure_still_delivers_each_debit_once(
    db: asyncpg.Pool, fake: FakePolar, exporter: UsageExporter, customer_factory
) -> None:
    c = await customer_factory(100)
    ids = [await settle_debit(db, c.account.id, cost=500) for _ in range(5)]
    fake.fail(
        Failure("status", status=500),
        Failure("status", status=503),
        Failure("rate_limit", retry_after=1),
        Failure("slow_before", seconds=1.5),  # times out before Polar stored anything
        Failure("slow_after", seconds=1.5),  # Polar stored the batch, the answer timed out
    )
    await drain(db, exporter, ids)
    assert_exported_once(fake, c.account.id, ids)
    # The batch was sent again after the timeout that came after Polar stored
    # it: Polar saw it twice and kept it once.
    assert any(fake.times_received(str(i)) >= 2 for i in ids)
    assert fake.failures == type(fake.failures)()  # every scripted failure was met


async def test_nothing_is_recorded_until_polar_acknowledges_and_a_restart_resumes(
    db: asyncpg.Pool, fake: FakePolar, cfg: PolarConfig, customer_factory
) -> None:
    c = await customer_factory(100)
    ids = [await settle_debit(db, c.account.id, cost=300) for _ in range(3)]
    fake.fail(*[Failure("status", status=502)] * cfg.max_attempts)
    async with PolarAsync(TOKEN, base_url=fake.url, timeout=0.5) as polar:
        first = UsageExporter(polar, cfg)

        async def round_gave_up() -> bool:
            async with db.acquire() as conn:
                try:
                    await first.export_once(conn)
                except PolarServerError:
                    return True
            return False

        await eventually(round_gave_up, what="a round to meet Polar's failures")
    # Polar never acknowledged: the cursor did not move past our debits.
    assert await unexported(db, ids) == 3
    # A new process (a restart) picks up where the acknowledged cursor is.
    async with PolarAsync(TOKEN, base_url=fake.url, timeout=0.5) as polar:
        await drain(db, UsageExporter(polar, cfg), ids)
    assert_exported_once(fake, c.account.id, ids)


async def test_a_422_about_the_request_parks_nothing_and_is_retried(
    db: asyncpg.Pool, fake: FakePolar, exporter: UsageExporter, customer_factory
) -> None:
    """Only events Polar names are parked: a request it refuses as a whole (a
    wrong organization) leaves every event to be sent again, none lost."""
    c = await customer_factory(100)
    ids = [await settle_debit(db, c.account.id, cost=100 + i) for i in range(4)]
    fake.fail(Failure("invalid_request"))
    async with db.acquire() as conn:
        with pytest.raises(PolarError):
            await exporter.export_once(conn)
    assert await unexported(db, ids) == 4
    assert (
        await db.fetchval(
            "SELECT count(*) FROM polar_parked_events WHERE entry_id = ANY($1::uuid[])", ids
        )
        == 0
    )
    await drain(db, exporter, ids)
    assert_exported_once(fake, c.account.id, ids)


async def test_an_event_polar_refuses_is_isolated_and_parked(
    db: asyncpg.Pool, fake: FakePolar, exporter: UsageExporter, customer_factory
) -> None:
    c = await customer_factory(100)
    ids = [await settle_debit(db, c.account.id, cost=100 + i) for i in range(6)]
    bad = ids[3]
    fake.invalid_external_ids.add(str(bad))
    parked_before = USAGE_PARKED._value.get()
    await drain(db, exporter, ids)
    good = [i for i in ids if i != bad]
    assert_exported_once(fake, c.account.id, good)
    assert fake.stored(str(bad)) is None
    parked = await db.fetchrow(
        "SELECT account_id, error FROM polar_parked_events WHERE entry_id = $1", bad
    )
    assert parked is not None and parked["account_id"] == c.account.id
    assert "refused for this test" in parked["error"]
    assert USAGE_PARKED._value.get() == parked_before + 1
    # Parked means done: later rounds never send it again.
    sent = fake.times_received(str(bad))
    later = await settle_debit(db, c.account.id, cost=99)
    await drain(db, exporter, [later])
    assert fake.times_received(str(bad)) == sent
    for entry_id in good:
        assert fake.times_received(str(entry_id)) == 1


async def test_an_uncommitted_debit_holds_back_every_later_one(
    db: asyncpg.Pool, fake: FakePolar, exporter: UsageExporter, customer_factory
) -> None:
    c, d = await customer_factory(100), await customer_factory(100)
    slow = await db.acquire()
    try:
        tx = slow.transaction()
        await tx.start()
        early = await settle_debit(slow, c.account.id, cost=10)  # older transaction id
        late = await settle_debit(db, d.account.id, cost=20)  # committed first
        async with db.acquire() as conn:
            for _ in range(3):
                await exporter.export_once(conn)
        # Exporting `late` now would move the cursor past `early`, which could
        # then never be exported: the exporter waits for the older transaction.
        assert fake.stored(str(late)) is None
        assert fake.stored(str(early)) is None
        await tx.commit()
    finally:
        await db.release(slow)
    await drain(db, exporter, [early, late])
    order = list(fake.events)
    assert order.index(str(early)) < order.index(str(late))


def test_a_429_waits_what_retry_after_says() -> None:
    cfg = PolarConfig(retry_initial_seconds=0.01, retry_max_seconds=0.2)
    wait = _WaitHonouringRetryAfter(cfg, None)

    def state_after(exc: BaseException) -> RetryCallState:
        state = RetryCallState(None, None, (), {})
        state.set_exception((type(exc), exc, None))
        return state

    assert wait(state_after(PolarRateLimitError(429, 7))) == 7.0
    assert wait(state_after(PolarRateLimitError(429, 10_000))) == 60.0  # capped
    assert wait(state_after(PolarServerError(500, "boom"))) <= 0.2
    assert _WaitHonouringRetryAfter(cfg, 2.0)(state_after(PolarRateLimitError(429, 7))) == 2.0
