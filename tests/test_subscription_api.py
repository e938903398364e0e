"""``GET``/``DELETE /api/subscription``: webhook-fed state, refreshed from Polar, cancellation."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from creditgate.config import Settings
from tests.billing_support import PRO, applied, deliver
from tests.conftest import Services, running
from tests.fake_clerk import FakeClerk
from tests.parity_support import parity_settings, signed_in
from tests.polar_fake import FakePolar, order_payload, subscription_payload
from tests.schema_check import assert_conforms, response_schema

CREDIT = 1_000_000


@pytest.fixture
def settings(
    services: Services, upstream: TestServer, clerk: FakeClerk, fake: FakePolar
) -> Settings:
    return parity_settings(services, str(upstream.make_url("/v1")), polar_url=fake.url, clerk=clerk)


@pytest.fixture
async def app(settings: Settings, db: asyncpg.Pool) -> AsyncIterator[TestClient]:
    async with running(settings) as client:
        yield client


class Plan:
    """One Polar subscription of an account: its payloads at successive moments."""

    def __init__(self, account_id: str) -> None:
        self.id = str(uuid.uuid4())
        self.account_id = account_id
        self.created = datetime.now(UTC) - timedelta(days=3)
        self.start = self.created
        self.end = self.start + timedelta(days=30)
        self.clock = self.created

    def at(self, status: str = "active", **kw: Any) -> dict[str, Any]:
        """The subscription as Polar has it now, modified a minute after the last state."""
        self.clock += timedelta(minutes=1)
        return subscription_payload(
            subscription_id=self.id,
            account_id=self.account_id,
            product_id=PRO,
            status=status,
            modified_at=self.clock,
            created_at=self.created,
            period_start=self.start,
            period_end=self.end,
            **kw,
        )


async def webhook(app: TestClient, db: asyncpg.Pool, event: str, data: dict[str, Any]) -> None:
    status, webhook_id = await deliver(app, event, data)
    assert status == 202
    assert (await applied(db, webhook_id))["status"] == "processed"


async def view(app: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    resp = await app.get("/api/subscription", headers=headers)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert_conforms(body, response_schema("get", "/api/subscription", 200))
    data: dict[str, Any] = body["data"]
    return data


async def subscribed(
    app: TestClient, db: asyncpg.Pool, clerk: FakeClerk, fake: FakePolar
) -> tuple[dict[str, str], str, Plan]:
    """A signed-in user with an active Pro plan (Polar and our webhook-fed state agree)."""
    session, account_id = await signed_in(app, clerk)
    plan = Plan(account_id)
    state = plan.at()
    fake.put_subscription(state)
    await webhook(app, db, "subscription.active", state)
    return session, account_id, plan


async def test_the_view_is_what_the_webhooks_said(
    app: TestClient, db: asyncpg.Pool, clerk: FakeClerk, fake: FakePolar
) -> None:
    session, account_id, plan = await subscribed(app, db, clerk, fake)
    await webhook(
        app,
        db,
        "order.paid",
        order_payload(
            order_id=str(uuid.uuid4()),
            account_id=account_id,
            product_id=PRO,
            billing_reason="subscription_create",
            subscription_id=plan.id,
        ),
    )
    data = await view(app, session)
    assert data == {
        "id": plan.id,
        "productId": PRO,
        "plan": "Pro",
        "tier": "pro",
        "status": "active",
        "currentPeriodStart": plan.start.isoformat().replace("+00:00", "Z"),
        "currentPeriodEnd": plan.end.isoformat().replace("+00:00", "Z"),
        "cancelAtPeriodEnd": False,
        "cancelRequestedAt": None,
        "creditsGranted": 25,
        "creditsGrantedMicros": 25 * CREDIT,
        "updatedAt": data["updatedAt"],
        "refreshedAt": None,
    }
    assert fake.subscription_calls("GET", plan.id) == 0  # fresh: Polar was not asked


async def test_cancel_asks_polar_once_and_the_tier_changes_with_the_webhook(
    app: TestClient, db: asyncpg.Pool, clerk: FakeClerk, fake: FakePolar
) -> None:
    session, _, plan = await subscribed(app, db, clerk, fake)
    resp = await app.delete("/api/subscription", headers=session)
    assert resp.status == 202, await resp.text()
    answer = await resp.json()
    assert_conforms(answer, response_schema("delete", "/api/subscription", 202))
    data = answer["data"]
    assert data["cancelRequestedAt"] is not None
    assert (data["tier"], data["status"], data["cancelAtPeriodEnd"]) == ("pro", "active", False)
    assert fake.subscription_calls("PATCH", plan.id) == 1
    assert fake.subscriptions[plan.id]["cancel_at_period_end"] is True
    # Asked again before Polar's webhook: answered, Polar not called again.
    resp = await app.delete("/api/subscription", headers=session)
    assert resp.status == 202
    assert fake.subscription_calls("PATCH", plan.id) == 1
    assert (await view(app, session))["tier"] == "pro"

    # Polar confirms the scheduled cancellation: still the plan's tier until the period ends.
    await webhook(app, db, "subscription.canceled", plan.at(cancel_at_period_end=True))
    data = await view(app, session)
    assert (data["cancelAtPeriodEnd"], data["tier"], data["status"]) == (True, "pro", "active")
    resp = await app.delete("/api/subscription", headers=session)
    assert resp.status == 200  # already set to cancel
    assert fake.subscription_calls("PATCH", plan.id) == 1
    # The period ends: Polar revokes it, and the tier goes back to free.
    await webhook(app, db, "subscription.revoked", plan.at("canceled", cancel_at_period_end=True))
    data = await view(app, session)
    assert (data["status"], data["tier"]) == ("canceled", "free")
    resp = await app.delete("/api/subscription", headers=session)
    assert resp.status == 404


async def test_a_stale_state_is_refreshed_from_polar(
    app: TestClient, db: asyncpg.Pool, clerk: FakeClerk, fake: FakePolar
) -> None:
    session, _, plan = await subscribed(app, db, clerk, fake)
    # Polar changed it (a cancellation in the customer portal) and the webhook got lost.
    fake.put_subscription(plan.at(cancel_at_period_end=True))
    assert (await view(app, session))["cancelAtPeriodEnd"] is False  # fresh: not asked
    await db.execute(
        "UPDATE subscriptions SET updated_at = now() - interval '1 hour' WHERE id = $1", plan.id
    )
    data = await view(app, session)
    assert data["cancelAtPeriodEnd"] is True and data["refreshedAt"] is not None
    assert fake.subscription_calls("GET", plan.id) == 1
    await view(app, session)  # fresh again
    assert fake.subscription_calls("GET", plan.id) == 1


async def test_when_polar_cannot_refresh_the_stored_state_is_served(
    app: TestClient, db: asyncpg.Pool, clerk: FakeClerk, fake: FakePolar
) -> None:
    session, _, plan = await subscribed(app, db, clerk, fake)
    del fake.subscriptions[plan.id]  # Polar answers 404 for it
    await db.execute(
        "UPDATE subscriptions SET updated_at = now() - interval '1 hour' WHERE id = $1", plan.id
    )
    data = await view(app, session)
    assert (data["status"], data["refreshedAt"]) == ("active", None)
    assert fake.subscription_calls("GET", plan.id) == 1
    # Within the back-off the stored state is served without asking again.
    for _ in range(3):
        assert (await view(app, session))["status"] == "active"
    assert fake.subscription_calls("GET", plan.id) == 1


async def test_who_may_see_and_cancel(
    app: TestClient, db: asyncpg.Pool, clerk: FakeClerk, fake: FakePolar, customer_factory: Any
) -> None:
    c = await customer_factory(1)
    assert (await app.get("/api/subscription", headers=c.auth)).status == 404
    assert (await app.get("/api/subscription")).status == 401
    # Cancelling is a person's act: an API key is refused before anything is asked.
    assert (await app.delete("/api/subscription", headers=c.auth)).status == 403
    session, _ = await signed_in(app, clerk)
    assert (await app.delete("/api/subscription", headers=session)).status == 404
