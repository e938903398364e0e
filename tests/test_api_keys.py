"""API key management: create (secret once), list, revoke; limits, scoping, expiry."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from creditgate.auth import AUTH, MAX_LIVE_KEYS
from creditgate.auth.last_used import LastUsedRecorder
from tests.conftest import Services, make_settings, running
from tests.fake_clerk import ISSUER, PARTY, FakeClerk


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def cgc(
    services: Services, upstream: TestServer, clerk: FakeClerk, db: asyncpg.Pool
) -> AsyncIterator[TestClient]:
    settings = make_settings(
        services,
        str(upstream.make_url("/v1")),
        clerk_jwks_url=clerk.url,
        clerk_issuer=ISSUER,
        clerk_authorized_parties=(PARTY,),
    )
    async with running(settings) as client:
        yield client


async def create(cg: TestClient, session: dict[str, str], **body: Any) -> dict[str, Any]:
    resp = await cg.post("/api/keys", json={"name": "app", **body}, headers=session)
    assert resp.status == 201, await resp.text()
    data: dict[str, Any] = (await resp.json())["data"]
    return data


async def listed(cg: TestClient, session: dict[str, str]) -> list[dict[str, Any]]:
    resp = await cg.get("/api/keys", headers=session)
    assert resp.status == 200, await resp.text()
    keys: list[dict[str, Any]] = (await resp.json())["data"]["keys"]
    return keys


async def balance_account(cg: TestClient, headers: dict[str, str]) -> tuple[int, str | None]:
    resp = await cg.get("/api/user/balance", headers=headers)
    body = await resp.json()
    return resp.status, body["data"]["accountId"] if resp.status == 200 else None


async def test_create_list_revoke(cgc: TestClient, db: asyncpg.Pool, clerk: FakeClerk) -> None:
    session = bearer(clerk.token())
    _, account = await balance_account(cgc, session)
    made = await create(cgc, session, name="  my app  ")
    key = made["key"]
    assert key.startswith("cg_") and len(key) == 46 and made["prefix"] == key[:11]
    assert made["name"] == "my app" and made["accountId"] == account
    assert made["expiresAt"] is None and made["scope"] == "account"
    assert await balance_account(cgc, bearer(key)) == (200, account)

    resp = await cgc.get("/api/keys", headers=session)
    text = await resp.text()
    assert key not in text and key[11:] not in text  # never the secret again
    (item,) = (await resp.json())["data"]["keys"]
    assert set(item) == {
        "id",
        "prefix",
        "name",
        "scope",
        "createdAt",
        "lastUsedAt",
        "expiresAt",
        "revokedAt",
        # Every key shows its budget (all null without one: docs/api.md).
        "budget",
        "budgetMicros",
        "budgetPeriod",
        "spent",
        "spentMicros",
        "reserved",
        "reservedMicros",
        "remaining",
        "remainingMicros",
        "resetsAt",
    }
    assert item["budget"] is None and item["resetsAt"] is None
    assert item["id"] == made["id"] and item["prefix"] == made["prefix"]
    stored = await db.fetchval("SELECT key_hash FROM api_keys WHERE id = $1", uuid.UUID(item["id"]))
    assert stored.hex() not in text

    resp = await cgc.delete(f"/api/keys/{made['id']}", headers=session)
    assert resp.status == 200, await resp.text()
    revoked_at = (await resp.json())["data"]["revokedAt"]
    assert revoked_at is not None
    # This process forgets it at once, however recently it was cached.
    resp = await cgc.get("/api/user/balance", headers=bearer(key))
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "UNAUTHORIZED"
    assert await listed(cgc, session) == []
    again = await cgc.delete(f"/api/keys/{made['id']}", headers=session)
    assert again.status == 200 and (await again.json())["data"]["revokedAt"] == revoked_at


async def test_key_routes_need_a_session(
    cgc: TestClient, db: asyncpg.Pool, clerk: FakeClerk, customer_factory: Any
) -> None:
    c = await customer_factory()
    key_id = await db.fetchval("SELECT id FROM api_keys WHERE account_id = $1", c.account.id)
    for method, path, body in (
        ("POST", "/api/keys", {"name": "from a key"}),
        ("GET", "/api/keys", None),
        ("DELETE", f"/api/keys/{key_id}", None),
        ("POST", "/api/orgs/create", None),
    ):
        resp = await cgc.request(method, path, json=body, headers=c.auth)
        assert resp.status == 403, (path, await resp.text())
        assert (await resp.json())["error"]["code"] == "FORBIDDEN"
        bad = await cgc.request(method, path, json=body, headers=bearer("cg_" + "x" * 43))
        assert bad.status == 401
        none = await cgc.request(method, path, json=body)
        assert none.status == 401
    assert await db.fetchval("SELECT revoked_at FROM api_keys WHERE id = $1", key_id) is None
    assert (
        await db.fetchval("SELECT count(*) FROM api_keys WHERE account_id = $1", c.account.id) == 1
    )


async def test_at_most_twenty_live_keys_even_under_concurrency(
    cgc: TestClient, db: asyncpg.Pool, clerk: FakeClerk
) -> None:
    session = bearer(clerk.token())
    _, account = await balance_account(cgc, session)
    # An expired key does not count against the limit.
    await db.execute(
        "INSERT INTO api_keys (id, account_id, key_hash, prefix, name, expires_at)"
        " VALUES ($1, $2, $3, 'cg_old', 'old', now() - interval '1 day')",
        uuid.uuid4(),
        uuid.UUID(account),
        uuid.uuid4().bytes * 2,
    )

    async def attempt(i: int) -> int:
        resp = await cgc.post("/api/keys", json={"name": f"k{i}"}, headers=session)
        if resp.status == 409:
            err = (await resp.json())["error"]
            assert err["code"] == "CONFLICT" and err["details"]["limit"] == MAX_LIVE_KEYS
        return resp.status

    statuses = await asyncio.gather(*(attempt(i) for i in range(MAX_LIVE_KEYS + 5)))
    assert sorted(statuses) == [201] * MAX_LIVE_KEYS + [409] * 5
    live = await db.fetchval(
        "SELECT count(*) FROM api_keys WHERE account_id = $1 AND revoked_at IS NULL"
        " AND (expires_at IS NULL OR expires_at > now())",
        uuid.UUID(account),
    )
    assert live == MAX_LIVE_KEYS
    assert (await cgc.post("/api/keys", json={"name": "21st"}, headers=session)).status == 409
    # Revoking one makes room for one.
    victim = (await listed(cgc, session))[0]["id"]
    assert (await cgc.delete(f"/api/keys/{victim}", headers=session)).status == 200
    await create(cgc, session, name="replacement")
    assert (await cgc.post("/api/keys", json={"name": "one more"}, headers=session)).status == 409


async def test_keys_made_in_an_org_belong_to_the_org(
    cgc: TestClient, db: asyncpg.Pool, clerk: FakeClerk
) -> None:
    user, org = f"user_{uuid.uuid4().hex}", f"org_{uuid.uuid4().hex}"
    personal = bearer(clerk.token(user))
    team = bearer(clerk.token(user, org=org, role="member"))
    _, org_account = await balance_account(cgc, team)
    made = await create(cgc, team, name="team key")
    assert made["accountId"] == org_account
    assert await balance_account(cgc, bearer(made["key"])) == (200, org_account)
    assert [k["id"] for k in await listed(cgc, team)] == [made["id"]]
    assert await listed(cgc, personal) == []
    # The user outside the org cannot revoke the org's key.
    assert (await cgc.delete(f"/api/keys/{made['id']}", headers=personal)).status == 404


async def test_cross_account_access_is_404(
    cgc: TestClient, db: asyncpg.Pool, clerk: FakeClerk
) -> None:
    a, b = bearer(clerk.token()), bearer(clerk.token())
    _, a_account = await balance_account(cgc, a)
    b_key = await create(cgc, b, name="b's key")
    _, b_account = await balance_account(cgc, bearer(b_key["key"]))
    assert a_account != b_account
    assert await listed(cgc, a) == []
    for guess in (b_key["id"], str(uuid.uuid4()), "not-a-uuid", "1"):
        resp = await cgc.delete(f"/api/keys/{guess}", headers=a)
        assert resp.status == 404, guess
        assert (await resp.json())["error"]["code"] == "NOT_FOUND"
    # B's key still works, and A's balance is only ever A's, whatever A asks for.
    assert await balance_account(cgc, bearer(b_key["key"])) == (200, b_account)
    resp = await cgc.get(f"/api/user/balance?accountId={b_account}", headers=a)
    assert (await resp.json())["data"]["accountId"] == a_account


async def test_create_validation(cgc: TestClient, db: asyncpg.Pool, clerk: FakeClerk) -> None:
    session = bearer(clerk.token())
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    cases = [
        ({}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "ok", "expiresAt": past}, "expiresAt"),
        ({"name": "ok", "expiresAt": "tomorrow"}, "expiresAt"),
        ({"name": "ok", "expiresAt": "2099-01-01T00:00:00"}, "expiresAt"),  # no zone
        ({"name": "ok", "expiresAt": 4102444800}, "expiresAt"),
        ({"name": "ok", "expires_at": "2099-01-01T00:00:00Z"}, "expires_at"),
        ({"name": "ok", "scope": "root"}, "scope"),
    ]
    for body, path in cases:
        resp = await cgc.post("/api/keys", json=body, headers=session)
        assert resp.status == 400, body
        err = (await resp.json())["error"]
        assert err["code"] == "VALIDATION_ERROR"
        assert path in [d["path"] for d in err["details"]], (body, err)
    resp = await cgc.post("/api/keys", data=b"[1]", headers=session)
    assert resp.status == 400
    assert await listed(cgc, session) == []
    made = await create(cgc, session, expiresAt="2099-01-01T00:00:00Z")
    assert made["expiresAt"] == "2099-01-01T00:00:00Z"


async def test_expired_key_is_401(cgc: TestClient, db: asyncpg.Pool, clerk: FakeClerk) -> None:
    session = bearer(clerk.token())
    expires = datetime.now(UTC) + timedelta(seconds=1.5)
    made = await create(cgc, session, expiresAt=expires.isoformat())
    assert (await balance_account(cgc, bearer(made["key"])))[0] == 200  # cached now
    await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.3)
    resp = await cgc.get("/api/user/balance", headers=bearer(made["key"]))
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "UNAUTHORIZED"


async def test_last_used_is_recorded_in_batches(
    cgc: TestClient, db: asyncpg.Pool, clerk: FakeClerk
) -> None:
    session = bearer(clerk.token())
    made = await create(cgc, session)
    assert (await listed(cgc, session))[0]["lastUsedAt"] is None
    for _ in range(5):
        assert (await balance_account(cgc, bearer(made["key"])))[0] == 200
    recorder = cgc.server.app[AUTH].keys.last_used
    assert recorder.pending == 1  # five uses, one pending write
    assert await recorder.flush() == 1
    (item,) = await listed(cgc, session)
    assert item["lastUsedAt"] is not None
    assert (await balance_account(cgc, bearer(made["key"])))[0] == 200
    assert recorder.pending == 0  # used again within the minute: nothing new to write


async def test_last_used_recorder_notes_once_per_interval(db: asyncpg.Pool) -> None:
    recorder = LastUsedRecorder(db, every=60)
    key = uuid.uuid4()
    recorder.note(key, now=1000.0)
    recorder.note(key, now=1059.0)
    assert recorder.pending == 1
    await recorder.flush()  # an unknown id: the statement matches no row
    recorder.note(key, now=1061.0)
    assert recorder.pending == 1


def test_cli_makes_admin_keys_and_obeys_the_limit(services: Services) -> None:
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "DATABASE_URL": services.database_url, "REDIS_URL": services.redis_url}
    user = f"user_{uuid.uuid4().hex}"

    def cli(*args: str) -> tuple[int, dict[str, Any]]:
        proc = subprocess.run(
            [sys.executable, "-m", "creditgate", *args, "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return proc.returncode, json.loads(proc.stdout)

    assert cli("accounts", "create", "--user", user)[0] == 0
    code, made = cli("keys", "create", user, "--name", "ops", "--admin")
    assert code == 0 and made["key"].startswith("cg_")

    async def check() -> None:
        conn = await asyncpg.connect(services.database_url)
        try:
            scope = await conn.fetchval(
                "SELECT scope FROM api_keys WHERE id = $1", uuid.UUID(made["id"])
            )
            assert scope == "admin"
            # Fill the account up to the limit behind the CLI's back.
            from creditgate.auth import create_api_key

            for i in range(MAX_LIVE_KEYS - 1):
                await create_api_key(conn, uuid.UUID(made["accountId"]), f"k{i}")
        finally:
            await conn.close()

    asyncio.run(check())
    code, err = cli("keys", "create", user, "--name", "one too many")
    assert code == 1 and err["error"]["code"] == "CONFLICT"
