"""The Responses API, Anthropic Messages and embeddings through creditgate, with
the real clients (the openai and anthropic SDKs) against the mock upstream's
wire formats: exact charges (cached, cache-write and reasoning tokens at
their own prices), the error shapes, the routes of each model."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient

from creditgate.proxy.mock_upstream import MockStats
from creditgate.proxy.pricing import PER_MESSAGE_OVERHEAD
from tests.conftest import ledger_footprint
from tests.proxy.conftest import Debit, Outcome, outcome, sdk, text_estimate

GRANT = 10_000_000
TEXT = "Hello from the mock upstream"
PROMPT = "Say hello"
PROMPT_TOKENS = math.ceil(len(PROMPT) / 4) + 3  # the mock's count of one item
ANTHROPIC_MESSAGES: Any = [{"role": "user", "content": PROMPT}]


def price(*parts: tuple[int, str]) -> int:
    """Σ tokens × price (credits per 1M tokens = µc per token), rounded up once."""
    return math.ceil(sum(n * Fraction(p) for n, p in parts))


def claude(gw: TestClient, key: str, **kw: Any) -> anthropic.AsyncAnthropic:
    """Anthropic's SDK pointed at creditgate (it appends /v1/messages itself)."""
    return anthropic.AsyncAnthropic(base_url=str(gw.make_url("")), api_key=key, max_retries=0, **kw)


# ---------------------------------------------------------------- Responses API


async def test_responses_create_charges_cached_and_reasoning_tokens_exactly(
    gw: TestClient, db, customer_factory, key: str
) -> None:
    c = await customer_factory(10)
    resp = await sdk(gw, c.key).responses.create(
        model="reasoner",
        input=PROMPT,
        store=False,
        extra_body={"mock": {"key": key, "cached_tokens": 4, "reasoning_tokens": 7}},
    )
    assert resp.output_text == TEXT
    usage = resp.usage
    assert usage is not None
    assert usage.input_tokens == PROMPT_TOKENS and usage.output_tokens == 5 + 7
    assert usage.input_tokens_details.cached_tokens == 4
    assert usage.output_tokens_details.reasoning_tokens == 7
    # Cached input at its own price; reasoning tokens are output tokens.
    charged = price((PROMPT_TOKENS - 4, "2"), (4, "0.5"), (12, "8"))
    assert (usage.model_extra or {})["cost_micros"] == charged
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - charged, 0, ["settled"], [Debit(charged, PROMPT_TOKENS, 12, False, 0)]
    )


async def test_responses_stream_relays_typed_events_and_ends_with_the_cost(
    gw: TestClient, db, customer_factory, key: str
) -> None:
    c = await customer_factory(10)
    stream = await sdk(gw, c.key).responses.create(
        model="reasoner",
        input=[{"role": "user", "content": PROMPT}],
        stream=True,
        extra_body={"mock": {"key": key, "cached_tokens": 2, "reasoning_tokens": 3}},
    )
    types, text, completed = [], "", None
    async for event in stream:
        types.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type == "response.completed":
            completed = event
    assert text == TEXT
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == 5
    assert completed is not None and completed.response.usage is not None
    charged = price((PROMPT_TOKENS - 2, "2"), (2, "0.5"), (8, "8"))
    assert (completed.response.usage.model_extra or {})["cost_micros"] == charged
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - charged, 0, ["settled"], [Debit(charged, PROMPT_TOKENS, 8, False, 0)]
    )


async def test_responses_passes_previous_response_id_and_store_through(
    gw: TestClient, db, customer_factory, key: str, mock_stats: MockStats
) -> None:
    c = await customer_factory(10)
    await sdk(gw, c.key).responses.create(
        model="reasoner",
        input=PROMPT,
        previous_response_id="resp_earlier",
        store=False,
        extra_body={"mock": {"key": key}},
    )
    sent = mock_stats.last_body[key]
    assert sent["previous_response_id"] == "resp_earlier" and sent["store"] is False
    assert sent["max_output_tokens"] == 256  # the model's cap, so the hold is a bound
    assert sent["model"] == "reasoner-upstream"


# The hold of a Responses call continuing stored state on "reasoner": its
# whole context window (4000 input tokens) at the input price, and its output cap.
CHAINED_HOLD = price((4000, "2"), (256, "8"))


async def holds_of(db, account_id: Any) -> list[int]:
    """The amounts of an account's holds, oldest first."""
    rows = await db.fetch(
        "SELECT amount FROM holds WHERE account_id = $1 ORDER BY created_at", account_id
    )
    return [r["amount"] for r in rows]


async def test_chained_response_is_held_for_the_context_window_and_charged_its_usage(
    gw: TestClient, db, customer_factory, key: str
) -> None:
    c = await customer_factory(10)
    client = sdk(gw, c.key)
    long_input = "x" * 8000  # stored upstream: the next call reads it again
    first = await client.responses.create(
        model="reasoner", input=long_input, extra_body={"mock": {"key": key}}
    )
    assert first.usage is not None and first.usage.output_tokens == 5
    second = await client.responses.create(
        model="reasoner",
        input=PROMPT,
        previous_response_id=first.id,
        extra_body={"mock": {"key": key}},
    )
    usage = second.usage
    assert usage is not None
    # The earlier turns (its input and output) are read again, as OpenAI bills them.
    earlier = first.usage.input_tokens + first.usage.output_tokens
    assert usage.input_tokens == earlier + PROMPT_TOKENS and usage.output_tokens == 5
    charged = price((usage.input_tokens, "2"), (5, "8"))
    # More than a hold of the request alone could cover: the hole this closes.
    assert charged > price((PER_MESSAGE_OVERHEAD + len(PROMPT), "2"), (256, "8"))
    assert (usage.model_extra or {})["cost_micros"] == charged
    first_charge = price((first.usage.input_tokens, "2"), (5, "8"))
    assert (await holds_of(db, c.account.id))[1] == CHAINED_HOLD
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - first_charge - charged,
        0,
        ["settled", "settled"],
        [
            Debit(first_charge, first.usage.input_tokens, 5, False, 0),
            Debit(charged, usage.input_tokens, 5, False, 0),
        ],
    )


async def test_chained_stream_is_held_for_the_context_window(
    gw: TestClient, db, customer_factory, key: str
) -> None:
    c = await customer_factory(10)
    stream = await sdk(gw, c.key).responses.create(
        model="reasoner",
        input=PROMPT,
        conversation="conv_mock",
        stream=True,
        extra_body={"mock": {"key": key}},
    )
    completed = [e async for e in stream if e.type == "response.completed"]
    assert len(completed) == 1 and completed[0].response.usage is not None
    charged = (completed[0].response.usage.model_extra or {})["cost_micros"]
    assert await holds_of(db, c.account.id) == [CHAINED_HOLD]
    assert (await outcome(db, c.account.id)).debits == [Debit(charged, PROMPT_TOKENS, 5, False, 0)]


async def test_chained_call_without_usage_is_charged_its_bound_marked(
    gw: TestClient, db, customer_factory, key: str
) -> None:
    # No usage: the earlier turns' size is unknown, so the prompt is charged at
    # its bound (never less than it may have cost), marked estimated.
    c = await customer_factory(10)
    await sdk(gw, c.key).responses.create(
        model="reasoner",
        input=PROMPT,
        previous_response_id="resp_earlier",
        extra_body={"mock": {"key": key, "no_usage": True}},
    )
    out = text_estimate(TEXT)
    charged = price((4000, "2"), (out, "8"))
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - charged, 0, ["settled"], [Debit(charged, 4000, out, True, 0)]
    )


@pytest.mark.parametrize(
    "state",
    [{"previous_response_id": "resp_earlier"}, {"conversation": {"id": "conv_earlier"}}],
)
async def test_stored_state_without_a_context_window_is_refused_unbilled(
    gw: TestClient, db, customer_factory, key: str, mock_stats: MockStats, state: dict[str, Any]
) -> None:
    c = await customer_factory(10)
    before = await ledger_footprint(db, c.account.id)
    with pytest.raises(openai.BadRequestError) as bad:
        await sdk(gw, c.key).responses.create(
            model="mock-model", input=PROMPT, extra_body={"mock": {"key": key}, **state}
        )
    body: Any = bad.value.body
    assert body["code"] == "VALIDATION_ERROR"
    field = next(iter(state))
    assert body["details"][0]["path"] == field
    # Both ways out are named: the stateless call, or the model's bound.
    assert "`store: false`" in body["message"] and "`context_window`" in body["message"]
    assert await ledger_footprint(db, c.account.id) == before
    assert key not in mock_stats.requests  # never reached the upstream


@pytest.mark.parametrize(
    ("state", "path"),
    [
        ({"previous_response_id": ""}, "previous_response_id"),
        ({"previous_response_id": 7}, "previous_response_id"),
        ({"conversation": {"id": ""}}, "conversation"),
        ({"conversation": 3}, "conversation"),
    ],
)
async def test_stored_state_ids_are_validated(
    gw: TestClient, db, customer_factory, state: dict[str, Any], path: str
) -> None:
    c = await customer_factory(10)
    before = await ledger_footprint(db, c.account.id)
    resp = await gw.post(
        "/v1/responses",
        json={"model": "reasoner", "input": PROMPT, **state},
        headers=c.auth,
    )
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert [d["path"] for d in body["error"]["details"]] == [path]
    assert await ledger_footprint(db, c.account.id) == before


async def test_chained_call_beyond_the_balance_is_402_saying_why(
    gw: TestClient, db, customer_factory, key: str, mock_stats: MockStats
) -> None:
    # Enough for the request alone, not for the context window's bound.
    c = await customer_factory(str(Decimal(CHAINED_HOLD - 1) / 1_000_000))
    client = sdk(gw, c.key)
    before = await ledger_footprint(db, c.account.id)
    with pytest.raises(openai.APIStatusError) as e:
        await client.responses.create(
            model="reasoner",
            input=PROMPT,
            previous_response_id="resp_earlier",
            extra_body={"mock": {"key": key}},
        )
    assert e.value.status_code == 402
    body: Any = e.value.body
    assert body["code"] == "INSUFFICIENT_CREDITS"
    assert "context window (4000 input tokens)" in body["message"]
    assert "`store: false`" in body["message"]
    assert body["details"]["requiredMicros"] == CHAINED_HOLD
    assert await ledger_footprint(db, c.account.id) == before
    assert key not in mock_stats.requests
    # The same balance serves the stateless call.
    resp = await client.responses.create(
        model="reasoner", input=PROMPT, store=False, extra_body={"mock": {"key": key}}
    )
    assert resp.usage is not None and resp.usage.input_tokens == PROMPT_TOKENS


# ---------------------------------------------------------------- embeddings


async def test_embeddings_batch_is_charged_per_input_token(
    gw: TestClient, db, customer_factory, key: str
) -> None:
    c = await customer_factory(10)
    inputs = ["hello world", "héhé ✓"]
    result = await sdk(gw, c.key).embeddings.create(
        model="embed", input=inputs, extra_body={"mock": {"key": key}}
    )
    assert [d.index for d in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 8  # decoded from base64 by the SDK
    tokens = sum(math.ceil(len(t.encode()) / 4) for t in inputs)
    assert result.usage.prompt_tokens == tokens
    charged = price((tokens, "130"))
    assert (result.usage.model_extra or {})["cost_micros"] == charged
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - charged, 0, ["settled"], [Debit(charged, tokens, 0, False, 0)]
    )


async def test_embeddings_refuse_bad_input_without_a_ledger_write(
    gw: TestClient, db, customer_factory
) -> None:
    c = await customer_factory(10)
    for bad in ({"model": "embed"}, {"model": "embed", "input": ["ok", ""]}, {"input": "x"}):
        resp = await gw.post("/v1/embeddings", json=bad, headers=c.auth)
        assert resp.status == 400, bad
        assert (await resp.json())["error"]["code"] == "VALIDATION_ERROR"
    resp = await gw.post(
        "/v1/embeddings", json={"model": "embed", "input": "x", "stream": True}, headers=c.auth
    )
    assert resp.status == 400
    assert await outcome(db, c.account.id) == Outcome(GRANT, 0, [], [])


# ---------------------------------------------------------------- Anthropic Messages


async def test_messages_create_charges_cache_reads_and_writes_at_their_prices(
    gw: TestClient, db, customer_factory, key: str, mock_stats: MockStats
) -> None:
    c = await customer_factory(10)
    message = await claude(gw, c.key).messages.create(
        model="claude",
        max_tokens=100,
        messages=ANTHROPIC_MESSAGES,
        extra_body={"mock": {"key": key, "cached_tokens": 3, "cache_write_tokens": 2}},
    )
    assert message.content[0].type == "text" and message.content[0].text == TEXT
    u = message.usage
    assert (u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens) == (
        PROMPT_TOKENS - 5,
        3,
        2,
    )
    charged = price((PROMPT_TOKENS - 5, "3"), (3, "0.3"), (2, "3.75"), (5, "15"))
    assert (u.model_extra or {})["cost_micros"] == charged
    # The prompt is all three: Anthropic's input_tokens leaves the cache's out.
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - charged, 0, ["settled"], [Debit(charged, PROMPT_TOKENS, 5, False, 0)]
    )
    assert mock_stats.last_body[key]["model"] == "claude-upstream"


async def test_messages_stream_with_a_bearer_key_charges_exactly(
    gw: TestClient, db, customer_factory, key: str
) -> None:
    c = await customer_factory(10)
    client = anthropic.AsyncAnthropic(
        base_url=str(gw.make_url("")), auth_token=c.key, max_retries=0
    )
    async with client.messages.stream(
        model="claude",
        max_tokens=100,
        messages=ANTHROPIC_MESSAGES,
        extra_body={"mock": {"key": key, "cached_tokens": 4}},
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == TEXT
    assert final.usage.output_tokens == 5 and final.usage.cache_read_input_tokens == 4
    charged = price((PROMPT_TOKENS - 4, "3"), (4, "0.3"), (5, "15"))
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - charged, 0, ["settled"], [Debit(charged, PROMPT_TOKENS, 5, False, 0)]
    )


async def test_messages_stream_ends_with_the_usage_and_its_cost_then_message_stop(
    gw: TestClient, db, customer_factory, key: str
) -> None:
    c = await customer_factory(10)
    stream = await claude(gw, c.key).messages.create(
        model="claude",
        max_tokens=100,
        messages=ANTHROPIC_MESSAGES,
        stream=True,
        extra_body={"mock": {"key": key}},
    )
    events = [e async for e in stream]
    assert [e.type for e in events[-2:]] == ["message_delta", "message_stop"]
    usage = events[-2].usage
    charged = price((PROMPT_TOKENS, "3"), (5, "15"))
    assert usage.output_tokens == 5 and (usage.model_extra or {})["cost_micros"] == charged
    assert (await outcome(db, c.account.id)).debits == [Debit(charged, PROMPT_TOKENS, 5, False, 0)]


async def test_messages_errors_have_anthropics_shape_and_the_same_statuses(
    gw: TestClient, db, customer_factory
) -> None:
    broke = await customer_factory(0)
    with pytest.raises(anthropic.APIStatusError) as e:
        await claude(gw, broke.key).messages.create(
            model="claude", max_tokens=100, messages=ANTHROPIC_MESSAGES
        )
    assert e.value.status_code == 402
    assert isinstance(e.value.body, dict)
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "billing_error"
    assert e.value.body["error"]["code"] == "INSUFFICIENT_CREDITS"
    with pytest.raises(anthropic.AuthenticationError):
        await claude(gw, "cg_" + "x" * 43).messages.create(
            model="claude", max_tokens=100, messages=ANTHROPIC_MESSAGES
        )
    resp = await gw.post(
        "/v1/messages",
        json={"model": "claude", "max_tokens": 10, "messages": ANTHROPIC_MESSAGES},
        headers={"x-api-key": "sk-ant-not-ours"},  # an Anthropic key sent to creditgate
    )
    assert resp.status == 401
    assert (await resp.json())["error"]["type"] == "authentication_error"
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/messages",
        json={"model": "claude", "messages": ANTHROPIC_MESSAGES},
        headers={"x-api-key": c.key},
    )
    assert resp.status == 400
    body = await resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    assert await outcome(db, c.account.id) == Outcome(GRANT, 0, [], [])


async def test_count_tokens_is_passed_through_unmetered(
    gw: TestClient, db, customer_factory
) -> None:
    c = await customer_factory(10)
    counted = await claude(gw, c.key).messages.count_tokens(
        model="claude", messages=ANTHROPIC_MESSAGES
    )
    assert counted.input_tokens == PROMPT_TOKENS
    assert await outcome(db, c.account.id) == Outcome(GRANT, 0, [], [])
    resp = await gw.post("/v1/messages/count_tokens", json={"model": "claude", "messages": []})
    assert resp.status == 401 and (await resp.json())["type"] == "error"


async def test_count_tokens_counts_as_a_request_against_the_throttle(
    gw: TestClient, db, customer_factory
) -> None:
    c = await customer_factory(10, tier="tight")  # 2 requests per minute
    client = claude(gw, c.key)
    for _ in range(2):
        await client.messages.count_tokens(model="claude", messages=ANTHROPIC_MESSAGES)
    resp = await gw.post(
        "/v1/messages/count_tokens",
        json={"model": "claude", "messages": ANTHROPIC_MESSAGES},
        headers={"x-api-key": c.key},
    )
    assert resp.status == 429
    body = await resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert await outcome(db, c.account.id) == Outcome(GRANT, 0, [], [])


# ---------------------------------------------------------------- which API serves a model


async def test_a_model_called_through_another_api_is_404_naming_its_route(
    gw: TestClient, db, customer_factory
) -> None:
    c = await customer_factory(10)
    with pytest.raises(openai.NotFoundError) as oe:
        await sdk(gw, c.key).responses.create(model="claude", input=PROMPT)
    assert "POST /v1/messages" in oe.value.message
    with pytest.raises(anthropic.NotFoundError) as ae:
        await claude(gw, c.key).messages.create(
            model="mock-model", max_tokens=10, messages=ANTHROPIC_MESSAGES
        )
    assert "POST /v1/chat/completions or POST /v1/responses" in ae.value.message
    with pytest.raises(openai.NotFoundError) as ce:
        await sdk(gw, c.key).chat.completions.create(
            model="embed", messages=[{"role": "user", "content": PROMPT}]
        )
    assert "POST /v1/embeddings" in ce.value.message
    assert await outcome(db, c.account.id) == Outcome(GRANT, 0, [], [])


async def test_models_list_says_which_apis_serve_each_model(
    gw: TestClient, customer_factory
) -> None:
    c = await customer_factory(1)
    models = {m.id: m for m in (await sdk(gw, c.key).models.list()).data}
    assert (models["claude"].model_extra or {})["apis"] == ["messages"]
    assert (models["mock-model"].model_extra or {})["apis"] == ["chat", "responses"]
    assert (models["embed"].model_extra or {})["apis"] == ["embeddings"]
