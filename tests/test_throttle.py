"""The throttle against real Redis: atomicity, truthful waits, corrections, leases, overrides."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import uuid
import zoneinfo
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from creditgate.config import Tier
from creditgate.throttle import DayZone, Overrides, Throttle, resolve
from creditgate.throttle.errors import Throttled
from creditgate.throttle.local import LocalStore
from creditgate.throttle.resp import RedisPipe
from tests.conftest import Services
from tests.throttle_support import MESSAGES, app_client, make_settings

ADMIN = "admin-secret-for-tests"


def tier(rpm: int = 100_000, tpm: int = 10**8, par: int = 1000, day: int = 10**6) -> Tier:
    return Tier("t", rpm, tpm, par, day)


@pytest.fixture
async def throttle(services: Services) -> AsyncIterator[Throttle]:
    pipe = RedisPipe(services.redis_url)
    t = Throttle(pipe, policy="closed", timeout_ms=2000)
    await t.start()
    try:
        yield t
    finally:
        await t.aclose()
        await pipe.aclose()


@pytest.fixture
async def tc(services: Services, upstream: TestServer, db) -> AsyncIterator[TestClient]:
    settings = make_settings(services, str(upstream.make_url("/v1")), admin_token=ADMIN)
    async with app_client(settings) as client:
        yield client


def chat(**extra: object) -> dict[str, object]:
    return {"model": "mock-model", "messages": MESSAGES, **extra}


async def level(redis: aioredis.Redis, account_id: uuid.UUID, field: str = "tl") -> float:
    """A bucket's stored level in units (stored × 60,000): tokens "tl", requests "rl"."""
    raw = await redis.hget(f"cg:{{{account_id}}}", field)
    assert raw is not None
    return int(raw) / 60_000


# ------------------------------------------------------------ the decision itself


async def test_all_or_nothing_and_the_longest_wait_decides(
    throttle: Throttle, redis: aioredis.Redis
) -> None:
    acct = uuid.uuid4()
    limits = resolve(acct, None, tier(rpm=60, tpm=6000))
    big = await throttle.admit(limits, 6000)  # a whole minute's tokens
    await throttle.finish(big, 6000)
    for _ in range(59):  # and the rest of the minute's requests
        a = await throttle.admit(limits, 0)
        await throttle.finish(a, 0)
    day_before = (await redis.hgetall(f"cg:{{{acct}}}"))[b"n"]

    with pytest.raises(Throttled) as refused:
        await throttle.admit(limits, 150)
    # requests/min would be ready in ~1 s, tokens/min (150 at 100/s) in ~1.5 s: the
    # longer one decides, so a retry after Retry-After finds both ready.
    assert refused.value.details == {"limit": "tokens_per_minute", "retryAfter": 2}
    assert refused.value.headers["Retry-After"] == "2"
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    # Nothing was taken: not the day's message, not a lease.
    assert (await redis.hgetall(f"cg:{{{acct}}}"))[b"n"] == day_before == b"60"
    assert await redis.zcard(f"cg:{{{acct}}}:par") == 0

    await asyncio.sleep(2)  # wait exactly what it said, then it succeeds
    ok = await throttle.admit(limits, 150)
    await throttle.finish(ok, 150)


async def test_keys_share_a_hash_tag_and_expire_when_idle(
    throttle: Throttle, redis: aioredis.Redis
) -> None:
    acct, key = uuid.uuid4(), uuid.uuid4()
    limits = resolve(
        acct,
        key,
        tier(rpm=100, tpm=1000, day=10**6),
        key=Overrides(requests_per_minute=5, max_parallel=3),
    )
    a = await throttle.admit(limits, 10)
    assert limits.keys == (
        f"cg:{{{acct}}}",
        f"cg:{{{acct}}}:par",
        f"cg:{{{acct}}}:k:{key}",
        f"cg:{{{acct}}}:k:{key}:par",
    )
    for name in limits.keys:
        assert await redis.pttl(name) > 0, name  # nothing lives forever
    # A hash lives while a message is counted today; the lease set, a lease's life.
    assert await redis.pttl(f"cg:{{{acct}}}:par") <= 61_000
    assert await redis.hgetall(f"cg:{{{acct}}}:k:{key}") == {
        b"rl": b"%d" % (4 * 60_000),
        b"rt": (await redis.hget(f"cg:{{{acct}}}:k:{key}", "rt")),
    }  # the key's hash holds only what the key limits (requests)
    await throttle.finish(a, 10)
    assert await redis.zcard(f"cg:{{{acct}}}:par") == 0
    assert await redis.zcard(f"cg:{{{acct}}}:k:{key}:par") == 0


async def test_idle_buckets_expire_once_full(throttle: Throttle, redis: aioredis.Redis) -> None:
    acct = uuid.uuid4()
    limits = resolve(acct, None, Tier("t", 100, 1000, 1000, 10**6))
    # Without a daily count the hash lives until its buckets are full (+1 s):
    # 10 tokens at 1000/min refill in 0.6 s.
    call = throttle._call(limits, "a", 1, 10, "", 0)
    assert (await throttle._call_redis(call) or [0])[0] == 1
    assert 0 < await redis.pttl(f"cg:{{{acct}}}") <= 1600


async def test_too_large_prompt_is_refused_without_a_wait(throttle: Throttle) -> None:
    limits = resolve(uuid.uuid4(), None, tier(tpm=100))
    with pytest.raises(Throttled) as refused:
        await throttle.admit(limits, 400, required_tokens=300)
    assert refused.value.details == {"limit": "tokens_per_minute", "retryAfter": None}
    assert "Retry-After" not in refused.value.headers
    # A worst case above a minute's tokens whose prompt fits takes the whole
    # bucket: it is served, then corrected by what it used.
    a = await throttle.admit(limits, 400, required_tokens=50)
    assert a.tokens == 100
    await throttle.finish(a, 60)


async def test_local_store_decides_like_the_script(throttle: Throttle) -> None:
    """The degraded mode's buckets follow the same rules, on the same arguments."""
    limits = resolve(
        uuid.uuid4(),
        uuid.uuid4(),
        tier(rpm=6, tpm=600, par=2, day=4),
        key=Overrides(tokens_per_minute=300),
    )
    local = LocalStore()
    steps: list[tuple[str, int, str, int | str]] = [
        ("a", 200, "l1", 1),
        ("a", 200, "l2", 1),  # the key's bucket: 100 left
        ("a", 50, "l3", 1),  # parallel: 2 in flight
        ("r", -150, "l1", ""),
        ("a", 100, "l4", 1),
        ("q", 10, "x", 1),
        ("a", 10, "l5", 1),  # messages_per_day: 4 taken
        ("r", 0, "l4", "day"),  # never served: its message given back
        ("a", 10, "l6", 1),
    ]
    for mode, tokens, lease, messages in steps:
        if messages == "day":
            messages = throttle.day_zone.day_number()
        call = throttle._call(limits, mode, 1, tokens, lease, messages)
        remote = await throttle._call_redis(call)
        assert remote is not None
        here = local.run(call.keys, call.args)
        # Same decision, same limit, same counts; waits and resets differ only
        # by the milliseconds between the two calls.
        assert here[:2] == remote[:2], (mode, tokens)
        assert here[4::2] == remote[4::2], (mode, tokens)
        assert abs(here[2] - remote[2]) <= 50


# ------------------------------------------------------------ end to end


async def test_retry_after_is_whole_seconds_and_truthful(tc: TestClient, customer_factory) -> None:
    c = await customer_factory(1, tier="burst")  # 60 a minute: one a second
    refused = None
    for _ in range(150):
        resp = await tc.post("/v1/chat/completions", json=chat(), headers=c.auth)
        if resp.status == 429:
            refused = resp
            break
        assert resp.status == 200
    assert refused is not None
    body = await refused.json()
    assert body["error"]["code"] == "RATE_LIMITED"
    assert body["error"]["details"]["limit"] == "requests_per_minute"
    retry_after = refused.headers["Retry-After"]
    assert retry_after.isdigit()  # whole seconds
    assert body["error"]["details"]["retryAfter"] == int(retry_after) == 1
    assert refused.headers["x-ratelimit-limit-requests"] == "60"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    await asyncio.sleep(int(retry_after))
    again = await tc.post("/v1/chat/completions", json=chat(), headers=c.auth)
    assert again.status == 200


async def test_token_correction_refunds_what_was_not_used(
    tc: TestClient, customer_factory, redis: aioredis.Redis
) -> None:
    c = await customer_factory(1, tier="tokens")  # 3000 tokens a minute
    resp = await tc.post("/v1/chat/completions", json=chat(max_tokens=2000), headers=c.auth)
    assert resp.status == 200
    usage = (await resp.json())["usage"]
    # At admission the estimate (prompt + 2000) was taken...
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) < 1000
    # ...and by the last byte the bucket holds back only what was used.
    after = await level(redis, c.account.id)
    assert 3000 - usage["total_tokens"] - 1 <= after <= 3000


async def test_usage_above_the_estimate_leaves_a_debt(
    tc: TestClient, customer_factory, redis: aioredis.Redis
) -> None:
    c = await customer_factory(1, tier="tokens")  # 3000 a minute, 50 a second
    big = chat(max_tokens=1, mock={"chunks": 5000, "ignore_max_tokens": True})
    resp = await tc.post("/v1/chat/completions", json=big, headers=c.auth)
    assert resp.status == 200
    used = (await resp.json())["usage"]["total_tokens"]
    assert used > 5000
    debt = await level(redis, c.account.id)
    assert debt < 3000 - used + 100 < 0  # in debt by what the estimate missed

    resp = await tc.post("/v1/chat/completions", json=chat(max_tokens=1), headers=c.auth)
    assert resp.status == 429
    err = (await resp.json())["error"]
    assert err["details"]["limit"] == "tokens_per_minute"
    # The wait is what the debt (plus this request) takes to refill at 50/s.
    now_level = await level(redis, c.account.id)
    need = 8 + math.ceil(len(b"Hi") / 3) + 1  # the prompt estimate + max_tokens
    expected = math.ceil((need - now_level) / 50)
    assert abs(int(resp.headers["Retry-After"]) - expected) <= 1


async def test_parallel_limit_and_leases_returned_at_stream_end_and_disconnect(
    tc: TestClient, customer_factory
) -> None:
    c = await customer_factory(1, tier="pair")  # max_parallel = 2
    slow = chat(stream=True, mock={"chunks": 40, "chunk_delay_ms": 100})
    s1 = await tc.post("/v1/chat/completions", json=slow, headers=c.auth)
    s2 = await tc.post("/v1/chat/completions", json=slow, headers=c.auth)
    assert (s1.status, s2.status) == (200, 200)
    await s1.content.readline()
    await s2.content.readline()

    third = await tc.post("/v1/chat/completions", json=slow, headers=c.auth)
    assert third.status == 429
    err = (await third.json())["error"]
    assert err["details"]["limit"] == "max_parallel"
    assert third.headers["Retry-After"] == "1"

    s1.close()  # the client goes away mid-stream: its lease is returned
    for _ in range(100):
        resp = await tc.post("/v1/chat/completions", json=chat(), headers=c.auth)
        if resp.status == 200:
            break
        assert (await resp.json())["error"]["details"]["limit"] == "max_parallel"
        await asyncio.sleep(0.05)
    assert resp.status == 200
    s2.close()


async def test_lease_is_returned_before_the_last_byte(tc: TestClient, customer_factory) -> None:
    c = await customer_factory(1, tier="single")  # one request at a time
    for stream in (True, False, True):
        # A client that sends the next request the moment it has read the
        # previous one never meets its own finished request's lease.
        resp = await tc.post("/v1/chat/completions", json=chat(stream=stream), headers=c.auth)
        assert resp.status == 200
        await resp.read()


async def test_lease_of_a_long_stream_is_renewed(
    services: Services, upstream: TestServer, db, customer_factory
) -> None:
    settings = make_settings(services, str(upstream.make_url("/v1")), lease_ttl=0.6)
    async with app_client(settings) as client:
        c = await customer_factory(1, tier="single")
        slow = chat(stream=True, mock={"chunks": 30, "chunk_delay_ms": 100})
        s1 = await client.post("/v1/chat/completions", json=slow, headers=c.auth)
        assert s1.status == 200
        await asyncio.sleep(1.5)  # well past the lease's 0.6 s: renewed, still held
        second = await client.post("/v1/chat/completions", json=chat(), headers=c.auth)
        assert second.status == 429
        assert (await second.json())["error"]["details"]["limit"] == "max_parallel"
        body = await s1.read()
        assert body.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("zone", ["America/St_Johns", "Pacific/Kiritimati", "UTC"])
async def test_messages_per_day_count_in_the_configured_zone(
    services: Services,
    upstream: TestServer,
    db,
    customer_factory,
    redis: aioredis.Redis,
    zone: str,
) -> None:
    settings = make_settings(services, str(upstream.make_url("/v1")), zone=zone)
    async with app_client(settings) as client:
        c = await customer_factory(1, tier="daily")  # 2 messages a day
        failed = await client.post(
            "/v1/chat/completions", json=chat(mock={"status": 500}), headers=c.auth
        )
        assert failed.status == 502  # never served: its message is given back
        for _ in range(2):
            ok = await client.post("/v1/chat/completions", json=chat(), headers=c.auth)
            assert ok.status == 200
        refused = await client.post("/v1/chat/completions", json=chat(), headers=c.auth)
        assert refused.status == 429
        err = (await refused.json())["error"]
        assert err["details"]["limit"] == "messages_per_day"

    tz = zoneinfo.ZoneInfo(zone)
    now = dt.datetime.now(tz)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), tz)
    assert abs(int(refused.headers["Retry-After"]) - (midnight - now).total_seconds()) <= 2
    # The day counted is the zone's calendar day, found from Redis's clock.
    stored = await redis.hgetall(f"cg:{{{c.account.id}}}")
    assert int(stored[b"d"]) == (now.date() - dt.date(1970, 1, 1)).days
    assert int(stored[b"n"]) == 2
    assert DayZone(zone).day_number() == int(stored[b"d"])


# ------------------------------------------------------------ overrides


async def test_overrides_by_account_and_key(tc: TestClient, db, customer_factory) -> None:
    from creditgate.auth import create_api_key

    c = await customer_factory(1)  # the free tier: effectively unlimited
    admin = {"Authorization": f"Bearer {ADMIN}"}
    url = f"/api/admin/accounts/{c.account.id}/limits"
    resp = await tc.patch(url, json={"requestsPerMinute": 2}, headers=admin)
    assert resp.status == 200
    data = (await resp.json())["data"]
    assert data["accountOverrides"]["requestsPerMinute"] == 2
    assert data["effective"]["requestsPerMinute"] == 2
    assert data["tierLimits"]["requestsPerMinute"] == 100000

    strict = await create_api_key(db, c.account.id, "strict")
    loose = await create_api_key(db, c.account.id, "loose")
    resp = await tc.patch(
        f"/api/admin/keys/{strict.id}/limits", json={"requestsPerMinute": 1}, headers=admin
    )
    assert (await resp.json())["data"]["effective"]["requestsPerMinute"] == 1
    resp = await tc.patch(
        f"/api/admin/keys/{loose.id}/limits", json={"requestsPerMinute": 50}, headers=admin
    )
    # Never looser than its account: the account's 2 still applies.
    assert (await resp.json())["data"]["effective"]["requestsPerMinute"] == 2

    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    ok = await tc.post("/v1/chat/completions", json=chat(), headers=auth(strict.key))
    assert ok.status == 200 and ok.headers["x-ratelimit-limit-requests"] == "1"
    refused = await tc.post("/v1/chat/completions", json=chat(), headers=auth(strict.key))
    assert refused.status == 429
    assert "API key" in (await refused.json())["error"]["message"]
    ok = await tc.post("/v1/chat/completions", json=chat(), headers=auth(loose.key))
    assert ok.status == 200  # the account's second and last
    refused = await tc.post("/v1/chat/completions", json=chat(), headers=auth(loose.key))
    assert refused.status == 429
    assert refused.headers["x-ratelimit-limit-requests"] == "2"

    # null clears an override: the tier's value is back.
    resp = await tc.patch(url, json={"requestsPerMinute": None}, headers=admin)
    assert (await resp.json())["data"]["effective"]["requestsPerMinute"] == 100000


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"requestsPerMinute": 0}, "requestsPerMinute"),
        ({"maxParallel": "3"}, "maxParallel"),
        ({"maxParallel": True}, "maxParallel"),
        ({"rpm": 3}, "rpm"),
        ({}, ""),
        ([1], ""),
    ],
)
async def test_bad_overrides_are_400(tc: TestClient, customer_factory, body, path) -> None:
    c = await customer_factory(0)
    resp = await tc.patch(
        f"/api/admin/accounts/{c.account.id}/limits",
        json=body,
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["code"] == "VALIDATION_ERROR"
    assert any(d["path"] == path for d in err["details"])


async def test_override_routes_need_the_admin_token(tc: TestClient, customer_factory) -> None:
    c = await customer_factory(0)
    url = f"/api/admin/accounts/{c.account.id}/limits"
    assert (await tc.get(url)).status == 401
    assert (await tc.get(url, headers=c.auth)).status == 403  # a customer's key is not an admin
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert (await tc.get(url, headers=admin)).status == 200
    missing = await tc.get(f"/api/admin/keys/{uuid.uuid4()}/limits", headers=admin)
    assert missing.status == 404
    assert (await tc.get("/api/admin/keys/not-a-uuid/limits", headers=admin)).status == 404
    assert (await tc.get("/api/admin/accounts/user_nobody/limits", headers=admin)).status == 404


def test_limits_cli(services: Services) -> None:
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "DATABASE_URL": services.database_url, "REDIS_URL": services.redis_url}

    def run(*args: str) -> tuple[int, dict]:
        proc = subprocess.run(
            [sys.executable, "-m", "creditgate", *args, "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}

    user = f"user_{uuid.uuid4().hex}"
    code, acct = run("accounts", "create", "--user", user)
    assert code == 0
    code, out = run("limits", "set", user, "--requests-per-minute", "7", "--max-parallel", "3")
    assert code == 0
    assert out["accountOverrides"]["requestsPerMinute"] == 7
    assert out["effective"] == {
        "requestsPerMinute": 7,
        "tokensPerMinute": 200000,  # the built-in config's free tier
        "maxParallel": 3,
        "messagesPerDay": 1000,
    }
    code, key = run("keys", "create", user)
    code, out = run("limits", "set", user, "--key", key["id"], "--requests-per-minute", "99")
    assert code == 0 and out["keyOverrides"]["requestsPerMinute"] == 99
    assert out["effective"]["requestsPerMinute"] == 7  # a key never loosens its account
    code, out = run("limits", "set", user, "--max-parallel", "none")
    assert code == 0 and out["effective"]["maxParallel"] == 8
    code, out = run("limits", "show", user, "--key", key["id"])
    assert code == 0 and out["keyId"] == key["id"] and out["accountId"] == acct["id"]
    code, err = run("limits", "set", user, "--max-parallel", "0")
    assert code == 1 and err["error"]["code"] == "VALIDATION_ERROR"
    code, err = run("limits", "set", user)
    assert code == 1 and err["error"]["code"] == "VALIDATION_ERROR"
    code, err = run("limits", "show", user, "--key", str(uuid.uuid4()))
    assert code == 1 and err["error"]["code"] == "NOT_FOUND"


async def test_check_takes_nothing(throttle: Throttle, redis: aioredis.Redis) -> None:
    acct = uuid.uuid4()
    limits = resolve(acct, None, tier(rpm=2))
    for _ in range(3):
        found = await throttle.check(limits, 10)
        assert found.allowed and found.limit is None
    assert not await redis.exists(f"cg:{{{acct}}}")  # nothing was written
    for _ in range(2):
        await throttle.finish(await throttle.admit(limits, 10), 10)
    found = await throttle.check(limits, 10)
    assert (found.allowed, found.limit) == (False, "requests_per_minute")
    assert found.retry_after == 30  # 2 a minute: one every 30 s
    assert found.headers["x-ratelimit-remaining-requests"] == "0"
