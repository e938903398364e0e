"""The migration runner: once each, in order, refusing edited history."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from creditgate import migrations
from tests.conftest import Services, _admin_url


async def test_concurrent_migrate_applies_each_once(services: Services) -> None:
    name = f"cg_mig_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(services.owner_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _admin_url(services.owner_url, name)
    try:
        conns = [await asyncpg.connect(url) for _ in range(3)]
        results = await asyncio.gather(*(migrations.migrate(c) for c in conns))
        applied = sorted(r for result in results for r in result)
        assert applied == [m.name for m in migrations.available()]
        assert await migrations.pending(conns[0]) == []
        # An edited applied migration stops the start.
        await conns[0].execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 1")
        with pytest.raises(migrations.MigrationError, match="edited"):
            await migrations.migrate(conns[1])
        for c in conns:
            await c.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


def test_unknown_applied_migration_is_refused() -> None:
    shipped = migrations.available()
    done = {m.version: m.checksum for m in shipped} | {9999: "abc"}
    with pytest.raises(migrations.MigrationError, match="not shipped"):
        migrations.check_history(done, shipped)
