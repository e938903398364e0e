"""Fixtures for the proxy tests: creditgate in front of the mock upstream, with
models made for fallback, tight timeouts and large answers, and helpers that
read the exact ledger outcome of a call."""

from __future__ import annotations

import asyncio
import math
import socket
import tomllib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

import asyncpg
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from creditgate.config import Settings, parse_config
from creditgate.http.app import create_app
from creditgate.proxy.mock_upstream import STATS, MockStats
from tests.conftest import Services

PROXY_CONFIG = """
[upstreams.main]
base_url = "{upstream}"

[upstreams.dead]
base_url = "{dead}"

[models."rescued"]
input_price = 1000
output_price = 3000
max_output_tokens = 256
deployments = [
    {{ upstream = "dead", model = "nobody-home" }},
    {{ upstream = "main", model = "rescued-upstream" }},
]

[models."mock-model"]
input_price = 0.15
output_price = 0.60
max_output_tokens = 256
deployments = [{{ upstream = "main", model = "mock-model" }}]

[models."pricey"]
input_price = 1000
output_price = 3000.5
max_output_tokens = 1000
max_messages = 4
deployments = [{{ upstream = "main", model = "pricey-upstream" }}]

[models."fast"]
input_price = 1000
output_price = 3000
max_output_tokens = 256
deployments = [{{ upstream = "main", model = "fast-upstream" }}]
timeouts = {{ connect = 1, first_byte = 0.4, idle = 0.4, total = 5 }}

[models."brief"]
input_price = 1000
output_price = 3000
max_output_tokens = 256
deployments = [{{ upstream = "main", model = "brief-upstream" }}]
timeouts = {{ first_byte = 5, idle = 5, total = 1.5 }}

[models."fallback"]
input_price = 1000
output_price = 3000
max_output_tokens = 256
deployments = [
    {{ upstream = "main", model = "fb-primary", name = "primary" }},
    {{ upstream = "main", model = "fb-backup", name = "backup" }},
]

[models."big"]
input_price = 1
output_price = 1
max_output_tokens = 20000
deployments = [{{ upstream = "main", model = "big-upstream" }}]

[models."hidden"]
input_price = 1
output_price = 1
max_output_tokens = 16
public = false
max_tokens_field = "max_completion_tokens"
deployments = [{{ upstream = "main", model = "hidden-upstream" }}]

[upstreams.claude]
base_url = "{upstream}"
kind = "anthropic"

[models."claude"]
input_price = 3
output_price = 15
cached_input_price = 0.3
cache_write_price = 3.75
max_output_tokens = 256
deployments = [{{ upstream = "claude", model = "claude-upstream" }}]

[models."claude-fast"]
input_price = 3
output_price = 15
max_output_tokens = 256
deployments = [{{ upstream = "claude", model = "claude-fast-upstream" }}]
timeouts = {{ connect = 1, first_byte = 0.4, idle = 0.4, total = 5 }}

[models."reasoner"]
input_price = 2
output_price = 8
cached_input_price = 0.5
max_output_tokens = 256
context_window = 4000
deployments = [{{ upstream = "main", model = "reasoner-upstream" }}]

[models."embed"]
api = "embeddings"
input_price = 130
output_price = 0
max_output_tokens = 1
deployments = [{{ upstream = "main", model = "embed-upstream" }}]

[models."embed-fast"]
api = "embeddings"
input_price = 130
output_price = 0
max_output_tokens = 1
deployments = [{{ upstream = "main", model = "embed-fast-upstream" }}]
timeouts = {{ connect = 1, first_byte = 0.4, idle = 0.4, total = 5 }}

[tiers.free]
requests_per_minute = 1000
tokens_per_minute = 100000000
max_parallel = 50
messages_per_day = 100000

[tiers.tight]
requests_per_minute = 2
tokens_per_minute = 100000000
max_parallel = 50
messages_per_day = 100000
"""

PRICES = {  # (input, output) credits per 1M tokens, as the config writes them
    "mock-model": ("0.15", "0.60"),
    "pricey": ("1000", "3000.5"),
    "fast": ("1000", "3000"),
    "brief": ("1000", "3000"),
    "fallback": ("1000", "3000"),
    "big": ("1", "1"),
    "hidden": ("1", "1"),
    "rescued": ("1000", "3000"),
    "claude": ("3", "15"),
    "claude-fast": ("3", "15"),
    "reasoner": ("2", "8"),
    "embed": ("130", "0"),
    "embed-fast": ("130", "0"),
}

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello in five words, héhé ✓."},
]


def cost(model: str, in_tokens: int, out_tokens: int) -> int:
    """DESIGN.md §3, computed independently: ceil(in·in_price + out·out_price) µc."""
    i, o = PRICES[model]
    return math.ceil(in_tokens * Fraction(i) + out_tokens * Fraction(o))


def prompt_estimate(messages: list[dict[str, Any]]) -> int:
    """The prompt bound, computed independently: UTF-8 bytes + 8 per text message."""
    return sum(len(m["content"].encode()) + 8 for m in messages)


def text_estimate(text: str) -> int:
    return math.ceil(len(text.encode()) / 3)


def closed_port_url() -> str:
    """The URL of a port nothing listens on: connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def proxy_config_text(upstream_url: str) -> str:
    return PROXY_CONFIG.format(upstream=upstream_url, dead=closed_port_url())


def proxy_settings(services: Services, upstream_url: str) -> Settings:
    raw = tomllib.loads(proxy_config_text(upstream_url), parse_float=Decimal)
    return Settings(
        config=parse_config(raw, {}),
        database_url=services.database_url,
        redis_url=services.redis_url,
    )


class GatewayServer(TestServer):
    """A test server that, like ``creditgate serve``, does not cancel handlers when
    a client disconnects — unless told to (aiohttp's TestServer default)."""

    def __init__(self, app: Any, *, handler_cancellation: bool) -> None:
        super().__init__(app)
        self._handler_cancellation = handler_cancellation

    async def _make_runner(self, **kwargs: Any) -> Any:
        kwargs["handler_cancellation"] = self._handler_cancellation
        return await super()._make_runner(**kwargs)


@pytest.fixture
def handler_cancellation() -> bool:
    """False, as in production; tests parametrize it to cover both."""
    return False


@pytest.fixture
async def gw(
    services: Services, upstream: TestServer, db: asyncpg.Pool, handler_cancellation: bool
) -> AsyncIterator[TestClient]:
    """creditgate (the proxy config above) in front of the mock upstream."""
    settings = proxy_settings(services, str(upstream.make_url("/v1")))
    client = TestClient(
        GatewayServer(create_app(settings), handler_cancellation=handler_cancellation)
    )
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def mock_stats(upstream: TestServer) -> MockStats:
    return upstream.app[STATS]


@pytest.fixture
def key() -> str:
    """A fresh mock counter key: the mock's stats under it are this test's attempts."""
    return f"k{uuid.uuid4().hex[:12]}"


def sdk(gw: TestClient, api_key: str) -> openai.AsyncOpenAI:
    """The official SDK, pointed at creditgate, without its own retries."""
    return openai.AsyncOpenAI(base_url=str(gw.make_url("/v1")), api_key=api_key, max_retries=0)


@dataclass(frozen=True)
class Debit:
    amount: int  # µc taken (positive)
    input_tokens: int
    output_tokens: int
    estimated: bool
    uncollected: int


@dataclass(frozen=True)
class Outcome:
    """An account's ledger after calls: what the tests compare exactly."""

    balance: int
    reserved: int
    holds: list[str]  # outcomes, oldest first
    debits: list[Debit]


async def outcome(db: asyncpg.Pool, account_id: uuid.UUID) -> Outcome:
    # One snapshot: read in three statements, a settle committing in between
    # would show its hold ended and its debit but the balance from before.
    async with db.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        bal = await conn.fetchrow(
            "SELECT balance, reserved FROM account_balances WHERE account_id = $1", account_id
        )
        holds = await conn.fetch(
            "SELECT coalesce(outcome, 'live') AS o FROM holds WHERE account_id = $1"
            " ORDER BY created_at",
            account_id,
        )
        debits = await conn.fetch(
            "SELECT -amount AS amount, input_tokens, output_tokens, estimated, uncollected"
            " FROM ledger_entries WHERE account_id = $1 AND kind = 'debit' ORDER BY seq",
            account_id,
        )
    return Outcome(
        bal["balance"], bal["reserved"], [h["o"] for h in holds], [Debit(**dict(d)) for d in debits]
    )


async def settled_outcome(db: asyncpg.Pool, account_id: uuid.UUID, holds: int = 1) -> Outcome:
    """The outcome once ``holds`` holds have ended (a disconnect is billed a moment later)."""
    for _ in range(200):  # at most ~10 s
        got = await outcome(db, account_id)
        if len(got.holds) >= holds and "live" not in got.holds:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"holds still live: {got}")
