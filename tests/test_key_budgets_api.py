"""Per-key budgets through the API and CLI: set at creation and by admins, listed
with spent and reset time; 402 KEY_BUDGET_EXCEEDED / INSUFFICIENT_CREDITS with
``affordableMaxTokens``, and a retry at that ``max_tokens`` goes through."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from creditgate import ledger
from creditgate.auth import create_api_key
from creditgate.config import PRICE_SCALE, Model, Timeouts
from creditgate.proxy.pricing import affordable_max_tokens, worst_case_micros
from creditgate.proxy.request import parse_chat_request
from tests.conftest import Services, ledger_footprint, make_settings, running
from tests.fake_clerk import ISSUER, PARTY, FakeClerk
from tests.logcapture import remember_secret
from tests.procs import run_cli

ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MESSAGES = [{"role": "user", "content": "Say hello, in a few words."}]


@pytest.fixture
async def api(
    services: Services, upstream: TestServer, clerk: FakeClerk, db: asyncpg.Pool
) -> AsyncIterator[TestClient]:
    settings = make_settings(
        services,
        str(upstream.make_url("/v1")),
        admin_token=ADMIN_TOKEN,
        clerk_jwks_url=clerk.url,
        clerk_issuer=ISSUER,
        clerk_authorized_parties=(PARTY,),
    )
    async with running(settings) as client:
        yield client


def sdk(api: TestClient, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(api.make_url("/v1")), api_key=key, max_retries=0)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def keyed(
    db: asyncpg.Pool, credits: str, budget: str | None, period: str | None = None
) -> tuple[uuid.UUID, uuid.UUID, str]:
    account = await ledger.ensure_account(db, "user", f"user_{uuid.uuid4().hex}")
    await ledger.post_entry(
        db,
        account_id=account.id,
        amount=ledger.credits_to_micros(credits),
        kind="grant",
        idempotency_key=f"test:{uuid.uuid4()}",
        reason="test",
    )
    key = await create_api_key(
        db,
        account.id,
        "budgeted",
        budget=ledger.credits_to_micros(budget) if budget is not None else None,
        budget_period=period,
    )
    remember_secret(key.key)
    return account.id, key.id, key.key


async def test_session_creates_a_budgeted_key_and_lists_its_spend(
    api: TestClient, db: asyncpg.Pool, clerk: FakeClerk
) -> None:
    session = bearer(clerk.token())
    resp = await api.get("/api/user/balance", headers=session)
    account_id = uuid.UUID((await resp.json())["data"]["accountId"])
    await ledger.post_entry(
        db,
        account_id=account_id,
        amount=10**6,
        kind="grant",
        idempotency_key=f"test:{uuid.uuid4()}",
        reason="test",
    )
    resp = await api.post(
        "/api/keys",
        json={"name": "capped", "budget": "2.5", "budgetPeriod": "week"},
        headers=session,
    )
    assert resp.status == 201, await resp.text()
    made = (await resp.json())["data"]
    remember_secret(made["key"])
    assert (made["budget"], made["budgetMicros"], made["budgetPeriod"]) == (2.5, 2_500_000, "week")
    reply = await sdk(api, made["key"]).chat.completions.create(
        model="mock-model", messages=MESSAGES
    )
    cost = reply.usage.model_extra["cost_micros"]  # type: ignore[union-attr]
    resp = await api.get("/api/keys", headers=session)
    (item,) = [k for k in (await resp.json())["data"]["keys"] if k["id"] == made["id"]]
    assert item["budgetMicros"] == 2_500_000 and item["budgetPeriod"] == "week"
    assert (item["spentMicros"], item["reservedMicros"]) == (cost, 0)
    assert item["remainingMicros"] == 2_500_000 - cost
    assert item["resetsAt"].endswith("Z")  # next Monday 00:00 in day_zone (UTC here)
    # A key made without a budget: number 0 is a budget too (it refuses priced calls).
    resp = await api.post("/api/keys", json={"name": "frozen", "budget": 0}, headers=session)
    frozen = (await resp.json())["data"]
    remember_secret(frozen["key"])
    assert (frozen["budgetMicros"], frozen["budgetPeriod"]) == (0, None)
    # A revocation answers the key as listed, its budget included.
    resp = await api.delete(f"/api/keys/{made['id']}", headers=session)
    revoked = (await resp.json())["data"]
    assert (revoked["budgetMicros"], revoked["spentMicros"]) == (2_500_000, cost)


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"budget": "-1"}, "budget"),
        ({"budget": "1.1234567"}, "budget"),
        ({"budget": "1e3"}, "budget"),
        ({"budget": True}, "budget"),
        ({"budget": 5, "budgetPeriod": "year"}, "budgetPeriod"),
        ({"budgetPeriod": "day"}, "budgetPeriod"),
    ],
)
async def test_bad_budgets_are_400_and_make_no_key(
    api: TestClient, db: asyncpg.Pool, clerk: FakeClerk, body: dict[str, Any], path: str
) -> None:
    session = bearer(clerk.token())
    before = await db.fetchval("SELECT count(*) FROM api_keys")
    resp = await api.post("/api/keys", json={"name": "x", **body}, headers=session)
    assert resp.status == 400, await resp.text()
    problems = (await resp.json())["error"]["details"]
    assert [p["path"] for p in problems] == [path], problems
    assert await db.fetchval("SELECT count(*) FROM api_keys") == before


async def test_key_budget_402_has_affordable_max_tokens_and_a_retry_at_it_succeeds(
    api: TestClient, db: asyncpg.Pool
) -> None:
    # "pricey": 1000 µc per input token, 3000.5 per output token, up to 1000 tokens.
    account_id, key_id, key = await keyed(db, "100", "1", "day")
    client = sdk(api, key)
    before = await ledger_footprint(db, account_id)
    with pytest.raises(openai.APIStatusError) as exc:
        await client.chat.completions.create(model="pricey", messages=MESSAGES, max_tokens=1000)
    assert exc.value.status_code == 402
    err = exc.value.body
    assert isinstance(err, dict) and err["code"] == "KEY_BUDGET_EXCEEDED", err
    d = err["details"]
    assert (d["budget"], d["budgetMicros"], d["spent"], d["budgetPeriod"]) == (1, 10**6, 0, "day")
    assert d["resetsAt"].endswith("Z")
    affordable = d["affordableMaxTokens"]
    assert 0 < affordable < 1000
    assert await ledger_footprint(db, account_id) == before  # a refusal writes nothing
    # One more token would not fit; exactly that many does.
    with pytest.raises(openai.APIStatusError) as exc:
        await client.chat.completions.create(
            model="pricey", messages=MESSAGES, max_tokens=affordable + 1
        )
    assert exc.value.status_code == 402
    reply = await client.chat.completions.create(
        model="pricey", messages=MESSAGES, max_tokens=affordable
    )
    cost = reply.usage.model_extra["cost_micros"]  # type: ignore[union-attr]
    state = await ledger.key_budget(db, key_id, "UTC")
    assert state is not None and (state.spent, state.reserved) == (cost, 0)
    # The stream path holds and spends against the same budget.
    stream = await client.chat.completions.create(
        model="pricey", messages=MESSAGES, max_tokens=10, stream=True
    )
    assert [c async for c in stream]
    state = await ledger.key_budget(db, key_id, "UTC")
    assert state is not None and state.spent > cost and state.reserved == 0


async def test_insufficient_credits_402_has_affordable_max_tokens_too(
    api: TestClient, db: asyncpg.Pool
) -> None:
    _, _, key = await keyed(db, "0.5", None)
    client = sdk(api, key)
    with pytest.raises(openai.APIStatusError) as exc:
        await client.chat.completions.create(model="pricey", messages=MESSAGES, max_tokens=1000)
    err = exc.value.body
    assert isinstance(err, dict) and err["code"] == "INSUFFICIENT_CREDITS", err
    affordable = err["details"]["affordableMaxTokens"]
    assert 0 < affordable < 1000
    await client.chat.completions.create(model="pricey", messages=MESSAGES, max_tokens=affordable)
    # Not even the prompt fits: 0.
    _, _, broke = await keyed(db, "0.000001", None)
    with pytest.raises(openai.APIStatusError) as exc:
        await sdk(api, broke).chat.completions.create(model="pricey", messages=MESSAGES)
    err = exc.value.body
    assert isinstance(err, dict) and err["details"]["affordableMaxTokens"] == 0


async def test_the_tighter_of_budget_and_credits_is_the_answer(
    api: TestClient, db: asyncpg.Pool
) -> None:
    # Credits are tighter than the budget: INSUFFICIENT_CREDITS, though the key has one.
    _, _, key = await keyed(db, "0.5", "10", "month")
    with pytest.raises(openai.APIStatusError) as exc:
        await sdk(api, key).chat.completions.create(
            model="pricey", messages=MESSAGES, max_tokens=1000
        )
    err = exc.value.body
    assert isinstance(err, dict) and err["code"] == "INSUFFICIENT_CREDITS"


async def test_admin_changes_a_budget_and_it_applies_at_once(
    api: TestClient, db: asyncpg.Pool
) -> None:
    _, key_id, key = await keyed(db, "100", None)
    client = sdk(api, key)
    await client.chat.completions.create(model="pricey", messages=MESSAGES, max_tokens=100)
    url = f"/api/admin/keys/{key_id}"
    resp = await api.patch(url, json={"budget": "0.1", "budgetPeriod": "month"}, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    data = (await resp.json())["data"]
    assert (data["budgetMicros"], data["budgetPeriod"], data["spentMicros"]) == (
        100_000,
        "month",
        0,  # spend counts from when the budget is set
    )
    with pytest.raises(openai.APIStatusError) as exc:
        await client.chat.completions.create(model="pricey", messages=MESSAGES, max_tokens=100)
    assert isinstance(exc.value.body, dict) and exc.value.body["code"] == "KEY_BUDGET_EXCEEDED"
    # Only the amount: the period stays.
    resp = await api.patch(url, json={"budget": 5}, headers=ADMIN)
    data = (await resp.json())["data"]
    assert (data["budgetMicros"], data["budgetPeriod"]) == (5_000_000, "month")
    await client.chat.completions.create(model="pricey", messages=MESSAGES, max_tokens=100)
    # null removes it.
    resp = await api.patch(url, json={"budget": None}, headers=ADMIN)
    data = (await resp.json())["data"]
    assert data["budget"] is None and data["budgetPeriod"] is None
    for body in ({}, {"budgetPeriod": "day", "budget": None}, {"limit": 1}, {"budget": "x"}):
        resp = await api.patch(url, json=body, headers=ADMIN)
        assert resp.status == 400, (body, await resp.text())
    resp = await api.patch(f"/api/admin/keys/{uuid.uuid4()}", json={"budget": 1}, headers=ADMIN)
    assert resp.status == 404
    resp = await api.patch(url, json={"budget": 1}, headers=bearer(key))
    assert resp.status == 403


def test_affordable_max_tokens_is_the_exact_bound_of_the_hold() -> None:
    rng = random.Random(17)
    for _ in range(2_000):
        model = Model(
            name="m",
            input_price=rng.randrange(0, 5 * PRICE_SCALE),
            output_price=rng.randrange(1, 20 * PRICE_SCALE),
            max_output_tokens=rng.randrange(1, 100_000),
            deployments=(),
            timeouts=Timeouts(),
            input_price_text="",
            output_price_text="",
            cache_write_price=rng.choice([None, rng.randrange(0, 9 * PRICE_SCALE)]),
            audio_output_price=rng.choice([None, rng.randrange(0, 40 * PRICE_SCALE)]),
        )
        prompt, n = rng.randrange(0, 5_000), rng.randrange(1, 4)
        spendable = rng.randrange(0, 3_000_000)
        got = affordable_max_tokens(model, prompt, n, spendable)
        assert 0 <= got <= model.max_output_tokens
        if got > 0:
            assert worst_case_micros(model, prompt, n * got) <= spendable
        if got < model.max_output_tokens and worst_case_micros(model, prompt, 0) <= spendable:
            assert worst_case_micros(model, prompt, n * (got + 1)) > spendable


def test_cli_sets_changes_and_lists_budgets(services: Services) -> None:
    user = f"user_{uuid.uuid4().hex}"
    code, _ = run_cli(services, "accounts", "create", "--user", user)
    assert code == 0
    code, k = run_cli(services, "keys", "create", user, "--budget", "1.5", "--period", "day")
    remember_secret(k["key"])
    assert code == 0 and (k["budgetMicros"], k["budgetPeriod"]) == (1_500_000, "day")
    code, listed = run_cli(services, "keys", "list", user)
    (item,) = listed["keys"]
    assert (item["budgetMicros"], item["spentMicros"], item["budgetPeriod"]) == (
        1_500_000,
        0,
        "day",
    )
    assert item["resetsAt"].endswith("T00:00:00Z")  # the next midnight of day_zone (UTC)
    code, changed = run_cli(services, "keys", "budget", k["id"], "--period", "lifetime")
    assert code == 0 and (changed["budgetMicros"], changed["budgetPeriod"]) == (1_500_000, None)
    assert changed["resetsAt"] is None and changed["accountId"] == k["accountId"]
    code, changed = run_cli(services, "keys", "budget", k["id"], "--budget", "none")
    assert code == 0 and changed["budget"] is None
    code, err = run_cli(services, "keys", "budget", k["id"], "--budget", "-3")
    assert code == 1 and err["error"]["code"] == "VALIDATION_ERROR"
    assert "--budget" in err["error"]["message"]
    code, err = run_cli(services, "keys", "create", user, "--period", "week")
    assert code == 1 and "--period" in err["error"]["message"]
    code, err = run_cli(services, "keys", "budget", str(uuid.uuid4()), "--budget", "1")
    assert code == 1 and err["error"]["code"] == "NOT_FOUND"


async def test_quota_check_answers_as_the_key_budget_would(
    api: TestClient, db: asyncpg.Pool, services: Services, upstream: TestServer
) -> None:
    models = make_settings(services, str(upstream.make_url("/v1"))).config.models
    body = {"model": "pricey", "messages": MESSAGES, "max_tokens": 200}
    prompt = parse_chat_request(body, models, 3).prompt_tokens_estimate
    worst = worst_case_micros(models["pricey"], prompt, 200)
    params = {"model": "pricey", "max_tokens": "200", "prompt_tokens": str(prompt)}
    for budget, allowed in ((worst - 1, False), (worst, True)):
        _, _, key = await keyed(db, "100", str(ledger.micros_to_credits(budget)), "day")
        resp = await api.get("/api/quota/check", params=params, headers=bearer(key))
        found = (await resp.json())["data"]
        assert found["allowed"] is allowed
        assert found["reason"] == (None if allowed else "KEY_BUDGET_EXCEEDED")
        resp = await api.post("/v1/chat/completions", json=body, headers=bearer(key))
        assert resp.status == (200 if allowed else 402), await resp.text()
