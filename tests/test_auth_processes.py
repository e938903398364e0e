"""Revoked and expired API keys stop working in every server process, within the documented delay.

Two real ``creditgate serve`` processes share Postgres; each caches key
lookups for 5 s (``CACHE_TTL_SECONDS``), invalidated by Postgres NOTIFY.
Revoking through one process must make the key fail there at once and in the
other within a second (the TTL is only the fallback); an expired key fails
everywhere from its expiry; closures and limit changes show within a second.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from creditgate.auth.api_keys import CACHE_TTL_SECONDS
from tests.conftest import TEST_CONFIG, Services
from tests.fake_clerk import ISSUER, PARTY, FakeClerk

MARGIN = 2.0  # scheduling slack on a shared 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def servers(
    services: Services, upstream: TestServer, clerk: FakeClerk, tmp_path: Path
) -> Iterator[list[str]]:
    """Two ``creditgate serve`` processes; their base URLs."""
    config = tmp_path / "creditgate.toml"
    config.write_text(TEST_CONFIG.format(upstream=upstream.make_url("/v1")))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CLERK_", "CREDITGATE_"))},
        "DATABASE_URL": services.database_url,
        "REDIS_URL": services.redis_url,
        "CREDITGATE_CONFIG": str(config),
        "CLERK_JWKS_URL": clerk.url,
        "CLERK_ISSUER": ISSUER,
        "CLERK_AUTHORIZED_PARTIES": PARTY,
        "LOG_LEVEL": "warning",
    }
    procs, urls = [], []
    try:
        for i in range(2):
            port = _free_port()
            log = (tmp_path / f"server{i}.log").open("w")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "creditgate", "serve", "--port", str(port)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


async def _wait_up(http: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            async with http.get(f"{url}/health") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"{url} did not start")


async def _status(http: aiohttp.ClientSession, url: str, key: str) -> int:
    async with http.get(
        f"{url}/api/user/balance", headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        return resp.status


async def _refused_within(
    http: aiohttp.ClientSession, url: str, key: str, deadline: float
) -> float:
    """Poll until the key is refused (401); the time it took. Fails past ``deadline``."""
    started = time.monotonic()
    while True:
        status = await _status(http, url, key)
        if status == 401:
            return time.monotonic() - started
        assert status == 200, status
        assert time.monotonic() < deadline, f"{url} still accepts the key"
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_revoked_and_expired_keys_fail_in_every_process(
    servers: list[str], clerk: FakeClerk, db: asyncpg.Pool
) -> None:
    a, b = servers
    session = {"Authorization": f"Bearer {clerk.token()}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        await asyncio.gather(_wait_up(http, a), _wait_up(http, b))
        expires = datetime.now(UTC) + timedelta(seconds=3)
        made = []
        for body in ({"name": "revoked"}, {"name": "expiring", "expiresAt": expires.isoformat()}):
            async with http.post(f"{a}/api/keys", json=body, headers=session) as resp:
                assert resp.status == 201, await resp.text()
                made.append((await resp.json())["data"])
        revoked, expiring = made
        # Both processes accept both keys, and now hold them in their caches.
        for url in (a, b):
            for key in (revoked["key"], expiring["key"]):
                assert await _status(http, url, key) == 200

        async with http.delete(f"{a}/api/keys/{revoked['id']}", headers=session) as resp:
            assert resp.status == 200
        revoked_at = time.monotonic()
        assert await _status(http, a, revoked["key"]) == 401  # at once where it was revoked
        await _refused_within(http, b, revoked["key"], revoked_at + CACHE_TTL_SECONDS + MARGIN)

        expiry = time.monotonic() + (expires - datetime.now(UTC)).total_seconds()
        for url in (a, b):
            await _refused_within(http, url, expiring["key"], expiry + MARGIN)


INVALIDATION_BOUND = 1.0  # seconds: revocation, closure, limits on every process


async def _poll_both(
    http: aiohttp.ClientSession, urls: list[str], path: str, key: str, done: Any
) -> list[float]:
    """Poll ``path`` on every process at once until ``done(status, body)``; each one's delay."""
    started = time.monotonic()

    async def one(url: str) -> float:
        while True:
            async with http.get(f"{url}{path}", headers={"Authorization": f"Bearer {key}"}) as resp:
                body = await resp.json()
                if done(resp.status, body):
                    return time.monotonic() - started
            assert time.monotonic() - started < 10, f"{url}{path} never changed: {body}"
            await asyncio.sleep(0.02)

    return list(await asyncio.gather(*(one(u) for u in urls)))


@pytest.mark.slow
async def test_revocation_closure_and_limits_reach_every_process_within_a_second(
    servers: list[str], clerk: FakeClerk, db: asyncpg.Pool
) -> None:
    a, b = servers
    session = {"Authorization": f"Bearer {clerk.token()}"}
    quota = "/api/quota/check?model=mock-model&max_tokens=10"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        await asyncio.gather(_wait_up(http, a), _wait_up(http, b))
        keys = []
        for name in ("via-api", "via-sql", "closing"):
            async with http.post(f"{a}/api/keys", json={"name": name}, headers=session) as resp:
                assert resp.status == 201, await resp.text()
                keys.append((await resp.json())["data"])
        via_api, via_sql, closing = keys
        for url in (a, b):  # every process caches every key, and the limits
            for k in keys:
                assert await _status(http, url, k["key"]) == 200
            async with http.get(
                f"{url}{quota}", headers={"Authorization": f"Bearer {via_sql['key']}"}
            ) as resp:
                assert (await resp.json())["data"]["limits"]["requests"]["limit"] == 1000

        delays: dict[str, list[float]] = {}
        # Revoked through process a: b must stop accepting it within the bound.
        async with http.delete(f"{a}/api/keys/{via_api['id']}", headers=session) as resp:
            assert resp.status == 200
        delays["revoke (api)"] = await _poll_both(
            http, [a, b], "/api/user/balance", via_api["key"], lambda s, _: s == 401
        )
        # Limits changed in the database (as `creditgate limits set` does).
        await db.execute(
            "UPDATE accounts SET requests_per_minute = 7 WHERE id = $1",
            uuid.UUID(via_sql["accountId"]),
        )
        delays["limits"] = await _poll_both(
            http,
            [a, b],
            quota,
            via_sql["key"],
            lambda s, body: s == 200 and body["data"]["limits"]["requests"]["limit"] == 7,
        )
        # Revoked in the database (as `creditgate keys revoke` does): no process knew.
        await db.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1", uuid.UUID(via_sql["id"])
        )
        delays["revoke (sql)"] = await _poll_both(
            http, [a, b], "/api/user/balance", via_sql["key"], lambda s, _: s == 401
        )
        # The account closed (a Clerk user.deleted): its keys are 403 everywhere.
        await db.execute(
            "UPDATE accounts SET status = 'closed' WHERE id = $1",
            uuid.UUID(closing["accountId"]),
        )
        delays["closed"] = await _poll_both(
            http, [a, b], "/api/user/balance", closing["key"], lambda s, _: s == 403
        )
        print("invalidation delays (s):", {k: [round(d, 3) for d in v] for k, v in delays.items()})
        for what, seen in delays.items():
            assert max(seen) < INVALIDATION_BOUND, (what, seen)
