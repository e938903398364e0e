"""Checkout and customer portal against the local Polar, through the real polar-sdk.

Both routes are session-only (DESIGN.md §2): the caller is a signed-in Clerk
user, here with tokens from the local Clerk stand-in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from creditgate.billing.client import POLAR_CALLS_HOLDING_A_CONNECTION
from creditgate.config import Settings
from creditgate.http.app import create_app
from tests.billing_support import PACK, PRO, billing_settings
from tests.conftest import Services, ledger_footprint, running
from tests.fake_clerk import ISSUER, PARTY, FakeClerk
from tests.parity_support import signed_in
from tests.polar_fake import FakePolar


def with_clerk(settings: Settings, clerk: FakeClerk) -> Settings:
    return dataclasses.replace(
        settings,
        clerk_jwks_url=clerk.url,
        clerk_issuer=ISSUER,
        clerk_authorized_parties=(PARTY,),
    )


@pytest.fixture
async def app(
    services: Services, upstream: TestServer, db: asyncpg.Pool, fake: FakePolar, clerk: FakeClerk
) -> AsyncIterator[Any]:
    settings = billing_settings(services, str(upstream.make_url("/v1")), fake.url)
    async with running(with_clerk(settings, clerk)) as client:
        yield client


async def test_checkout_is_created_for_the_caller_and_reused_while_open(
    app: TestClient, fake: FakePolar, clerk: FakeClerk
) -> None:
    session, account_id = await signed_in(app, clerk)
    resp = await app.post("/api/checkout", json={"product": PACK}, headers=session)
    assert resp.status == 201
    first = (await resp.json())["data"]
    assert first["url"].startswith("https://sandbox.polar.sh/checkout/")
    sent = fake.checkouts[first["checkoutId"]]
    assert sent["external_customer_id"] == account_id
    assert sent["metadata"] == {"accountId": account_id}
    assert sent["product_id"] == PACK
    assert sent["success_url"] == "https://app.example.com/billing/done"

    resp = await app.post("/api/checkout", json={"product": PACK}, headers=session)
    assert resp.status == 200
    again = (await resp.json())["data"]
    assert (again["checkoutId"], again["url"], again["reused"]) == (
        first["checkoutId"],
        first["url"],
        True,
    )
    # Another product is another checkout.
    resp = await app.post("/api/checkout", json={"product": PRO}, headers=session)
    assert (await resp.json())["data"]["checkoutId"] != first["checkoutId"]
    # Once Polar says the checkout is done, a new one is made.
    fake.checkouts[first["checkoutId"]]["status"] = "succeeded"
    resp = await app.post("/api/checkout", json={"product": PACK}, headers=session)
    assert resp.status == 201
    assert (await resp.json())["data"]["checkoutId"] != first["checkoutId"]


async def test_concurrent_checkouts_for_one_product_make_one(
    app: TestClient, fake: FakePolar, clerk: FakeClerk
) -> None:
    session, account_id = await signed_in(app, clerk)
    responses = await asyncio.gather(
        *(app.post("/api/checkout", json={"product": PACK}, headers=session) for _ in range(4))
    )
    ids = {(await r.json())["data"]["checkoutId"] for r in responses}
    assert len(ids) == 1
    mine = [k for k, v in fake.checkouts.items() if v["external_customer_id"] == account_id]
    assert len(mine) == 1


async def test_a_slow_polar_holds_few_database_connections(
    services: Services, upstream: TestServer, db: asyncpg.Pool, fake: FakePolar, clerk: FakeClerk
) -> None:
    # A checkout holds a connection (its advisory lock) while it calls Polar;
    # with Polar stuck, only a few may, so the proxy's pool is never starved.
    settings = billing_settings(services, str(upstream.make_url("/v1")), fake.url)
    config = settings.config
    patient = dataclasses.replace(config.polar, request_timeout_seconds=30.0)
    settings = dataclasses.replace(settings, config=dataclasses.replace(config, polar=patient))
    async with running(with_clerk(settings, clerk)) as app:
        sessions = [(await signed_in(app, clerk))[0] for _ in range(10)]
        fake.hold_checkouts.set()
        try:
            calls = [
                asyncio.create_task(app.post("/api/checkout", json={"product": PACK}, headers=s))
                for s in sessions
            ]
            for _ in range(500):
                if fake.checkouts_waiting >= POLAR_CALLS_HOLDING_A_CONNECTION:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # time for more to arrive, were they let through
            assert fake.checkouts_waiting == POLAR_CALLS_HOLDING_A_CONNECTION
            # Meanwhile every other route still gets its connection.
            resp = await app.get("/api/user/balance", headers=sessions[0])
            assert resp.status == 200
        finally:
            fake.hold_checkouts.clear()
        statuses = [(await c).status for c in calls]
        assert statuses == [201] * 10


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"product": "not-a-product"}, "product"),
        ({}, "product"),
        ({"product": 7}, "product"),
        ({"product": PACK, "quantity": 2}, "quantity"),
    ],
)
async def test_bad_checkout_requests_are_400(
    app: TestClient, db: asyncpg.Pool, fake: FakePolar, clerk: FakeClerk, body: Any, path: str
) -> None:
    session, account_id = await signed_in(app, clerk)
    before = len(fake.checkouts)
    resp = await app.post("/api/checkout", json=body, headers=session)
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["code"] == "VALIDATION_ERROR"
    assert err["details"][0]["path"] == path
    assert len(fake.checkouts) == before
    assert await ledger_footprint(db, uuid.UUID(account_id)) == (0, 0, 0, 0)


async def test_billing_routes_are_for_signed_in_people_only(
    app: TestClient, fake: FakePolar, customer_factory
) -> None:
    c = await customer_factory(0)
    before = len(fake.checkouts)
    for route in ("/api/checkout", "/api/billing-portal"):
        resp = await app.post(route, json={"product": PACK})
        assert resp.status == 401
        resp = await app.post(route, json={"product": PACK}, headers=c.auth)
        assert resp.status == 403  # an API key is an app, not the account's owner
        assert (await resp.json())["error"]["code"] == "FORBIDDEN"
    assert len(fake.checkouts) == before


async def test_portal_url_once_polar_knows_the_customer(app: TestClient, clerk: FakeClerk) -> None:
    session, _ = await signed_in(app, clerk)
    resp = await app.post("/api/billing-portal", headers=session)
    assert resp.status == 404  # never bought anything: Polar has no such customer
    assert (await resp.json())["error"]["code"] == "NOT_FOUND"
    await app.post("/api/checkout", json={"product": PACK}, headers=session)
    resp = await app.post("/api/billing-portal", headers=session)
    assert resp.status == 200
    assert (await resp.json())["data"]["url"].startswith("https://sandbox.polar.sh/portal")


async def test_polar_down_is_a_502_and_unconfigured_is_a_503(
    services: Services, upstream: TestServer, db: asyncpg.Pool, clerk: FakeClerk
) -> None:
    session = {"Authorization": f"Bearer {clerk.token(f'user_{uuid.uuid4().hex}')}"}
    down = billing_settings(services, str(upstream.make_url("/v1")), "http://127.0.0.1:9")
    async with TestClient(TestServer(create_app(with_clerk(down, clerk)))) as client:
        resp = await client.post("/api/checkout", json={"product": PACK}, headers=session)
        assert resp.status == 502
        assert (await resp.json())["error"]["code"] == "UPSTREAM_ERROR"
    off = billing_settings(services, str(upstream.make_url("/v1")), None)
    async with TestClient(TestServer(create_app(with_clerk(off, clerk)))) as client:
        resp = await client.post("/api/checkout", json={"product": PACK}, headers=session)
        assert resp.status == 503
        resp = await client.post("/api/billing-portal", headers=session)
        assert resp.status == 503
