"""One paid chat completion, end to end: the openai SDK → creditgate → mock upstream."""

from __future__ import annotations

import math

import openai
import pytest
from aiohttp.test_utils import TestClient

from creditgate import ledger
from creditgate.proxy.mock_upstream import prompt_tokens
from tests.conftest import Customer, ledger_footprint
from tests.logcapture import remember_secret

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello in five words, héhé ✓."},
]
COMPLETION = "Hello from the mock upstream"
# Prompts and completions must never reach a log line.
remember_secret(*(m["content"] for m in MESSAGES), COMPLETION)


def expected_cost(in_tokens: int, out_tokens: int, in_price: str, out_price: str) -> int:
    """DESIGN.md §3: ceil(in·in_price + out·out_price) µc, computed independently."""
    from fractions import Fraction

    return math.ceil(in_tokens * Fraction(in_price) + out_tokens * Fraction(out_price))


def sdk(cg: TestClient, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(cg.make_url("/v1")), api_key=key, max_retries=0)


async def balance_micros(cg: TestClient, c: Customer) -> int:
    resp = await cg.get("/api/user/balance", headers=c.auth)
    assert resp.status == 200
    body = await resp.json()
    assert body["correlationId"] == resp.headers["x-correlation-id"]
    return int(body["data"]["balanceMicros"])


async def test_sdk_completion_charges_exact_cost(cg: TestClient, db, customer_factory) -> None:
    c = await customer_factory(10)
    before = await balance_micros(cg, c)
    client = sdk(cg, c.key)
    result = await client.chat.completions.create(model="mock-model", messages=MESSAGES)
    assert result.choices[0].message.content == "Hello from the mock upstream"
    usage = result.usage
    assert usage is not None
    assert usage.prompt_tokens == prompt_tokens(MESSAGES)
    assert usage.completion_tokens == 5
    cost = expected_cost(usage.prompt_tokens, usage.completion_tokens, "0.15", "0.60")
    extra = usage.model_extra or {}
    assert extra["cost_micros"] == cost
    assert extra["cost"] == pytest.approx(cost / 1_000_000)
    assert before - await balance_micros(cg, c) == cost


async def test_sdk_stream_charges_exact_cost_and_reports_usage(
    cg: TestClient, db, customer_factory
) -> None:
    c = await customer_factory(10)
    before = await balance_micros(cg, c)
    client = sdk(cg, c.key)
    stream = await client.chat.completions.create(
        model="pricey",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage_chunks = [], []
    async for chunk in stream:
        if chunk.usage is not None:
            usage_chunks.append(chunk)
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
    assert "".join(text) == "Hello from the mock upstream"
    # OpenAI's shape: exactly one usage chunk, with no choices.
    assert len(usage_chunks) == 1 and usage_chunks[0].choices == []
    usage = usage_chunks[0].usage
    cost = expected_cost(usage.prompt_tokens, usage.completion_tokens, "1000", "3000.5")
    assert (usage.model_extra or {})["cost_micros"] == cost
    # The charge is committed by the time the client has read the whole stream.
    assert before - await balance_micros(cg, c) == cost


async def test_stream_without_include_usage_drops_usage_chunk(
    cg: TestClient, db, customer_factory
) -> None:
    c = await customer_factory(10)
    before = await balance_micros(cg, c)
    stream = await sdk(cg, c.key).chat.completions.create(
        model="mock-model", messages=MESSAGES, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    # Usage was still requested upstream, so the charge is exact, not estimated.
    cost = expected_cost(prompt_tokens(MESSAGES), 5, "0.15", "0.60")
    assert before - await balance_micros(cg, c) == cost
    row = await db.fetchrow(
        "SELECT estimated, input_tokens, output_tokens FROM ledger_entries"
        " WHERE account_id = $1 AND kind = 'debit'",
        c.account.id,
    )
    assert dict(row) == {
        "estimated": False,
        "input_tokens": prompt_tokens(MESSAGES),
        "output_tokens": 5,
    }


async def test_api_chat_is_the_same_handler(cg: TestClient, db, customer_factory) -> None:
    c = await customer_factory(1)
    resp = await cg.post(
        "/api/chat", json={"model": "mock-model", "messages": MESSAGES}, headers=c.auth
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["usage"]["cost_micros"] == expected_cost(prompt_tokens(MESSAGES), 5, "0.15", "0.60")


async def test_no_credits_is_402_and_changes_nothing(cg: TestClient, db, customer_factory) -> None:
    c = await customer_factory(0)
    before = await ledger_footprint(db, c.account.id)
    with pytest.raises(openai.APIStatusError) as exc:
        await sdk(cg, c.key).chat.completions.create(model="mock-model", messages=MESSAGES)
    assert exc.value.status_code == 402
    assert exc.value.body["code"] == "INSUFFICIENT_CREDITS"
    assert await ledger_footprint(db, c.account.id) == before


async def test_bad_key_is_401(cg: TestClient, db, customer_factory) -> None:
    c = await customer_factory(1)
    before = await ledger_footprint(db, c.account.id)
    for key in ("cg_" + "A" * 43, "sk-not-ours", c.key[:-1] + ("A" if c.key[-1] != "A" else "B")):
        with pytest.raises(openai.AuthenticationError) as exc:
            await sdk(cg, key).chat.completions.create(model="mock-model", messages=MESSAGES)
        assert exc.value.body["code"] == "UNAUTHORIZED"
    resp = await cg.post("/v1/chat/completions", json={"model": "mock-model", "messages": []})
    assert resp.status == 401
    body = await resp.json()
    assert body["error"]["code"] == "UNAUTHORIZED"
    assert body["correlationId"] == resp.headers["x-correlation-id"]
    assert await ledger_footprint(db, c.account.id) == before


async def test_rate_limit_is_429_with_retry_after_in_seconds(
    cg: TestClient, db, customer_factory
) -> None:
    c = await customer_factory(1, tier="tight")  # 2 requests per minute
    body = {"model": "mock-model", "messages": MESSAGES}
    for _ in range(2):
        ok = await cg.post("/v1/chat/completions", json=body, headers=c.auth)
        assert ok.status == 200
        assert ok.headers["x-ratelimit-limit-requests"] == "2"
    before = await ledger_footprint(db, c.account.id)
    resp = await cg.post("/v1/chat/completions", json=body, headers=c.auth)
    assert resp.status == 429
    err = await resp.json()
    assert err["error"]["code"] == "RATE_LIMITED"
    assert err["error"]["details"]["limit"] == "requests_per_minute"
    retry_after = int(resp.headers["Retry-After"])  # whole seconds, not ms
    assert 1 <= retry_after <= 60
    assert err["error"]["details"]["retryAfter"] == retry_after
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert await ledger_footprint(db, c.account.id) == before


async def test_chunked_body_over_limit_is_413(cg: TestClient, db, customer_factory) -> None:
    c = await customer_factory(1)
    before = await ledger_footprint(db, c.account.id)

    async def body():  # no Content-Length: the server must count bytes as they arrive
        for _ in range(32):
            yield b"x" * (64 * 1024)

    resp = await cg.post(
        "/v1/chat/completions",
        data=body(),
        headers={**c.auth, "Content-Type": "application/json"},
    )
    assert resp.status == 413
    err = await resp.json()
    assert err["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert await ledger_footprint(db, c.account.id) == before


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (b"{not json", ""),
        (b'{"model": "mock-model"}', "messages"),
        (b'{"model": "mock-model", "messages": [{"role": "wizard", "content": 1}]}', None),
        (b"[1, 2]", ""),
    ],
)
async def test_invalid_request_is_400_with_details(
    cg: TestClient, db, customer_factory, raw: bytes, path: str | None
) -> None:
    c = await customer_factory(1)
    before = await ledger_footprint(db, c.account.id)
    resp = await cg.post(
        "/v1/chat/completions", data=raw, headers={**c.auth, "Content-Type": "application/json"}
    )
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["code"] == "VALIDATION_ERROR"
    assert err["type"] == "invalid_request_error"
    assert err["details"] and all({"path", "message"} <= set(d) for d in err["details"])
    if path is not None:
        assert any(d["path"] == path for d in err["details"])
    else:
        paths = {d["path"] for d in err["details"]}
        assert {"messages[0].role", "messages[0].content"} <= paths
    assert await ledger_footprint(db, c.account.id) == before


async def test_unknown_model_is_404(cg: TestClient, db, customer_factory) -> None:
    c = await customer_factory(1)
    with pytest.raises(openai.NotFoundError) as exc:
        await sdk(cg, c.key).chat.completions.create(model="gpt-nope", messages=MESSAGES)
    assert exc.value.body["code"] == "MODEL_NOT_FOUND"


async def test_upstream_500_is_502_and_releases_the_hold(
    cg: TestClient, db, customer_factory
) -> None:
    c = await customer_factory(1)
    before = await ledger_footprint(db, c.account.id)
    with pytest.raises(openai.APIStatusError) as exc:
        await sdk(cg, c.key).chat.completions.create(
            model="mock-model", messages=MESSAGES, extra_body={"mock": {"status": 500}}
        )
    assert exc.value.status_code == 502
    assert exc.value.body["code"] == "UPSTREAM_ERROR"
    entries, holds, balance, reserved = await ledger_footprint(db, c.account.id)
    assert (entries, balance, reserved) == (before[0], before[2], before[3])
    assert holds == before[1] + 1
    outcome = await db.fetchval(
        "SELECT outcome FROM holds WHERE account_id = $1 ORDER BY created_at DESC LIMIT 1",
        c.account.id,
    )
    assert outcome == "released"


async def test_models_lists_prices(cg: TestClient, db, customer_factory) -> None:
    c = await customer_factory(0)
    models = await sdk(cg, c.key).models.list()
    by_id = {m.id: m for m in models.data}
    assert set(by_id) == {"mock-model", "pricey"}
    assert (by_id["pricey"].model_extra or {})["pricing"]["output"] == 3000.5


async def test_ids_are_kept_when_well_formed_and_replaced_otherwise(cg: TestClient, db) -> None:
    resp = await cg.get("/health", headers={"x-request-id": "abc-123", "x-correlation-id": "c.1"})
    assert resp.headers["x-request-id"] == "abc-123"
    assert resp.headers["x-correlation-id"] == "c.1"
    resp = await cg.get("/health", headers={"x-request-id": "bad id with spaces"})
    assert resp.headers["x-request-id"] != "bad id with spaces"
    assert len(resp.headers["x-request-id"]) == 36
    resp = await cg.get("/nowhere")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "NOT_FOUND"


async def test_ready_and_metrics(cg: TestClient, db, customer_factory) -> None:
    resp = await cg.get("/ready")
    assert resp.status == 200, await resp.text()
    c = await customer_factory(1)
    await cg.post(
        "/v1/chat/completions", json={"model": "mock-model", "messages": MESSAGES}, headers=c.auth
    )
    text = await (await cg.get("/metrics")).text()
    assert (
        'creditgate_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}'
        in text
    )
    assert "creditgate_http_request_duration_seconds_bucket" in text
    assert "creditgate_credits_charged_micros_total" in text


async def test_balance_shape(cg: TestClient, db, customer_factory) -> None:
    c = await customer_factory("12.5")
    body = (await (await cg.get("/api/user/balance", headers=c.auth)).json())["data"]
    assert body == {
        "accountId": str(c.account.id),
        "balance": 12.5,
        "balanceMicros": 12_500_000,
        "reserved": 0,
        "reservedMicros": 0,
        "available": 12.5,
        "availableMicros": 12_500_000,
        "creditLimit": 12.5,
        "creditLimitMicros": 12_500_000,
        "tier": "free",
        "plan": None,
    }
    assert ledger.micros_to_credits(12_500_000) == body["balance"]


async def test_calls_write_time_ordered_ids(cg: TestClient, db, customer_factory) -> None:
    """Holds and entries get UUIDv7 ids in the order they were made (ledger/ids.py): the
    reason their indexes take inserts at the right-most page at any ledger size."""
    c = await customer_factory(10)
    client = sdk(cg, c.key)
    for _ in range(3):
        await client.chat.completions.create(model="mock-model", messages=MESSAGES)
    rows = await db.fetch(
        "SELECT e.id AS entry, e.hold_id AS hold, k.id AS key_id FROM ledger_entries e"
        " JOIN ledger_entry_keys k ON k.id = e.id WHERE e.account_id = $1 ORDER BY e.seq",
        c.account.id,
    )
    assert [r["entry"].version for r in rows] == [7, 7, 7, 7]  # the grant and three debits
    assert [r["hold"].version for r in rows[1:]] == [7, 7, 7]
    entries = [r["entry"] for r in rows]
    holds = [r["hold"] for r in rows[1:]]
    assert entries == sorted(entries) and holds == sorted(holds)
    # An id's first 48 bits are its creation time (ms): within the grant's and the last
    # call's commit times.
    times = await db.fetchrow(
        "SELECT min(created_at) AS lo, max(created_at) AS hi FROM ledger_entries"
        " WHERE account_id = $1",
        c.account.id,
    )
    lo_ms = int(times["lo"].timestamp() * 1000) - 1000
    hi_ms = int(times["hi"].timestamp() * 1000) + 1000
    assert all(lo_ms <= (e.int >> 80) <= hi_ms for e in entries + holds)
