"""Request validation: every problem listed with its path; good requests untouched."""

from __future__ import annotations

import tomllib
from decimal import Decimal
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from creditgate.config import parse_config
from creditgate.errors import ModelNotFound, ValidationError
from creditgate.proxy.pricing import IMAGE_TOKENS
from creditgate.proxy.request import parse_chat_request
from tests.conftest import ledger_footprint
from tests.proxy.conftest import proxy_config_text

MODELS = parse_config(
    tomllib.loads(proxy_config_text("http://127.0.0.1:9/v1"), parse_float=Decimal), {}
).models
USER = {"role": "user", "content": "hi"}


def parse(body: dict[str, Any]):
    return parse_chat_request(body, MODELS, 3)


def problems(body: dict[str, Any]) -> list[dict[str, str]]:
    with pytest.raises(ValidationError) as exc:
        parse(body)
    assert exc.value.status == 400 and exc.value.code == "VALIDATION_ERROR"
    return exc.value.details


def paths(body: dict[str, Any]) -> set[str]:
    return {p["path"] for p in problems(body)}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "mock-model", "messages": [USER], **fields}


GOOD_MESSAGES = [
    {"role": "developer", "content": "be brief"},
    {"role": "system", "content": [{"type": "text", "text": "sys"}]},
    {
        "role": "user",
        "name": "ann",
        "content": [
            {"type": "text", "text": "look"},
            {
                "type": "image_url",
                "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"},
            },
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "42"},
    {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
    {"role": "function", "name": "legacy", "content": None},
]


def test_a_full_request_is_accepted_and_passed_on_as_sent() -> None:
    body = {
        "model": "mock-model",
        "messages": GOOD_MESSAGES,
        "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
            {"type": "custom", "custom": {"name": "grammar"}},
        ],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "parallel_tool_calls": False,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True},
        },
        "n": 2,
        "max_completion_tokens": 10,
        "max_tokens": 20,
        "temperature": 0.5,
        "top_p": 1,
        "presence_penalty": -2,
        "frequency_penalty": 2,
        "logit_bias": {"50256": -100},
        "logprobs": True,
        "top_logprobs": 3,
        "seed": 1,
        "stop": ["a", "b"],
        "user": "u1",
        "metadata": {"k": "v"},
        "store": False,
        "reasoning_effort": "low",
        "modalities": ["text"],
        "service_tier": "auto",
        "stream": True,
        "stream_options": {"include_usage": False, "future_option": 1},
        "some_provider_field": {"anything": [1]},
        "temperature_unit": None,
    }
    chat_request = parse(body)
    assert chat_request.n == 2
    assert chat_request.max_output_tokens == 20  # the larger cap bounds the hold
    assert chat_request.worst_case_output_tokens == 40
    assert chat_request.stream and not chat_request.include_usage
    # Passed on untouched, except the usage request; nothing injected (a cap was set).
    expected = {**body, "stream_options": {"include_usage": True, "future_option": 1}}
    assert chat_request.upstream_body == expected


def test_nulls_mean_absent() -> None:
    req = parse(chat(n=None, stream=None, max_tokens=None, temperature=None, tools=None))
    assert req.n == 1 and not req.stream and req.max_output_tokens == 256
    assert req.upstream_body["max_tokens"] == 256


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"messages": [USER]}, {"model"}),
        ({"model": 3, "messages": [USER]}, {"model"}),
        (chat(messages=[]), {"messages"}),
        (chat(messages="hi"), {"messages"}),
        (chat(messages=[{"role": "user"}]), {"messages[0].content"}),
        (chat(messages=[{"role": "user", "content": []}]), {"messages[0].content"}),
        (chat(messages=[{"content": "x"}]), {"messages[0].role"}),
        (chat(messages=["hi"]), {"messages[0]"}),
        (chat(messages=[{"role": "user", "content": [{"text": "x"}]}]), {"messages[0].content[0]"}),
        (
            chat(messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}]),
            {"messages[0].content[0].text"},
        ),
        (
            chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]),
            {"messages[0].content[0].image_url"},
        ),
        (
            chat(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "u", "detail": "max"}}
                        ],
                    }
                ]
            ),
            {"messages[0].content[0].image_url.detail"},
        ),
        (
            chat(
                messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
            ),
            {
                "messages[0].content[0].input_audio.data",
                "messages[0].content[0].input_audio.format",
            },
        ),
        (chat(messages=[{"role": "assistant"}]), {"messages[0].content"}),
        (
            chat(messages=[{"role": "assistant", "tool_calls": [{"type": "function"}]}]),
            {"messages[0].tool_calls[0].id", "messages[0].tool_calls[0].function"},
        ),
        (
            chat(
                messages=[
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f"}}],
                    }
                ]
            ),
            {"messages[0].tool_calls[0].function.arguments"},
        ),
        (
            chat(messages=[{"role": "assistant", "tool_calls": {}}]),
            {"messages[0].tool_calls", "messages[0].content"},
        ),
        (chat(messages=[{"role": "tool", "content": "x"}]), {"messages[0].tool_call_id"}),
        (chat(messages=[{"role": "function", "content": "x"}]), {"messages[0].name"}),
        (chat(messages=[{"role": "user", "content": "x", "name": 5}]), {"messages[0].name"}),
        (chat(n=0), {"n"}),
        (chat(n=129), {"n"}),
        (chat(n=True), {"n"}),
        (chat(max_tokens=0), {"max_tokens"}),
        (chat(max_tokens="5"), {"max_tokens"}),
        (chat(max_tokens=257), {"max_tokens"}),  # over the model's max_output_tokens
        (chat(max_completion_tokens=1.5), {"max_completion_tokens"}),
        (chat(max_completion_tokens=10_000), {"max_completion_tokens"}),
        (chat(stream="yes"), {"stream"}),
        (chat(stream_options={"include_usage": True}), {"stream_options"}),  # without stream
        (chat(stream=True, stream_options=[]), {"stream_options"}),
        (chat(stream=True, stream_options={"include_usage": 1}), {"stream_options.include_usage"}),
        (chat(tools={}), {"tools"}),
        (chat(tools=[{"function": {}}]), {"tools[0]"}),
        (chat(tools=[{"type": "function"}]), {"tools[0].function"}),
        (
            chat(tools=[{"type": "function", "function": {"name": "a b"}}]),
            {"tools[0].function.name"},
        ),
        (
            chat(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
            {"tools[0].function.parameters"},
        ),
        (chat(tools=[{"type": "function", "function": {"name": "f"}}] * 129), {"tools"}),
        (chat(tool_choice="sometimes"), {"tool_choice"}),
        (chat(tool_choice={"type": "function"}), {"tool_choice.function"}),
        (chat(parallel_tool_calls="no"), {"parallel_tool_calls"}),
        (chat(functions=[{}]), {"functions[0].name"}),
        (chat(function_call=1), {"function_call"}),
        (chat(response_format={"type": "yaml"}), {"response_format.type"}),
        (chat(response_format={"type": "json_schema"}), {"response_format.json_schema"}),
        (
            chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
            {"response_format.json_schema.name"},
        ),
        (chat(temperature=2.5), {"temperature"}),
        (chat(temperature="hot"), {"temperature"}),
        (chat(top_p=-0.1), {"top_p"}),
        (chat(presence_penalty=3), {"presence_penalty"}),
        (chat(frequency_penalty=-3), {"frequency_penalty"}),
        (chat(logit_bias={"1": 200}), {"logit_bias"}),
        (chat(logprobs="yes"), {"logprobs"}),
        (chat(top_logprobs=21), {"top_logprobs"}),
        (chat(seed=1.5), {"seed"}),
        (chat(stop=["a", "b", "c", "d", "e"]), {"stop"}),
        (chat(stop=[1]), {"stop"}),
        (chat(user=1), {"user"}),
        (chat(metadata="x"), {"metadata"}),
        (chat(modalities="text"), {"modalities"}),
    ],
)
def test_each_problem_is_reported_at_its_path(body: dict[str, Any], expected: set[str]) -> None:
    assert paths(body) == expected


def test_all_problems_are_listed_at_once() -> None:
    found = problems(
        {"model": "mock-model", "messages": [{"role": "user"}], "n": 0, "temperature": 9}
    )
    assert {p["path"] for p in found} == {"messages[0].content", "n", "temperature"}
    assert all(p["message"] for p in found)


def test_per_model_limits() -> None:
    five = [USER] * 5
    assert problems({"model": "pricey", "messages": five}) == [
        {"path": "messages", "message": "at most 4 messages for this model, got 5"}
    ]
    parse({"model": "pricey", "messages": five[:4]})
    assert problems(chat(max_tokens=300)) == [
        {"path": "max_tokens", "message": "at most 256 for mock-model, got 300"}
    ]


def test_unknown_model_is_404_alone_and_listed_with_other_problems() -> None:
    with pytest.raises(ModelNotFound) as exc:
        parse({"model": "nope", "messages": [USER]})
    assert exc.value.status == 404
    assert paths({"model": "nope", "messages": []}) == {"messages", "model"}


def test_parts_whose_cost_cannot_be_bounded_are_refused() -> None:
    for part in (
        {"type": "file", "file": {"file_id": "file-1"}},
        {"type": "video_url", "video_url": {"url": "https://x"}},
    ):
        body = chat(messages=[{"role": "user", "content": [part]}])
        with pytest.raises(ValidationError) as raised:
            parse(body)
        assert raised.value.status == 400
        assert raised.value.details == [
            {
                "path": "messages[0].content[0].type",
                "message": f"content parts of type {part['type']!r} are not accepted: their cost"
                " cannot be bounded before the call (accepted: text, refusal, image_url,"
                " input_audio)",
            }
        ]


def test_estimate_counts_tools_schema_and_images_flat() -> None:
    base = parse(chat()).prompt_tokens_estimate
    assert base == 2 + 8  # one token per UTF-8 byte (an upper bound) + 8
    tools = [{"type": "function", "function": {"name": "f"}}]
    import orjson

    with_tools = parse(chat(tools=tools)).prompt_tokens_estimate
    assert with_tools == base + len(orjson.dumps(tools))
    huge = "data:image/png;base64," + "A" * 300_000
    image = {
        "role": "user",
        "content": [
            {"type": "text", "text": "hi"},
            {"type": "image_url", "image_url": {"url": huge}},
        ],
    }
    assert parse(chat(messages=[image])).prompt_tokens_estimate == base + IMAGE_TOKENS


async def test_over_http_a_bad_request_is_400_with_details_and_no_ledger_write(
    gw: TestClient, db, customer_factory
) -> None:
    c = await customer_factory(1)
    before = await ledger_footprint(db, c.account.id)
    resp = await gw.post(
        "/v1/chat/completions",
        json={"model": "mock-model", "messages": [{"role": "user"}], "max_tokens": 999},
        headers=c.auth,
    )
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert body["error"]["message"].startswith("The request is not a valid chat completion request")
    assert body["error"]["details"] == [
        {
            "path": "messages[0].content",
            "message": "required: a string or an array of content parts",
        },
        {"path": "max_tokens", "message": "at most 256 for mock-model, got 999"},
    ]
    assert body["correlationId"] == resp.headers["x-correlation-id"]
    assert await ledger_footprint(db, c.account.id) == before
