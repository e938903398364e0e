"""creditgate as a drop-in OpenAI endpoint: the official SDK, unchanged, streams,
calls tools and gets typed errors carrying creditgate's codes."""

from __future__ import annotations

import json
import re

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from creditgate.proxy.mock_upstream import MockStats, prompt_tokens
from tests.proxy.conftest import MESSAGES, Debit, Outcome, cost, outcome, sdk

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
QUESTION = [{"role": "user", "content": "Weather in Paris for 1 day?"}]


async def test_sdk_streams_n_choices_with_one_usage_chunk(
    gw: TestClient, db, customer_factory
) -> None:
    c = await customer_factory(10)
    stream = await sdk(gw, c.key).chat.completions.create(
        model="pricey",
        messages=MESSAGES,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = {0: "", 1: ""}
    usage_chunks = []
    async for chunk in stream:
        if chunk.usage is not None:
            usage_chunks.append(chunk)
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {0: "Hello from the mock upstream", 1: "Hello from the mock upstream"}
    assert len(usage_chunks) == 1 and usage_chunks[0].choices == []
    usage = usage_chunks[0].usage
    assert usage.completion_tokens == 10
    charged = cost("pricey", prompt_tokens(MESSAGES), 10)
    assert (usage.model_extra or {})["cost_micros"] == charged
    assert await outcome(db, c.account.id) == Outcome(
        10_000_000 - charged,
        0,
        ["settled"],
        [Debit(charged, prompt_tokens(MESSAGES), 10, False, 0)],
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_call_round_trip(gw: TestClient, db, customer_factory, stream: bool) -> None:
    c = await customer_factory(10)
    client = sdk(gw, c.key)

    # 1. The model asks for the tool.
    if stream:
        call_id, name, arguments, finish = "", "", "", None
        async for chunk in await client.chat.completions.create(
            model="pricey", messages=QUESTION, tools=[WEATHER_TOOL], stream=True
        ):
            for choice in chunk.choices:
                for delta in choice.delta.tool_calls or []:
                    call_id = delta.id or call_id
                    name = (delta.function and delta.function.name) or name
                    arguments += (delta.function and delta.function.arguments) or ""
                finish = choice.finish_reason or finish
    else:
        first = await client.chat.completions.create(
            model="pricey", messages=QUESTION, tools=[WEATHER_TOOL]
        )
        message = first.choices[0].message
        assert message.content is None
        call = message.tool_calls[0]
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
        finish = first.choices[0].finish_reason
    assert finish == "tool_calls"
    assert name == "get_weather"
    assert json.loads(arguments) == {"city": "mock", "days": 1}

    # 2. The tool's result goes back; the model answers in words.
    followup = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": '{"temp": 21}'},
    ]
    second = await client.chat.completions.create(
        model="pricey", messages=followup, tools=[WEATHER_TOOL]
    )
    assert second.choices[0].message.content == 'The tool returned: {"temp": 21}'
    assert second.choices[0].finish_reason == "stop"

    # Both calls are charged exactly, from the upstream's usage.
    tool_tokens = len(range(0, len(arguments), 8))  # the mock: one token per 8 characters
    debits = [
        Debit(
            cost("pricey", prompt_tokens(QUESTION), tool_tokens),
            prompt_tokens(QUESTION),
            tool_tokens,
            False,
            0,
        ),
        Debit(cost("pricey", prompt_tokens(followup), 5), prompt_tokens(followup), 5, False, 0),
    ]
    assert await outcome(db, c.account.id) == Outcome(
        10_000_000 - sum(d.amount for d in debits), 0, ["settled", "settled"], debits
    )


async def test_typed_errors_carry_creditgate_codes(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    rich, broke, tight = (
        await customer_factory(10),
        await customer_factory(0),
        await customer_factory(10, tier="tight"),
    )
    client = sdk(gw, rich.key)

    with pytest.raises(openai.AuthenticationError) as auth:
        await sdk(gw, "cg_" + "x" * 43).chat.completions.create(
            model="mock-model", messages=MESSAGES, stream=True
        )
    assert auth.value.status_code == 401 and auth.value.body["code"] == "UNAUTHORIZED"

    for _ in range(2):
        await sdk(gw, tight.key).chat.completions.create(model="mock-model", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as limited:
        await sdk(gw, tight.key).chat.completions.create(model="mock-model", messages=MESSAGES)
    assert limited.value.body["code"] == "RATE_LIMITED"
    assert int(limited.value.response.headers["retry-after"]) >= 1

    with pytest.raises(openai.APIStatusError) as poor:
        await sdk(gw, broke.key).chat.completions.create(model="mock-model", messages=MESSAGES)
    assert poor.value.status_code == 402 and poor.value.body["code"] == "INSUFFICIENT_CREDITS"

    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="mock-model", messages=MESSAGES, n=0)
    assert bad.value.body["code"] == "VALIDATION_ERROR"
    assert bad.value.body["details"] == [
        {"path": "n", "message": "must be an integer from 1 to 128"}
    ]

    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="gpt-nope", messages=MESSAGES)
    assert missing.value.body["code"] == "MODEL_NOT_FOUND"

    with pytest.raises(openai.UnprocessableEntityError) as refused:
        await client.chat.completions.create(
            model="mock-model", messages=MESSAGES, extra_body={"mock": {"status": 422}}
        )
    assert refused.value.body["code"] == "UPSTREAM_BAD_REQUEST"

    with pytest.raises(openai.InternalServerError) as failed:
        await client.chat.completions.create(
            model="mock-model", messages=MESSAGES, extra_body={"mock": {"status": 500, "key": key}}
        )
    assert failed.value.status_code == 502 and failed.value.body["code"] == "UPSTREAM_ERROR"
    assert failed.value.response.headers["x-creditgate-attempts"] == "3"
    assert mock_stats.requests[key] == 3

    with pytest.raises(openai.InternalServerError) as slow:
        await client.chat.completions.create(
            model="fast",
            messages=MESSAGES,
            stream=True,
            extra_body={"mock": {"first_byte_ms": 1500}},
        )
    assert slow.value.status_code == 504 and slow.value.body["code"] == "UPSTREAM_TIMEOUT"

    stream = await client.chat.completions.create(
        model="fast", messages=MESSAGES, stream=True, extra_body={"mock": {"stall_after": 1}}
    )
    text = ""
    with pytest.raises(openai.APIError) as cut:
        async for chunk in stream:
            text += "".join(ch.delta.content or "" for ch in chunk.choices)
    assert text == "Hello"
    assert cut.value.body["code"] == "UPSTREAM_TIMEOUT"


async def test_response_headers_name_the_deployment_and_attempts(
    gw: TestClient, db, customer_factory
) -> None:
    c = await customer_factory(10)
    raw = await sdk(gw, c.key).chat.completions.with_raw_response.create(
        model="fallback", messages=MESSAGES
    )
    assert raw.headers["x-creditgate-deployment"] == "primary"
    assert raw.headers["x-creditgate-attempts"] == "1"
    assert raw.headers["x-ratelimit-limit-requests"] == "1000"
    assert raw.parse().choices[0].message.content == "Hello from the mock upstream"


async def test_models_list_public_models_and_retrieve_any(
    gw: TestClient, db, customer_factory
) -> None:
    c = await customer_factory(0)
    client = sdk(gw, c.key)
    listed = {m.id: m for m in (await client.models.list()).data}
    assert set(listed) == {
        *("mock-model", "pricey", "fast", "brief", "fallback", "big", "rescued"),
        *("claude", "claude-fast", "reasoner", "embed", "embed-fast"),  # tests/proxy/test_apis.py
    }
    assert (listed["pricey"].model_extra or {})["pricing"] == {
        "input": 1000,
        "output": 3000.5,
        "unit": "credits per 1M tokens",
    }
    hidden = await client.models.retrieve("hidden")
    assert hidden.id == "hidden" and (hidden.model_extra or {})["max_output_tokens"] == 16
    with pytest.raises(openai.NotFoundError) as exc:
        await client.models.retrieve("gpt-nope")
    assert exc.value.body["code"] == "MODEL_NOT_FOUND"
    with pytest.raises(openai.AuthenticationError):
        await sdk(gw, "cg_nope").models.list()


async def test_unknown_fields_reach_the_upstream_untouched(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    extra = {"foo": {"bar": [1, 2.5, None]}, "logit_bias": {"42": -5}, "seed": 7}
    await sdk(gw, c.key).chat.completions.create(
        model="pricey",
        messages=MESSAGES,
        stream=True,
        extra_body={**extra, "mock": {"key": key}},
    )
    sent = mock_stats.last_body[key]
    assert sent == {
        "model": "pricey-upstream",  # the deployment's name for the model
        "messages": MESSAGES,
        "stream": True,
        **extra,
        "mock": {"key": key},
        "max_tokens": 1000,  # the model's cap: the hold is a bound
        "stream_options": {"include_usage": True},  # always asked: the charge is exact
    }
    await sdk(gw, c.key).chat.completions.create(
        model="hidden",
        messages=MESSAGES,
        max_completion_tokens=7,
        extra_body={"mock": {"key": key}},
    )
    assert mock_stats.last_body[key]["max_completion_tokens"] == 7
    assert "max_tokens" not in mock_stats.last_body[key]
    await sdk(gw, c.key).chat.completions.create(
        model="hidden", messages=MESSAGES, extra_body={"mock": {"key": key}}
    )
    assert mock_stats.last_body[key]["max_completion_tokens"] == 16  # max_tokens_field


def _normalise(raw: bytes) -> list[bytes]:
    raw = re.sub(rb'"id":"chatcmpl-mock-\d+"', b'"id":"X"', raw)
    raw = re.sub(rb'"created":\d+', b'"created":0', raw)
    return raw.split(b"\n\n")


async def test_stream_bytes_are_the_upstreams_except_the_usage_chunk(
    gw: TestClient, upstream: TestServer, db, customer_factory
) -> None:
    c = await customer_factory(10)
    request = {
        "model": "mock-model",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 256,
        "mock": {"heartbeat_every": 2},
    }
    via = await gw.post("/v1/chat/completions", json=request, headers=c.auth)
    async with aiohttp.ClientSession() as s:
        direct = await s.post(upstream.make_url("/v1/chat/completions"), json=request)
        direct_events = _normalise(await direct.read())
    via_events = _normalise(await via.read())
    assert via.headers["Content-Type"].startswith("text/event-stream")
    # Everything but the usage chunk is forwarded byte for byte, in order.
    usage_at = next(i for i, e in enumerate(direct_events) if b'"choices":[]' in e)
    assert via_events[:usage_at] == direct_events[:usage_at]
    assert via_events[usage_at + 1 :] == direct_events[usage_at + 1 :]
    theirs = orjson.loads(direct_events[usage_at][6:])
    ours = orjson.loads(via_events[usage_at][6:])
    assert ours["usage"] == {
        **theirs["usage"],
        "cost": pytest.approx(ours["usage"]["cost_micros"] / 1e6),
        "cost_micros": cost("mock-model", prompt_tokens(MESSAGES), 5),
    }
    assert {k: v for k, v in ours.items() if k != "usage"} == {
        k: v for k, v in theirs.items() if k != "usage"
    }
