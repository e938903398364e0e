"""Clerk session JWTs against a local JWKS server: what passes, what is 401, 403 or 503."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from creditgate import ledger
from creditgate.auth import require_admin
from creditgate.auth.clerk import session_claims
from creditgate.config import ConfigError, load_settings
from creditgate.http.app import create_app
from tests.conftest import Services, ledger_footprint, make_settings
from tests.fake_clerk import ISSUER, PARTY, FakeClerk, rsa_key

ADMIN_TOKEN = "admin-secret-token"
ADMIN_ORG = "org_operators"
MESSAGES = [{"role": "user", "content": "Hello there"}]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _admin_probe(request: web.Request) -> web.Response:
    caller = await require_admin(request)
    return web.json_response({"via": caller.via})


@pytest.fixture
async def cgc(
    services: Services, upstream: TestServer, clerk: FakeClerk, db: asyncpg.Pool
) -> AsyncIterator[TestClient]:
    """creditgate with Clerk configured against the fake JWKS (and a probe admin route)."""
    settings = make_settings(
        services,
        str(upstream.make_url("/v1")),
        clerk_jwks_url=clerk.url,
        clerk_issuer=ISSUER,
        clerk_authorized_parties=(PARTY,),
        clerk_admin_org_id=ADMIN_ORG,
        admin_token=ADMIN_TOKEN,
    )
    app = create_app(settings)
    app.router.add_post("/test/admin-probe", _admin_probe)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def account_of(db: asyncpg.Pool, kind: str, external_id: str) -> uuid.UUID | None:
    return await db.fetchval(
        "SELECT id FROM accounts WHERE kind = $1 AND external_id = $2", kind, external_id
    )


async def footprint(db: asyncpg.Pool) -> tuple[int, int, int, int]:
    """Rows in every table a request could write to."""
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM accounts) a, (SELECT count(*) FROM ledger_entries) e,"
        " (SELECT count(*) FROM holds) h, (SELECT count(*) FROM api_keys) k"
    )
    return tuple(row)  # type: ignore[return-value]


async def balance(cg: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    resp = await cg.get("/api/user/balance", headers=headers)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["data"]


# ------------------------------------------------------------------ valid tokens


@pytest.mark.parametrize("version", [1, 2])
async def test_valid_tokens_resolve_user_and_org_accounts(
    cgc: TestClient, db: asyncpg.Pool, clerk: FakeClerk, version: int
) -> None:
    user = f"user_{uuid.uuid4().hex}"
    org = f"org_{uuid.uuid4().hex}"
    mine = await balance(cgc, bearer(clerk.token(user, v=version)))
    assert mine["accountId"] == str(await account_of(db, "user", user))
    role = "org:member" if version == 1 else "member"
    ours = await balance(cgc, bearer(clerk.token(user, v=version, org=org, role=role)))
    assert ours["accountId"] == str(await account_of(db, "org", org))
    assert ours["accountId"] != mine["accountId"]
    # Clock skew inside the 5 s leeway is accepted.
    skewed = clerk.token(user, v=version, exp_in=-3, nbf_in=3, iat_in=3)
    assert (await balance(cgc, bearer(skewed)))["accountId"] == mine["accountId"]


async def test_session_cookie_is_accepted_and_guarded_against_cross_site_posts(
    cgc: TestClient, db: asyncpg.Pool, clerk: FakeClerk
) -> None:
    token = clerk.token()
    cookie = {"Cookie": f"__session={token}"}
    assert (await cgc.get("/api/user/balance", headers=cookie)).status == 200
    # A state-changing request carrying the cookie from a foreign page: 403.
    resp = await cgc.post(
        "/api/keys", json={"name": "x"}, headers={**cookie, "Origin": "https://evil.example"}
    )
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "FORBIDDEN"
    resp = await cgc.post("/api/keys", json={"name": "x"}, headers={**cookie, "Origin": PARTY})
    assert resp.status == 201, await resp.text()
    # The Authorization header wins over the cookie.
    resp = await cgc.get("/api/user/balance", headers={**cookie, "Authorization": "Bearer nope"})
    assert resp.status == 401


async def test_cookie_writes_need_an_allowed_origin_bearer_calls_do_not(
    services: Services, upstream: TestServer, db: asyncpg.Pool, clerk: FakeClerk
) -> None:
    settings = make_settings(
        services,
        str(upstream.make_url("/v1")),
        clerk_jwks_url=clerk.url,
        allowed_origins=("https://app.example.com",),
    )
    async with TestClient(TestServer(create_app(settings))) as cg:
        token = clerk.token()
        cookie = {"Cookie": f"__session={token}"}
        assert (await cg.get("/api/user/balance", headers=cookie)).status == 200
        before = await footprint(db)
        # No Origin at all (the issue's repro), "null", a foreign page, a
        # look-alike: 403 FORBIDDEN, nothing written.
        for origin in (None, "null", "https://evil.example", "https://app.example.com.evil"):
            headers = dict(cookie) if origin is None else {**cookie, "Origin": origin}
            resp = await cg.post("/api/keys", json={"name": "x"}, headers=headers)
            assert resp.status == 403, (origin, await resp.text())
            err = (await resp.json())["error"]
            assert err["code"] == "FORBIDDEN" and "origin" in err["message"].lower(), origin
        assert await footprint(db) == before
        own = f"http://{cg.server.host}:{cg.server.port}"
        for origin in (own, "https://app.example.com", "HTTPS://APP.EXAMPLE.COM"):
            resp = await cg.post(
                "/api/keys", json={"name": "x"}, headers={**cookie, "Origin": origin}
            )
            assert resp.status == 201, (origin, await resp.text())
        # Bearer calls are not cookie calls: no Origin needed.
        resp = await cg.post("/api/keys", json={"name": "y"}, headers=bearer(token))
        assert resp.status == 201, await resp.text()


async def test_same_user_with_and_without_org_is_charged_to_two_accounts(
    cgc: TestClient, db: asyncpg.Pool, clerk: FakeClerk
) -> None:
    user, org = f"user_{uuid.uuid4().hex}", f"org_{uuid.uuid4().hex}"
    personal = bearer(clerk.token(user))
    team = bearer(clerk.token(user, org=org, role="member"))
    ids = [uuid.UUID((await balance(cgc, h))["accountId"]) for h in (personal, team)]
    for account_id in ids:
        await ledger.post_entry(
            db,
            account_id=account_id,
            amount=1_000_000,
            kind="grant",
            idempotency_key=f"test:{uuid.uuid4()}",
            reason="test",
        )
    for headers, calls in ((personal, 1), (team, 2)):
        for _ in range(calls):
            resp = await cgc.post(
                "/v1/chat/completions",
                json={"model": "mock-model", "messages": MESSAGES},
                headers=headers,
            )
            assert resp.status == 200, await resp.text()
    debits = [
        await db.fetchval(
            "SELECT count(*) FROM ledger_entries WHERE account_id = $1 AND kind = 'debit'", a
        )
        for a in ids
    ]
    assert debits == [1, 2]
    assert (await balance(cgc, personal))["balanceMicros"] < 1_000_000


# ------------------------------------------------------------------ invalid tokens


def _bad_tokens(clerk: FakeClerk) -> dict[str, str]:
    sub = f"user_{uuid.uuid4().hex}"
    good = clerk.claims(sub)
    return {
        "expired": clerk.token(sub, exp_in=-30),
        "not yet valid": clerk.token(sub, nbf_in=30),
        "issued in the future": clerk.token(sub, iat_in=30),
        "wrong azp": clerk.token(sub, azp="https://evil.example"),
        "missing azp": clerk.token(sub, azp=None),
        "wrong iss": clerk.token(sub, iss="https://clerk.evil.example"),
        "alg none": clerk.unsigned(good),
        "HS256 keyed with the public key": clerk.hs256_with_public_key(good),
        "tampered payload": clerk.tampered(clerk.token(sub), sub=f"user_{uuid.uuid4().hex}"),
        "tampered org": clerk.tampered(clerk.token(sub), o={"id": "org_victim", "rol": "admin"}),
        "signed by another key under a known kid": clerk.token(sub, signer="kid-rogue"),
        "no sub": _without(clerk, sub, "sub"),
        "no exp": _without(clerk, sub, "exp"),
        "not a JWT": "eyJhbGciOiJSUzI1NiJ9.garbage",
    }


def _without(clerk: FakeClerk, sub: str, claim: str) -> str:
    import jwt

    claims = clerk.claims(sub)
    del claims[claim]
    return jwt.encode(claims, rsa_key("kid-1"), algorithm="RS256", headers={"kid": "kid-1"})


async def test_invalid_tokens_are_401_and_write_nothing(
    cgc: TestClient, db: asyncpg.Pool, clerk: FakeClerk
) -> None:
    # Keys are loaded (a valid call) so every refusal below is the token's fault.
    assert (await cgc.get("/api/user/balance", headers=bearer(clerk.token()))).status == 200
    before = await footprint(db)
    for case, token in _bad_tokens(clerk).items():
        for method, path, body in (
            ("POST", "/v1/chat/completions", {"model": "mock-model", "messages": MESSAGES}),
            ("GET", "/api/user/balance", None),
            ("POST", "/api/keys", {"name": "k"}),
            ("POST", "/api/orgs/create", None),
        ):
            resp = await cgc.request(method, path, json=body, headers=bearer(token))
            assert resp.status == 401, (case, path, resp.status, await resp.text())
            err = (await resp.json())["error"]
            assert err["code"] == "UNAUTHORIZED" and err["type"] == "authentication_error", case
    assert await footprint(db) == before


async def test_unknown_kid_is_refetched_once_then_refused(
    cgc: TestClient, db: asyncpg.Pool, clerk: FakeClerk
) -> None:
    assert (await cgc.get("/api/user/balance", headers=bearer(clerk.token()))).status == 200
    fetched = clerk.fetches
    before = await footprint(db)
    rogue = clerk.token(kid="kid-unpublished")
    resp = await cgc.get("/api/user/balance", headers=bearer(rogue))
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "UNAUTHORIZED"
    assert clerk.fetches == fetched + 1  # one refetch, in case it was a rotation
    # More unknown kids within 30 s cause no more fetches (no JWKS hammering).
    for _ in range(5):
        resp = await cgc.get("/api/user/balance", headers=bearer(clerk.token(kid="kid-other")))
        assert resp.status == 401
    assert clerk.fetches == fetched + 1
    assert await footprint(db) == before


async def test_key_rotation_is_accepted_without_restart(
    cgc: TestClient, db: asyncpg.Pool, clerk: FakeClerk
) -> None:
    assert (await cgc.get("/api/user/balance", headers=bearer(clerk.token()))).status == 200
    fetched = clerk.fetches
    clerk.published = ["kid-1", "kid-2"]  # Clerk rotates in a new key
    # Many concurrent first uses of the new kid share one fetch.
    tokens = [clerk.token(kid="kid-2") for _ in range(8)]
    statuses = await asyncio.gather(
        *(_status(cgc.get("/api/user/balance", headers=bearer(t))) for t in tokens)
    )
    assert statuses == [200] * 8
    assert clerk.fetches == fetched + 1
    assert (await cgc.get("/api/user/balance", headers=bearer(clerk.token()))).status == 200


async def _status(request: Any) -> int:
    resp = await request
    return int(resp.status)


async def test_jwks_unreachable_without_cached_key_is_503_then_recovers(
    services: Services, upstream: TestServer, db: asyncpg.Pool, clerk: FakeClerk
) -> None:
    clerk.down = True
    settings = make_settings(
        services,
        str(upstream.make_url("/v1")),
        clerk_jwks_url=clerk.url,
        clerk_authorized_parties=(PARTY,),
    )
    async with TestClient(TestServer(create_app(settings))) as cg:
        before = await footprint(db)
        resp = await cg.get("/api/user/balance", headers=bearer(clerk.token()))
        assert resp.status == 503, await resp.text()
        assert (await resp.json())["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert "Retry-After" in resp.headers
        assert await footprint(db) == before
        clerk.down = False
        status = 503
        for _ in range(40):  # the failure back-off is 2 s; bounded at 10 s
            await asyncio.sleep(0.25)
            status = (await cg.get("/api/user/balance", headers=bearer(clerk.token()))).status
            if status == 200:
                break
        assert status == 200
        # Once keys are cached, a JWKS outage does not stop known-kid tokens.
        clerk.down = True
        assert (await cg.get("/api/user/balance", headers=bearer(clerk.token()))).status == 200


async def test_jwks_unreachable_for_an_unknown_kid_is_503_every_time(
    cgc: TestClient, db: asyncpg.Pool, clerk: FakeClerk
) -> None:
    assert (await cgc.get("/api/user/balance", headers=bearer(clerk.token()))).status == 200
    clerk.down = True
    before = await footprint(db)
    # The first unknown kid's refetch fails; so does every later one inside
    # the 30 s refetch spacing: none of them may be told "who are you?".
    for kid in ("kid-new", "kid-new", "kid-other", "kid-new"):
        resp = await cgc.get("/api/user/balance", headers=bearer(clerk.token(kid=kid)))
        assert resp.status == 503, (kid, await resp.text())
        assert (await resp.json())["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert "Retry-After" in resp.headers
    assert await footprint(db) == before
    # Known keys keep working through the outage.
    assert (await cgc.get("/api/user/balance", headers=bearer(clerk.token()))).status == 200
    # Clerk answers again: after the 2 s back-off the unknown kid is refetched
    # and, really unknown, refused as such.
    clerk.down = False
    status = 503
    for _ in range(40):
        await asyncio.sleep(0.25)
        resp = await cgc.get("/api/user/balance", headers=bearer(clerk.token(kid="kid-new")))
        status = resp.status
        if status != 503:
            break
    assert status == 401


async def test_jwks_answering_garbage_is_503_not_500(
    services: Services, upstream: TestServer, db: asyncpg.Pool, clerk: FakeClerk
) -> None:
    clerk.garbage = True
    settings = make_settings(services, str(upstream.make_url("/v1")), clerk_jwks_url=clerk.url)
    async with TestClient(TestServer(create_app(settings))) as cg:
        resp = await cg.get("/api/user/balance", headers=bearer(clerk.token()))
        assert resp.status == 503, await resp.text()
        assert (await resp.json())["error"]["code"] == "SERVICE_UNAVAILABLE"


async def test_jwt_without_clerk_configured_is_401(cg: TestClient, db: asyncpg.Pool) -> None:
    fake = FakeClerk()
    resp = await cg.get("/api/user/balance", headers=bearer(fake.token()))
    assert resp.status == 401
    resp = await cg.get("/api/user/balance", headers={"Authorization": "Basic abc"})
    assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")


# ------------------------------------------------------------------ 403s


async def test_closed_accounts_are_403(
    cgc: TestClient, db: asyncpg.Pool, clerk: FakeClerk, customer_factory: Any
) -> None:
    user = f"user_{uuid.uuid4().hex}"
    account = await ledger.ensure_account(db, "user", user)
    session = bearer(clerk.token(user))
    keyed = await customer_factory(1)
    # Closed before first use here; a cached account sees it within the 5 s TTL.
    await db.execute(
        "UPDATE accounts SET status = 'closed' WHERE id = ANY($1::uuid[])",
        [account.id, keyed.account.id],
    )
    before = await ledger_footprint(db, keyed.account.id)
    for headers in (session, keyed.auth):
        resp = await cgc.post(
            "/v1/chat/completions",
            json={"model": "mock-model", "messages": MESSAGES},
            headers=headers,
        )
        assert resp.status == 403, await resp.text()
        assert (await resp.json())["error"]["code"] == "FORBIDDEN"
    assert await ledger_footprint(db, keyed.account.id) == before


async def test_orgs_create(cgc: TestClient, db: asyncpg.Pool, clerk: FakeClerk) -> None:
    user = f"user_{uuid.uuid4().hex}"
    org = f"org_{uuid.uuid4().hex}"
    resp = await cgc.post("/api/orgs/create", headers=bearer(clerk.token(user)))
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "FORBIDDEN"
    first = await cgc.post("/api/orgs/create", headers=bearer(clerk.token(user, org=org)))
    assert first.status == 200, await first.text()
    body = await first.json()
    assert body["data"]["orgId"] == org
    assert body["correlationId"] == first.headers["x-correlation-id"]
    again = await cgc.post("/api/orgs/create", headers=bearer(clerk.token(user, v=1, org=org)))
    assert (await again.json())["data"] == body["data"]  # idempotent, v1 or v2
    assert body["data"]["accountId"] == str(await account_of(db, "org", org))
    count = await db.fetchval("SELECT count(*) FROM accounts WHERE external_id = $1", org)
    assert count == 1
    for bad in ("org-with-dash", "team_abc", "org_"):
        resp = await cgc.post("/api/orgs/create", headers=bearer(clerk.token(user, org=bad)))
        assert resp.status == 400, bad
        assert (await resp.json())["error"]["code"] == "VALIDATION_ERROR"


async def test_admin_routes(
    cgc: TestClient, db: asyncpg.Pool, clerk: FakeClerk, customer_factory: Any
) -> None:
    async def probe(headers: dict[str, str]) -> tuple[int, Any]:
        resp = await cgc.post("/test/admin-probe", headers=headers)
        body = await resp.json()
        return resp.status, body.get("via") or body["error"]["code"]

    assert await probe({}) == (401, "UNAUTHORIZED")
    assert await probe(bearer("not-the-admin-token")) == (401, "UNAUTHORIZED")
    assert await probe(bearer(ADMIN_TOKEN)) == (200, "admin_token")
    plain = await customer_factory()
    assert await probe(plain.auth) == (403, "FORBIDDEN")
    # Admins of the admin org, in v1 and v2 claims:
    assert await probe(bearer(clerk.token(org=ADMIN_ORG, role="admin"))) == (200, "session")
    v1 = clerk.token(v=1, org=ADMIN_ORG, role="org:admin")
    assert await probe(bearer(v1)) == (200, "session")
    # Admin of some other org, or a member of the admin org: authenticated, not allowed.
    assert await probe(bearer(clerk.token(org="org_customer", role="admin"))) == (403, "FORBIDDEN")
    assert await probe(bearer(clerk.token(org=ADMIN_ORG, role="member"))) == (403, "FORBIDDEN")
    assert await probe(bearer(clerk.token())) == (403, "FORBIDDEN")
    # An admin session may mint an admin key; that key passes the admin check.
    resp = await cgc.post(
        "/api/keys",
        json={"name": "ops", "scope": "admin"},
        headers=bearer(clerk.token(org=ADMIN_ORG, role="admin")),
    )
    assert resp.status == 201, await resp.text()
    admin_key = (await resp.json())["data"]["key"]
    assert await probe(bearer(admin_key)) == (200, "api_key")
    # Nobody else may mint one.
    resp = await cgc.post(
        "/api/keys",
        json={"name": "sneaky", "scope": "admin"},
        headers=bearer(clerk.token(org="org_customer", role="admin")),
    )
    assert resp.status == 403


# ------------------------------------------------------------------ claims


def test_v2_and_v1_claims_give_one_shape() -> None:
    v2 = session_claims(
        {
            "sub": "user_1",
            "sid": "sess_1",
            "v": 2,
            "fea": "o:billing,u:profile,o:keys",
            "o": {"id": "org_1", "rol": "admin", "per": "read,manage", "fpm": "3,2"},
        }
    )
    v1 = session_claims(
        {
            "sub": "user_1",
            "sid": "sess_1",
            "org_id": "org_1",
            "org_role": "org:admin",
            "org_permissions": ["org:billing:read", "org:billing:manage", "org:keys:read"],
        }
    )
    assert v2 == v1
    assert v2.org_role == "org:admin"
    assert v2.org_permissions == {"org:billing:read", "org:billing:manage", "org:keys:read"}
    assert session_claims({"sub": "user_1", "v": 2}).org_id is None
    assert session_claims({"sub": "user_1", "v": 2, "o": {"slg": "x"}}).org_id is None


async def test_a_remembered_token_never_outlives_its_expiry(
    cgc: TestClient, db: asyncpg.Pool, clerk: FakeClerk
) -> None:
    # Expired 3-4 s ago (whole seconds): inside the 5 s leeway for 1-2 s more.
    token = clerk.token(exp_in=-3)
    assert (await cgc.get("/api/user/balance", headers=bearer(token))).status == 200
    await asyncio.sleep(2.5)  # now past exp + leeway: the remembered verification is void
    resp = await cgc.get("/api/user/balance", headers=bearer(token))
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "UNAUTHORIZED"


def test_allowed_origins_setting_is_parsed_and_checked() -> None:
    env = {"ALLOWED_ORIGINS": " https://App.example.com , http://localhost:3000,"}
    assert load_settings(env).allowed_origins == (
        "https://app.example.com",
        "http://localhost:3000",
    )
    assert load_settings({}).allowed_origins == ()
    for bad in ("app.example.com", "https://app.example.com/path", "ftp://x", "https://"):
        with pytest.raises(ConfigError, match="ALLOWED_ORIGINS"):
            load_settings({"ALLOWED_ORIGINS": bad})
