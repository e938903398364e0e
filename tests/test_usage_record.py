"""``POST /api/usage/record``: external usage through the ledger's debit path, once per key."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from creditgate import ledger
from creditgate.auth import create_api_key
from tests.billing_support import eventually
from tests.conftest import Customer, Services, ledger_footprint, running
from tests.logcapture import remember_secret
from tests.parity_support import ADMIN, parity_settings
from tests.polar_fake import FakePolar
from tests.procs import run_cli as cli
from tests.schema_check import assert_conforms, problems, request_schema, response_schema

CREDIT = 1_000_000
PATH = "/api/usage/record"


@pytest.fixture
async def app(
    services: Services, upstream: TestServer, db: asyncpg.Pool, fake: FakePolar
) -> AsyncIterator[TestClient]:
    settings = parity_settings(services, str(upstream.make_url("/v1")), polar_url=fake.url)
    async with running(settings) as client:
        yield client


async def writer_key(db: asyncpg.Pool, c: Customer) -> dict[str, str]:
    """An API key of ``c``'s account with the usage:write scope."""
    key = await create_api_key(db, c.account.id, "metering", scope="usage:write")
    remember_secret(key.key)
    return {"Authorization": f"Bearer {key.key}"}


async def record(app: TestClient, body: dict[str, Any], headers: dict[str, str]) -> Any:
    return await app.post("/api/usage/record", json=body, headers=headers)


async def test_tokens_are_priced_and_debited_exactly_with_a_settled_hold(
    app: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(2)
    headers = await writer_key(db, c)
    body = {
        "model": "mock-model",
        "inputTokens": 1000,
        "outputTokens": 2000,
        "idempotencyKey": "batch-1",
        "occurredAt": "2026-01-02T03:04:05Z",
        "metadata": {"job": "nightly", "rows": 12},
    }
    assert_conforms(body, request_schema("post", PATH))
    resp = await record(app, body, headers)
    assert resp.status == 201, await resp.text()
    answer = await resp.json()
    assert_conforms(answer, response_schema("post", PATH, 201))
    data = answer["data"]
    # ceil(1000 × 0.15 + 2000 × 0.60) µc
    assert data["costMicros"] == 1350 and data["cost"] == 0.00135
    assert data["balanceMicros"] == 2 * CREDIT - 1350
    assert data["accountId"] == str(c.account.id)
    assert data["occurredAt"] == "2026-01-02T03:04:05Z"
    assert data["metadata"] == {"job": "nightly", "rows": 12}
    entry = await db.fetchrow(
        "SELECT e.kind, e.amount, e.model, e.input_tokens, e.output_tokens, e.balance_after,"
        " h.amount AS held, h.outcome, h.account_id AS hold_account"
        " FROM ledger_entries e JOIN holds h ON h.id = e.hold_id WHERE e.id = $1",
        uuid.UUID(data["entryId"]),
    )
    assert dict(entry) == {
        "kind": "debit",
        "amount": -1350,
        "model": "mock-model",
        "input_tokens": 1000,
        "output_tokens": 2000,
        "balance_after": 2 * CREDIT - 1350,
        "held": 1350,
        "outcome": "settled",
        "hold_account": c.account.id,
    }
    bal = await ledger.get_balance(db, c.account.id)
    assert (bal.balance, bal.reserved) == (2 * CREDIT - 1350, 0)


async def test_an_explicit_cost_needs_no_priced_model(
    app: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(1)
    headers = await writer_key(db, c)
    resp = await record(
        app,
        {"cost": "0.25", "model": "some-provider/model-x", "idempotencyKey": "k"},
        headers,
    )
    assert resp.status == 201, await resp.text()
    answer = await resp.json()
    assert_conforms(answer, response_schema("post", PATH, 201))
    data = answer["data"]
    assert (data["costMicros"], data["balanceMicros"]) == (250_000, 750_000)
    assert data["model"] == "some-provider/model-x" and data["inputTokens"] is None


async def test_a_replay_answers_the_first_result_and_a_changed_body_is_a_conflict(
    app: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(1)
    headers = await writer_key(db, c)
    body = {"model": "pricey", "inputTokens": 10, "outputTokens": 20, "idempotencyKey": "r-1"}
    first = await record(app, body, headers)
    assert first.status == 201 and "Idempotent-Replayed" not in first.headers
    before = await ledger_footprint(db, c.account.id)
    again = await record(app, body, headers)
    assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["data"] == (await first.json())["data"]
    changed = await record(app, {**body, "outputTokens": 21}, headers)
    assert changed.status == 409
    assert (await changed.json())["error"]["code"] == "CONFLICT"
    assert await ledger_footprint(db, c.account.id) == before


async def test_concurrent_repeats_of_one_key_write_one_debit(
    app: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(1)
    headers = await writer_key(db, c)
    body = {"cost": "0.1", "idempotencyKey": "same"}
    answers = await asyncio.gather(*(record(app, body, headers) for _ in range(8)))
    assert [r.status for r in answers] == [201] * 8
    ids = {(await r.json())["data"]["entryId"] for r in answers}
    assert len(ids) == 1
    assert await ledger_footprint(db, c.account.id) == (2, 1, 900_000, 0)


async def test_without_credits_it_is_402_unless_the_overdraft_is_allowed_and_covers_it(
    app: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory("0.5")
    headers = await writer_key(db, c)
    before = await ledger_footprint(db, c.account.id)
    resp = await record(app, {"cost": 1, "idempotencyKey": "a"}, headers)
    assert resp.status == 402
    err = (await resp.json())["error"]
    assert err["code"] == "INSUFFICIENT_CREDITS" and err["details"]["requiredMicros"] == CREDIT
    # Asking for the overdraft does not help while the account has none.
    resp = await record(app, {"cost": 1, "idempotencyKey": "a", "allowOverdraft": True}, headers)
    assert resp.status == 402
    assert await ledger_footprint(db, c.account.id) == before

    await ledger.set_overdraft_limit(db, c.account.id, 2 * CREDIT)
    resp = await record(app, {"cost": 1, "idempotencyKey": "a"}, headers)
    assert resp.status == 402  # not asked for: the overdraft stays untouched
    resp = await record(app, {"cost": 1, "idempotencyKey": "a", "allowOverdraft": True}, headers)
    assert resp.status == 201
    assert (await resp.json())["data"]["balanceMicros"] == -500_000
    # Beyond the overdraft limit even when allowed.
    resp = await record(app, {"cost": 2, "idempotencyKey": "b", "allowOverdraft": True}, headers)
    assert resp.status == 402
    assert (await ledger.get_balance(db, c.account.id)).balance == -500_000


async def test_who_may_record_and_for_which_account(
    app: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(1)
    other = await customer_factory(1)
    body = {"cost": "0.01", "idempotencyKey": str(uuid.uuid4())}
    assert (await record(app, body, {})).status == 401
    # An ordinary account key may spend through calls, not record usage.
    assert (await record(app, body, c.auth)).status == 403
    writer = await writer_key(db, c)
    resp = await record(app, {**body, "account": str(other.account.id)}, writer)
    assert resp.status == 403
    resp = await record(app, {**body, "account": c.account.external_id}, writer)
    assert resp.status == 201 and (await resp.json())["data"]["accountId"] == str(c.account.id)
    # ADMIN_TOKEN is no account: it must name one, by id or Clerk id.
    resp = await record(app, {**body, "idempotencyKey": "x"}, ADMIN)
    assert resp.status == 400
    assert (await resp.json())["error"]["details"][0]["path"] == "account"
    resp = await record(app, {**body, "account": other.account.external_id}, ADMIN)
    assert resp.status == 201 and (await resp.json())["data"]["accountId"] == str(other.account.id)
    # Idempotency keys are per account: the same key elsewhere is another record.
    assert (await ledger.get_balance(db, c.account.id)).balance == CREDIT - 10_000
    assert (await ledger.get_balance(db, other.account.id)).balance == CREDIT - 10_000
    resp = await record(app, {**body, "account": str(uuid.uuid4())}, ADMIN)
    assert resp.status == 404


@pytest.mark.parametrize(
    ("body", "paths"),
    [
        ({"cost": 1}, {"idempotencyKey"}),
        ({"idempotencyKey": "k"}, {"model", "inputTokens", "outputTokens"}),
        (
            {"idempotencyKey": "k", "model": "mock-model", "inputTokens": -1, "outputTokens": 1.5},
            {"inputTokens", "outputTokens"},
        ),
        ({"idempotencyKey": "k", "cost": "-1"}, {"cost"}),
        ({"idempotencyKey": "k", "cost": "0.0000001"}, {"cost"}),
        ({"idempotencyKey": "k", "cost": 1, "occurredAt": "2999-01-01T00:00:00Z"}, {"occurredAt"}),
        ({"idempotencyKey": "k", "cost": 1, "occurredAt": "yesterday"}, {"occurredAt"}),
        ({"idempotencyKey": "k", "cost": 1, "metadata": [1]}, {"metadata"}),
        ({"idempotencyKey": "k", "cost": 1, "metadata": {"x": "y" * 5000}}, {"metadata"}),
        ({"idempotencyKey": "k", "cost": 1, "metadata": {"x": ["a\x00b"]}}, {"metadata.x[0]"}),
        ({"idempotencyKey": "k", "cost": "1e999999"}, {"cost"}),
        ({"idempotencyKey": "k", "cost": 1, "allowOverdraft": "yes"}, {"allowOverdraft"}),
        ({"idempotencyKey": "k", "cost": 1, "tokens": 3}, {"tokens"}),
        ({"idempotencyKey": "", "cost": 1}, {"idempotencyKey"}),
    ],
)
async def test_bad_bodies_are_400_listing_each_problem_and_write_nothing(
    app: TestClient, db: asyncpg.Pool, customer_factory: Any, body: Any, paths: set[str]
) -> None:
    c = await customer_factory(1)
    headers = await writer_key(db, c)
    before = await ledger_footprint(db, c.account.id)
    resp = await record(app, body, headers)
    assert resp.status == 400, await resp.text()
    err = (await resp.json())["error"]
    assert err["code"] == "VALIDATION_ERROR"
    assert {d["path"] for d in err["details"]} == paths
    # The declared request schema refuses it too (what the schema can say).
    if body.get("idempotencyKey") != "" and "metadata" not in body and "occurredAt" not in body:
        assert problems(body, request_schema("post", PATH)), body
    assert await ledger_footprint(db, c.account.id) == before


async def test_an_unpriced_model_without_a_cost_is_404(
    app: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(1)
    headers = await writer_key(db, c)
    resp = await record(
        app,
        {"model": "nope", "inputTokens": 1, "outputTokens": 1, "idempotencyKey": "k"},
        headers,
    )
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "MODEL_NOT_FOUND"


async def test_a_recorded_usage_is_exported_to_polar_once_like_a_call(
    app: TestClient, db: asyncpg.Pool, fake: FakePolar, customer_factory: Any
) -> None:
    c = await customer_factory(1)
    headers = await writer_key(db, c)
    body = {"model": "pricey", "inputTokens": 7, "outputTokens": 3, "idempotencyKey": "exp"}
    resp = await record(app, body, headers)
    assert resp.status == 201
    data = (await resp.json())["data"]
    entry_id = data["entryId"]
    assert (await record(app, body, headers)).status == 201  # a replay: no second debit

    async def exported() -> bool:
        past = await db.fetchval(
            "SELECT (e.tx_id, e.seq) <= (c.tx_id, c.seq) FROM ledger_entries e,"
            " polar_export_cursor c WHERE e.id = $1",
            uuid.UUID(entry_id),
        )
        return bool(past)

    await eventually(exported, what="the recorded usage to be exported")
    assert fake.times_received(entry_id) == 1
    event = fake.stored(entry_id)
    assert event is not None
    assert event["external_customer_id"] == str(c.account.id)
    # ceil(7 × 1000 + 3 × 3000.5) µc, with the tokens, as for a proxied call
    assert event["metadata"] == {
        "credits": 16002,
        "input_tokens": 7,
        "output_tokens": 3,
        "total_tokens": 10,
        "estimated": False,
        "model": "pricey",
    }
    assert data["costMicros"] == 16002


async def test_the_cli_mints_usage_write_keys(
    app: TestClient, services: Services, customer_factory: Any
) -> None:
    c = await customer_factory(1)
    code, made = cli(services, "keys", "create", str(c.account.id), "--scope", "usage:write")
    assert code == 0, made
    remember_secret(made["key"])
    headers = {"Authorization": f"Bearer {made['key']}"}
    resp = await record(app, {"cost": "0.5", "idempotencyKey": "cli"}, headers)
    assert resp.status == 201
    code, _ = cli(services, "keys", "create", str(c.account.id), "--scope", "root")
    assert code == 2
