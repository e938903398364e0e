"""``GET /api/user/usage`` and ``POST /api/admin/credits`` over HTTP."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from creditgate.config import Settings
from tests.conftest import Customer, Services, ledger_footprint, make_settings, running

ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def admin_settings(services: Services, upstream: TestServer) -> Settings:
    return make_settings(services, str(upstream.make_url("/v1")), admin_token=ADMIN_TOKEN)


@pytest.fixture
async def api(admin_settings: Settings, db: asyncpg.Pool) -> AsyncIterator[TestClient]:
    async with running(admin_settings) as client:
        yield client


async def usage(api: TestClient, c: Customer, **params: Any) -> tuple[int, dict[str, Any]]:
    resp = await api.get("/api/user/usage", params=params, headers=c.auth)
    return resp.status, await resp.json()


async def post_credits(api: TestClient, body: Any, headers: dict[str, str] = ADMIN) -> Any:
    return await api.post("/api/admin/credits", json=body, headers=headers)


# ---------------------------------------------------------------- usage


async def test_usage_pages_the_callers_entries_newest_first(
    api: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(5)
    other = await customer_factory(7)
    for _ in range(3):
        r = await api.post(
            "/v1/chat/completions",
            json={"model": "mock-model", "messages": MESSAGES},
            headers=c.auth,
        )
        assert r.status == 200
    r = await post_credits(
        api,
        {"account": str(c.account.id), "amount": "1.5", "reason": "bonus", "idempotencyKey": "k1"},
    )
    assert r.status == 201
    expected = await db.fetch(
        "SELECT id, kind, amount, request_id, model FROM ledger_entries"
        " WHERE account_id = $1 ORDER BY seq DESC",
        c.account.id,
    )
    assert [e["kind"] for e in expected] == ["grant", "debit", "debit", "debit", "grant"]

    seen: list[dict[str, Any]] = []
    cursor = None
    for _ in range(10):  # bounded
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        status, body = await usage(api, c, **params)
        assert status == 200 and set(body) == {"data", "correlationId"}
        page = body["data"]
        assert set(page) == {"entries", "nextCursor"} and len(page["entries"]) <= 2
        seen.extend(page["entries"])
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert [e["id"] for e in seen] == [str(e["id"]) for e in expected]
    debit = seen[1]
    assert set(debit) == {
        "id",
        "kind",
        "amount",
        "amountMicros",
        "model",
        "inputTokens",
        "outputTokens",
        "requestId",
        "estimated",
        "tokens",
        "expiresAt",
        "createdAt",
        "source",
        "description",
    }
    # The debit's tokens by kind: the mock reported no details, so the two totals.
    assert debit["tokens"] == {"input": debit["inputTokens"], "output": debit["outputTokens"]}
    assert seen[0]["tokens"] is None  # a grant has no tokens
    # Each entry says where it came from and what it is (a grant: its reason).
    assert (seen[0]["source"], seen[0]["description"]) == ("admin", "bonus")
    assert debit["source"] == "usage" and debit["description"].startswith("mock-model: ")
    row = expected[1]
    assert debit["amountMicros"] == row["amount"] < 0
    assert debit["model"] == "mock-model" and debit["requestId"] == row["request_id"]
    assert debit["inputTokens"] > 0 and debit["outputTokens"] == 5 and not debit["estimated"]
    assert seen[0]["amount"] == 1.5 and seen[0]["amountMicros"] == 1_500_000
    assert datetime.fromisoformat(seen[0]["createdAt"]).tzinfo is not None

    # Another caller never sees these rows — not even with this caller's cursor.
    _, mine = await usage(api, c, limit=1)
    status, theirs = await usage(api, other, cursor=mine["data"]["nextCursor"])
    assert status == 200
    assert all(e["kind"] == "grant" for e in theirs["data"]["entries"])
    ids = {e["id"] for e in theirs["data"]["entries"]}
    assert ids.isdisjoint({str(e["id"]) for e in expected})
    _, all_theirs = await usage(api, other)
    assert [e["amountMicros"] for e in all_theirs["data"]["entries"]] == [7_000_000]


async def test_usage_filters_by_kind_and_time(
    api: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(5)
    r = await api.post(
        "/v1/chat/completions", json={"model": "mock-model", "messages": MESSAGES}, headers=c.auth
    )
    assert r.status == 200
    status, body = await usage(api, c, kind="debit")
    assert status == 200 and [e["kind"] for e in body["data"]["entries"]] == ["debit"]
    status, body = await usage(api, c, kind="grant,debit")
    assert [e["kind"] for e in body["data"]["entries"]] == ["debit", "grant"]

    created = await db.fetch(
        "SELECT kind, created_at FROM ledger_entries WHERE account_id = $1 ORDER BY seq",
        c.account.id,
    )
    grant_at, debit_at = created[0]["created_at"], created[1]["created_at"]
    assert grant_at < debit_at
    status, body = await usage(api, c, since=debit_at.isoformat())
    assert [e["kind"] for e in body["data"]["entries"]] == ["debit"]
    status, body = await usage(api, c, until=debit_at.isoformat())
    assert [e["kind"] for e in body["data"]["entries"]] == ["grant"]
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    status, body = await usage(api, c, since=future)
    assert status == 200 and body["data"] == {"entries": [], "nextCursor": None}


@pytest.mark.parametrize(
    ("params", "path"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "201"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "ZTk5OTk5OTk5OTk5OTk5OTk5OTk"}, "cursor"),  # e + 19 nines: past bigint
        ({"since": "9999-12-31T23:59:59-01:00"}, "since"),  # no UTC time exists for it
        ({"kind": "debit,gift"}, "kind"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-02-01", "until": "2026-01-01"}, "until"),
    ],
)
async def test_usage_refuses_bad_parameters_with_details(
    api: TestClient, customer_factory: Any, params: dict[str, str], path: str
) -> None:
    c = await customer_factory(1)
    status, body = await usage(api, c, **params)
    assert status == 400
    err = body["error"]
    assert err["code"] == "VALIDATION_ERROR" and err["type"] == "invalid_request_error"
    assert [d["path"] for d in err["details"]] == [path]


async def test_usage_needs_credentials(api: TestClient) -> None:
    resp = await api.get("/api/user/usage")
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "UNAUTHORIZED"


# ---------------------------------------------------------------- admin credits


async def test_admin_grant_answers_entry_and_balance_and_replays_exactly(
    api: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(2)
    key = f"grant-{uuid.uuid4()}"
    body = {
        "account": c.account.external_id,
        "amount": 3.25,
        "reason": "promo",
        "idempotencyKey": key,
    }
    first = await post_credits(api, body)
    assert first.status == 201, await first.text()
    data = (await first.json())["data"]
    assert data["accountId"] == str(c.account.id) and data["kind"] == "grant"
    assert (data["amountMicros"], data["balanceMicros"]) == (3_250_000, 5_250_000)
    assert (data["amount"], data["balance"]) == (3.25, 5.25)
    assert "Idempotent-Replayed" not in first.headers
    before = await ledger_footprint(db, c.account.id)

    again = await post_credits(api, body)
    assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["data"] == data  # the same result
    assert await ledger_footprint(db, c.account.id) == before  # nothing written

    changed = await post_credits(api, {**body, "amount": 4})
    assert changed.status == 409
    assert (await changed.json())["error"]["code"] == "CONFLICT"
    assert await ledger_footprint(db, c.account.id) == before


async def test_admin_adjustment_below_available_is_402_and_writes_nothing(
    api: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(2)
    before = await ledger_footprint(db, c.account.id)
    body = {
        "account": str(c.account.id),
        "amount": "-2.000001",
        "reason": "x",
        "idempotencyKey": "a",
    }
    resp = await post_credits(api, body)
    assert resp.status == 402
    assert (await resp.json())["error"]["code"] == "INSUFFICIENT_CREDITS"
    assert await ledger_footprint(db, c.account.id) == before
    ok = await post_credits(api, {**body, "amount": -2, "idempotencyKey": f"b-{uuid.uuid4()}"})
    assert ok.status == 201
    assert (await ok.json())["data"]["balanceMicros"] == 0


async def test_admin_grant_can_expire_and_shows_it(
    api: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c = await customer_factory(0)
    when = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    resp = await post_credits(
        api,
        {
            "account": str(c.account.id),
            "amount": 10,
            "reason": "trial credits",
            "idempotencyKey": f"trial-{c.account.id}",
            "expiresAt": when.isoformat().replace("+00:00", "Z"),
        },
    )
    assert resp.status == 201
    data = (await resp.json())["data"]
    assert datetime.fromisoformat(data["expiresAt"]) == when
    lot = await db.fetchrow(
        "SELECT remaining, expires_at FROM credit_lots WHERE id = $1", uuid.UUID(data["entryId"])
    )
    assert (lot["remaining"], lot["expires_at"]) == (10_000_000, when)
    status, body = await usage(api, c)
    assert status == 200
    assert datetime.fromisoformat(body["data"]["entries"][0]["expiresAt"]) == when


@pytest.mark.parametrize(
    ("body", "paths"),
    [
        ({}, ["account", "amount", "reason", "idempotencyKey"]),
        ({"account": "x", "amount": 0, "reason": "r", "idempotencyKey": "k"}, ["amount"]),
        ({"account": "x", "amount": "0.0000001", "reason": "r", "idempotencyKey": "k"}, ["amount"]),
        ({"account": "x", "amount": True, "reason": "r", "idempotencyKey": "k"}, ["amount"]),
        ({"account": "x", "amount": "1e999999", "reason": "r", "idempotencyKey": "k"}, ["amount"]),
        (
            {"account": "x", "amount": "1e-999999999", "reason": "r", "idempotencyKey": "k"},
            ["amount"],
        ),
        ({"account": "x", "amount": 1, "reason": " ", "idempotencyKey": "k"}, ["reason"]),
        (
            {"account": "x", "amount": 1, "reason": "r", "idempotencyKey": "k", "extra": 1},
            ["extra"],
        ),
        (
            {
                "account": "x",
                "amount": 1,
                "reason": "r",
                "idempotencyKey": "k",
                "expiresAt": "2001-01-01T00:00:00Z",
            },
            ["expiresAt"],
        ),
        (
            {
                "account": "x",
                "amount": -1,
                "reason": "r",
                "idempotencyKey": "k",
                "expiresAt": "2999-01-01",
            },
            ["expiresAt"],
        ),
    ],
)
async def test_admin_credits_validation(
    api: TestClient, body: dict[str, Any], paths: list[str]
) -> None:
    resp = await post_credits(api, body)
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["code"] == "VALIDATION_ERROR"
    assert [d["path"] for d in err["details"]] == paths


async def test_admin_credits_needs_an_admin(api: TestClient, customer_factory: Any) -> None:
    c = await customer_factory(1)
    body = {"account": str(c.account.id), "amount": 1, "reason": "r", "idempotencyKey": "k"}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = await post_credits(api, body, headers)
        assert resp.status == 401, headers
        assert (await resp.json())["error"]["code"] == "UNAUTHORIZED"
    # A customer's own key authenticates, but is not an admin's.
    resp = await post_credits(api, body, c.auth)
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "FORBIDDEN"
    assert (await api.get("/api/user/balance", headers=c.auth)).status == 200


async def test_admin_credits_unknown_account_is_404(api: TestClient) -> None:
    body = {"account": "user_nobody_here", "amount": 1, "reason": "r", "idempotencyKey": "k"}
    resp = await post_credits(api, body)
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "NOT_FOUND"
    resp = await api.post("/api/admin/credits", data=b"[1]", headers=ADMIN)
    assert resp.status == 400


@pytest.mark.parametrize("token", [b"cg_" + b"\xff" * 43, b"\xff\xfe", b"admin-\xe9"])
async def test_a_bearer_token_that_is_not_ascii_is_401_not_500(
    api: TestClient, token: bytes
) -> None:
    """Keys and JWTs are ASCII; aiohttp hands header bytes it cannot decode on as
    surrogates, which hashing a key or comparing the admin token choked on."""
    for method, path in ((b"GET", b"/api/user/balance"), (b"POST", b"/api/admin/credits")):
        reader, writer = await asyncio.open_connection(api.host, api.port)
        writer.write(
            method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token
            + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        )  # fmt: skip
        status_line = await reader.readline()
        writer.close()
        assert status_line.split()[1] == b"401", (path, status_line)
