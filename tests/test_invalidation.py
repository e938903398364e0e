"""The cache-invalidation listener against real Postgres: triggers, payloads, reconnects."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from creditgate.auth.api_keys import create_api_key
from creditgate.invalidation import CHANNEL, CacheInvalidation, parse
from creditgate.ledger import ensure_account
from tests.conftest import Services


class RecordingCache:
    """A cache that remembers what it was told to drop (the real caches scan dicts)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, uuid.UUID | None]] = []
        self.changed = asyncio.Event()

    def forget_account(self, account_id: uuid.UUID) -> None:
        self._note("a", account_id)

    def forget_key(self, key_id: uuid.UUID) -> None:
        self._note("k", key_id)

    def clear(self) -> None:
        self._note("clear", None)

    def _note(self, kind: str, ident: uuid.UUID | None) -> None:
        self.events.append((kind, ident))
        self.changed.set()

    async def wait_for(self, event: tuple[str, uuid.UUID | None]) -> None:
        async with asyncio.timeout(10):
            while event not in self.events:
                self.changed.clear()
                await self.changed.wait()


def test_payloads_are_parsed_strictly() -> None:
    ident = uuid.uuid4()
    assert parse(f"a:{ident}") == ("a", ident)
    assert parse(f"k:{ident}") == ("k", ident)
    for bad in ("", "a:", "x:" + str(ident), "a:not-a-uuid", f"a{ident}"):
        assert parse(bad) is None


async def test_triggers_notify_only_what_caches_hold(services: Services, db: asyncpg.Pool) -> None:
    cache = RecordingCache()
    listener = CacheInvalidation(services.database_url, [cache])
    listener.start()
    try:
        await cache.wait_for(("clear", None))
        account = await ensure_account(db, "user", f"user_{uuid.uuid4().hex}")
        key = await create_api_key(db, account.id, "k")
        # last_used_at is written in batches on the hot path: never a notification.
        await db.execute("UPDATE api_keys SET last_used_at = now() WHERE id = $1", key.id)
        await db.execute("UPDATE api_keys SET max_parallel = 3 WHERE id = $1", key.id)
        await cache.wait_for(("k", key.id))
        await db.execute("UPDATE accounts SET tier = 'tight' WHERE id = $1", account.id)
        await cache.wait_for(("a", account.id))
        assert cache.events == [("clear", None), ("k", key.id), ("a", account.id)]
    finally:
        await listener.stop()


async def test_a_dropped_listener_reconnects_and_starts_afresh(
    services: Services, db: asyncpg.Pool
) -> None:
    cache = RecordingCache()
    listener = CacheInvalidation(services.database_url, [cache])
    listener.start()
    try:
        await cache.wait_for(("clear", None))
        killed = await db.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'creditgate-invalidation'"
        )
        assert killed == 1
        # Reconnected: the caches are cleared (what was missed is unknown) …
        async with asyncio.timeout(10):
            while cache.events.count(("clear", None)) < 2:
                await asyncio.sleep(0.05)
        # … and notifications flow again.
        ident = uuid.uuid4()
        await db.execute("SELECT pg_notify($1, $2)", CHANNEL, f"a:{ident}")
        await cache.wait_for(("a", ident))
    finally:
        await listener.stop()


@pytest.mark.parametrize("payload", ["garbage", "a:\x01", "k:" + "9" * 500])
async def test_a_foreign_payload_is_ignored(services: Services, payload: str) -> None:
    cache = RecordingCache()
    listener = CacheInvalidation(services.database_url, [cache])
    listener.apply(payload)
    assert cache.events == []
