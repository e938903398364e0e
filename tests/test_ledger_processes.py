"""The ledger across real processes: concurrency, kill -9, and a Postgres restart.

Each test runs real ``creditgate serve`` processes against a Postgres of its
own (pgserver), so it can open many connections and stop the database without
touching the machine's shared server; the mock upstream runs in the test.
"""

from __future__ import annotations

import asyncio
import json
import time
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
from tests.ledger_procs import (
    PrivatePostgres,
    run_verify,
    servers,
    wait_for,
    write_exact_config,
)
from tests.logcapture import remember_secret

pytestmark = pytest.mark.slow

PRICE = 10  # µc per output token of the "exact" model (input is free)
MAX_TOKENS = 100
WORST_CASE = PRICE * MAX_TOKENS  # µc: what one call holds, and — with mock chunks = 100 — costs


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


async def paying_customer(pool: asyncpg.Pool, micros: int) -> tuple[uuid.UUID, str]:
    account = await ledger.ensure_account(pool, "user", f"user_{uuid.uuid4().hex}")
    await ledger.post_entry(
        pool,
        account_id=account.id,
        amount=micros,
        kind="grant",
        idempotency_key=f"test:{uuid.uuid4()}",
        reason="test",
    )
    key = await create_api_key(pool, account.id, "test")
    remember_secret(key.key)  # no log line of the run may hold it
    return account.id, key.key


def completion(mock: dict[str, Any], stream: bool = False) -> dict[str, Any]:
    return {
        "model": "exact",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": MAX_TOKENS,
        "stream": stream,
        "mock": {"chunks": MAX_TOKENS, **mock},
    }


def env_for(database_url: str, services: Services, config: Path) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": services.redis_url,
        "CREDITGATE_CONFIG": str(config),
    }


async def test_four_servers_let_exactly_n_of_10n_concurrent_calls_through(
    private_pg: PrivatePostgres,
    pg_pool: asyncpg.Pool,
    services: Services,
    upstream: TestServer,
    tmp_path: Path,
) -> None:
    n = 10
    account_id, key = await paying_customer(pg_pool, n * WORST_CASE)
    config = write_exact_config(tmp_path / "cg.toml", str(upstream.make_url("/v1")))
    with servers(4, env_for(private_pg.url, services, config)) as procs:
        lowest = [0]
        done = asyncio.Event()

        async def watch_available() -> None:
            while not done.is_set():
                available = await pg_pool.fetchval(
                    "SELECT balance - reserved FROM account_balances WHERE account_id = $1",
                    account_id,
                )
                lowest[0] = min(lowest[0], available)
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch_available())
        headers = {"Authorization": f"Bearer {key}"}
        # Slow first byte: every reservation is made while the others are held.
        body = completion({"first_byte_ms": 400})
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

            async def call(i: int) -> tuple[int, dict[str, Any]]:
                url = procs[i % 4].url + "/v1/chat/completions"
                async with http.post(url, json=body, headers=headers) as r:
                    return r.status, await r.json()

            results = await asyncio.wait_for(
                asyncio.gather(*(call(i) for i in range(10 * n))), timeout=90
            )
        done.set()
        await watcher

    statuses = Counter(status for status, _ in results)
    assert set(statuses) <= {200, 402}, statuses
    assert statuses[200] <= n  # never more than the credits afford...
    assert statuses[200] == n  # ...and, costs being exact, no credit lost either
    assert all(b["error"]["code"] == "INSUFFICIENT_CREDITS" for s, b in results if s == 402)
    assert all(b["usage"]["cost_micros"] == WORST_CASE for s, b in results if s == 200)
    assert lowest[0] >= 0
    row = await pg_pool.fetchrow(
        "SELECT balance, reserved FROM account_balances WHERE account_id = $1", account_id
    )
    assert (row["balance"], row["reserved"]) == (0, 0)
    debits = await pg_pool.fetchval(
        "SELECT count(*) FROM ledger_entries WHERE account_id = $1 AND kind = 'debit'", account_id
    )
    assert debits == n
    code, out = run_verify(private_pg.url)
    assert code == 0 and json.loads(out)["ok"] is True, out


async def test_kill_9_mid_stream_charges_each_streams_recorded_progress_once(
    private_pg: PrivatePostgres,
    pg_pool: asyncpg.Pool,
    services: Services,
    upstream: TestServer,
    tmp_path: Path,
) -> None:
    account_id, key = await paying_customer(pg_pool, 1_000_000)
    config = write_exact_config(
        tmp_path / "cg.toml",
        str(upstream.make_url("/v1")),
        settle_margin_seconds=2,  # holds live 8 + 2 s
        timeouts="{ connect = 2, first_byte = 5, idle = 5, total = 8 }",
    )
    headers = {"Authorization": f"Bearer {key}"}
    with servers(2, env_for(private_pg.url, services, config)) as (victim, survivor):
        async with aiohttp.ClientSession() as http:
            # One call completes before the crash: it must stay charged exactly once.
            async with http.post(
                victim.url + "/v1/chat/completions", json=completion({}), headers=headers
            ) as r:
                assert r.status == 200
                settled_cost = (await r.json())["usage"]["cost_micros"]
            # Five streams in flight on the victim (100 chunks, 50 ms apart).
            streams = []
            for _ in range(5):
                resp = await http.post(
                    victim.url + "/v1/chat/completions",
                    json=completion({"chunk_delay_ms": 50}, stream=True),
                    headers=headers,
                )
                assert resp.status == 200
                # Content is through (the first text chunk, after the role chunk):
                # the stream has recorded its progress (proxy.metering).
                delivered = 0
                while delivered < 3:
                    line = await resp.content.readline()
                    delivered += b'"content"' in line
                streams.append(resp)
            await asyncio.sleep(1.5)  # a progress record or two more per stream
            live = await pg_pool.fetchval(
                "SELECT count(*) FROM holds WHERE account_id = $1 AND ended_at IS NULL",
                account_id,
            )
            assert live == 5
            victim.kill9()
            for resp in streams:
                with pytest.raises(aiohttp.ClientError):
                    await asyncio.wait_for(resp.read(), timeout=10)
                resp.release()

        async def ended() -> bool:
            reserved = await pg_pool.fetchval(
                "SELECT reserved FROM account_balances WHERE account_id = $1", account_id
            )
            return bool(reserved == 0)

        # The survivor's sweeper ends the dead process's holds once they expire,
        # charging what each stream had delivered by its last progress record.
        assert not await ended()
        assert await wait_for(ended, timeout=40), "holds did not end after expiry"

        holds = await pg_pool.fetch(
            "SELECT h.outcome, count(e.id) AS debits, sum(-e.amount) AS charged,"
            " bool_and(e.estimated) AS estimated, sum(e.output_tokens) AS tokens"
            " FROM holds h LEFT JOIN ledger_entries e ON e.hold_id = h.id"
            " WHERE h.account_id = $1 GROUP BY h.id, h.outcome",
            account_id,
        )
        assert sorted((h["outcome"], h["debits"]) for h in holds) == [("settled", 1)] * 6
        swept = [h for h in holds if h["estimated"]]
        assert len(swept) == 5  # every stream that delivered content, charged once
        # Each at least the 3 tokens the client had (10 µc each), at most the whole call.
        assert all(3 <= h["tokens"] <= MAX_TOKENS for h in swept), holds
        assert all(h["charged"] == PRICE * h["tokens"] for h in swept), holds
        balance = await pg_pool.fetchval(
            "SELECT balance FROM account_balances WHERE account_id = $1", account_id
        )
        assert balance == 1_000_000 - settled_cost - sum(h["charged"] for h in swept)
        # The surviving process serves on.
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                survivor.url + "/v1/chat/completions", json=completion({}), headers=headers
            ) as r,
        ):
            assert r.status == 200
    code, out = run_verify(private_pg.url)
    assert code == 0 and json.loads(out)["ok"] is True, out


async def test_postgres_restart_under_load_answers_503_then_recovers(
    services: Services, upstream: TestServer, tmp_path: Path
) -> None:
    pg = PrivatePostgres()
    try:
        await pg.migrate()
        pool = await asyncpg.create_pool(pg.url, min_size=1, max_size=2)
        _, key = await paying_customer(pool, 1_000_000_000)
        await pool.close()
        config = write_exact_config(
            tmp_path / "cg.toml",
            str(upstream.make_url("/v1")),
            settle_margin_seconds=2,
            timeouts="{ connect = 2, first_byte = 5, idle = 5, total = 8 }",
        )
        headers = {"Authorization": f"Bearer {key}"}
        results: list[tuple[float, str, int, dict[str, Any]]] = []
        stop = asyncio.Event()
        with servers(1, env_for(pg.url, services, config)) as (server,):
            async with aiohttp.ClientSession() as http:

                async def load() -> None:
                    while not stop.is_set():
                        rid = f"load-{uuid.uuid4().hex}"
                        try:
                            async with http.post(
                                server.url + "/v1/chat/completions",
                                json=completion({"first_byte_ms": 20}),
                                headers={**headers, "x-request-id": rid},
                                timeout=aiohttp.ClientTimeout(total=20),
                            ) as r:
                                results.append((time.monotonic(), rid, r.status, await r.json()))
                        except aiohttp.ClientError as e:  # would be a broken answer: recorded
                            results.append((time.monotonic(), rid, -1, {"error": str(e)}))

                workers = [asyncio.create_task(load()) for _ in range(6)]
                await asyncio.sleep(1.5)
                await asyncio.to_thread(pg.stop)
                stopped_at = time.monotonic()
                await asyncio.sleep(2)
                await asyncio.to_thread(pg.start)
                started_at = time.monotonic()

                async def recovered() -> bool:
                    recent = [s for t, _, s, _ in results if t > started_at]
                    return len(recent) >= 20 and all(s == 200 for s in recent[-10:])

                ok = await wait_for(recovered, timeout=30)
                stop.set()
                await asyncio.gather(*workers)
            assert server.proc.poll() is None  # the same process, never restarted
            assert ok, Counter(s for t, _, s, _ in results if t > started_at)

            statuses = Counter(s for _, _, s, _ in results)
            assert set(statuses) <= {200, 503}, statuses
            assert statuses[200] > 20
            assert all(
                b["error"]["code"] == "SERVICE_UNAVAILABLE" for _, _, s, b in results if s == 503
            )
            # Answers sent while Postgres was down are mostly 503 (a call whose
            # charge committed just before the stop may still arrive as a 200).
            # Calls may also wait the outage out in their settlement's retries
            # and succeed after it, so no 503 is required; none may be a 500
            # (above) or charged twice (below).
            gap = [s for t, _, s, _ in results if stopped_at < t < started_at]
            assert not gap or gap.count(503) >= gap.count(200), Counter(gap)

            # Nothing half-written: once this server's sweeper has ended the
            # holds of calls cut off by the restart, every answered call is
            # charged exactly once, and the whole ledger verifies.
            conn = await asyncpg.connect(pg.url)
            try:

                async def holds_ended() -> bool:
                    live = await conn.fetchval("SELECT count(*) FROM holds WHERE ended_at IS NULL")
                    return bool(live == 0)

                assert await wait_for(holds_ended, timeout=40)
                debits = {
                    r["request_id"]: -r["amount"]
                    for r in await conn.fetch(
                        "SELECT request_id, amount FROM ledger_entries WHERE kind = 'debit'"
                    )
                }
            finally:
                await conn.close()
        answered = {rid: b["usage"]["cost_micros"] for _, rid, s, b in results if s == 200}
        assert all(debits.get(rid) == cost for rid, cost in answered.items())
        assert set(debits) <= {rid for _, rid, _, _ in results}
        code, out = run_verify(pg.url)
        assert code == 0 and json.loads(out)["ok"] is True, out
    finally:
        pg.close()


async def test_postgres_restart_while_streams_run_charges_every_stream_once(
    services: Services, upstream: TestServer, tmp_path: Path
) -> None:
    pg = PrivatePostgres()
    try:
        await pg.migrate()
        pool = await asyncpg.create_pool(pg.url, min_size=1, max_size=2)
        account_id, key = await paying_customer(pool, 1_000_000_000)
        await pool.close()
        config = write_exact_config(
            tmp_path / "cg.toml",
            str(upstream.make_url("/v1")),
            settle_margin_seconds=20,  # settlements retry for up to 16 s past the deadline
            timeouts="{ connect = 2, first_byte = 5, idle = 5, total = 15 }",
        )
        headers = {"Authorization": f"Bearer {key}"}
        with servers(1, env_for(pg.url, services, config)) as (server,):
            async with aiohttp.ClientSession() as http:

                async def stream(i: int) -> tuple[str, bytes]:
                    rid = f"stream-{i}-{uuid.uuid4().hex}"
                    # 100 chunks 30 ms apart, starting 0-1.5 s apart: streams
                    # end before, during and after the database's restart.
                    await asyncio.sleep(i * 0.03)
                    async with http.post(
                        server.url + "/v1/chat/completions",
                        json=completion({"chunk_delay_ms": 30}, stream=True),
                        headers={**headers, "x-request-id": rid},
                        timeout=aiohttp.ClientTimeout(total=60),
                    ) as r:
                        return rid, (await r.read() if r.status == 200 else b"")

                tasks = [asyncio.create_task(stream(i)) for i in range(50)]
                await asyncio.sleep(2.5)
                await asyncio.to_thread(pg.stop)
                await asyncio.sleep(2)
                await asyncio.to_thread(pg.start)
                results = await asyncio.gather(*tasks)
            assert server.proc.poll() is None

        conn = await asyncpg.connect(pg.url)
        try:
            live = await conn.fetchval("SELECT count(*) FROM holds WHERE ended_at IS NULL")
            debits = Counter(
                r["request_id"]
                for r in await conn.fetch(
                    "SELECT request_id FROM ledger_entries WHERE kind = 'debit'"
                    " AND account_id = $1",
                    account_id,
                )
            )
        finally:
            await conn.close()
        delivered = [rid for rid, raw in results if b'"content":"' in raw.replace(b" ", b"")]
        assert len(delivered) > 40  # most streams ran (a few may start while it is down)
        assert live == 0  # every settlement went through once Postgres was back
        assert all(debits[rid] == 1 for rid in delivered), debits
        assert all(n == 1 for n in debits.values())
        code, out = run_verify(pg.url)
        assert code == 0 and json.loads(out)["ok"] is True, out
    finally:
        pg.close()
