"""Clerk webhooks, signed by svix's own signer: accounts created and closed, once."""

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
from creditgate.auth import create_api_key
from creditgate.http.app import create_app
from tests.billing_support import CLERK_WEBHOOK_SECRET, billing_settings, eventually
from tests.conftest import Services, running
from tests.polar_fake import new_svix_secret, sign_clerk


@pytest.fixture
async def app(services: Services, upstream: TestServer, db: asyncpg.Pool) -> AsyncIterator[Any]:
    settings = billing_settings(services, str(upstream.make_url("/v1")), None)
    async with running(settings) as client:
        yield client


def clerk_body(event_type: str, clerk_id: str) -> bytes:
    # Clerk's payloads carry names and emails; creditgate keeps only the id.
    data: dict[str, Any] = {"id": clerk_id, "object": event_type.split(".")[0]}
    if event_type.endswith(".deleted"):
        data["deleted"] = True
    else:
        data["email_addresses"] = [{"email_address": "someone@example.com"}]
    return orjson.dumps({"type": event_type, "object": "event", "data": data})


async def deliver(
    client: TestClient, event_type: str, clerk_id: str, *, svix_id: str | None = None
) -> tuple[int, str]:
    body = clerk_body(event_type, clerk_id)
    headers = sign_clerk(body, CLERK_WEBHOOK_SECRET, svix_id=svix_id)
    resp = await client.post("/api/webhooks/clerk", data=body, headers=headers)
    return resp.status, headers["svix-id"]


async def applied(db: asyncpg.Pool, svix_id: str) -> None:
    async def done() -> bool:
        status = await db.fetchval(
            "SELECT status FROM webhook_events WHERE source = 'clerk' AND webhook_id = $1",
            svix_id,
        )
        return status == "processed"

    await eventually(done, what=f"clerk event {svix_id} to be applied")


async def accounts_of(db: asyncpg.Pool, kind: str, clerk_id: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT id, status FROM accounts WHERE kind = $1 AND external_id = $2", kind, clerk_id
    )


async def test_user_created_three_times_makes_one_account_shared_with_first_use(
    app: TestClient, db: asyncpg.Pool
) -> None:
    clerk_id = f"user_{uuid.uuid4().hex}"
    svix_id = f"msg_{uuid.uuid4().hex}"
    statuses = [(await deliver(app, "user.created", clerk_id, svix_id=svix_id))[0] for _ in "abc"]
    assert statuses == [202, 200, 200]
    await applied(db, svix_id)
    rows = await accounts_of(db, "user", clerk_id)
    assert [r["status"] for r in rows] == ["active"]
    # The account a first request would create is the same one.
    assert (await ledger.ensure_account(db, "user", clerk_id)).id == rows[0]["id"]
    stored = await db.fetchval(
        "SELECT facts::text FROM webhook_events WHERE webhook_id = $1", svix_id
    )
    assert "example.com" not in stored  # no email kept


async def test_user_deleted_closes_the_account_and_keeps_its_history(
    app: TestClient, db: asyncpg.Pool, customer_factory
) -> None:
    c = await customer_factory(5)
    _, svix_id = await deliver(app, "user.deleted", c.account.external_id)
    await applied(db, svix_id)
    assert [r["status"] for r in await accounts_of(db, "user", c.account.external_id)] == ["closed"]
    resp = await app.get("/api/user/balance", headers=c.auth)
    assert resp.status == 403  # no new charges: a closed account's keys are refused
    assert (
        await db.fetchval("SELECT count(*) FROM ledger_entries WHERE account_id = $1", c.account.id)
        == 1
    )
    # A late user.created does not reopen it.
    _, late = await deliver(app, "user.created", c.account.external_id)
    await applied(db, late)
    assert [r["status"] for r in await accounts_of(db, "user", c.account.external_id)] == ["closed"]


async def test_a_deletion_that_overtakes_the_creation_leaves_the_account_closed(
    app: TestClient, db: asyncpg.Pool
) -> None:
    clerk_id = f"user_{uuid.uuid4().hex}"
    _, deleted = await deliver(app, "user.deleted", clerk_id)
    await applied(db, deleted)
    _, created = await deliver(app, "user.created", clerk_id)
    await applied(db, created)
    assert [r["status"] for r in await accounts_of(db, "user", clerk_id)] == ["closed"]


async def test_organizations_are_created_and_closed(app: TestClient, db: asyncpg.Pool) -> None:
    org_id = f"org_{uuid.uuid4().hex}"
    _, created = await deliver(app, "organization.created", org_id)
    await applied(db, created)
    rows = await accounts_of(db, "org", org_id)
    assert [r["status"] for r in rows] == ["active"]
    key = await create_api_key(db, rows[0]["id"])
    assert (
        await app.get("/api/user/balance", headers={"Authorization": f"Bearer {key.key}"})
    ).status == 200
    _, deleted = await deliver(app, "organization.deleted", org_id)
    await applied(db, deleted)
    assert [r["status"] for r in await accounts_of(db, "org", org_id)] == ["closed"]


@pytest.mark.parametrize("tamper", ["forged", "stale", "unsigned", "garbled-signature"])
async def test_unverifiable_clerk_deliveries_are_refused_and_write_nothing(
    app: TestClient, db: asyncpg.Pool, tamper: str
) -> None:
    clerk_id = f"user_{uuid.uuid4().hex}"
    body = clerk_body("user.created", clerk_id)
    secret, at = CLERK_WEBHOOK_SECRET, datetime.now(UTC)
    if tamper == "forged":
        secret = new_svix_secret()
    elif tamper == "stale":
        at -= timedelta(minutes=6)
    headers = sign_clerk(body, secret, at=at)
    if tamper == "unsigned":
        headers = {"content-type": "application/json"}
    elif tamper == "garbled-signature":
        headers["svix-signature"] = "not a signature"
    resp = await app.post("/api/webhooks/clerk", data=body, headers=headers)
    assert resp.status == (400 if tamper == "unsigned" else 401)
    assert await accounts_of(db, "user", clerk_id) == []
    assert (
        await db.fetchval(
            "SELECT count(*) FROM webhook_events WHERE webhook_id = $1", headers.get("svix-id", "")
        )
        == 0
    )


async def test_other_clerk_events_are_acknowledged_and_ignored(
    app: TestClient, db: asyncpg.Pool
) -> None:
    clerk_id = f"user_{uuid.uuid4().hex}"
    status, svix_id = await deliver(app, "user.updated", clerk_id)
    assert status == 200
    assert (
        await db.fetchval("SELECT count(*) FROM webhook_events WHERE webhook_id = $1", svix_id) == 0
    )
    assert await accounts_of(db, "user", clerk_id) == []


async def test_a_secretless_deployment_refuses_clerk_webhooks(
    services: Services, upstream: TestServer, db: asyncpg.Pool
) -> None:
    settings = billing_settings(
        services, str(upstream.make_url("/v1")), None, clerk_webhook_secret=None
    )
    clerk_id = f"user_{uuid.uuid4().hex}"
    body = clerk_body("user.created", clerk_id)
    async with TestClient(TestServer(create_app(settings))) as client:
        resp = await client.post(
            "/api/webhooks/clerk", data=body, headers=sign_clerk(body, CLERK_WEBHOOK_SECRET)
        )
        assert resp.status == 503
    assert await accounts_of(db, "user", clerk_id) == []


async def test_an_event_type_that_is_not_a_string_is_ignored_not_500(app: TestClient) -> None:
    client = app
    body = orjson.dumps({"type": ["user.created"], "object": "event", "data": {"id": "user_x"}})
    resp = await client.post(
        "/api/webhooks/clerk", data=body, headers=sign_clerk(body, CLERK_WEBHOOK_SECRET)
    )
    assert resp.status == 200
    assert (await resp.json())["data"] == {"received": True, "ignored": True}
