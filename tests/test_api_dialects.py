"""The pure parts of issue 18: upstream kinds and a model's APIs in the config,
each API's usage read into TokenCounts, its request bounds, its auth headers."""

from __future__ import annotations

import tomllib
from decimal import Decimal
from typing import Any

import pytest

from creditgate.config import ConfigError, Deployment, Upstream, parse_config
from creditgate.errors import ValidationError
from creditgate.proxy.apis import (
    ANTHROPIC_TOOL_PROMPT_TOKENS,
    EMBEDDINGS,
    MESSAGES,
    RESPONSES,
    prompt_bound,
)
from creditgate.proxy.dialect import CHAT_DIALECT, ROUTES
from creditgate.proxy.pricing import TokenCounts
from creditgate.proxy.upstream import _auth_headers

BASE = """
[upstreams.main]
base_url = "http://127.0.0.1:1/v1"
[upstreams.claude]
base_url = "http://127.0.0.1:1/v1"
kind = "anthropic"
api_key_env = "CLAUDE_KEY"
[models.m]
input_price = 1
output_price = 2
max_output_tokens = 100
deployments = [{ upstream = "main", model = "x" }]
[models.c]
input_price = 3
output_price = 15
max_output_tokens = 100
deployments = [{ upstream = "claude", model = "y" }]
[tiers.free]
requests_per_minute = 1
tokens_per_minute = 1
max_parallel = 1
messages_per_day = 1
"""


def parse(text: str) -> Any:
    return parse_config(tomllib.loads(text, parse_float=Decimal), {"CLAUDE_KEY": "sk-ant"})


def test_default_apis_follow_the_upstream_kind() -> None:
    cfg = parse(BASE)
    assert cfg.models["m"].apis == {"chat", "responses"}
    assert cfg.models["c"].apis == {"messages"}
    up = cfg.models["c"].deployments[0].upstream
    assert (up.kind, up.anthropic_version, up.api_key) == ("anthropic", "2023-06-01", "sk-ant")


def test_api_takes_a_name_or_a_list() -> None:
    one = parse(BASE.replace('model = "x" }]', 'model = "x" }]\napi = "embeddings"'))
    assert one.models["m"].apis == {"embeddings"}
    many = parse(BASE.replace('model = "x" }]', 'model = "x" }]\napi = ["chat", "embeddings"]'))
    assert many.models["m"].apis == {"chat", "embeddings"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (('kind = "anthropic"', 'kind = "gemini"'), "upstreams.claude.kind"),
        (('model = "x" }]', 'model = "x" }]\napi = "messages"'), "models.m.api"),
        (('model = "y" }]', 'model = "y" }]\napi = "chat"'), "models.c.api"),
        (('model = "x" }]', 'model = "x" }]\napi = "images"'), "models.m.api"),
        (('model = "x" }]', 'model = "x" }]\napi = []'), "models.m.api"),
        (('model = "x" }]', 'model = "x" }]\ncontext_window = 0'), "models.m.context_window"),
        (('model = "x" }]', 'model = "x" }]\ncontext_window = "big"'), "models.m.context_window"),
        (
            (
                '{ upstream = "main", model = "x" }]',
                '{ upstream = "main", model = "x" }, { upstream = "claude", model = "y" }]',
            ),
            "models.m.deployments",
        ),
    ],
)
def test_bad_api_config_names_the_field(change: tuple[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(BASE.replace(*change))
    assert str(exc.value).startswith(field)


def test_each_api_reads_its_usage_into_token_counts() -> None:
    assert RESPONSES.counts(
        {
            "input_tokens": 10,
            "input_tokens_details": {"cached_tokens": 4},
            "output_tokens": 7,
            "output_tokens_details": {"reasoning_tokens": 3},
        }
    ) == TokenCounts(10, 7, cached_input=4, reasoning=3)
    # A detail larger than its total is clamped into it.
    assert RESPONSES.counts(
        {"input_tokens": 2, "input_tokens_details": {"cached_tokens": 9}, "output_tokens": 0}
    ) == TokenCounts(2, 0, cached_input=2)
    # Anthropic's input_tokens leaves the cache's tokens out; the prompt is all three.
    assert MESSAGES.counts(
        {
            "input_tokens": 5,
            "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 20,
            "output_tokens": 9,
        }
    ) == TokenCounts(125, 9, cached_input=100, cache_write=20)
    assert EMBEDDINGS.counts({"prompt_tokens": 12, "total_tokens": 12}) == TokenCounts(12, 0)
    for dialect in (RESPONSES, MESSAGES, EMBEDDINGS, CHAT_DIALECT):
        assert dialect.counts(None) is None
        assert dialect.counts({"input_tokens": -1, "prompt_tokens": "3"}) is None


def test_prompt_bounds_count_text_bytes_and_images_at_their_cap() -> None:
    assert prompt_bound("héhé", 1500) == 6
    image = {"type": "input_image", "image_url": "data:image/png;base64," + "A" * 100_000}
    assert prompt_bound([{"type": "input_text", "text": "hi"}, image], 1500) == (
        len("type") + len("input_text") + len("text") + 2 + 1500
    )


def test_messages_requests_are_bounded_by_max_tokens_and_tools() -> None:
    models = parse(BASE).models
    body = {"model": "c", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    plain = MESSAGES.parse(body, models, 3)
    assert (plain.prompt_tokens_estimate, plain.worst_case_output_tokens) == (8 + 2, 50)
    tools = [{"name": "t", "input_schema": {"type": "object"}}]
    with_tools = MESSAGES.parse({**body, "tools": tools}, models, 3)
    assert with_tools.prompt_tokens_estimate > 10 + ANTHROPIC_TOOL_PROMPT_TOKENS
    with pytest.raises(ValidationError) as exc:
        MESSAGES.parse({**body, "max_tokens": 101}, models, 3)
    assert exc.value.details == [{"path": "max_tokens", "message": "at most 100 for c, got 101"}]


def test_responses_send_the_models_cap_when_the_request_sets_none() -> None:
    models = parse(BASE).models
    req = RESPONSES.parse({"model": "m", "input": "hi"}, models, 3)
    assert req.upstream_body["max_output_tokens"] == 100 and req.worst_case_output_tokens == 100
    with pytest.raises(ValidationError):
        RESPONSES.parse({"model": "m", "input": "hi", "background": True}, models, 3)


def test_stored_state_is_bounded_by_the_context_window() -> None:
    models = parse(BASE.replace('model = "x" }]', 'model = "x" }]\ncontext_window = 5000')).models
    assert models["m"].context_window == 5000 and parse(BASE).models["m"].context_window is None
    plain = RESPONSES.parse({"model": "m", "input": "hi"}, models, 3)
    for state in ({"previous_response_id": "resp_1"}, {"conversation": {"id": "conv_1"}}):
        req = RESPONSES.parse({"model": "m", "input": "hi", **state}, models, 3)
        # The hold's prompt is the window; the throttle still sees only what is sent.
        assert req.prompt_tokens_estimate == 5000
        assert req.required_prompt_tokens == plain.prompt_tokens_estimate
        assert req.worst_case_tokens == plain.worst_case_tokens
        assert req.hold_note is not None and "5000" in req.hold_note
    assert plain.hold_note is None and plain.required_prompt_tokens == plain.prompt_tokens_estimate


def test_routes_come_from_the_dialects() -> None:
    assert ROUTES == {
        "chat": "/v1/chat/completions",
        "responses": "/v1/responses",
        "messages": "/v1/messages",
        "embeddings": "/v1/embeddings",
    }


def test_an_anthropic_upstream_gets_its_key_as_x_api_key_and_a_version() -> None:
    up = Upstream("claude", "http://x/v1", "sk-ant", kind="anthropic")
    d = Deployment(up, "y", "claude", 0, 1)
    assert _auth_headers(d, None) == {
        "Content-Type": "application/json",
        "anthropic-version": "2023-06-01",
        "x-api-key": "sk-ant",
    }
    passed = _auth_headers(d, {"anthropic-version": "2024-01-01", "anthropic-beta": "b"})
    assert passed["anthropic-version"] == "2024-01-01" and passed["anthropic-beta"] == "b"
    openai_up = Deployment(Upstream("main", "http://x/v1", "sk-oa"), "x", "main", 0, 1)
    assert _auth_headers(openai_up, None)["Authorization"] == "Bearer sk-oa"
