"""Numbered SQL migrations, each applied once, in order, in its own transaction.

Files are named ``NNNN_description.sql``. The runner records each applied
file's SHA-256; an applied file whose text changed stops the start (a
migration is history: fix it with a new one). A session-level advisory lock
lets several replicas start at once: one applies, the others wait and then
find nothing to do. Each migration's transaction also records the ledger's
guard triggers as it leaves them (``ledger.guards``), for ``verify``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from creditgate.ledger.guards import record_definitions

# pg_advisory_lock key: the first 8 bytes of sha256("creditgate.migrations").
_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"creditgate.migrations").digest()[:8], "big", signed=True
)
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class MigrationError(Exception):
    """The database's migration history does not match the code's."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str
    checksum: str


def available() -> list[Migration]:
    """The migrations shipped with this package, in order."""
    found = []
    for entry in resources.files(__name__).iterdir():
        m = _NAME.match(entry.name)
        if m is None:
            continue
        sql = entry.read_text("utf-8")
        found.append(
            Migration(int(m.group(1)), entry.name, sql, hashlib.sha256(sql.encode()).hexdigest())
        )
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    assert len(set(versions)) == len(versions), f"duplicate migration numbers: {versions}"
    return found


async def applied(conn: asyncpg.Connection) -> dict[int, str]:
    """Version → checksum of every migration applied to this database."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
    return {r["version"]: r["checksum"] for r in rows}


def check_history(done: dict[int, str], shipped: list[Migration]) -> list[Migration]:
    """The migrations still to apply; raise if an applied one was edited or is unknown."""
    by_version = {m.version: m for m in shipped}
    for version, checksum in sorted(done.items()):
        mig = by_version.get(version)
        if mig is None:
            raise MigrationError(
                f"migration {version:04d} is applied but not shipped: is this an older creditgate?"
            )
        if mig.checksum != checksum:
            raise MigrationError(
                f"migration {mig.name} was edited after it was applied; "
                "write a new migration instead"
            )
    return [m for m in shipped if m.version not in done]


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply pending migrations; return the names applied (empty when up to date)."""
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        pending = check_history(await applied(conn), available())
        for mig in pending:
            async with conn.transaction():
                await conn.execute(mig.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    mig.version,
                    mig.name,
                    mig.checksum,
                )
                # The guard triggers as this migration leaves them: what
                # `verify` compares against (only a migration re-records).
                await record_definitions(conn)
        return [m.name for m in pending]
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


async def pending(conn: asyncpg.Connection) -> list[str]:
    """Names of shipped migrations not yet applied (raises on an edited one)."""
    return [m.name for m in check_history(await applied(conn), available())]
