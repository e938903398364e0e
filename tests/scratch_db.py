"""A migrated database of a test's own, for tests that tamper with the ledger
as its owner would (triggers disabled, partitions detached): the session's
database must stay clean for the after-test ``verify``."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg

from creditgate import migrations
from creditgate.ledger import roles
from tests.conftest import Services, _admin_url


@dataclass(frozen=True)
class Scratch:
    owner: asyncpg.Pool
    app_url: str
    owner_url: str


async def create_database(services: Services, prefix: str) -> tuple[str, str]:
    """An empty database named ``prefix_<random>``: (its name, its owner URL)."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(services.owner_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return name, _admin_url(services.owner_url, name)


async def drop_database(services: Services, name: str) -> None:
    admin = await asyncpg.connect(services.owner_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def scratch_ledger(services: Services, prefix: str) -> AsyncIterator[Scratch]:
    """A migrated database, the application role granted on it; dropped after."""
    name, owner_url = await create_database(services, prefix)
    pool = await asyncpg.create_pool(owner_url, min_size=1, max_size=4)
    try:
        async with pool.acquire() as conn:
            await migrations.migrate(conn)
            await roles.grant_app_role(conn, services.app_role)
        yield Scratch(pool, roles.url_as(owner_url, services.app_role), owner_url)
    finally:
        await pool.close()
        await drop_database(services, name)
