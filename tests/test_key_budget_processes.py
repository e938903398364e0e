"""A key budget under 200 concurrent calls on two ``creditgate serve`` processes.

The processes share nothing but Postgres: the budget holds only if the reserve
statement itself enforces it (the key's spend row taken under the account's
balance row lock, in the same statement as the balance check).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from creditgate import ledger
from creditgate.auth import create_api_key
from tests.conftest import Services
from tests.ledger_procs import PrivatePostgres, run_verify, servers, write_exact_config
from tests.logcapture import remember_secret

pytestmark = pytest.mark.slow

PRICE = 10  # µc per output token of the "exact" model (input is free)
MAX_TOKENS = 100
WORST_CASE = PRICE * MAX_TOKENS  # µc one call holds
CALLS = 200
BUDGET_CALLS = 20  # the budget affords this many worst cases


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        asyncio.run(pg.migrate())
        yield pg
    finally:
        pg.close()


@pytest.fixture
async def pg_pool(private_pg: PrivatePostgres) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(private_pg.url, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.mark.parametrize("chunks", [MAX_TOKENS, 37])
async def test_200_concurrent_calls_on_two_processes_never_pass_the_key_budget(
    private_pg: PrivatePostgres,
    pg_pool: asyncpg.Pool,
    services: Services,
    upstream: TestServer,
    tmp_path: Path,
    chunks: int,
) -> None:
    budget = BUDGET_CALLS * WORST_CASE
    account = await ledger.ensure_account(pg_pool, "user", f"user_{uuid.uuid4().hex}")
    await ledger.post_entry(
        pg_pool,
        account_id=account.id,
        amount=100 * budget,  # plenty: only the key's budget may refuse
        kind="grant",
        idempotency_key=f"test:{uuid.uuid4()}",
        reason="test",
    )
    key = await create_api_key(pg_pool, account.id, "capped", budget=budget, budget_period="day")
    remember_secret(key.key)
    config = write_exact_config(tmp_path / "cg.toml", str(upstream.make_url("/v1")))
    env = {
        "DATABASE_URL": private_pg.url,
        "REDIS_URL": services.redis_url,
        "CREDITGATE_CONFIG": str(config),
    }
    highest = [0]
    done = asyncio.Event()

    async def watch_spend() -> None:
        # spent + reserved of the key's period, seen from outside while the calls run.
        while not done.is_set():
            used = await pg_pool.fetchval(
                "SELECT COALESCE(SUM(spent + reserved), 0) FROM key_budget_spend WHERE key_id = $1",
                key.id,
            )
            highest[0] = max(highest[0], used)
            await asyncio.sleep(0.01)

    with servers(2, env) as procs:
        watcher = asyncio.create_task(watch_spend())
        headers = {"Authorization": f"Bearer {key.key}"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

            async def call(i: int) -> tuple[int, dict[str, Any]]:
                body = {
                    "model": "exact",
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": MAX_TOKENS,
                    # A slow first byte: reservations overlap across both processes.
                    "mock": {"chunks": chunks, "first_byte_ms": 300},
                }
                url = procs[i % 2].url + "/v1/chat/completions"
                async with http.post(url, json=body, headers=headers) as r:
                    return r.status, await r.json()

            results = await asyncio.wait_for(
                asyncio.gather(*(call(i) for i in range(CALLS))), timeout=120
            )
        done.set()
        await watcher

    statuses = Counter(status for status, _ in results)
    assert set(statuses) <= {200, 402}, statuses
    refusals = [b["error"] for s, b in results if s == 402]
    assert all(e["code"] == "KEY_BUDGET_EXCEEDED" for e in refusals)
    assert all(e["details"]["budgetMicros"] == budget for e in refusals)
    spent = sum(b["usage"]["cost_micros"] for s, b in results if s == 200)
    assert highest[0] <= budget
    state = await ledger.key_budget(pg_pool, key.id, "UTC")
    assert state is not None
    assert (state.spent, state.reserved) == (spent, 0)
    assert spent <= budget
    if chunks == MAX_TOKENS:  # costs equal holds: exactly what the budget affords
        assert statuses[200] == BUDGET_CALLS and spent == budget
    else:
        assert statuses[200] >= BUDGET_CALLS
    code, out = run_verify(private_pg.url)
    assert code == 0 and json.loads(out)["ok"] is True, out
