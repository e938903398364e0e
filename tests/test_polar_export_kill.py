"""The exporter killed between sending a batch and recording it: nothing lost, nothing doubled.

Two real ``creditgate serve`` processes share the database. The one holding
the export lock sends a batch; the local Polar stores it and withholds its
answer; the test kills that process (SIGKILL) right then. The other process
takes the lock over, sends the same batch again, and Polar keeps one copy.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from polar.v2026_10 import PolarAsync

from creditgate.billing.export import EXPORT_APPLICATION_NAME, UsageExporter
from tests.billing_support import (
    billing_settings,
    billing_toml,
    eventually,
    settle_debit,
)
from tests.conftest import Services
from tests.logcapture import log_file
from tests.polar_fake import TOKEN, Failure, FakePolar

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def lock_holder(db: asyncpg.Pool) -> int | None:
    """The OS pid of the creditgate process holding the export lock, if any."""
    name = await db.fetchval(
        """
        SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND a.application_name LIKE $1
        """,
        f"{EXPORT_APPLICATION_NAME}:%",
    )
    return int(name.rsplit(":", 1)[1]) if name else None


async def unexported(db: asyncpg.Pool, ids: list[uuid.UUID]) -> int:
    count = await db.fetchval(
        """
        SELECT count(*) FROM ledger_entries e, polar_export_cursor c
        WHERE e.id = ANY($1::uuid[]) AND (e.tx_id, e.seq) > (c.tx_id, c.seq)
        """,
        ids,
    )
    return int(count)


async def healthy(port: int) -> bool:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/health") as resp,
        ):
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def test_killed_exporter_is_replaced_and_polar_keeps_one_copy(
    db: asyncpg.Pool, services: Services, fake: FakePolar, customer_factory, tmp_path: Path
) -> None:
    settings = billing_settings(services, "http://127.0.0.1:9/v1", fake.url)
    # Start from an empty backlog so the batch that gets cut off is ours.
    async with PolarAsync(TOKEN, base_url=fake.url, timeout=2) as polar:
        exporter = UsageExporter(polar, settings.config.polar)

        async def drained() -> bool:
            async with db.acquire() as conn:
                await exporter.export_once(conn)
                return (await exporter.update_gauges(conn))[0] == 0

        await eventually(drained, what="an empty backlog")

    c = await customer_factory(100)
    ids = [await settle_debit(db, c.account.id, cost=1000 + i) for i in range(5)]
    fake.fail(Failure("hang_after"))  # store the batch, then withhold the answer

    config = tmp_path / "creditgate.toml"
    config.write_text(billing_toml("http://127.0.0.1:9/v1"))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": services.database_url,
        "REDIS_URL": services.redis_url,
        "CREDITGATE_CONFIG": str(config),
        "POLAR_ACCESS_TOKEN": TOKEN,
        "POLAR_BASE_URL": fake.url,
        "LOG_LEVEL": "info",
    }
    procs: list[asyncio.subprocess.Process] = []

    async def serve(name: str) -> tuple[asyncio.subprocess.Process, int]:
        port = free_port()
        log = log_file(f"polar-export-{name}")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "creditgate",
            "serve",
            "--port",
            str(port),
            env=env | {"CREDITGATE_PORT": str(port)},
            stdout=log,
            stderr=log,
        )
        procs.append(proc)
        await eventually(lambda: healthy(port), what=f"{name} to serve")
        return proc, port

    try:
        first, _ = await serve("first")

        async def batch_stored_answer_withheld() -> bool:
            return fake.hanging.is_set()

        await eventually(batch_stored_answer_withheld, what="a batch stored, answer withheld")
        assert await lock_holder(db) == first.pid
        assert all(fake.times_received(str(i)) == 1 for i in ids)

        second, _ = await serve("second")
        assert await lock_holder(db) == first.pid  # one exporter at a time
        first.send_signal(signal.SIGKILL)  # after sending, before recording
        await asyncio.wait_for(first.wait(), 30)
        fake.release.set()

        async def taken_over_and_caught_up() -> bool:
            return await lock_holder(db) == second.pid and await unexported(db, ids) == 0

        await eventually(taken_over_and_caught_up, what="the second process to take over")
        for entry_id in ids:
            # Sent by both processes, kept once.
            assert fake.times_received(str(entry_id)) == 2
            assert fake.stored(str(entry_id))["external_customer_id"] == str(c.account.id)
        totals = await db.fetchval(
            "SELECT SUM(events) FROM polar_export_totals WHERE account_id = $1", c.account.id
        )
        assert totals == 5
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
