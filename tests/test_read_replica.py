"""``DATABASE_READ_URL`` (issue 19): balance and usage reads go to the read pool.

No streaming replica is available here, so the "replica" is a second database
on the same server, migrated, holding the same account with other amounts: a
read answered from it is recognisably not the primary's. That proves the
routing — which reads go to the replica, and that money (reserve, settle,
402) stays on the primary — not replication itself.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import asyncpg
import pytest

from creditgate import ledger, migrations
from creditgate.config import Settings
from creditgate.ledger import roles
from tests.conftest import Services, _admin_url, running

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def replica(services: Services) -> AsyncIterator[tuple[asyncpg.Pool, str]]:
    name = f"cg_replica_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(services.owner_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    owner_url = _admin_url(services.owner_url, name)
    pool = await asyncpg.create_pool(owner_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await migrations.migrate(conn)
            await roles.grant_app_role(conn, services.app_role)
        yield pool, roles.url_as(owner_url, services.app_role)
    finally:
        await pool.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _mirror(replica: asyncpg.Pool, account: ledger.Account, credits: int) -> None:
    """The account on the "replica", as a stale copy would hold it (other credits)."""
    await replica.execute(
        "INSERT INTO accounts (id, kind, external_id) VALUES ($1, $2, $3)",
        account.id,
        account.kind,
        account.external_id,
    )
    await ledger.post_entry(
        replica,
        account_id=account.id,
        amount=credits * 1_000_000,
        kind="grant",
        idempotency_key=f"stale-grant-{account.id}",
        reason="as the replica last saw it",
    )


async def test_balance_and_usage_read_the_replica_and_money_stays_on_the_primary(
    settings: Settings,
    db: asyncpg.Pool,
    customer_factory: Any,
    replica: tuple[asyncpg.Pool, str],
) -> None:
    replica_pool, replica_url = replica
    rich = await customer_factory(5)  # 5 credits on the primary
    await _mirror(replica_pool, rich.account, 42)
    broke = await customer_factory(0)  # nothing on the primary, 42 on the "replica"
    await _mirror(replica_pool, broke.account, 42)
    async with running(replace(settings, database_read_url=replica_url)) as cg:
        r = await cg.get("/api/user/balance", headers=rich.auth)
        assert r.status == 200
        assert (await r.json())["data"]["balanceMicros"] == 42_000_000  # the replica's

        r = await cg.get("/api/user/usage", headers=rich.auth)
        entries = (await r.json())["data"]["entries"]
        assert [e["description"] for e in entries] == ["as the replica last saw it"]

        # Money: the reserve decides on the primary (0 credits: 402), whatever
        # the replica says; a paid call is charged on the primary only.
        r = await cg.post(
            "/v1/chat/completions",
            json={"model": "mock-model", "messages": MESSAGES},
            headers=broke.auth,
        )
        assert r.status == 402
        r = await cg.post(
            "/v1/chat/completions",
            json={"model": "mock-model", "messages": MESSAGES},
            headers=rich.auth,
        )
        assert r.status == 200
        primary = await ledger.get_balance(db, rich.account.id)
        assert primary.balance < 5_000_000  # charged on the primary
        stale = await ledger.get_balance(replica_pool, rich.account.id)
        assert stale.balance == 42_000_000  # the replica untouched

        # An account the replica has not seen yet is read from the primary.
        fresh = await customer_factory(3)
        r = await cg.get("/api/user/balance", headers=fresh.auth)
        assert r.status == 200 and (await r.json())["data"]["balanceMicros"] == 3_000_000


async def test_without_a_read_url_reads_are_the_primarys(cg: Any, customer_factory: Any) -> None:
    c = await customer_factory(5)
    r = await cg.get("/api/user/balance", headers=c.auth)
    assert (await r.json())["data"]["balanceMicros"] == 5_000_000


async def test_the_read_pool_refuses_writes(
    settings: Settings, replica: tuple[asyncpg.Pool, str]
) -> None:
    """Read-only sessions: a write sent to the replica's pool by mistake fails loudly."""
    from creditgate.http.state import STATE

    _, replica_url = replica
    async with running(replace(settings, database_read_url=replica_url)) as cg:
        st = cg.server.app[STATE]
        assert st.read_db is not st.db
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await st.read_db.execute("DELETE FROM webhook_events")
        assert await st.read_db.fetchval("SELECT current_database()") != await st.db.fetchval(
            "SELECT current_database()"
        )
