"""Reserves across a crash of Postgres: every reserve whose reply arrived survives.

A private Postgres (pgserver, its own data directory) is stopped the way a
crash stops it — SIGQUIT to the postmaster: every process exits at once,
nothing more is written — and started again, which replays its WAL. The
walwriter is slowed to 10 s, so a commit that did not wait for its flush
would be lost: nothing is served on a hold a crash can lose
(ledger.group_commit; the unflushed reserves of older versions are gone).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from creditgate import ledger, migrations
from creditgate.embedded import EmbeddedPostgres
from creditgate.ledger.group_commit import GroupCommit
from creditgate.ledger.holds import Usage
from creditgate.ledger.verify import verify_ledger


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


async def test_every_reserve_answered_survives_a_crash() -> None:
    # Not under pytest's tmp_path (tests/ledger_procs.PrivatePostgres says why).
    data = Path(tempfile.mkdtemp(prefix="creditgate-test-pg-"))
    pg = await asyncio.to_thread(EmbeddedPostgres, data)
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
        pool = await asyncpg.create_pool(pg.url, min_size=1, max_size=4)
        gc = GroupCommit(pool, lanes=2)

        def reserve() -> asyncio.Future[ledger.Hold]:
            return gc.reserve_soon(
                hold_id=uuid.uuid4(), account_id=account.id, amount=1_000, ttl_seconds=600
            )

        settled = await reserve()
        await gc.settle(settled.id, Usage(10, 20, 300))
        # Concurrent reserves (batched) and a last one alone, nothing after it.
        kept = list(await asyncio.gather(*(reserve() for _ in range(10))))
        kept.append(await reserve())
        pool.terminate()

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
            assert all(holds[h.id] is None for h in kept)  # every one, live
            balance = await conn.fetchrow(
                "SELECT balance, reserved FROM account_balances WHERE account_id = $1", account.id
            )
            assert balance["reserved"] == 1_000 * len(kept)
            assert balance["balance"] == 10_000_000 - 300
            report = await verify_ledger(conn)
            assert report.ok, report
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(pg.stop)
        shutil.rmtree(data, ignore_errors=True)
