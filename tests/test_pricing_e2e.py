"""Metering real providers exactly (issue 17), end to end: the openai SDK → creditgate → the mock.

The mock reports cached, cache-write, audio, reasoning and prediction tokens
and OpenRouter's ``usage.cost`` when a request's ``mock`` object asks for
them. For each combination, streaming and not, the charge is the exact µc
computed here independently, the client's usage keeps the upstream's details
with the cost added, the ledger entry keeps the tokens by kind (shown by
``GET /api/user/usage``), and the Polar usage event carries them.
"""

from __future__ import annotations

import math
import tomllib
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from fractions import Fraction
from typing import Any

import aiohttp
import asyncpg
import openai
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from polar.v2026_10 import PolarAsync

from creditgate import ledger, migrations
from creditgate.auth import create_api_key
from creditgate.billing.export import UsageExporter
from creditgate.config import Settings, parse_config
from creditgate.proxy.mock_upstream import prompt_tokens
from tests.billing_support import billing_settings
from tests.conftest import TEST_CONFIG, Customer, Services, ledger_footprint, running
from tests.logcapture import remember_secret
from tests.polar_fake import TOKEN, FakePolar
from tests.schema_check import assert_conforms, request_schema, response_schema
from tests.test_polar_export import drain

PRICING_MODELS = """
[models."kinds"]
input_price = 1.5
output_price = 6
cached_input_price = 0.375
cache_write_price = 1.875
audio_input_price = 40
audio_output_price = 80
max_output_tokens = 1000
deployments = [{{ upstream = "main", model = "kinds-upstream" }}]

[models."resold"]
pricing = "upstream"
markup = 1.25
input_price = 2.5
output_price = 10
cached_input_price = 1.25
max_output_tokens = 1000
deployments = [{{ upstream = "main", model = "resold-upstream" }}]
"""
# Credits per 1M tokens are µc per token: the prices above, as exact rationals.
PRICES = {
    "kinds": {
        "input": Fraction("1.5"),
        "output": Fraction(6),
        "cached_input": Fraction("0.375"),
        "cache_write": Fraction("1.875"),
        "audio_input": Fraction(40),
        "audio_output": Fraction(80),
    },
    "resold": {"input": Fraction("2.5"), "output": Fraction(10), "cached_input": Fraction("1.25")},
}
MARKUP = Fraction("1.25")
# A prompt long enough that its hold (one token per byte) covers the audio added to it.
MESSAGES = [{"role": "user", "content": "lorem ipsum " * 200}]
TEXT_IN = prompt_tokens(MESSAGES)  # the mock's count of the prompt's text
TEXT_OUT = 5  # the mock's completion: five text tokens

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("kinds", {}),
    "cached": ("kinds", {"cached_tokens": 512}),
    "cache_write": ("kinds", {"cache_write_tokens": 300}),
    "cached_and_write": ("kinds", {"cached_tokens": 256, "cache_write_tokens": 128}),
    "audio": ("kinds", {"audio_input_tokens": 200, "audio_output_tokens": 40}),
    "reasoning": ("kinds", {"reasoning_tokens": 700}),
    "prediction": (
        "kinds",
        {"accepted_prediction_tokens": 3, "rejected_prediction_tokens": 11},
    ),
    "everything": (
        "kinds",
        {
            "cached_tokens": 400,
            "cache_write_tokens": 100,
            "audio_input_tokens": 90,
            "audio_output_tokens": 30,
            "reasoning_tokens": 250,
            "accepted_prediction_tokens": 2,
            "rejected_prediction_tokens": 7,
        },
    ),
    "table_model_ignores_a_cost": ("kinds", {"cached_tokens": 100, "cost": "0.5"}),
    "upstream_cost": ("resold", {"cost": "0.0004321", "cached_tokens": 500}),
    "upstream_cost_zero": ("resold", {"cost": "0"}),
    "upstream_no_cost_uses_the_table": ("resold", {"cached_tokens": 500}),
    "upstream_unsound_cost_uses_the_table": ("resold", {"cost": "-0.001"}),
}


def expected_counts(mock: dict[str, Any]) -> dict[str, int]:
    """The mock's usage for these modes (its documented rule), by kind."""
    audio_in, audio_out = mock.get("audio_input_tokens", 0), mock.get("audio_output_tokens", 0)
    reasoning, rejected = mock.get("reasoning_tokens", 0), mock.get("rejected_prediction_tokens", 0)
    counts = {
        "input": TEXT_IN + audio_in,
        "output": TEXT_OUT + audio_out + reasoning + rejected,
        "cached_input": mock.get("cached_tokens", 0),
        "cache_write": mock.get("cache_write_tokens", 0),
        "audio_input": audio_in,
        "audio_output": audio_out,
        "reasoning": reasoning,
        "accepted_prediction": mock.get("accepted_prediction_tokens", 0),
        "rejected_prediction": rejected,
    }
    return {k: v for k, v in counts.items() if v or k in ("input", "output")}


def expected_micros(model: str, mock: dict[str, Any]) -> int:
    """The charge, computed independently: reported cost × markup for "resold" when
    the mock reports a sound one, else every kind at its price, rounded up once."""
    if model == "resold" and "cost" in mock and Decimal(mock["cost"]) >= 0:
        return math.ceil(Fraction(mock["cost"]) * MARKUP * 1_000_000)
    p, c = PRICES[model], expected_counts(mock)
    get = c.get
    text_in = c["input"] - get("cached_input", 0) - get("cache_write", 0) - get("audio_input", 0)
    exact = (
        text_in * p["input"]
        + get("cached_input", 0) * p.get("cached_input", p["input"])
        + get("cache_write", 0) * p.get("cache_write", p["input"])
        + get("audio_input", 0) * p.get("audio_input", p["input"])
        + (c["output"] - get("audio_output", 0)) * p["output"]
        + get("audio_output", 0) * p.get("audio_output", p["output"])
    )
    return math.ceil(exact)


def camel(kind: str) -> str:
    head, *rest = kind.split("_")
    return head + "".join(w.capitalize() for w in rest)


@pytest.fixture
async def pcg(
    services: Services, upstream: TestServer, db: asyncpg.Pool
) -> AsyncIterator[TestClient]:
    """creditgate with the test models and the two pricing models above."""
    text = TEST_CONFIG.format(upstream=upstream.make_url("/v1")) + PRICING_MODELS.format()
    config = parse_config(tomllib.loads(text, parse_float=Decimal), {})
    settings = Settings(
        config=config, database_url=services.database_url, redis_url=services.redis_url
    )
    async with running(settings) as client:
        yield client


def sdk(cg: TestClient, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(cg.make_url("/v1")), api_key=key, max_retries=0)


async def balance(cg: TestClient, c: Customer) -> int:
    resp = await cg.get("/api/user/balance", headers=c.auth)
    assert resp.status == 200
    return int((await resp.json())["data"]["balanceMicros"])


async def last_entry(cg: TestClient, c: Customer) -> dict[str, Any]:
    resp = await cg.get("/api/user/usage?limit=1&kind=debit", headers=c.auth)
    assert resp.status == 200
    (entry,) = (await resp.json())["data"]["entries"]
    return dict(entry)


async def call(
    cg: TestClient, c: Customer, model: str, mock: dict[str, Any], *, stream: bool
) -> dict[str, Any]:
    """One completion through the SDK; the usage the client saw, as JSON."""
    client = sdk(cg, c.key)
    extra = {"mock": mock} if mock else None
    if not stream:
        result = await client.chat.completions.create(
            model=model, messages=MESSAGES, extra_body=extra
        )
        assert result.choices[0].message.content == "Hello from the mock upstream"
        assert result.usage is not None
        return result.usage.model_dump(exclude_unset=True)
    chunks = await client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    usages, text = [], []
    async for chunk in chunks:
        if chunk.usage is not None:
            assert chunk.choices == []  # OpenAI's shape: the usage chunk has no choices
            usages.append(chunk.usage.model_dump(exclude_unset=True))
        text += [ch.delta.content or "" for ch in chunk.choices]
    assert "".join(text) == "Hello from the mock upstream"
    (usage,) = usages
    return usage


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("case", list(CASES))
async def test_each_kind_is_charged_exactly(
    pcg: TestClient, db: asyncpg.Pool, customer_factory: Any, case: str, stream: bool
) -> None:
    model, mock = CASES[case]
    c = await customer_factory(10)
    before = await balance(pcg, c)
    usage = await call(pcg, c, model, mock, stream=stream)
    cost = expected_micros(model, mock)
    counts = expected_counts(mock)

    # The client's usage: the upstream's totals and details, and the cost in credits.
    assert usage["prompt_tokens"] == counts["input"]
    assert usage["completion_tokens"] == counts["output"]
    assert usage["cost_micros"] == cost
    assert Decimal(str(usage["cost"])) == Decimal(cost) / 1_000_000
    details_asked = set(mock) - {"cost"}
    if details_asked:
        pd, cd = usage["prompt_tokens_details"], usage["completion_tokens_details"]
        assert pd["cached_tokens"] == counts.get("cached_input", 0)
        assert pd["audio_tokens"] == counts.get("audio_input", 0)
        if "cache_write_tokens" in mock:
            assert pd["cache_write_tokens"] == counts["cache_write"]
        assert cd["reasoning_tokens"] == counts.get("reasoning", 0)
        assert cd["audio_tokens"] == counts.get("audio_output", 0)
        assert cd["accepted_prediction_tokens"] == counts.get("accepted_prediction", 0)
        assert cd["rejected_prediction_tokens"] == counts.get("rejected_prediction", 0)
    else:
        assert "prompt_tokens_details" not in usage

    # The ledger: exactly that much, and the tokens by kind on the entry.
    assert before - await balance(pcg, c) == cost
    entry = await last_entry(pcg, c)
    assert entry["amountMicros"] == -cost
    assert entry["estimated"] is False
    assert entry["tokens"] == {camel(k): v for k, v in counts.items()}
    assert (entry["inputTokens"], entry["outputTokens"]) == (counts["input"], counts["output"])
    stored = await db.fetchval(
        "SELECT breakdown FROM ledger_entries WHERE id = $1", uuid.UUID(entry["id"])
    )
    recorded = orjson.loads(stored)
    if model == "resold" and "cost" in mock and Decimal(mock["cost"]) >= 0:
        # Kept for the operator (exact), never shown to the caller.
        assert Decimal(recorded.pop("upstream_cost")) == Decimal(mock["cost"])
    assert "upstream_cost" not in recorded
    assert recorded == counts


async def test_the_models_list_shows_the_prices_by_kind(
    pcg: TestClient, customer_factory: Any
) -> None:
    c = await customer_factory(1)
    models = {m.id: m for m in (await sdk(pcg, c.key).models.list()).data}
    pricing = (models["kinds"].model_extra or {})["pricing"]
    assert pricing == {
        "input": 1.5,
        "output": 6,
        "cached_input": 0.375,
        "cache_write": 1.875,
        "audio_input": 40,
        "audio_output": 80,
        "unit": "credits per 1M tokens",
    }
    # A model without kind prices lists only its two.
    assert set((models["mock-model"].model_extra or {})["pricing"]) == {"input", "output", "unit"}


async def test_the_tokens_metric_has_kinds(pcg: TestClient, customer_factory: Any) -> None:
    c = await customer_factory(10)
    await call(pcg, c, "kinds", CASES["everything"][1], stream=False)
    scrape = await (await pcg.get("/metrics")).text()
    for direction, kind in (
        ("input", "cached"),
        ("input", "cache_write"),
        ("input", "audio"),
        ("input", "text"),
        ("output", "audio"),
        ("output", "reasoning"),
        ("output", "text"),
    ):
        assert (
            f'creditgate_tokens_total{{direction="{direction}",kind="{kind}",model="kinds"}}'
            in scrape
        )


async def test_a_reported_cost_above_the_hold_is_charged_as_far_as_the_balance_goes(
    pcg: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    """The hold is the price table's worst case; a reported cost above it is charged
    like any cost above a hold: in full when the account covers it, else up to the
    balance (the overdraft limit: 0), the rest recorded as uncollected."""
    mock = {"cost": "4"}  # × 1.25 = 5 credits, far above the table's worst case
    rich = await customer_factory(10)
    usage = await call(pcg, rich, "resold", mock, stream=False)
    assert usage["cost_micros"] == 5_000_000
    assert await balance(pcg, rich) == 5_000_000

    poor = await customer_factory(1)
    usage = await call(pcg, poor, "resold", mock, stream=True)
    assert usage["cost_micros"] == 1_000_000  # what was debited
    assert await balance(pcg, poor) == 0
    entry = await last_entry(pcg, poor)
    uncollected = await db.fetchval(
        "SELECT uncollected FROM ledger_entries WHERE id = $1", uuid.UUID(entry["id"])
    )
    assert uncollected == 4_000_000


async def test_the_client_does_not_see_the_upstreams_own_cost_details(
    pcg: TestClient, customer_factory: Any, upstream: TestServer
) -> None:
    """usage.cost is the credits charged; OpenRouter's cost_details (its currency) are dropped."""
    async with aiohttp.ClientSession() as direct:  # the mock does send them
        body = {"messages": MESSAGES, "mock": {"cost": "0.002"}}
        async with direct.post(upstream.make_url("/v1/chat/completions"), json=body) as resp:
            assert {"cost_details", "is_byok"} <= set((await resp.json())["usage"])
    c = await customer_factory(10)
    usage = await call(pcg, c, "resold", {"cost": "0.002"}, stream=False)
    assert usage["cost_micros"] == 2_500
    assert "cost_details" not in usage and "is_byok" not in usage


async def test_polar_usage_events_carry_the_tokens_by_kind(
    pcg: TestClient, db: asyncpg.Pool, customer_factory: Any, services: Services, fake: FakePolar
) -> None:
    c = await customer_factory(10)
    mock = CASES["everything"][1]
    await call(pcg, c, "kinds", mock, stream=True)
    entry = await last_entry(pcg, c)
    entry_id = uuid.UUID(entry["id"])
    cfg = billing_settings(services, "http://127.0.0.1:9/v1", fake.url).config.polar
    async with PolarAsync(TOKEN, base_url=fake.url, timeout=cfg.request_timeout_seconds) as polar:
        await drain(db, UsageExporter(polar, cfg), [entry_id])
    event = fake.stored(str(entry_id))
    assert event is not None
    counts = expected_counts(mock)
    metadata = event["metadata"]
    assert metadata["credits"] == expected_micros("kinds", mock)
    assert metadata["input_tokens"] == counts["input"]
    assert metadata["output_tokens"] == counts["output"]
    for kind, n in counts.items():
        if kind not in ("input", "output"):
            assert metadata[f"{kind}_tokens"] == n, kind
    assert "upstream_cost" not in metadata


# ---------------------------------------------------------------- the usage-record route


async def writer(db: asyncpg.Pool, c: Customer) -> dict[str, str]:
    """An API key of ``c``'s account with the usage:write scope."""
    key = await create_api_key(db, c.account.id, "metering", scope="usage:write")
    remember_secret(key.key)
    return {"Authorization": f"Bearer {key.key}"}


async def test_recorded_usage_takes_the_same_breakdown_priced_by_kind(
    pcg: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(1)
    headers = await writer(db, c)
    tokens = {
        "input": 1000,
        "output": 300,
        "cachedInput": 600,
        "audioInput": 100,
        "audioOutput": 50,
        "reasoning": 200,
    }
    body = {"model": "kinds", "tokens": tokens, "idempotencyKey": "kinds-1"}
    assert_conforms(body, request_schema("post", "/api/usage/record"))
    resp = await pcg.post("/api/usage/record", json=body, headers=headers)
    assert resp.status == 201, await resp.text()
    answer = await resp.json()
    assert_conforms(answer, response_schema("post", "/api/usage/record", 201))
    data = answer["data"]
    # (300 text + 600 cached + 100 audio) in, (250 text incl. reasoning + 50 audio) out:
    # 300×1.5 + 600×0.375 + 100×40 + 250×6 + 50×80 = 10,175 µc
    assert data["costMicros"] == 10_175
    assert (data["inputTokens"], data["outputTokens"]) == (1000, 300)
    assert data["tokens"] == tokens
    assert (await last_entry(pcg, c))["tokens"] == tokens
    # A replay answers the first result; the same key with other kinds is a conflict.
    again = await pcg.post("/api/usage/record", json=body, headers=headers)
    assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["data"]["tokens"] == tokens
    other = {**body, "tokens": {**tokens, "cachedInput": 500}}
    assert (await pcg.post("/api/usage/record", json=other, headers=headers)).status == 409

    # Top-level totals still work (and are recorded as the two totals); they may
    # also be given beside tokens, when they agree.
    plain = {"model": "kinds", "inputTokens": 10, "outputTokens": 2, "idempotencyKey": "k-2"}
    resp = await pcg.post("/api/usage/record", json=plain, headers=headers)
    assert resp.status == 201
    assert (await resp.json())["data"]["tokens"] == {"input": 10, "output": 2}
    both = {
        "model": "kinds",
        "inputTokens": 10,
        "outputTokens": 2,
        "tokens": {"cacheWrite": 10},
        "idempotencyKey": "k-3",
    }
    resp = await pcg.post("/api/usage/record", json=both, headers=headers)
    assert resp.status == 201, await resp.text()
    data = (await resp.json())["data"]
    assert data["tokens"] == {"input": 10, "output": 2, "cacheWrite": 10}
    assert data["costMicros"] == math.ceil(10 * Fraction("1.875") + 2 * 6)
    # An explicit cost is charged as given, the tokens recorded beside it.
    explicit = {"cost": "0.5", "tokens": {"input": 5, "output": 1}, "idempotencyKey": "k-4"}
    resp = await pcg.post("/api/usage/record", json=explicit, headers=headers)
    assert resp.status == 201
    data = (await resp.json())["data"]
    assert data["costMicros"] == 500_000 and data["tokens"] == {"input": 5, "output": 1}


@pytest.mark.parametrize(
    ("tokens", "extra", "path"),
    [
        ({"input": 10, "output": 1, "cached": 5}, {}, "tokens.cached"),
        ({"input": 10, "output": 1, "cachedInput": -1}, {}, "tokens.cachedInput"),
        ({"input": 10, "output": 1, "cachedInput": True}, {}, "tokens.cachedInput"),
        ({"input": 10, "output": 1, "cachedInput": 8, "audioInput": 3}, {}, "tokens"),
        ({"input": 10, "output": 4, "reasoning": 3, "audioOutput": 2}, {}, "tokens"),
        ({"input": 10, "output": 4, "rejectedPrediction": 5}, {}, "tokens.rejectedPrediction"),
        ({"input": 10, "output": 1}, {"inputTokens": 11}, "tokens.input"),
        ({"output": 1}, {}, "tokens.input"),
        ([10, 1], {}, "tokens"),
    ],
)
async def test_a_bad_breakdown_is_a_400_that_names_it_and_writes_nothing(
    pcg: TestClient,
    db: asyncpg.Pool,
    customer_factory: Any,
    tokens: Any,
    extra: dict[str, Any],
    path: str,
) -> None:
    c = await customer_factory(1)
    headers = await writer(db, c)
    before = await ledger_footprint(db, c.account.id)
    body = {"model": "kinds", "tokens": tokens, "idempotencyKey": "bad", **extra}
    resp = await pcg.post("/api/usage/record", json=body, headers=headers)
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert path in [d["path"] for d in error["details"]], error
    assert await ledger_footprint(db, c.account.id) == before


async def test_verify_finds_a_breakdown_that_does_not_add_up(services: Services) -> None:
    """``verify`` checks every debit's kinds against its totals (what only someone
    bypassing the append-only trigger could break), in a database of its own."""
    name = f"cg_kinds_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(services.owner_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = services.owner_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        conn = await asyncpg.connect(url)
        try:
            await migrations.migrate(conn)
            account = await ledger.ensure_account(conn, "user", "user_kinds")
            await ledger.post_entry(
                conn,
                account_id=account.id,
                amount=1_000_000,
                kind="grant",
                idempotency_key="g",
                reason="t",
            )
            hold = await ledger.reserve_hold(
                conn, hold_id=uuid.uuid4(), account_id=account.id, amount=5_000, ttl_seconds=60
            )
            kinds = (("input", 100), ("output", 20), ("cached_input", 60), ("reasoning", 10))
            await ledger.settle_hold(conn, hold.id, ledger.Usage(100, 20, 900, breakdown=kinds))
            assert (await ledger.verify_ledger(conn)).ok
            for bad in (
                {"input": 100, "output": 20, "cached_input": 101},  # a part above its total
                {"input": 99, "output": 20},  # a total not the entry's
                {"input": 100, "output": 20, "reasoning": -1},
                {"input": 100, "output": 20, "reasoning": "10"},
                {"input": 100, "output": 20, "audio_output": 15, "reasoning": 10},
            ):
                async with conn.transaction():
                    # What only a superuser bypassing the triggers could do.
                    await conn.execute("SET LOCAL session_replication_role = replica")
                    await conn.execute(
                        "UPDATE ledger_entries SET breakdown = $1::jsonb WHERE kind = 'debit'",
                        orjson.dumps(bad).decode(),
                    )
                report = await ledger.verify_ledger(conn)
                problems = [p["problem"] for p in report.problems]
                assert problems and all("tokens by kind" in p for p in problems), (bad, problems)
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_a_late_debit_keeps_its_tokens_by_kind(
    db: asyncpg.Pool, customer_factory: Any
) -> None:
    """A call whose hold the sweeper expired meanwhile is still debited, with its kinds."""
    c = await customer_factory(1)
    hold = await ledger.reserve_hold(
        db, hold_id=uuid.uuid4(), account_id=c.account.id, amount=1_000, ttl_seconds=60
    )
    assert await ledger.release_hold(db, hold.id, expired=True)  # as the sweeper does
    kinds = (("input", 40), ("output", 9), ("cached_input", 30), ("audio_output", 2))
    settled = await ledger.settle_hold(db, hold.id, ledger.Usage(40, 9, 700, breakdown=kinds))
    assert settled.debited == 700 and not settled.replayed
    stored = await db.fetchval(
        "SELECT breakdown FROM ledger_entries WHERE id = $1", settled.entry_id
    )
    assert orjson.loads(stored) == dict(kinds)
