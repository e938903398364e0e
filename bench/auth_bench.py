"""What authentication adds to a request: p50/p90/p99 of ``Authenticator.authenticate``.

Steady-state cases, each timed call by call after a warm-up:

* a cached API key (``Bearer cg_…``: SHA-256 + dict lookup), and
* a Clerk session JWT with the JWKS cached: verified in full on every call
  (RS256 signature, claim checks, the session's account from the in-process
  cache), and the same token repeated (the verified-token cache).

It uses a real PostgreSQL (``DATABASE_URL``, or an embedded one) for the first
lookups, and a local JWKS server fetched by PyJWKClient. Run from the repo root:

    .venv/bin/python bench/auth_bench.py [--n 20000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import asyncpg
import jwt
import orjson
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from creditgate import ledger, migrations
from creditgate.auth import Authenticator, create_api_key
from creditgate.config import Settings, load_config

PARTY = "http://localhost:3000"
ISSUER = "https://clerk.bench.test"


async def _jwks_server(key: rsa.RSAPrivateKey) -> tuple[web.AppRunner, str]:
    jwk = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k1", "alg": "RS256"}

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response({"keys": [jwk]})

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/.well-known/jwks.json"


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    qs = statistics.quantiles(samples_ns, n=100)
    return {
        "p50_ms": round(statistics.median(samples_ns) / 1e6, 4),
        "p90_ms": round(qs[89] / 1e6, 4),
        "p99_ms": round(qs[98] / 1e6, 4),
        "mean_ms": round(statistics.fmean(samples_ns) / 1e6, 4),
    }


async def _time(
    auth: Authenticator,
    headers: dict[str, str],
    n: int,
    before_each: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    request = make_mocked_request("GET", "/api/user/balance", headers=headers)
    for _ in range(min(1000, n)):  # warm-up: caches filled, code paths hot
        before_each()
        await auth.authenticate(request)
    samples = []
    clock = time.perf_counter_ns
    for _ in range(n):
        before_each()
        t0 = clock()
        await auth.authenticate(request)
        samples.append(clock() - t0)
    return _percentiles(samples)


async def bench(database_url: str, n: int) -> dict[str, object]:
    name = f"cg_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = database_url.rsplit("/", 1)[0] + f"/{name}"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    runner, jwks_url = await _jwks_server(key)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    try:
        async with pool.acquire() as conn:
            await migrations.migrate(conn)
        account = await ledger.ensure_account(pool, "user", "user_bench")
        api_key = await create_api_key(pool, account.id, "bench")
        settings = Settings(
            config=load_config(None, {}),
            database_url=url,
            redis_url=None,
            clerk_jwks_url=jwks_url,
            clerk_issuer=ISSUER,
            clerk_authorized_parties=(PARTY,),
        )
        auth = Authenticator(settings)
        await auth.start(pool)
        now = int(time.time())
        token = jwt.encode(
            {
                "sub": "user_bench",
                "sid": "sess_bench",
                "iss": ISSUER,
                "azp": PARTY,
                "iat": now,
                "nbf": now - 5,
                "exp": now + 3600,
                "v": 2,
            },
            key,
            algorithm="RS256",
            headers={"kid": "k1"},
        )
        assert auth.sessions is not None
        forget_tokens = auth.sessions._verified.clear
        session = {"Authorization": f"Bearer {token}"}
        results = {
            "api_key_cached": await _time(auth, {"Authorization": f"Bearer {api_key.key}"}, n),
            # Every call verifies RS256 and the claims (the JWKS is cached):
            "jwt_cached_jwks_full_verify": await _time(auth, session, n, forget_tokens),
            # The same token again within its lifetime (what a front end sends):
            "jwt_repeated_token": await _time(auth, session, n),
        }
        await auth.stop()
        return {"n": n, "python": sys.version.split()[0], "results": results}
    finally:
        await pool.close()
        await runner.cleanup()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="timed calls per case")
    args = parser.parse_args()
    stops = []
    database_url = os.environ.get("DATABASE_URL")
    if not database_url:
        from creditgate.embedded import EmbeddedPostgres

        pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="cg-bench-")))
        stops.append(pg.stop)
        database_url = pg.url
    try:
        import uvloop  # the servers' event loop

        result = uvloop.run(bench(database_url, args.n))
    finally:
        for stop in stops:
            stop()
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2, default=Decimal).decode())


if __name__ == "__main__":
    main()
