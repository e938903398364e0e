"""Reserves without a flush (``GroupCommit`` with ``reserve_db``) across a crash of Postgres.

A private Postgres (pgserver, its own data directory) is stopped the way a
crash stops it — SIGQUIT to the postmaster: every process exits at once,
nothing more is written — and started again, which replays its WAL. What the
ledger promises (ledger.group_commit):

* a hold reserved with ``durable=False`` whose settlement has committed
  survives, settlement and all: the settlement's flush covered it;
* a hold reserved durably survives;
* a hold reserved with ``durable=False`` and nothing committed synchronously
  after it may be lost — whole: the account's balance row, its holds and its
  entries agree after recovery (``verify``), as after any commit.

The walwriter is slowed to 10 s so that the last hold is lost unless
something flushed it; the test checks the flush position before the crash,
so that third case asserts the loss only when the WAL shows it unflushed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path

import asyncpg

from creditgate import ledger, migrations
from creditgate.embedded import EmbeddedPostgres
from creditgate.ledger.group_commit import GroupCommit
from creditgate.ledger.holds import Usage
from creditgate.ledger.verify import verify_ledger


async def _pools(url: str) -> tuple[asyncpg.Pool, asyncpg.Pool]:
    sync = await asyncpg.create_pool(url, min_size=1, max_size=2)
    fast = await asyncpg.create_pool(
        url, min_size=1, max_size=1, server_settings={"synchronous_commit": "off"}
    )
    return sync, fast


def _crash_and_restart(pg: EmbeddedPostgres) -> str:
    """Stop Postgres as a crash would, start it again (it recovers); its new URL."""
    server = pg._server
    pid = server.get_pid()
    os.kill(pid, signal.SIGQUIT)  # what `pg_ctl stop -m immediate` sends
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("postmaster did not exit")
    with server._lock:
        server.ensure_postgres_running()
    return str(server.get_uri())


async def test_unflushed_reserves_are_durable_once_settled_and_lost_whole_otherwise(
    tmp_path: Path,
) -> None:
    pg = await asyncio.to_thread(EmbeddedPostgres, tmp_path)
    try:
        conn = await asyncpg.connect(pg.url)
        await migrations.migrate(conn)
        await conn.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
        await conn.execute("SELECT pg_reload_conf()")
        account = await ledger.ensure_account(conn, "user", "user_crash")
        await ledger.post_entry(
            conn,
            account_id=account.id,
            amount=10_000_000,
            kind="grant",
            idempotency_key="crash:grant",
            reason="test credits",
        )
        await conn.close()
        sync, fast = await _pools(pg.url)
        gc = GroupCommit(sync, lanes=1, reserve_db=fast)

        def reserve(durable: bool) -> asyncio.Future[ledger.Hold]:
            return gc.reserve_soon(
                hold_id=uuid.uuid4(),
                account_id=account.id,
                amount=1_000,
                ttl_seconds=600,
                durable=durable,
            )

        settled = await reserve(False)
        await gc.settle(settled.id, Usage(10, 20, 300))
        kept = await reserve(True)
        lost = await reserve(False)
        assert gc.unflushed_reserves == 2
        # Nothing commits synchronously after `lost`: is it still unflushed?
        lsn = await fast.fetchval("SELECT pg_current_wal_insert_lsn()")
        flushed = await sync.fetchval("SELECT pg_current_wal_flush_lsn() >= $1::pg_lsn", lsn)
        sync.terminate()
        fast.terminate()

        url = await asyncio.to_thread(_crash_and_restart, pg)
        conn = await asyncpg.connect(url)
        try:
            holds = {
                r["id"]: r["outcome"]
                for r in await conn.fetch(
                    "SELECT id, outcome FROM holds WHERE account_id = $1", account.id
                )
            }
            assert holds[settled.id] == "settled"
            assert holds[kept.id] is None  # live
            debit = await conn.fetchval(
                "SELECT -amount FROM ledger_entries WHERE hold_id = $1", settled.id
            )
            assert debit == 300
            balance = await conn.fetchrow(
                "SELECT balance, reserved FROM account_balances WHERE account_id = $1", account.id
            )
            if not flushed:
                assert lost.id not in holds  # lost, and whole:
                assert balance["reserved"] == 1_000  # only `kept` is reserved
            else:
                assert holds[lost.id] is None and balance["reserved"] == 2_000
            assert balance["balance"] == 10_000_000 - 300
            report = await verify_ledger(conn)
            assert report.ok, report
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(pg.stop)
