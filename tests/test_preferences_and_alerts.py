"""Preferences, and low-balance webhooks: one signed notification per crossing, off the path."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY
from standardwebhooks import Webhook, WebhookVerificationError

from creditgate import ledger
from creditgate.config import Settings
from tests.billing_support import eventually
from tests.conftest import Customer, Services, ledger_footprint, running
from tests.fake_clerk import FakeClerk
from tests.logcapture import remember_secret
from tests.parity_support import ADMIN, parity_settings, signed_in
from tests.schema_check import assert_conforms, request_schema, response_schema

CREDIT = 1_000_000
MESSAGES = [{"role": "user", "content": "Hello there"}]


@dataclass
class Receiver:
    """A webhook endpoint: records every delivery; fails the first ``fail_first`` of them."""

    server: TestServer | None = None
    hits: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    fail_first: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.hits.append((dict(request.headers), body))
        if len(self.hits) <= self.fail_first:
            return web.Response(status=500)
        return web.Response(status=204)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/hooks/creditgate"))

    def accepted(self) -> list[tuple[dict[str, str], bytes]]:
        return self.hits[self.fail_first :]

    def verified(self, secret: str) -> list[dict[str, Any]]:
        """Each accepted delivery, checked by the Standard Webhooks reference verifier."""
        out = []
        for headers, body in self.accepted():
            Webhook(secret).verify(body, headers)  # raises on a bad signature
            out.append({"id": headers["webhook-id"], **orjson.loads(body)})
        return out


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/creditgate", rec.handle)
    rec.server = TestServer(app)
    await rec.server.start_server()
    try:
        yield rec
    finally:
        await rec.server.close()


@pytest.fixture
def settings(services: Services, upstream: TestServer, clerk: FakeClerk) -> Settings:
    return parity_settings(services, str(upstream.make_url("/v1")), polar_url=None, clerk=clerk)


@pytest.fixture
async def app(settings: Settings, db: asyncpg.Pool) -> AsyncIterator[TestClient]:
    async with running(settings) as client:
        yield client


def low_balance_total() -> float:
    return REGISTRY.get_sample_value("creditgate_low_balance_total") or 0.0


async def patch(app: TestClient, body: Any, headers: dict[str, str]) -> Any:
    resp = await app.patch("/api/preferences", json=body, headers=headers)
    if resp.status == 200:
        assert_conforms(body, request_schema("patch", "/api/preferences"))
        assert_conforms(await resp.json(), response_schema("patch", "/api/preferences", 200))
    return resp


async def prefs(app: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    resp = await app.get("/api/preferences", headers=headers)
    assert resp.status == 200
    body = await resp.json()
    assert_conforms(body, response_schema("get", "/api/preferences", 200))
    data: dict[str, Any] = body["data"]
    return data


async def watch(app: TestClient, c: Customer, url: str, threshold: str) -> str:
    """Set the threshold and URL; the signing secret (shown this once)."""
    resp = await patch(app, {"lowBalanceThreshold": threshold, "notificationUrl": url}, c.auth)
    assert resp.status == 200, await resp.text()
    secret: str = (await resp.json())["data"]["signingSecret"]
    remember_secret(secret)
    return secret


async def alerts(db: asyncpg.Pool, c: Customer) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT id, status, attempts, threshold, available FROM low_balance_alerts"
        " WHERE account_id = $1 ORDER BY crossed_at",
        c.account.id,
    )


async def settled(db: asyncpg.Pool, c: Customer, count: int) -> list[asyncpg.Record]:
    """The account's alerts once ``count`` of them have finished (sent, failed, skipped)."""

    async def done() -> bool:
        rows = await alerts(db, c)
        return len(rows) == count and all(
            r["status"] in ("sent", "failed", "skipped") for r in rows
        )

    await eventually(done, what=f"{count} alert(s) to finish")
    return await alerts(db, c)


async def chat(app: TestClient, c: Customer, model: str | None = "pricey") -> dict[str, Any]:
    body: dict[str, Any] = {"messages": MESSAGES, "max_tokens": 10}
    if model is not None:
        body["model"] = model
    resp = await app.post("/v1/chat/completions", json=body, headers=c.auth)
    assert resp.status == 200, await resp.text()
    data: dict[str, Any] = await resp.json()
    return data


async def spend(app: TestClient, c: Customer, credits: str) -> None:
    """An admin-recorded usage of exactly ``credits``."""
    resp = await app.post(
        "/api/usage/record",
        json={"account": str(c.account.id), "cost": credits, "idempotencyKey": str(uuid.uuid4())},
        headers=ADMIN,
    )
    assert resp.status == 201, await resp.text()


# ---------------------------------------------------------------- preferences


async def test_preferences_start_empty_and_change_only_for_the_caller(
    app: TestClient, db: asyncpg.Pool, customer_factory: Any, receiver: Receiver
) -> None:
    c = await customer_factory(1)
    other = await customer_factory(1)
    fresh = await prefs(app, c.auth)
    assert fresh == {
        "accountId": str(c.account.id),
        "lowBalanceThreshold": None,
        "lowBalanceThresholdMicros": None,
        "lowBalance": False,
        "notificationUrl": None,
        "defaultModel": None,
        "signingSecretPrefix": None,
        "signingSecretCreatedAt": None,
        "updatedAt": None,
    }
    resp = await patch(
        app,
        {"lowBalanceThreshold": "0.5", "notificationUrl": receiver.url, "defaultModel": "pricey"},
        c.auth,
    )
    assert resp.status == 200
    data = (await resp.json())["data"]
    secret = data.pop("signingSecret")
    remember_secret(secret)
    assert secret.startswith("whsec_") and len(secret) > 40
    assert data["lowBalanceThresholdMicros"] == 500_000 and data["lowBalanceThreshold"] == 0.5
    assert data["notificationUrl"] == receiver.url and data["defaultModel"] == "pricey"
    assert data["signingSecretPrefix"] == secret[:10]
    shown = await prefs(app, c.auth)
    assert shown == data and secret not in orjson.dumps(shown).decode()
    assert await prefs(app, other.auth) == {**fresh, "accountId": str(other.account.id)}
    # A later change shows no secret; a rotation shows a new one, once.
    resp = await patch(app, {"lowBalanceThreshold": 1}, c.auth)
    assert "signingSecret" not in (await resp.json())["data"]
    resp = await patch(app, {"rotateSigningSecret": True}, c.auth)
    rotated = (await resp.json())["data"]["signingSecret"]
    remember_secret(rotated)
    assert rotated != secret
    resp = await patch(
        app, {"lowBalanceThreshold": None, "notificationUrl": None, "defaultModel": None}, c.auth
    )
    cleared = (await resp.json())["data"]
    assert (cleared["lowBalanceThreshold"], cleared["notificationUrl"]) == (None, None)
    assert cleared["signingSecretPrefix"] == rotated[:10]  # kept for the next URL


@pytest.mark.parametrize(
    ("body", "paths"),
    [
        ({}, {""}),
        ({"lowBalanceThreshold": "abc"}, {"lowBalanceThreshold"}),
        ({"lowBalanceThreshold": -1}, {"lowBalanceThreshold"}),
        ({"lowBalanceThreshold": "0.0000001"}, {"lowBalanceThreshold"}),
        ({"notificationUrl": "ftp://example.com/x"}, {"notificationUrl"}),
        ({"notificationUrl": "javascript:alert(1)"}, {"notificationUrl"}),
        ({"notificationUrl": "not a url"}, {"notificationUrl"}),
        ({"notificationUrl": "https://user:pw@example.com/"}, {"notificationUrl"}),
        ({"notificationUrl": "https://example.com/" + "x" * 2048}, {"notificationUrl"}),
        ({"notificationUrl": 5}, {"notificationUrl"}),
        ({"notificationUrl": "https://example.com/hook"}, {"notificationUrl"}),  # allowed_hosts
        ({"defaultModel": "gpt-unknown"}, {"defaultModel"}),
        ({"rotateSigningSecret": "yes"}, {"rotateSigningSecret"}),
        ({"theme": "dark"}, {"theme"}),
        (
            {"lowBalanceThreshold": [], "notificationUrl": "x", "defaultModel": 1},
            {"lowBalanceThreshold", "notificationUrl", "defaultModel"},
        ),
    ],
)
async def test_patch_validates_every_field(
    app: TestClient, customer_factory: Any, body: Any, paths: set[str]
) -> None:
    c = await customer_factory(1)
    before = await prefs(app, c.auth)
    resp = await patch(app, body, c.auth)
    assert resp.status == 400, await resp.text()
    err = (await resp.json())["error"]
    assert err["code"] == "VALIDATION_ERROR"
    assert {d["path"] for d in err["details"]} == paths
    assert await prefs(app, c.auth) == before


async def test_preferences_need_credentials_and_a_session_works_too(
    app: TestClient, clerk: FakeClerk
) -> None:
    assert (await app.get("/api/preferences")).status == 401
    assert (await app.patch("/api/preferences", json={"defaultModel": None})).status == 401
    session, account_id = await signed_in(app, clerk)
    resp = await patch(app, {"defaultModel": "mock-model"}, session)
    assert resp.status == 200
    assert (await resp.json())["data"]["accountId"] == account_id


async def test_the_default_model_serves_requests_that_name_none(
    app: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(5)
    resp = await app.post("/v1/chat/completions", json={"messages": MESSAGES}, headers=c.auth)
    assert resp.status == 400
    assert (await resp.json())["error"]["details"][0]["path"] == "model"
    assert (await patch(app, {"defaultModel": "pricey"}, c.auth)).status == 200
    await chat(app, c, model=None)
    model = await db.fetchval(
        "SELECT model FROM ledger_entries WHERE account_id = $1 AND kind = 'debit'", c.account.id
    )
    assert model == "pricey"
    await chat(app, c, model="mock-model")  # a named model still wins
    found = (await app.get("/api/quota/check", headers=c.auth)).status
    assert found == 200


# ---------------------------------------------------------------- low balance


async def test_a_call_crossing_the_threshold_sends_one_signed_webhook_per_crossing(
    app: TestClient, db: asyncpg.Pool, customer_factory: Any, receiver: Receiver
) -> None:
    c = await customer_factory(1)
    secret = await watch(app, c, receiver.url, "0.5")
    counted = low_balance_total()
    await spend(app, c, "0.49")  # available 0.51: above
    assert await alerts(db, c) == []
    charge = await chat(app, c)  # this call takes it below 0.5
    cost = charge["usage"]["cost_micros"]
    assert cost > 10_000
    rows = await alerts(db, c)  # decided in the call's own transaction
    assert len(rows) == 1
    await chat(app, c)  # still below: no second crossing
    assert len(await alerts(db, c)) == 1
    [row] = await settled(db, c, 1)
    assert (row["status"], row["attempts"]) == ("sent", 1)
    [hook] = receiver.verified(secret)
    assert hook["id"] == f"msg_{row['id'].hex}"
    assert hook["type"] == "balance.low"
    assert hook["data"]["accountId"] == str(c.account.id)
    assert hook["data"]["thresholdMicros"] == 500_000
    assert hook["data"]["availableMicros"] == CREDIT - 490_000 - cost
    assert low_balance_total() == counted + 1
    assert (await prefs(app, c.auth))["lowBalance"] is True

    # Back above (a grant), then below again: the next crossing, the next webhook.
    grant = {"account": str(c.account.id), "amount": "0.1", "reason": "top-up"}
    resp = await app.post(
        "/api/admin/credits", json={**grant, "idempotencyKey": str(uuid.uuid4())}, headers=ADMIN
    )
    assert resp.status == 201
    assert (await prefs(app, c.auth))["lowBalance"] is False
    await chat(app, c)  # still above
    assert len(await alerts(db, c)) == 1
    await spend(app, c, "0.1")  # below again
    rows = await settled(db, c, 2)
    hooks = receiver.verified(secret)
    assert len(hooks) == 2 and hooks[0]["id"] != hooks[1]["id"]
    assert low_balance_total() == counted + 2
    # Nothing else went out: every delivery was one of the two crossings.
    assert len(receiver.hits) == 2


async def test_a_forged_or_stale_signature_fails_the_receivers_check(
    app: TestClient, customer_factory: Any, db: asyncpg.Pool, receiver: Receiver
) -> None:
    c = await customer_factory(1)
    secret = await watch(app, c, receiver.url, "0.9")
    await spend(app, c, "0.2")
    await settled(db, c, 1)
    [(headers, body)] = receiver.accepted()
    Webhook(secret).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"balance.low", b"balance.big"), headers)
    other = (await (await patch(app, {"rotateSigningSecret": True}, c.auth)).json())["data"]
    remember_secret(other["signingSecret"])
    with pytest.raises(WebhookVerificationError):
        Webhook(other["signingSecret"]).verify(body, headers)


async def test_a_failing_receiver_is_retried_with_the_same_message_id(
    app: TestClient, customer_factory: Any, db: asyncpg.Pool, receiver: Receiver
) -> None:
    receiver.fail_first = 2
    c = await customer_factory(1)
    secret = await watch(app, c, receiver.url, "0.9")
    await spend(app, c, "0.2")
    [row] = await settled(db, c, 1)
    assert row["status"] == "sent"
    assert len(receiver.hits) == 3  # two 500s, then accepted
    assert len({h["webhook-id"] for h, _ in receiver.hits}) == 1
    assert len(receiver.verified(secret)) == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_an_unreachable_receiver_never_fails_a_completion(
    app: TestClient, customer_factory: Any, db: asyncpg.Pool
) -> None:
    c = await customer_factory(1)
    await watch(app, c, f"http://127.0.0.1:{_closed_port()}/hook", "0.99")
    counted = low_balance_total()
    await chat(app, c)  # crosses; the delivery fails in the background
    [row] = await settled(db, c, 1)
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert low_balance_total() == counted + 1
    await chat(app, c)


async def test_without_a_url_the_crossing_is_counted_and_nothing_is_sent(
    app: TestClient, customer_factory: Any, db: asyncpg.Pool
) -> None:
    c = await customer_factory(1)
    assert (await patch(app, {"lowBalanceThreshold": "0.99"}, c.auth)).status == 200
    counted = low_balance_total()
    await chat(app, c)
    [row] = await settled(db, c, 1)
    assert row["status"] == "skipped"
    assert low_balance_total() == counted + 1


async def test_a_host_outside_allowed_hosts_is_never_contacted(
    app: TestClient, customer_factory: Any, db: asyncpg.Pool, receiver: Receiver
) -> None:
    c = await customer_factory(1)
    await watch(app, c, receiver.url, "0.99")
    # As if the URL had been set before an operator narrowed [notifications] allowed_hosts.
    await db.execute(
        "UPDATE account_preferences SET notification_url = 'https://example.com/hook'"
        " WHERE account_id = $1",
        c.account.id,
    )
    await chat(app, c)
    [row] = await settled(db, c, 1)
    assert row["status"] == "failed"
    error = await db.fetchval("SELECT last_error FROM low_balance_alerts WHERE id = $1", row["id"])
    assert error == "host not allowed"
    assert receiver.hits == []


async def test_reservations_alone_never_cross(
    app: TestClient, customer_factory: Any, db: asyncpg.Pool, receiver: Receiver
) -> None:
    c = await customer_factory(1)
    await watch(app, c, receiver.url, "0.99")
    hold = await ledger.reserve_hold(
        db, hold_id=uuid.uuid4(), account_id=c.account.id, amount=900_000, ttl_seconds=60
    )
    assert await alerts(db, c) == []  # available is 0.1, but nothing was charged
    await ledger.release_hold(db, hold.id)
    assert await alerts(db, c) == []


async def test_concurrent_charges_in_two_servers_cross_once(
    settings: Settings, db: asyncpg.Pool, customer_factory: Any, receiver: Receiver
) -> None:
    c = await customer_factory(1)
    counted = low_balance_total()
    async with running(settings) as one, running(settings) as two:
        secret = await watch(one, c, receiver.url, "0.8")
        # 2 × 8 calls at once, each about 0.021: the threshold is crossed by one of them.
        await asyncio.gather(*(chat(server, c) for server in (one, two) for _ in range(8)))
        # Every charge has committed: its crossing (if any) is queued with it.
        # Usually one; a second is legitimate when settlements released enough
        # reserved credits to lift `available` back over the threshold between
        # two charges (holds are upper bounds, several times a call's cost).
        crossings = len(await alerts(db, c))
        assert crossings >= 1
        rows = await settled(db, c, crossings)
    # Two servers, one delivery per crossing: none lost, none sent twice.
    assert [r["status"] for r in rows] == ["sent"] * crossings
    assert len(receiver.verified(secret)) == crossings
    assert low_balance_total() == counted + crossings
    assert (await ledger.get_balance(db, c.account.id)).balance < 800_000
    footprint = await ledger_footprint(db, c.account.id)
    assert footprint[0] == 17  # the grant and 16 debits
