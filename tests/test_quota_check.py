"""``GET /api/quota/check`` agrees with what a completion then does, and changes nothing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from creditgate import ledger
from creditgate.config import Settings
from creditgate.proxy.pricing import cost_micros
from creditgate.proxy.request import parse_chat_request
from tests.billing_support import eventually
from tests.conftest import Customer, Services, ledger_footprint, running
from tests.parity_support import parity_settings
from tests.schema_check import assert_conforms, response_schema

MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def settings(services: Services, upstream: TestServer) -> Settings:
    return parity_settings(services, str(upstream.make_url("/v1")), polar_url=None)


@pytest.fixture
async def app(settings: Settings, db: asyncpg.Pool) -> AsyncIterator[TestClient]:
    async with running(settings) as client:
        yield client


def chat_body(model: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, **extra}


def prompt_estimate(settings: Settings, body: dict[str, Any]) -> int:
    """The prompt tokens a completion with this body reserves for (what a client would send)."""
    return parse_chat_request(body, settings.config.models, 3).prompt_tokens_estimate


async def quota(app: TestClient, c: Customer, **params: Any) -> dict[str, Any]:
    resp = await app.get(
        "/api/quota/check", params={k: str(v) for k, v in params.items()}, headers=c.auth
    )
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert_conforms(body, response_schema("get", "/api/quota/check", 200))
    data: dict[str, Any] = body["data"]
    return data


async def redis_state(redis: aioredis.Redis, c: Customer) -> tuple[Any, Any]:
    """Everything the throttle keeps for the account."""
    tag = f"cg:{{{c.account.id}}}"
    return await redis.hgetall(tag), await redis.zrange(f"{tag}:par", 0, -1, withscores=True)


async def set_overrides(db: asyncpg.Pool, c: Customer, **limits: int) -> None:
    """Account overrides, before the account's first request (limits are cached 5 s)."""
    for name, value in limits.items():
        assert name in (
            "requests_per_minute",
            "tokens_per_minute",
            "max_parallel",
            "messages_per_day",
        )
        await db.execute(f"UPDATE accounts SET {name} = $2 WHERE id = $1", c.account.id, value)


async def test_money_allowed_exactly_when_the_call_is_admitted(
    app: TestClient,
    settings: Settings,
    db: asyncpg.Pool,
    redis: aioredis.Redis,
    customer_factory: Any,
) -> None:
    body = chat_body("pricey", 200)
    prompt = prompt_estimate(settings, body)
    worst = cost_micros(settings.config.models["pricey"], prompt, 200)
    # One micro-credit short of the worst case: refused, by the check and by the call.
    c = await customer_factory(ledger.micros_to_credits(worst - 1))
    before = (await ledger_footprint(db, c.account.id), await redis_state(redis, c))
    found = await quota(app, c, model="pricey", max_tokens=200, prompt_tokens=prompt)
    assert found["allowed"] is False and found["reason"] == "INSUFFICIENT_CREDITS"
    assert found["worstCaseCostMicros"] == worst
    assert found["availableMicros"] == worst - 1
    assert (await ledger_footprint(db, c.account.id), await redis_state(redis, c)) == before
    resp = await app.post("/v1/chat/completions", json=body, headers=c.auth)
    assert resp.status == 402
    assert (await resp.json())["error"]["details"]["requiredMicros"] == worst

    # Exactly the worst case: allowed, and the call goes through.
    c = await customer_factory(ledger.micros_to_credits(worst))
    before = (await ledger_footprint(db, c.account.id), await redis_state(redis, c))
    found = await quota(app, c, model="pricey", max_tokens=200, prompt_tokens=prompt)
    assert found["allowed"] is True and found["reason"] is None
    assert (await ledger_footprint(db, c.account.id), await redis_state(redis, c)) == before
    assert (await app.post("/v1/chat/completions", json=body, headers=c.auth)).status == 200

    # Short, but the overdraft limit covers the rest: allowed, and admitted.
    c = await customer_factory(ledger.micros_to_credits(worst - 1000))
    await ledger.set_overdraft_limit(db, c.account.id, 1000)
    found = await quota(app, c, model="pricey", max_tokens=200, prompt_tokens=prompt)
    assert found["allowed"] is True and found["overdraftLimitMicros"] == 1000
    assert (await app.post("/v1/chat/completions", json=body, headers=c.auth)).status == 200


async def test_requests_per_minute(
    app: TestClient, settings: Settings, customer_factory: Any
) -> None:
    c = await customer_factory(5, tier="tight")  # 2 requests a minute
    body = chat_body("mock-model", 16)
    prompt = prompt_estimate(settings, body)
    for remaining in (2, 1):
        found = await quota(app, c, model="mock-model", max_tokens=16, prompt_tokens=prompt)
        assert found["allowed"] is True
        assert found["limits"]["requests"]["limit"] == 2
        assert found["limits"]["requests"]["remaining"] == remaining
        assert (await app.post("/v1/chat/completions", json=body, headers=c.auth)).status == 200
    found = await quota(app, c, model="mock-model", max_tokens=16, prompt_tokens=prompt)
    assert (found["allowed"], found["reason"], found["limit"]) == (
        False,
        "RATE_LIMITED",
        "requests_per_minute",
    )
    assert found["limits"]["requests"]["remaining"] == 0
    resp = await app.post("/v1/chat/completions", json=body, headers=c.auth)
    assert resp.status == 429
    details = (await resp.json())["error"]["details"]
    assert details["limit"] == "requests_per_minute"
    assert found["retryAfter"] == details["retryAfter"] == int(resp.headers["Retry-After"])


async def test_tokens_per_minute(
    app: TestClient, settings: Settings, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(5)
    await set_overrides(db, c, tokens_per_minute=400)
    body = chat_body("mock-model", 256)
    prompt = prompt_estimate(settings, body)
    found = await quota(app, c, model="mock-model", max_tokens=256, prompt_tokens=prompt)
    assert found["allowed"] is True and found["limits"]["tokens"]["limit"] == 400
    # The upstream reports 250 output tokens: the bucket is charged them.
    big = {**body, "mock": {"chunks": 250}}
    assert (await app.post("/v1/chat/completions", json=big, headers=c.auth)).status == 200
    found = await quota(app, c, model="mock-model", max_tokens=256, prompt_tokens=prompt)
    assert (found["allowed"], found["limit"]) == (False, "tokens_per_minute")
    assert found["limits"]["tokens"]["remaining"] < prompt + 256
    resp = await app.post("/v1/chat/completions", json=body, headers=c.auth)
    assert resp.status == 429
    assert (await resp.json())["error"]["details"]["limit"] == "tokens_per_minute"
    # A prompt larger than a whole minute's tokens can never be served: no retryAfter.
    found = await quota(app, c, model="mock-model", max_tokens=1, prompt_tokens=401)
    assert (found["allowed"], found["limit"], found["retryAfter"]) == (
        False,
        "tokens_per_minute",
        None,
    )


async def test_max_parallel(
    app: TestClient, settings: Settings, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(5)
    await set_overrides(db, c, max_parallel=1)
    body = chat_body("mock-model", 16)
    prompt = prompt_estimate(settings, body)
    found = await quota(app, c, model="mock-model", max_tokens=16, prompt_tokens=prompt)
    assert found["allowed"] is True and found["limits"]["parallel"]["remaining"] == 1
    # A stream that stalls after its first token holds the one slot.
    stream = await app.post(
        "/v1/chat/completions",
        json={**body, "stream": True, "mock": {"stall_after": 1}},
        headers=c.auth,
    )
    assert stream.status == 200
    assert (await stream.content.readline()).startswith(b"data: ")
    try:
        found = await quota(app, c, model="mock-model", max_tokens=16, prompt_tokens=prompt)
        assert (found["allowed"], found["limit"]) == (False, "max_parallel")
        assert found["limits"]["parallel"] == {
            "limit": 1,
            "remaining": 0,
            "reset": None,
            "resetSeconds": None,
        }
        resp = await app.post("/v1/chat/completions", json=body, headers=c.auth)
        assert resp.status == 429
        assert (await resp.json())["error"]["details"]["limit"] == "max_parallel"
    finally:
        stream.close()  # the client leaves: creditgate returns the slot

    async def free() -> bool:
        return bool(
            (await quota(app, c, model="mock-model", max_tokens=16, prompt_tokens=prompt))[
                "allowed"
            ]
        )

    await eventually(free, what="the stream's slot to be returned")
    assert (await app.post("/v1/chat/completions", json=body, headers=c.auth)).status == 200


async def test_messages_per_day(
    app: TestClient, settings: Settings, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(5)
    await set_overrides(db, c, messages_per_day=1)
    body = chat_body("mock-model", 16)
    found = await quota(app, c, model="mock-model", max_tokens=16)
    assert found["allowed"] is True and found["limits"]["daily"]["remaining"] == 1
    assert 0 < found["limits"]["daily"]["resetSeconds"] <= 86_400
    assert (await app.post("/v1/chat/completions", json=body, headers=c.auth)).status == 200
    found = await quota(app, c, model="mock-model", max_tokens=16)
    assert (found["allowed"], found["limit"]) == (False, "messages_per_day")
    resp = await app.post("/v1/chat/completions", json=body, headers=c.auth)
    assert resp.status == 429
    assert (await resp.json())["error"]["details"]["limit"] == "messages_per_day"


async def test_a_key_stricter_than_its_account_is_what_the_check_reports(
    app: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(5)
    key_id = await db.fetchval("SELECT id FROM api_keys WHERE account_id = $1", c.account.id)
    await db.execute("UPDATE api_keys SET requests_per_minute = 1 WHERE id = $1", key_id)
    found = await quota(app, c, model="mock-model", max_tokens=16)
    assert found["limits"]["requests"]["limit"] == 1
    body = chat_body("mock-model", 16)
    assert (await app.post("/v1/chat/completions", json=body, headers=c.auth)).status == 200
    found = await quota(app, c, model="mock-model", max_tokens=16)
    assert (found["allowed"], found["limit"]) == (False, "requests_per_minute")
    assert (await app.post("/v1/chat/completions", json=body, headers=c.auth)).status == 429


async def test_defaults_and_bad_parameters(
    app: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(5)
    found = await quota(app, c, model="mock-model")
    # Without max_tokens, the model's cap (what the completion would send upstream).
    assert (found["maxTokens"], found["promptTokens"]) == (256, 0)
    before = await ledger_footprint(db, c.account.id)
    for params, status, path in (
        ({"model": "mock-model", "max_tokens": "0"}, 400, "max_tokens"),
        ({"model": "mock-model", "max_tokens": "257"}, 400, "max_tokens"),
        ({"model": "mock-model", "prompt_tokens": "-1"}, 400, "prompt_tokens"),
        ({"model": "mock-model", "prompt_tokens": "many"}, 400, "prompt_tokens"),
        ({"max_tokens": "5"}, 400, "model"),  # no model, and no defaultModel
        ({"model": "nope"}, 404, "model"),
    ):
        resp = await app.get("/api/quota/check", params=params, headers=c.auth)
        assert resp.status == status, params
        assert (await resp.json())["error"]["details"][0]["path"] == path
    assert (await app.get("/api/quota/check", params={"model": "mock-model"})).status == 401
    unknown = {"Authorization": f"Bearer cg_{uuid.uuid4().hex}"}
    assert (await app.get("/api/quota/check", headers=unknown)).status == 401
    assert await ledger_footprint(db, c.account.id) == before
