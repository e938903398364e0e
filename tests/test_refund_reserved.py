"""A refund of credits that calls in flight hold is taken as their holds end, never spent again.

Real PostgreSQL: the collection is the database's (trigger
``account_balances_collect_refund``, migration 0008), so every way a hold
ends — settle, release, the sweeper's expiry — is covered by the same code.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from creditgate import ledger
from creditgate.ledger.errors import CreditsExhausted
from tests.billing_support import PACK, applied, billing_settings, deliver, shared_fake_polar
from tests.conftest import Customer, Services, running
from tests.polar_fake import order_payload

CREDIT = 1_000_000


async def _hold(db: asyncpg.Pool, account_id: uuid.UUID, amount: int, ttl: int = 900) -> uuid.UUID:
    hold = await ledger.reserve_hold(
        db, hold_id=uuid.uuid4(), account_id=account_id, amount=amount, ttl_seconds=ttl
    )
    return hold.id


async def _refund(db: asyncpg.Pool, account_id: uuid.UUID, amount: int) -> ledger.Reversal:
    return await ledger.reverse_up_to(
        db,
        account_id=account_id,
        amount=amount,
        idempotency_key=f"test-refund:{uuid.uuid4()}",
        reverses="test-grant",
        reason="test refund",
    )


async def _money(db: asyncpg.Pool, account_id: uuid.UUID) -> tuple[int, int, int]:
    """(balance, reserved, refund_pending)."""
    row = await db.fetchrow(
        "SELECT balance, reserved, refund_pending FROM account_balances WHERE account_id = $1",
        account_id,
    )
    return row["balance"], row["reserved"], row["refund_pending"]


async def test_a_refund_of_reserved_credits_is_taken_when_the_hold_is_released(
    db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(100)
    # The session's database is shared: verify's refund debt is compared, not absolute.
    debt_before = (await ledger.verify_ledger(db)).refund_debt
    hold = await _hold(db, c.account.id, 100 * CREDIT)
    r = await _refund(db, c.account.id, 100 * CREDIT)
    assert (r.reversed, r.pending, r.debt) == (0, 100 * CREDIT, 0)
    assert await _money(db, c.account.id) == (100 * CREDIT, 100 * CREDIT, 100 * CREDIT)

    assert await ledger.release_hold(db, hold)  # the call failed: nothing charged
    assert await _money(db, c.account.id) == (0, 0, 0)
    with pytest.raises(CreditsExhausted):
        await _hold(db, c.account.id, 1)
    assert await ledger.account_debt(db, c.account.id) == 0
    entries = await db.fetch(
        "SELECT kind, amount, balance_after FROM ledger_entries WHERE account_id = $1 ORDER BY seq",
        c.account.id,
    )
    assert [tuple(e) for e in entries] == [
        ("grant", 100 * CREDIT, 100 * CREDIT),
        ("reversal", -100 * CREDIT, 0),
    ]
    report = await ledger.verify_ledger(db)
    assert report.ok and report.refund_debt == debt_before


async def test_a_settled_hold_pays_its_call_and_the_refund_takes_the_rest(
    db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(100)
    hold = await _hold(db, c.account.id, 100 * CREDIT)
    await _refund(db, c.account.id, 100 * CREDIT)
    settled = await ledger.settle_hold(db, hold, ledger.Usage(10, 20, 30 * CREDIT))
    assert (settled.debited, settled.uncollected) == (30 * CREDIT, 0)
    assert await _money(db, c.account.id) == (0, 0, 0)
    # The 30 the call spent before the refund arrived is the only debt.
    assert await ledger.account_debt(db, c.account.id) == 30 * CREDIT
    kinds = await db.fetch(
        "SELECT kind, amount FROM ledger_entries WHERE account_id = $1 ORDER BY seq",
        c.account.id,
    )
    assert [tuple(k) for k in kinds] == [
        ("grant", 100 * CREDIT),
        ("debit", -30 * CREDIT),
        ("reversal", -70 * CREDIT),
    ]


async def test_a_partly_reserved_balance_gives_back_what_is_free_now_and_the_rest_later(
    db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(100)
    hold = await _hold(db, c.account.id, 60 * CREDIT)
    r = await _refund(db, c.account.id, 100 * CREDIT)
    assert (r.reversed, r.pending, r.debt) == (40 * CREDIT, 60 * CREDIT, 0)
    # A second refund finds nothing left to claim: all of it is debt.
    r2 = await _refund(db, c.account.id, 5 * CREDIT)
    assert (r2.reversed, r2.pending, r2.debt) == (0, 0, 5 * CREDIT)
    await ledger.settle_hold(db, hold, ledger.Usage(1, 1, 20 * CREDIT))
    assert await _money(db, c.account.id) == (0, 0, 0)
    assert await ledger.account_debt(db, c.account.id) == 25 * CREDIT


async def test_a_hold_the_sweeper_expires_is_collected_too(
    db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(10)
    await _hold(db, c.account.id, 10 * CREDIT, ttl=0)
    await _refund(db, c.account.id, 10 * CREDIT)
    assert await ledger.sweep_expired_holds(db) >= 1
    assert await _money(db, c.account.id) == (0, 0, 0)
    assert await ledger.account_debt(db, c.account.id) == 0


async def test_credits_granted_while_a_refund_is_pending_pay_it_first(
    db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(100)
    hold = await _hold(db, c.account.id, 100 * CREDIT)
    await _refund(db, c.account.id, 100 * CREDIT)
    await ledger.post_entry(
        db,
        account_id=c.account.id,
        amount=50 * CREDIT,
        kind="grant",
        idempotency_key=f"test:{uuid.uuid4()}",
        reason="top-up",
    )
    # The refund is owed: the new credits are not spendable while it is pending.
    assert await _money(db, c.account.id) == (100 * CREDIT, 100 * CREDIT, 50 * CREDIT)
    await ledger.release_hold(db, hold)
    assert await _money(db, c.account.id) == (50 * CREDIT, 0, 0)
    assert await ledger.account_debt(db, c.account.id) == 0


async def test_a_batch_of_settles_collects_after_its_debits(
    db: asyncpg.Pool, customer_factory: Any
) -> None:
    """Group commit's multi-row settle: the collection's entry follows the batch's debits."""
    import asyncio

    from creditgate.ledger.group_commit import GroupCommit

    c = await customer_factory(100)
    holds = [await _hold(db, c.account.id, 10 * CREDIT) for _ in range(10)]
    r = await _refund(db, c.account.id, 100 * CREDIT)
    assert (r.reversed, r.pending) == (0, 100 * CREDIT)
    gc = GroupCommit(db, lanes=1)
    await asyncio.gather(*(gc.settle(h, ledger.Usage(1, 1, 2 * CREDIT)) for h in holds))
    assert gc.batched_calls >= 2  # a multi-row statement settled some of them
    assert await _money(db, c.account.id) == (0, 0, 0)
    assert await ledger.account_debt(db, c.account.id) == 20 * CREDIT  # what the calls used
    rows = await db.fetch(
        "SELECT kind, amount, balance_after FROM ledger_entries WHERE account_id = $1 ORDER BY seq",
        c.account.id,
    )
    running = 0
    for row in rows:
        running += row["amount"]
        assert row["balance_after"] == running, rows
    assert sum(-row["amount"] for row in rows if row["kind"] == "reversal") == 80 * CREDIT


# ---------------------------------------------------------------- through Polar's webhook


@pytest.fixture
async def app(
    services: Services, upstream: TestServer, db: asyncpg.Pool
) -> AsyncIterator[TestClient]:
    settings = billing_settings(services, str(upstream.make_url("/v1")), shared_fake_polar().url)
    async with running(settings) as client:
        yield client


async def _chat(app: TestClient, c: Customer) -> int:
    resp = await app.post(
        "/v1/chat/completions",
        json={"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]},
        headers=c.auth,
    )
    return resp.status


async def test_a_polar_refund_during_a_call_leaves_nothing_to_spend(
    app: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(0)
    order = order_payload(order_id=str(uuid.uuid4()), account_id=str(c.account.id), product_id=PACK)
    _, paid = await deliver(app, "order.paid", order)
    await applied(db, paid)
    granted, _, _ = await _money(db, c.account.id)
    assert granted > 0

    in_flight = await _hold(db, c.account.id, granted)  # a call holding all of it
    full = order | {"status": "refunded", "refunded_amount": 1000, "refundable_amount": 0}
    _, refunded = await deliver(app, "order.refunded", full)
    row = await applied(db, refunded)
    assert row["status"] == "processed", row["outcome"]
    assert "debt 0" in row["outcome"]
    assert await _money(db, c.account.id) == (granted, granted, granted)

    await ledger.release_hold(db, in_flight)  # the call ends without a charge
    assert await _money(db, c.account.id) == (0, 0, 0)
    assert await _chat(app, c) == 402
    assert await ledger.account_debt(db, c.account.id) == 0
