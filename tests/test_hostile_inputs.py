"""Hostile input against a live server: always a 4xx in the envelope, never a 500 or a ledger write.

The named cases are the 500s issue 15 found; the corpus sends control
characters, deep nesting, huge numbers and huge strings into every field,
path and query parameter of every route the OpenAPI document lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from creditgate.config import Settings
from creditgate.http.app import create_app
from creditgate.http.textguard import MAX_JSON_DEPTH
from tests.billing_support import CLERK_WEBHOOK_SECRET, POLAR_WEBHOOK_SECRET, billing_settings
from tests.conftest import Customer, Services, running
from tests.fake_clerk import FakeClerk
from tests.polar_fake import order_payload, sign_clerk, sign_polar, webhook_body
from tests.procs import run_cli

ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT = "/v1/chat/completions"


@pytest.fixture
async def cg(
    services: Services, upstream: TestServer, clerk: FakeClerk, db: asyncpg.Pool
) -> AsyncIterator[TestClient]:
    """creditgate with admin, Clerk sessions and both webhook secrets configured."""
    settings = billing_settings(
        services,
        str(upstream.make_url("/v1")),
        None,
        admin_token=ADMIN_TOKEN,
        clerk_jwks_url=clerk.url,
    )
    async with running(settings) as client:
        yield client


async def ledger_rows(db: asyncpg.Pool) -> tuple[int, int]:
    """Entries and holds of the whole ledger: 'nothing written' compares these."""
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM ledger_entries) e, (SELECT count(*) FROM holds) h"
    )
    return row["e"], row["h"]


DEEP = "__nested__"


def nested(depth: int) -> str:
    """JSON text nested ``depth`` levels, an object outermost (json.dumps stops at ~1,000)."""
    kinds = ["{" if j % 2 == 0 else "[" for j in range(depth)]
    opening = "".join('{"a":' if k == "{" else "[" for k in kinds)
    return opening + "1" + "".join("}" if k == "{" else "]" for k in reversed(kinds))


def with_nesting(body: Any, depth: int) -> bytes:
    """``body`` as JSON with its ``DEEP`` placeholder replaced by ``nested(depth)``."""
    return orjson.dumps(body).replace(f'"{DEEP}"'.encode(), nested(depth).encode())


async def refused(resp: Any, status: int = 400) -> dict[str, Any]:
    """The error envelope of a refusal with ``status``."""
    text = await resp.text()
    assert resp.status == status, text
    body = orjson.loads(text)
    assert set(body) == {"error", "correlationId"}, body
    assert body["error"]["code"] and body["error"]["message"], body
    return body["error"]


def paths_of(error: dict[str, Any]) -> list[str]:
    return [d["path"] for d in error.get("details") or []]


# ------------------------------------------------------------ the named 500s


async def test_nul_in_a_notification_url_is_400_naming_the_field(
    cg: TestClient, customer_factory: Any
) -> None:
    c: Customer = await customer_factory(0)
    for url in ("http://a\u0000b/", "http://a\u0001b/", "http://a b/"):
        resp = await cg.patch("/api/preferences", json={"notificationUrl": url}, headers=c.auth)
        error = await refused(resp)
        assert error["code"] == "VALIDATION_ERROR"
        assert "notificationUrl" in paths_of(error)


@pytest.mark.parametrize("segment", ["%00", "a%00b", "%01", "%7F", "%0A"])
async def test_a_control_character_in_a_path_parameter_is_400(cg: TestClient, segment: str) -> None:
    resp = await cg.get(f"/api/admin/accounts/{segment}/limits", headers=ADMIN)
    error = await refused(resp)
    assert error["code"] == "VALIDATION_ERROR"
    assert paths_of(error) == ["account"]


async def test_nul_in_a_query_parameter_is_400(cg: TestClient, customer_factory: Any) -> None:
    c: Customer = await customer_factory(0)
    resp = await cg.get("/api/usage?cursor=a%00b", headers=c.auth)
    error = await refused(resp)
    assert paths_of(error) == ["cursor"]


@pytest.mark.parametrize("sub", ["user_\u0000x", "user_\u0001x", "\u007f"])
async def test_a_session_whose_sub_holds_a_control_character_is_401(
    cg: TestClient, clerk: FakeClerk, db: asyncpg.Pool, sub: str
) -> None:
    before = await db.fetchval("SELECT count(*) FROM accounts")
    resp = await cg.get(
        "/api/user/balance", headers={"Authorization": f"Bearer {clerk.token(sub)}"}
    )
    error = await refused(resp, 401)
    assert error["code"] == "UNAUTHORIZED"
    assert await db.fetchval("SELECT count(*) FROM accounts") == before


async def test_a_signed_clerk_webhook_with_nul_in_its_id_is_400_and_not_stored(
    cg: TestClient, db: asyncpg.Pool
) -> None:
    body = orjson.dumps({"type": "user.created", "object": "event", "data": {"id": "user_\u0000"}})
    headers = sign_clerk(body, CLERK_WEBHOOK_SECRET)
    resp = await cg.post("/api/webhooks/clerk", data=body, headers=headers)
    await refused(resp)
    stored = await db.fetchval(
        "SELECT count(*) FROM webhook_events WHERE webhook_id = $1", headers["svix-id"]
    )
    assert stored == 0


async def test_a_signed_polar_webhook_with_nul_in_its_id_is_400_and_not_stored(
    cg: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c: Customer = await customer_factory(0)
    order = order_payload(order_id="ord_\u0000", account_id=str(c.account.id), product_id="x")
    body = webhook_body("order.paid", order)
    headers = sign_polar(body, POLAR_WEBHOOK_SECRET)
    resp = await cg.post("/api/webhooks/polar", data=body, headers=headers)
    error = await refused(resp)
    assert "NUL" in error["message"]
    stored = await db.fetchval(
        "SELECT count(*) FROM webhook_events WHERE webhook_id = $1", headers["webhook-id"]
    )
    assert stored == 0


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 255, 256, 600, 1010, 5000])
async def test_json_nested_past_the_limit_is_400_with_its_path(
    cg: TestClient, db: asyncpg.Pool, customer_factory: Any, depth: int
) -> None:
    c: Customer = await customer_factory(10)
    before = await ledger_rows(db)
    cases: list[tuple[str, dict[str, str], dict[str, Any], str]] = [
        (
            CHAT,
            c.auth,
            {
                "model": "mock-model",
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": None}}],
            },
            "tools[0].function.parameters",
        ),
        (
            CHAT,
            c.auth,
            {"model": "mock-model", "messages": [{"role": "user", "content": None}]},
            "messages[0].content",
        ),
        (
            "/api/usage/record",
            ADMIN,
            {
                "account": str(c.account.id),
                "model": "mock-model",
                "inputTokens": 1,
                "outputTokens": 1,
                "idempotencyKey": uuid.uuid4().hex,
                "metadata": None,
            },
            "metadata",
        ),
    ]
    for path, headers, body, where in cases:
        # The field itself holds the nesting, so the whole body is deeper still.
        *parents, last = where.replace("[", ".").replace("]", "").split(".")
        node: Any = body
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[last] = DEEP
        resp = await cg.post(
            path,
            data=with_nesting(body, depth),
            headers={**headers, "Content-Type": "application/json"},
        )
        error = await refused(resp)
        assert error["code"] == "VALIDATION_ERROR"
        # Past orjson's own parse limit (1,024) the body is not JSON at all: path "".
        assert paths_of(error)[0].startswith(where if depth < 1024 else ""), (where, error)
    assert await ledger_rows(db) == before


async def test_nesting_within_the_limit_still_passes(cg: TestClient, customer_factory: Any) -> None:
    c: Customer = await customer_factory(10)
    body = {
        "model": "mock-model",
        "messages": [{"role": "user", "content": "hi"}],
        # The body, the tools list, the tool and its function take 4 levels.
        "tools": [
            {
                "type": "function",
                "function": {"name": "f", "parameters": DEEP},
            }
        ],
    }
    resp = await cg.post(CHAT, data=with_nesting(body, MAX_JSON_DEPTH - 4), headers=c.auth)
    assert resp.status == 200, await resp.text()


async def test_nul_anywhere_in_a_json_body_is_400_with_its_path(
    cg: TestClient, db: asyncpg.Pool, customer_factory: Any
) -> None:
    c: Customer = await customer_factory(10)
    before = await ledger_rows(db)
    resp = await cg.post(
        CHAT,
        json={"model": "mock-model", "messages": [{"role": "user", "content": "a\u0000b"}]},
        headers=c.auth,
    )
    error = await refused(resp)
    assert paths_of(error) == ["messages[0].content"]
    resp = await cg.patch("/api/preferences", json={"x\u0001y": 1}, headers=c.auth)
    error = await refused(resp)
    assert paths_of(error) == ["x\u0001y"]
    assert await ledger_rows(db) == before


async def test_chat_text_may_hold_control_characters_other_than_nul(
    cg: TestClient, customer_factory: Any
) -> None:
    c: Customer = await customer_factory(10)
    body = {"model": "mock-model", "messages": [{"role": "user", "content": "a\tb\u0001\u001b[0m"}]}
    resp = await cg.post(CHAT, json=body, headers=c.auth)
    assert resp.status == 200, await resp.text()


@pytest.mark.parametrize(
    "amount", [" 5 ", "1_000", "１２", "٣", "1e3", "+5", "5.", "0x10", "5\u00a0"]
)
async def test_admin_credits_refuse_amounts_outside_the_grammar(
    cg: TestClient, db: asyncpg.Pool, customer_factory: Any, amount: str
) -> None:
    c: Customer = await customer_factory(0)
    before = await ledger_rows(db)
    body = {
        "account": str(c.account.id),
        "amount": amount,
        "reason": "test",
        "idempotencyKey": uuid.uuid4().hex,
    }
    error = await refused(await cg.post("/api/admin/credits", json=body, headers=ADMIN))
    assert paths_of(error) == ["amount"]
    body = {
        "account": str(c.account.id),
        "cost": amount,
        "idempotencyKey": uuid.uuid4().hex,
    }
    error = await refused(await cg.post("/api/usage/record", json=body, headers=ADMIN))
    assert "cost" in paths_of(error)
    assert await ledger_rows(db) == before


# (br without the brotli package is refused by aiohttp itself, before any handler.)
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_cannot_be_decoded_is_400(
    cg: TestClient, customer_factory: Any, encoding: str
) -> None:
    c: Customer = await customer_factory(10)
    headers = {**c.auth, "Content-Type": "application/json", "Content-Encoding": encoding}
    resp = await cg.post(CHAT, data=b"not compressed at all", headers=headers)
    error = await refused(resp)
    assert error["code"] == "VALIDATION_ERROR"


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[int]:
    """The app served as ``creditgate serve`` serves it (no handler cancellation); its port.

    aiohttp's TestServer cancels a handler whose client left, which hides what
    production sees: the body read failing with ConnectionResetError.
    """
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def test_a_client_that_leaves_mid_upload_is_a_499_logged_at_info(
    settings: Settings, db: asyncpg.Pool, customer_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    c: Customer = await customer_factory(10)
    caplog.set_level(logging.INFO)
    labels = {"route": CHAT, "method": "POST", "status": "499"}
    before = REGISTRY.get_sample_value("creditgate_http_requests_total", labels) or 0
    async with served(settings) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {c.key}\r\n"
            'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"model":'.encode()
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()

        def logged() -> list[logging.LogRecord]:
            return [r for r in caplog.records if getattr(r, "route", None) == CHAT]

        for _ in range(400):  # bounded wait for the server to notice (not a timing assert)
            if logged():
                break
            await asyncio.sleep(0.025)
    records = logged()
    assert [(r.levelno, getattr(r, "status", None)) for r in records] == [(logging.INFO, 499)]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert REGISTRY.get_sample_value("creditgate_http_requests_total", labels) == before + 1


# ------------------------------------------------------------ the generated corpus

PLACEHOLDER = "__hostile__"
# Hostile JSON values, as JSON text: control characters, deep nesting, huge
# numbers and strings, big arrays.
HOSTILE_VALUES = {
    "nul": '"a\\u0000b"',
    "controls": '"\\u0001\\u001b[31m\\u007f\\n"',
    "huge-string": '"' + "x" * 100_000 + '"',
    "deep-65": nested(MAX_JSON_DEPTH + 1),
    "deep-300": nested(300),
    "u64-max": "18446744073709551615",
    "below-i64": "-9223372036854775809",
    "float-max": "1e308",
    "past-float": "1" + "0" * 400,
    "big-array": "[" + ",".join(["0"] * 20_000) + "]",
    "negative": "-1",
    "tiny-fraction": "0.0000001",
}
# Whole bodies that are hostile before any field is read.
HOSTILE_BODIES = {
    "deep-5000": nested(5000).encode(),
    "nul-key": b'{"\\u0000": 1}',
    "nul-string": b'"\\u0000"',
    "unclosed": b"[" * 100_000,
    "not-utf8": b'{"model": "\xff\xfe"}',
    "huge-number": b"1" * 1000,
}
HOSTILE_QUERY = ["a\x00b", "\x1b[0m", "9" * 400, "-1", "x" * 3000, "1e308", "\u202e"]
HOSTILE_PATH = ["%00", "a%01b", "%7F", "9" * 400, "x" * 3000, "..%2F..", "%E2%80%AE"]
# Routes whose 503 says a feature is not configured here (documented), not a failure.
UNCONFIGURED_503 = {"/api/checkout", "/api/billing-portal", "/api/subscription"}


def baselines(account: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Valid bodies, so a hostile field is read where a real request's would be."""
    chat = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
    return {
        ("post", CHAT): chat,
        ("post", "/api/chat"): chat,
        ("post", "/api/usage/record"): {
            "account": account,
            "model": "mock-model",
            "inputTokens": 1,
            "outputTokens": 1,
            "idempotencyKey": uuid.uuid4().hex,
        },
        ("post", "/api/admin/credits"): {
            "account": account,
            "amount": 1,
            "reason": "r",
            "idempotencyKey": uuid.uuid4().hex,
        },
        ("patch", "/api/preferences"): {"lowBalanceThreshold": 1},
        ("post", "/api/keys"): {"name": "k"},
        ("patch", "/api/admin/accounts/{account}/limits"): {"requestsPerMinute": 10},
        ("patch", "/api/admin/keys/{key_id}/limits"): {"requestsPerMinute": 10},
        ("post", "/api/checkout"): {"product": "pack"},
    }


def fields_of(doc: dict[str, Any], op: dict[str, Any]) -> list[str]:
    """The top-level properties of an operation's JSON body (following a $ref)."""
    schema = op.get("requestBody", {}).get("content", {}).get("application/json", {})
    schema = schema.get("schema", {})
    if "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return list(schema.get("properties", {}))


async def test_every_field_of_every_route_refuses_hostile_input_without_a_500(
    cg: TestClient, db: asyncpg.Pool, clerk: FakeClerk, customer_factory: Any
) -> None:
    c: Customer = await customer_factory(0)  # no credits: a call that passes still writes nothing
    doc = await (await cg.get("/openapi.json")).json()
    session = {"Authorization": f"Bearer {clerk.token()}"}
    valid_path = {"account": str(c.account.id), "key_id": str(uuid.uuid4()), "model": "mock-model"}
    bodies = baselines(str(c.account.id))
    before = await ledger_rows(db)
    failures: list[str] = []
    sent = 0
    statuses: dict[int, int] = {}

    async def send(method: str, url: str, headers: dict[str, str], body: bytes | None) -> None:
        nonlocal sent
        sent += 1
        if body is not None:
            headers = {**headers, "Content-Type": "application/json"}
        resp = await cg.request(method, url, data=body, headers=headers)
        text = await resp.text()
        statuses[resp.status] = statuses.get(resp.status, 0) + 1
        route = url.split("?", 1)[0]
        case = f"{method} {url[:80]} body={(body or b'')[:60]!r} -> {resp.status}"
        if resp.status == 201:
            failures.append(case + " wrote something")
        elif resp.status >= 500 and not (resp.status == 503 and route in UNCONFIGURED_503):
            failures.append(case + f" {text[:200]}")
        elif resp.status >= 400:
            try:
                envelope = orjson.loads(text)
                assert envelope["error"]["code"] and envelope["error"]["message"]
                assert "correlationId" in envelope
            except (orjson.JSONDecodeError, AssertionError, KeyError, TypeError):
                failures.append(case + f" not in the error envelope: {text[:200]}")

    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            schemes = {name for s in op.get("security", []) for name in s}
            headers = (
                ADMIN
                if "adminToken" in schemes
                else c.auth
                if "apiKey" in schemes
                else session
                if "session" in schemes
                else {}
            )
            params = op.get("parameters", [])
            in_path = [p["name"] for p in params if p["in"] == "path"]
            url = path
            for name in in_path:
                url = url.replace(f"{{{name}}}", valid_path.get(name, "x"))
            baseline = bodies.get((method, path), {})
            body = orjson.dumps(baseline) if "requestBody" in op else None
            for name in in_path:
                for value in HOSTILE_PATH:
                    hostile_url = path
                    for other in in_path:
                        hostile_url = hostile_url.replace(
                            f"{{{other}}}", value if other == name else valid_path.get(other, "x")
                        )
                    await send(method, hostile_url, headers, body)
            for p in params:
                if p["in"] == "query":
                    for value in HOSTILE_QUERY:
                        query = urlencode({p["name"]: value})
                        await send(method, f"{url}?{query}", headers, body)
            if "requestBody" not in op:
                continue
            for raw in HOSTILE_BODIES.values():
                await send(method, url, headers, raw)
            for field in fields_of(doc, op):
                template = orjson.dumps({**baseline, field: PLACEHOLDER})
                for text in HOSTILE_VALUES.values():
                    mutated = template.replace(f'"{PLACEHOLDER}"'.encode(), text.encode())
                    await send(method, url, headers, mutated)
    # Fields inside the chat messages and tools, where prompts and schemas go.
    for where in ("content", "role", "name"):
        for text in HOSTILE_VALUES.values():
            message = orjson.dumps({"role": "user", "content": "hi", where: PLACEHOLDER})
            message = message.replace(f'"{PLACEHOLDER}"'.encode(), text.encode())
            await send(
                "POST", CHAT, c.auth, b'{"model":"mock-model","messages":[' + message + b"]}"
            )
    for text in HOSTILE_VALUES.values():
        tools = '[{"type":"function","function":{"name":"f","parameters":' + text + "}}]"
        chat = '{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"tools":'
        await send("POST", CHAT, c.auth, (chat + tools + "}").encode())
    assert sent > 500, sent
    assert not failures, "\n".join(failures[:40])
    # The corpus reached the handlers, not only the authentication in front of them.
    assert statuses.get(400, 0) > sent / 2, statuses
    assert await ledger_rows(db) == before


def test_cli_credits_grant_refuses_amounts_outside_the_grammar(services: Services) -> None:
    user = f"user_{uuid.uuid4().hex}"
    code, _ = run_cli(services, "accounts", "create", "--user", user)
    assert code == 0
    for amount in ("1_000", "１２", "٣", "1e3", " 5"):
        code, err = run_cli(services, "credits", "grant", user, amount, "--reason", "x")
        assert code == 1 and err["error"]["code"] == "VALIDATION_ERROR", (amount, err)
    code, balance = run_cli(services, "balance", user)
    assert code == 0 and balance["balanceMicros"] == 0, balance
