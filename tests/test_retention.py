"""Retention (issue 19): each rule prunes exactly the rows it names, nothing else.

The rule tests use a database of their own with a fixed clock, so "old" is
exact and the session's tables are not touched; the server test uses the
session's database with rows old by decades.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from creditgate import ledger, migrations
from creditgate.config import ConfigError, RetentionConfig, Settings, parse_config
from creditgate.ledger import roles
from creditgate.retention import prune
from tests.conftest import TEST_CONFIG, Services, _admin_url, running

NOW = datetime(2030, 6, 1, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture
async def scratch(services: Services) -> AsyncIterator[tuple[asyncpg.Pool, str]]:
    name = f"cg_retention_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(services.owner_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    owner_url = _admin_url(services.owner_url, name)
    pool = await asyncpg.create_pool(owner_url, min_size=1, max_size=4)
    try:
        async with pool.acquire() as conn:
            await migrations.migrate(conn)
            await roles.grant_app_role(conn, services.app_role)
        yield pool, roles.url_as(owner_url, services.app_role)
    finally:
        await pool.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _webhook(db: asyncpg.Pool, status: str, received: datetime) -> str:
    wid = f"msg_{uuid.uuid4().hex}"
    await db.execute(
        "INSERT INTO webhook_events (source, webhook_id, event_type, facts, received_at, status)"
        " VALUES ('polar', $1, 'order.paid', '{}', $2, $3)",
        wid,
        received,
        status,
    )
    return wid


async def _alert(db: asyncpg.Pool, account: uuid.UUID, status: str, finished: datetime) -> str:
    ended = None if status in ("pending", "sending") else finished
    alert_id: uuid.UUID = await db.fetchval(
        "INSERT INTO low_balance_alerts (account_id, threshold, available, balance, status,"
        " crossed_at, finished_at) VALUES ($1, 10, 5, 5, $2, $3, $4) RETURNING id",
        account,
        status,
        finished,
        ended,
    )
    return str(alert_id)


async def _left(db: asyncpg.Pool) -> tuple[set[str], set[str]]:
    hooks = {r["webhook_id"] for r in await db.fetch("SELECT webhook_id FROM webhook_events")}
    alerts = {str(r["id"]) for r in await db.fetch("SELECT id FROM low_balance_alerts")}
    return hooks, alerts


async def test_prune_deletes_only_finished_rows_past_their_period(
    scratch: tuple[asyncpg.Pool, str],
) -> None:
    db, _ = scratch
    config = RetentionConfig(webhook_events_days=30, low_balance_alerts_days=90, batch_size=2)
    old_hook, old_alert = NOW - 31 * DAY, NOW - 91 * DAY
    gone_hooks = {await _webhook(db, s, old_hook) for s in ("processed", "failed", "processed")}
    kept_hooks = {
        await _webhook(db, "pending", old_hook),  # still to apply
        await _webhook(db, "processed", NOW - 29 * DAY),  # inside the period
    }
    acct = await ledger.ensure_account(db, "user", "user_retention")
    await ledger.post_entry(
        db, account_id=acct.id, amount=9_000_000, kind="grant", idempotency_key="g", reason="t"
    )
    for i in range(3):  # holds of every outcome, with their entries: never pruned
        hold = uuid.uuid4()
        await ledger.reserve_hold(db, hold_id=hold, account_id=acct.id, amount=10, ttl_seconds=60)
        if i == 0:
            await ledger.settle_hold(db, hold, ledger.Usage(1, 1, 5))
        elif i == 1:
            await ledger.release_hold(db, hold)
    gone_alerts = {
        await _alert(db, acct.id, s, old_alert) for s in ("sent", "failed", "skipped", "sent")
    }
    kept_alerts = {
        await _alert(db, acct.id, "pending", old_alert),
        await _alert(db, acct.id, "sending", old_alert),
        await _alert(db, acct.id, "sent", NOW - 89 * DAY),
    }
    ledger_before = await db.fetchrow(
        "SELECT (SELECT count(*) FROM ledger_entries) AS e, (SELECT count(*) FROM holds) AS h"
    )

    would = await prune(db, config, now=NOW, dry_run=True)
    assert would == {"webhook_events": 3, "low_balance_alerts": 4, "holds": 0}
    assert await _left(db) == (gone_hooks | kept_hooks, gone_alerts | kept_alerts)

    done = await prune(db, config, now=NOW)  # batches of 2: several statements each
    assert done == {"webhook_events": 3, "low_balance_alerts": 4, "holds": 0}
    assert await _left(db) == (kept_hooks, kept_alerts)
    assert await prune(db, config, now=NOW) == {
        "webhook_events": 0,
        "low_balance_alerts": 0,
        "holds": 0,
    }
    assert (
        await db.fetchrow(
            "SELECT (SELECT count(*) FROM ledger_entries) AS e, (SELECT count(*) FROM holds) AS h"
        )
        == ledger_before
    )
    assert (await ledger.verify_ledger(db)).ok


async def _ended_long_ago(db: asyncpg.Pool, holds: list[uuid.UUID], days: int) -> None:
    """Move holds' times ``days`` into the past (the owner, its end-once guard off
    for the statement: a scratch database)."""
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("ALTER TABLE holds DISABLE TRIGGER holds_end_once")
        await conn.execute(
            "UPDATE holds SET created_at = created_at - $2 * interval '1 day',"
            " expires_at = expires_at - $2 * interval '1 day',"
            " ended_at = ended_at - $2 * interval '1 day' WHERE id = ANY($1::uuid[])",
            holds,
            days,
        )
        await conn.execute("ALTER TABLE holds ENABLE TRIGGER holds_end_once")


async def test_only_holds_that_moved_no_money_are_pruned(
    scratch: tuple[asyncpg.Pool, str],
) -> None:
    db, app_url = scratch
    acct = await ledger.ensure_account(db, "user", "user_unbilled")
    await ledger.post_entry(
        db, account_id=acct.id, amount=9_000_000, kind="grant", idempotency_key="g", reason="t"
    )
    holds = {name: uuid.uuid4() for name in ("released", "expired", "settled", "charged", "new")}
    for hold in holds.values():
        await ledger.reserve_hold(db, hold_id=hold, account_id=acct.id, amount=100, ttl_seconds=60)
    await ledger.release_hold(db, holds["released"])
    await ledger.release_hold(db, holds["expired"], expired=True)
    await ledger.settle_hold(db, holds["settled"], ledger.Usage(1, 1, 50))
    # Expired by the sweeper, then its late settlement: an expired hold with a debit.
    await ledger.release_hold(db, holds["charged"], expired=True)
    assert (await ledger.settle_hold(db, holds["charged"], ledger.Usage(1, 1, 40))).debited == 40
    await ledger.release_hold(db, holds["new"])  # ended today: inside every period
    old = [holds[n] for n in ("released", "expired", "settled", "charged")]
    await _ended_long_ago(db, old, 100)
    balance_before = await ledger.get_balance(db, acct.id)
    config = RetentionConfig(unbilled_holds_days=30, batch_size=1)
    now = datetime.now(UTC)

    # The serving role may not delete a hold itself; the owner neither, outside the function.
    app = await asyncpg.connect(app_url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.execute("DELETE FROM holds WHERE id = $1", holds["released"])
        assert (await prune(app, config, now=now, dry_run=True))["holds"] == 2
        # The function's own floor: whatever the caller asks, 7 days.
        assert (
            await app.fetchval(
                "SELECT creditgate_prune_unbilled_holds(now() + interval '1 day', 10, true)"
            )
            == 2
        )
        done = await prune(app, config, now=now)  # as every server does: the serving role
    finally:
        await app.close()
    with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
        await db.execute("DELETE FROM holds WHERE id = $1", holds["settled"])
    assert done["holds"] == 2
    left = {r["id"] for r in await db.fetch("SELECT id FROM holds WHERE account_id = $1", acct.id)}
    assert left == {holds[n] for n in ("settled", "charged", "new")}
    # Nothing the money rests on moved, and the ledger still checks out in full.
    assert await ledger.get_balance(db, acct.id) == balance_before
    report = await ledger.verify_ledger(db)
    assert report.ok, report.problems
    assert (await prune(db, config, now=now))["holds"] == 0


async def test_a_period_of_zero_keeps_the_table(scratch: tuple[asyncpg.Pool, str]) -> None:
    db, _ = scratch
    await _webhook(db, "processed", NOW - 3650 * DAY)
    config = RetentionConfig(webhook_events_days=0)
    assert await prune(db, config, now=NOW) == {"low_balance_alerts": 0, "holds": 0}
    assert len((await _left(db))[0]) == 1


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"webhook_events_days": 3}, "retention.webhook_events_days: 0 (keep) or at least 7"),
        ({"low_balance_alerts_days": -1}, "retention.low_balance_alerts_days"),
        ({"unbilled_holds_days": 6}, "retention.unbilled_holds_days: 0 (keep) or at least 7"),
        ({"unbilled_holds_days": -1}, "retention.unbilled_holds_days"),
        ({"interval_seconds": 0}, "retention.interval_seconds"),
        ({"batch_size": 0}, "retention.batch_size"),
        ({"days": 3}, "retention"),
    ],
)
def test_bad_retention_settings_are_refused(table: dict[str, int], message: str) -> None:
    import tomllib

    raw = tomllib.loads(TEST_CONFIG.format(upstream="http://127.0.0.1:9/v1"), parse_float=Decimal)
    raw["retention"] = table
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(raw, {})


async def test_the_cli_prunes_what_is_old_as_the_serving_role(
    scratch: tuple[asyncpg.Pool, str],
) -> None:
    db, app_url = scratch
    old = await _webhook(db, "processed", datetime.now(UTC) - 400 * DAY)
    new = await _webhook(db, "processed", datetime.now(UTC))

    def cli(*argv: str) -> dict[str, object]:
        proc = subprocess.run(
            [sys.executable, "-m", "creditgate", "prune", "--json", *argv],
            env={**os.environ, "DATABASE_URL": app_url},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        out: dict[str, object] = json.loads(proc.stdout)
        return out

    dry = await asyncio.to_thread(cli, "--dry-run")
    assert dry["wouldDelete"] == {"webhook_events": 1, "low_balance_alerts": 0, "holds": 0}
    assert (await _left(db))[0] == {old, new}
    done = await asyncio.to_thread(cli)
    assert done == {
        "dryRun": False,
        "deleted": {"webhook_events": 1, "low_balance_alerts": 0, "holds": 0},
    }
    assert (await _left(db))[0] == {new}


async def test_the_server_prunes_periodically(settings: Settings, db: asyncpg.Pool) -> None:
    old = await _webhook(db, "processed", datetime.now(UTC) - 4000 * DAY)
    recent = await _webhook(db, "processed", datetime.now(UTC))
    fast = replace(settings.config, retention=RetentionConfig(interval_seconds=0.1))
    async with running(replace(settings, config=fast)):
        for _ in range(200):
            if not await db.fetchval("SELECT 1 FROM webhook_events WHERE webhook_id = $1", old):
                break
            await asyncio.sleep(0.05)
    left = {r["webhook_id"] for r in await db.fetch("SELECT webhook_id FROM webhook_events")}
    assert old not in left and recent in left


async def test_prune_on_a_database_without_the_schema_is_a_clear_error(
    services: Services,
) -> None:
    name = f"cg_bare_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(services.owner_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "creditgate", "prune", "--json"],
            env={**os.environ, "DATABASE_URL": _admin_url(services.owner_url, name)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1, proc.stderr
        assert json.loads(proc.stdout)["error"]["code"] == "CONFIG_ERROR"
        assert "Traceback" not in proc.stderr
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
