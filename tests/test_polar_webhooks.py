"""Polar webhooks, signed as Polar signs them, through the real server: once, in any order."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from creditgate import ledger
from creditgate.http.app import create_app
from creditgate.webhooks.worker import process_now
from tests.billing_support import (
    PACK,
    POLAR_WEBHOOK_SECRET,
    PRO,
    applied,
    billing_config,
    billing_settings,
    deliver,
    eventually,
    settle_debit,
    shared_fake_polar,
)
from tests.conftest import Customer, Services, ledger_footprint, running
from tests.polar_fake import (
    customer_payload,
    order_payload,
    sign_polar,
    subscription_payload,
    webhook_body,
)

CREDIT = 1_000_000


@pytest.fixture
async def app(services: Services, upstream: TestServer, db: asyncpg.Pool) -> AsyncIterator[Any]:
    settings = billing_settings(services, str(upstream.make_url("/v1")), shared_fake_polar().url)
    async with running(settings) as client:
        yield client


async def balance(client: TestClient, c: Customer) -> dict[str, Any]:
    resp = await client.get("/api/user/balance", headers=c.auth)
    assert resp.status == 200
    data: dict[str, Any] = (await resp.json())["data"]
    return data


def new_order(c: Customer, product: str = PACK, **kw: Any) -> dict[str, Any]:
    return order_payload(
        order_id=str(uuid.uuid4()), account_id=str(c.account.id), product_id=product, **kw
    )


async def test_order_paid_delivered_three_times_grants_once(
    app: TestClient, db: asyncpg.Pool, customer_factory
) -> None:
    c = await customer_factory(0)
    order = new_order(c)
    webhook_id = f"msg_{uuid.uuid4().hex}"
    statuses = [(await deliver(app, "order.paid", order, webhook_id=webhook_id))[0] for _ in "abc"]
    assert statuses == [202, 200, 200]
    row = await applied(db, webhook_id)
    assert row["status"] == "processed"
    # The same order under another delivery id (a manual resend) grants nothing more.
    _, other = await deliver(app, "order.paid", order)
    await applied(db, other)
    data = await balance(app, c)
    assert data["balanceMicros"] == 10 * CREDIT
    assert data["creditLimitMicros"] == 10 * CREDIT
    assert (
        await db.fetchval(
            "SELECT count(*) FROM ledger_entries WHERE idempotency_key = $1",
            f"polar:order:{order['id']}",
        )
        == 1
    )
    assert (
        await db.fetchval("SELECT count(*) FROM webhook_events WHERE webhook_id = $1", webhook_id)
        == 1
    )


@pytest.mark.parametrize(
    "tamper",
    ["forged", "stale", "future", "unsigned", "no-id", "body-changed", "not-v1"],
)
async def test_unverifiable_deliveries_are_refused_and_write_nothing(
    app: TestClient, db: asyncpg.Pool, customer_factory, tamper: str
) -> None:
    c = await customer_factory(0)
    before = await ledger_footprint(db, c.account.id)
    stored_before = await db.fetchval("SELECT count(*) FROM webhook_events")
    body = webhook_body("order.paid", new_order(c))
    secret = POLAR_WEBHOOK_SECRET
    at = datetime.now(UTC)
    if tamper == "forged":
        secret = "whsec_" + "someone-else"
    elif tamper == "stale":
        at -= timedelta(minutes=6)
    elif tamper == "future":
        at += timedelta(minutes=6)
    headers = sign_polar(body, secret, at=at)
    if tamper == "unsigned":
        headers = {"content-type": "application/json"}
    elif tamper == "no-id":
        del headers["webhook-id"]
    elif tamper == "body-changed":
        body = body.replace(b'"paid"', b'"void"', 1)
    elif tamper == "not-v1":
        headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v2,")
    resp = await app.post("/api/webhooks/polar", data=body, headers=headers)
    expected = 400 if tamper in ("unsigned", "no-id") else 401
    assert resp.status == expected
    err = (await resp.json())["error"]
    assert err["code"] == ("VALIDATION_ERROR" if expected == 400 else "UNAUTHORIZED")
    assert await db.fetchval("SELECT count(*) FROM webhook_events") == stored_before
    await process_now(db, billing_config())
    assert await ledger_footprint(db, c.account.id) == before


async def test_a_secretless_deployment_refuses_polar_webhooks(
    services: Services, upstream: TestServer, db: asyncpg.Pool, customer_factory
) -> None:
    settings = billing_settings(
        services, str(upstream.make_url("/v1")), None, polar_webhook_secret=None
    )
    c = await customer_factory(0)
    before = await ledger_footprint(db, c.account.id)
    body = webhook_body("order.paid", new_order(c))
    headers = sign_polar(body, POLAR_WEBHOOK_SECRET)
    async with TestClient(TestServer(create_app(settings))) as client:
        resp = await client.post("/api/webhooks/polar", data=body, headers=headers)
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert (
        await db.fetchval(
            "SELECT count(*) FROM webhook_events WHERE webhook_id = $1", headers["webhook-id"]
        )
        == 0
    )
    assert await ledger_footprint(db, c.account.id) == before


async def test_event_types_not_handled_are_acknowledged_and_ignored(
    app: TestClient, db: asyncpg.Pool
) -> None:
    for event_type in ("benefit.created", "some.future_event"):
        body = orjson.dumps({"type": event_type, "timestamp": "x", "data": {"id": "x"}})
        headers = sign_polar(body, POLAR_WEBHOOK_SECRET)
        resp = await app.post("/api/webhooks/polar", data=body, headers=headers)
        assert resp.status == 200
        assert (await resp.json())["data"]["ignored"] is True
        assert (
            await db.fetchval(
                "SELECT count(*) FROM webhook_events WHERE webhook_id = $1", headers["webhook-id"]
            )
            == 0
        )


async def test_paid_then_refunded_nets_to_zero(
    app: TestClient, db: asyncpg.Pool, customer_factory
) -> None:
    c = await customer_factory(0)
    order = new_order(c)
    _, paid = await deliver(app, "order.paid", order)
    await applied(db, paid)
    half = order | {
        "status": "partially_refunded",
        "refunded_amount": 500,
        "refundable_amount": 500,
    }
    _, partial = await deliver(app, "order.refunded", half)
    await applied(db, partial)
    assert (await balance(app, c))["balanceMicros"] == 5 * CREDIT
    full = order | {"status": "refunded", "refunded_amount": 1000, "refundable_amount": 0}
    for _ in range(2):  # a redelivery under a new id changes nothing
        _, refunded = await deliver(app, "order.refunded", full)
        await applied(db, refunded)
    data = await balance(app, c)
    assert data["balanceMicros"] == 0
    assert data["creditLimitMicros"] == 0
    kinds = await db.fetch(
        "SELECT kind, amount FROM ledger_entries WHERE account_id = $1 ORDER BY seq",
        c.account.id,
    )
    assert [(r["kind"], r["amount"]) for r in kinds] == [
        ("grant", 10 * CREDIT),
        ("reversal", -5 * CREDIT),
        ("reversal", -5 * CREDIT),
    ]
    assert await ledger.account_debt(db, c.account.id) == 0


async def test_refunds_with_one_refunded_amount_but_other_shares_both_apply(
    app: TestClient, db: asyncpg.Pool, customer_factory
) -> None:
    c = await customer_factory(0)
    order = new_order(c)
    _, paid = await deliver(app, "order.paid", order)
    await applied(db, paid)
    # The same refunded amount against two refundable amounts: 30 % of the
    # order, then 60 % of what Polar then counts (an adjusted order).
    for refundable, left in ((700, 7), (200, 4)):
        event = order | {
            "status": "partially_refunded",
            "refunded_amount": 300,
            "refundable_amount": refundable,
        }
        _, refund = await deliver(app, "order.refunded", event)
        row = await applied(db, refund)
        assert row["status"] == "processed", row["outcome"]
        assert (await balance(app, c))["balanceMicros"] == left * CREDIT


async def test_a_refund_of_spent_credits_takes_what_remains_and_records_debt(
    app: TestClient, db: asyncpg.Pool, customer_factory
) -> None:
    c = await customer_factory(0)
    order = new_order(c)
    _, paid = await deliver(app, "order.paid", order)
    await applied(db, paid)
    await settle_debit(db, c.account.id, cost=7 * CREDIT)
    full = order | {"status": "refunded", "refunded_amount": 1000, "refundable_amount": 0}
    _, refunded = await deliver(app, "order.refunded", full)
    row = await applied(db, refunded)
    assert row["status"] == "processed", row["outcome"]
    data = await balance(app, c)
    assert data["balanceMicros"] == 0  # never below the overdraft limit (0)
    assert await ledger.account_debt(db, c.account.id) == 7 * CREDIT
    reversal = await db.fetchrow(
        "SELECT requested, reversed, debt FROM ledger_reversals WHERE account_id = $1",
        c.account.id,
    )
    assert tuple(reversal) == (10 * CREDIT, 3 * CREDIT, 7 * CREDIT)


async def test_a_refund_that_overtakes_its_payment_still_nets_to_zero(
    app: TestClient, db: asyncpg.Pool, customer_factory
) -> None:
    c = await customer_factory(0)
    order = new_order(c)
    full = order | {"status": "refunded", "refunded_amount": 1000, "refundable_amount": 0}
    _, refunded = await deliver(app, "order.refunded", full)
    await applied(db, refunded)
    _, paid = await deliver(app, "order.paid", order)
    await applied(db, paid)
    data = await balance(app, c)
    assert (data["balanceMicros"], data["creditLimitMicros"]) == (0, 0)


async def test_subscription_updated_before_created_ends_with_the_newest_state(
    app: TestClient, db: asyncpg.Pool, customer_factory
) -> None:
    c = await customer_factory(0)
    created_at = datetime.now(UTC) - timedelta(minutes=5)
    start, end = created_at, created_at + timedelta(days=30)
    sub_id = str(uuid.uuid4())

    def sub(status: str, modified: datetime | None, **kw: Any) -> dict[str, Any]:
        return subscription_payload(
            subscription_id=sub_id,
            account_id=str(c.account.id),
            product_id=PRO,
            status=status,
            modified_at=modified,
            created_at=created_at,
            period_start=start,
            period_end=end,
            **kw,
        )

    newer = sub("active", created_at + timedelta(minutes=2), cancel_at_period_end=True)
    older = sub("incomplete", None)  # subscription.created: modified_at not set yet
    _, first = await deliver(app, "subscription.updated", newer)
    await applied(db, first)
    _, second = await deliver(app, "subscription.created", older)
    assert "older" in (await applied(db, second))["outcome"]
    data = await balance(app, c)
    assert data["tier"] == "pro"
    assert data["plan"] == "Pro"
    stored = await db.fetchrow(
        "SELECT status, cancel_at_period_end, current_period_end FROM subscriptions WHERE id = $1",
        sub_id,
    )
    assert tuple(stored) == ("active", True, end)
    # Revoked later: the plan and its tier end.
    _, revoked = await deliver(
        app, "subscription.revoked", sub("canceled", created_at + timedelta(minutes=3))
    )
    await applied(db, revoked)
    data = await balance(app, c)
    assert (data["tier"], data["plan"]) == ("free", None)


async def test_each_subscription_cycle_grants_and_credit_limit_is_the_period(
    app: TestClient, db: asyncpg.Pool, customer_factory
) -> None:
    c = await customer_factory(0)
    sub_id = str(uuid.uuid4())
    t0 = datetime.now(UTC) - timedelta(days=40)

    def sub(start: datetime, modified: datetime) -> dict[str, Any]:
        return subscription_payload(
            subscription_id=sub_id,
            account_id=str(c.account.id),
            product_id=PRO,
            status="active",
            modified_at=modified,
            created_at=t0,
            period_start=start,
            period_end=start + timedelta(days=30),
        )

    _, s1 = await deliver(app, "subscription.active", sub(t0, t0))
    await applied(db, s1)
    _, o1 = await deliver(
        app,
        "order.paid",
        new_order(c, PRO, billing_reason="subscription_create", subscription_id=sub_id),
    )
    await applied(db, o1)
    assert (await balance(app, c))["creditLimitMicros"] == 25 * CREDIT
    # The next period starts now; its renewal order grants the period's credits.
    period2 = datetime.now(UTC)
    _, s2 = await deliver(app, "subscription.cycled", sub(period2, period2))
    await applied(db, s2)
    _, o2 = await deliver(
        app,
        "order.paid",
        new_order(c, PRO, billing_reason="subscription_cycle", subscription_id=sub_id),
    )
    await applied(db, o2)
    data = await balance(app, c)
    assert data["balanceMicros"] == 50 * CREDIT
    assert data["creditLimitMicros"] == 25 * CREDIT  # granted in the current period only
    assert data["plan"] == "Pro"


async def test_the_account_is_found_by_metadata_or_by_a_customer_link(
    app: TestClient, db: asyncpg.Pool, customer_factory
) -> None:
    c = await customer_factory(0)
    by_metadata = order_payload(
        order_id=str(uuid.uuid4()),
        account_id=None,
        product_id=PACK,
        metadata={"accountId": str(c.account.id)},
    )
    _, first = await deliver(app, "order.paid", by_metadata)
    assert (await applied(db, first))["status"] == "processed"
    assert (await balance(app, c))["balanceMicros"] == 10 * CREDIT

    # An order naming only a Polar customer nobody linked yet waits...
    polar_customer = str(uuid.uuid4())
    orphan = order_payload(
        order_id=str(uuid.uuid4()), account_id=None, product_id=PACK, customer_id=polar_customer
    )
    _, waiting = await deliver(app, "order.paid", orphan)

    async def tried() -> bool:
        attempts = await db.fetchval(
            "SELECT attempts FROM webhook_events WHERE webhook_id = $1", waiting
        )
        return bool(attempts)

    await eventually(tried, what="a first attempt")
    row = await db.fetchrow(
        "SELECT status, outcome FROM webhook_events WHERE webhook_id = $1", waiting
    )
    assert row["status"] == "pending" and "no account" in row["outcome"]
    # ...until customer.created links that customer to the account.
    _, linked = await deliver(
        app,
        "customer.created",
        customer_payload(customer_id=polar_customer, account_id=str(c.account.id)),
    )
    await applied(db, linked)
    await db.execute(
        "UPDATE webhook_events SET next_attempt_at = now() WHERE webhook_id = $1", waiting
    )  # the retry's backoff, elapsed
    await process_now(db, billing_config())
    assert (await applied(db, waiting))["status"] == "processed"
    assert (await balance(app, c))["balanceMicros"] == 20 * CREDIT


async def test_polar_signs_with_the_whole_secret_not_a_decoded_one(app: TestClient) -> None:
    from polar.webhooks import validate_event
    from svix.webhooks import Webhook, WebhookVerificationError

    body = webhook_body("customer.updated", customer_payload(customer_id="c", account_id=None))
    headers = sign_polar(body, POLAR_WEBHOOK_SECRET)
    # polar-sdk verifies it with the secret as configured.
    validate_event(body, headers, POLAR_WEBHOOK_SECRET, frozenset({"customer.updated"}), dict)
    with pytest.raises((WebhookVerificationError, ValueError)):
        # A plain Standard Webhooks verifier base64-decodes the secret: wrong key.
        Webhook(POLAR_WEBHOOK_SECRET).verify(body, headers)


async def test_an_order_for_a_product_not_in_the_config_is_parked_for_an_operator(
    app: TestClient, db: asyncpg.Pool, customer_factory
) -> None:
    c = await customer_factory(0)
    _, webhook_id = await deliver(app, "order.paid", new_order(c, product=str(uuid.uuid4())))
    row = await applied(db, webhook_id)
    assert row["status"] == "failed"
    assert "not in the config" in row["outcome"]
    assert await ledger_footprint(db, c.account.id) == (0, 0, 0, 0)


async def test_billing_metrics_are_exposed(app: TestClient) -> None:
    body = await (await app.get("/metrics")).text()
    for name in (
        "creditgate_polar_usage_pending_events",
        "creditgate_polar_usage_oldest_pending_seconds",
        "creditgate_polar_meter_drift_units",
        "creditgate_webhooks_total",
    ):
        assert name in body
