"""The ledger partitioned by month (migration 0017; docs/capacity.md).

A ledger spread over several monthly partitions is generated in SQL (entries
dated months back, as a long-running service would have them): each test
has a migrated database of its own, since several tamper as the owner would.
Every test ends with ``verify`` (incremental and full) clean, or says why not.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from creditgate import ledger, migrations
from creditgate.config import RetentionConfig, Settings
from creditgate.ledger import partitions
from creditgate.ledger.entries import _fingerprint
from creditgate.retention import prune
from tests.conftest import Services, running
from tests.scratch_db import Scratch, create_database, drop_database, scratch_ledger

MONTHS = 6  # the generated ledger spans this month and the five before it
GRANT = 1_000_000_000


@pytest.fixture
async def scratch(services: Services) -> AsyncIterator[Scratch]:
    async with scratch_ledger(services, "cg_part") as db:
        yield db


def _month_start(months_back: int) -> datetime:
    """The first instant (UTC) of the month ``months_back`` before this one."""
    now = datetime.now(UTC)
    year, month = divmod(now.year * 12 + now.month - 1 - months_back, 12)
    return datetime(year, month + 1, 1, tzinfo=UTC)


async def generate(
    conn: asyncpg.Connection,
    accounts: int,
    per_account: int,
    *,
    keys: bool = True,
    make_months: bool = True,
) -> list[uuid.UUID]:
    """A ledger generated in SQL: per account a grant in the oldest month, then
    settled calls (a hold and its debit) spread evenly up to now; balances,
    running balances and key rows as the posting template writes them.
    ``keys=False``: the schema before 0017 (no key table)."""
    start = _month_start(MONTHS - 1) + timedelta(hours=1)
    span = datetime.now(UTC) - timedelta(minutes=5) - start
    ids = [uuid.uuid4() for _ in range(accounts)]
    if keys and make_months:  # the past months' partitions, made by the owner
        for back in range(MONTHS):
            await conn.execute("SELECT creditgate_ledger_partition($1)", _month_start(back))
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO accounts (id, kind, external_id)"
            " SELECT id, 'user', 'gen-' || id::text FROM unnest($1::uuid[]) AS id",
            ids,
        )
        await conn.execute(
            """
            CREATE TEMP TABLE gen ON COMMIT DROP AS
            SELECT gen_random_uuid() AS id, a.id AS account_id, i,
                   CASE WHEN i = 0 THEN 'grant' ELSE 'debit' END AS kind,
                   CASE WHEN i = 0 THEN $2::bigint ELSE -(1000 + i)::bigint END AS amount,
                   CASE WHEN i = 0 THEN 'gen-grant-' || a.id::text
                        ELSE 'gen-debit-' || gen_random_uuid()::text END AS idempotency_key,
                   CASE WHEN i = 0 THEN NULL ELSE gen_random_uuid() END AS hold_id,
                   $3::timestamptz + $4::interval * i / GREATEST($5 - 1, 1) AS created_at
            FROM unnest($1::uuid[]) AS a(id), generate_series(0, $5 - 1) AS i
            """,
            ids,
            GRANT,
            start,
            span,
            per_account,
        )
        await conn.execute(
            "INSERT INTO holds (id, account_id, amount, created_at, expires_at, outcome, ended_at)"
            " SELECT hold_id, account_id, 5000, created_at, created_at + interval '1 minute',"
            " 'settled', created_at FROM gen WHERE hold_id IS NOT NULL"
        )
        if keys:
            await conn.execute(
                "INSERT INTO ledger_entry_keys (id, idempotency_key, hold_id, created_at)"
                " SELECT id, idempotency_key, hold_id, created_at FROM gen ORDER BY created_at, i"
            )
        # The grants' fingerprints are post_entry's, so a replay is recognised.
        await conn.execute(
            """
            INSERT INTO ledger_entries (id, account_id, kind, amount, idempotency_key,
                                        fingerprint, hold_id, reason, input_tokens,
                                        output_tokens, created_at, balance_after)
            SELECT id, account_id, kind, amount, idempotency_key,
                   CASE WHEN kind = 'grant' THEN fp.fingerprint ELSE '\\x00'::bytea END,
                   hold_id, 'generated', CASE WHEN kind = 'debit' THEN 10 END,
                   CASE WHEN kind = 'debit' THEN 20 END, created_at,
                   SUM(amount) OVER (PARTITION BY account_id ORDER BY i)
            FROM gen LEFT JOIN unnest($1::uuid[], $2::bytea[]) AS fp(account_id, fingerprint)
                USING (account_id)
            ORDER BY created_at, i
            """,
            ids,
            [_fingerprint(a, "grant", GRANT, "generated", None) for a in ids],
        )
        await conn.execute(
            "UPDATE account_balances b SET balance = s.total"
            " FROM (SELECT account_id, SUM(amount) AS total FROM gen GROUP BY account_id) s"
            " WHERE b.account_id = s.account_id"
        )
    return ids


async def _partition_of_oldest_month(db: asyncpg.Pool) -> str:
    name: str = await db.fetchval(
        "SELECT tableoid::regclass::text FROM ledger_entries ORDER BY created_at LIMIT 1"
    )
    return name


async def _clean(db: asyncpg.Pool) -> None:
    report = await ledger.verify_incremental(db)
    assert report.ok, report.problems
    report = await ledger.verify_ledger(db)
    assert report.ok, report.problems
    assert not [w for w in report.warnings if "DEFAULT" in w["warning"]]


def _problems(report: ledger.Report) -> set[str]:
    return {p["problem"].split(" (")[0] for p in report.problems}


async def test_a_generated_ledger_lands_in_its_months_and_adds_up(scratch: Scratch) -> None:
    db = scratch.owner
    async with db.acquire() as conn:
        await generate(conn, accounts=20, per_account=30)
    spread = await db.fetch(
        "SELECT tableoid::regclass::text AS part, count(*) FROM ledger_entries GROUP BY 1"
    )
    assert len(spread) == MONTHS, spread
    assert all(r["part"].startswith("ledger_entries_p") for r in spread)
    assert await db.fetchval("SELECT count(*) FROM ledger_entries_default") == 0
    full = await ledger.verify_ledger(db)
    assert full.ok and full.entries == 600, full.problems
    await _clean(db)


async def test_rows_of_a_month_never_made_land_in_default_and_verify_warns(
    scratch: Scratch,
) -> None:
    db = scratch.owner
    async with db.acquire() as conn:
        await generate(conn, accounts=2, per_account=10, make_months=False)
    stray = await db.fetchval("SELECT count(*) FROM ledger_entries_default")
    assert stray > 0  # no insert failed for want of a partition
    report = await ledger.verify_ledger(db)
    assert report.ok, report.problems
    assert [w["rows"] for w in report.warnings if "DEFAULT" in w["warning"]] == [stray]
    # The month cannot be made while the DEFAULT partition holds rows of it.
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("SELECT creditgate_ledger_partition($1)", _month_start(MONTHS - 1))


async def test_incremental_verify_reads_only_what_is_new(scratch: Scratch) -> None:
    db = scratch.owner
    async with db.acquire() as conn:
        (a, *_) = await generate(conn, accounts=10, per_account=50)
    first = await ledger.verify_incremental(db)
    assert first.ok and (first.mode, first.entries) == ("full", 500)
    for _ in range(3):
        hold = uuid.uuid4()
        await ledger.reserve_hold(db, hold_id=hold, account_id=a, amount=5_000, ttl_seconds=60)
        await ledger.settle_hold(db, hold, ledger.Usage(10, 20, 1_500))
    second = await ledger.verify_incremental(db)
    assert second.ok, second.problems
    assert (second.mode, second.entries, second.checkpointed_entries) == ("incremental", 3, 500)
    await _clean(db)


async def test_full_verify_finds_an_entry_tampered_in_an_old_partition(scratch: Scratch) -> None:
    db = scratch.owner
    async with db.acquire() as conn:
        await generate(conn, accounts=5, per_account=40)
    assert (await ledger.verify_incremental(db)).ok
    oldest = await _partition_of_oldest_month(db)
    assert oldest != await db.fetchval(
        "SELECT tableoid::regclass::text FROM ledger_entries ORDER BY created_at DESC LIMIT 1"
    )
    # The owner, triggers off on that partition alone, rewrites an old debit.
    await db.execute(f"ALTER TABLE {oldest} DISABLE TRIGGER ledger_entries_append_only")
    mid = await ledger.verify_incremental(db)
    assert "a partition of ledger_entries lacks a guard" in _problems(mid)
    assert any(p.get("partition") == oldest for p in mid.problems)
    await db.execute(
        f"UPDATE {oldest} SET amount = amount - 1"
        f" WHERE id = (SELECT id FROM {oldest} WHERE kind = 'debit' ORDER BY seq LIMIT 1)"
    )
    await db.execute(f"ALTER TABLE {oldest} ENABLE TRIGGER ledger_entries_append_only")
    # Old entries are the full scan's (documented): incremental is clean again.
    assert (await ledger.verify_incremental(db)).ok
    found = _problems(await ledger.verify_ledger(db))
    assert "balance row differs from the ledger" in found
    assert any(p.startswith("running balance broken") for p in found)


async def test_partitions_are_made_ahead_by_the_serving_role(scratch: Scratch) -> None:
    db = scratch.owner
    have = await db.fetchval("SELECT count(*) FROM ledger_partitions")
    app = await asyncpg.connect(scratch.app_url)
    try:
        # The migration made this month and twelve ahead; two more months:
        assert await partitions.ensure_ahead(app, months=14) == 2
        assert await partitions.ensure_ahead(app, months=14) == 0
        # The serving role runs the owner's function; it cannot make one itself.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.execute(
                "CREATE TABLE cg_mine PARTITION OF ledger_entries"
                " FOR VALUES FROM ('2100-01-01') TO ('2100-02-01')"
            )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.execute("SELECT creditgate_ledger_partition('2100-01-01')")
    finally:
        await app.close()
    assert await db.fetchval("SELECT count(*) FROM ledger_partitions") == have + 2
    newest = _month_start(-14)
    name = f"ledger_entries_p{newest:%Y%m}"
    row = await db.fetchrow(
        "SELECT c.relowner = (SELECT relowner FROM pg_class WHERE relname = 'ledger_entries')"
        " AS owners_own,"
        " EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid"
        "         AND t.tgname = 'ledger_entries_no_truncate') AS truncate_guard,"
        " EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid"
        "         AND t.tgname = 'ledger_entries_append_only') AS append_only"
        " FROM pg_class c WHERE c.relname = $1",
        name,
    )
    assert row is not None and row["owners_own"] and row["truncate_guard"] and row["append_only"]
    await _clean(db)


async def test_a_key_replayed_months_later_is_still_a_replay(scratch: Scratch) -> None:
    db = scratch.owner
    async with db.acquire() as conn:
        (a, b) = await generate(conn, accounts=2, per_account=20)
    oldest = await _partition_of_oldest_month(db)
    grant_part = await db.fetchval(
        "SELECT tableoid::regclass::text FROM ledger_entries WHERE idempotency_key = $1",
        f"gen-grant-{a}",
    )
    assert grant_part == oldest
    before = await db.fetchrow(
        "SELECT (SELECT count(*) FROM ledger_entries) AS n,"
        " (SELECT balance FROM account_balances WHERE account_id = $1) AS balance",
        a,
    )
    again = await ledger.post_entry(
        db,
        account_id=a,
        amount=GRANT,
        kind="grant",
        idempotency_key=f"gen-grant-{a}",
        reason="generated",
    )
    assert again.replayed and again.amount == GRANT
    with pytest.raises(ledger.IdempotencyConflict):
        await ledger.post_entry(
            db,
            account_id=a,
            amount=GRANT + 1,
            kind="grant",
            idempotency_key=f"gen-grant-{a}",
            reason="generated",
        )
    # A hold settled months ago: settling it again debits nothing more.
    hold = await db.fetchval(
        f"SELECT hold_id FROM {oldest} WHERE account_id = $1 AND kind = 'debit'"
        " ORDER BY seq LIMIT 1",
        b,
    )
    settled = await ledger.settle_hold(db, hold, ledger.Usage(10, 20, 1_001))
    assert settled.replayed
    # A second debit of that hold, written as the template writes: refused by its key.
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(
            "INSERT INTO ledger_entry_keys (id, idempotency_key, hold_id) VALUES ($1, $2, $3)",
            uuid.uuid4(),
            f"another-{uuid.uuid4()}",
            hold,
        )
    after = await db.fetchrow(
        "SELECT (SELECT count(*) FROM ledger_entries) AS n,"
        " (SELECT balance FROM account_balances WHERE account_id = $1) AS balance",
        a,
    )
    assert after == before
    await _clean(db)


async def test_the_serving_role_cannot_detach_or_truncate_a_partition(scratch: Scratch) -> None:
    db = scratch.owner
    async with db.acquire() as conn:
        await generate(conn, accounts=3, per_account=12)
    oldest = await _partition_of_oldest_month(db)
    app = await asyncpg.connect(scratch.app_url)
    try:
        for sql in (
            f"ALTER TABLE ledger_entries DETACH PARTITION {oldest}",
            f"TRUNCATE {oldest}",
            f"DELETE FROM {oldest}",
            f"UPDATE {oldest} SET amount = amount",
            f"INSERT INTO {oldest} SELECT * FROM {oldest} LIMIT 1",
            f"DROP TABLE {oldest}",
            f"ALTER TABLE {oldest} DISABLE TRIGGER ALL",
            "TRUNCATE ledger_entry_keys",
            "DELETE FROM ledger_entry_keys",
            "DELETE FROM ledger_partitions",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await app.execute(sql)
        assert await app.fetchval("SELECT count(*) FROM ledger_entries") > 0  # reads are fine
    finally:
        await app.close()
    # The owner's TRUNCATE of one partition meets the partition's own guard.
    with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
        await db.execute(f"TRUNCATE {oldest}")
    with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
        await db.execute("TRUNCATE ledger_entry_keys CASCADE")
    await _clean(db)
    # The owner can detach; verify says so, and the full scan misses the rows.
    await db.execute(f"ALTER TABLE ledger_entries DETACH PARTITION {oldest}")
    report = await ledger.verify_incremental(db)
    assert "a partition of ledger_entries is not attached as made" in _problems(report)
    full = _problems(await ledger.verify_ledger(db))
    assert "a partition of ledger_entries is not attached as made" in full
    assert "an entry and its key row" in full


async def test_retention_prunes_only_what_its_rules_name(scratch: Scratch) -> None:
    db = scratch.owner
    async with db.acquire() as conn:
        await generate(conn, accounts=4, per_account=25)
    counts = await db.fetchrow(
        "SELECT (SELECT count(*) FROM ledger_entries) AS entries,"
        " (SELECT count(*) FROM ledger_entry_keys) AS keys,"
        " (SELECT count(*) FROM holds) AS holds"
    )
    old = datetime.now(UTC) - timedelta(days=200)
    for status in ("processed", "pending"):
        await db.execute(
            "INSERT INTO webhook_events (source, webhook_id, event_type, facts, received_at,"
            " status) VALUES ('polar', $1, 'order.paid', '{}', $2, $3)",
            f"msg_{uuid.uuid4().hex}",
            old,
            status,
        )
    done = await prune(db, RetentionConfig(), now=datetime.now(UTC) + timedelta(days=3650))
    assert done == {"webhook_events": 1, "low_balance_alerts": 0, "holds": 0}
    assert await db.fetchval("SELECT count(*) FROM webhook_events") == 1  # the pending one
    after = await db.fetchrow(
        "SELECT (SELECT count(*) FROM ledger_entries) AS entries,"
        " (SELECT count(*) FROM ledger_entry_keys) AS keys,"
        " (SELECT count(*) FROM holds) AS holds"
    )
    assert after == counts
    await _clean(db)


async def test_migration_0017_keeps_an_existing_ledger(services: Services) -> None:
    """Entries written before 0017 are copied in place: same rows, seq continuing,
    foreign keys to entries re-pointed, replays recognised, verify clean."""
    name, owner_url = await create_database(services, "cg_part_mig")
    shipped = migrations.available()
    try:
        conn = await asyncpg.connect(owner_url)
        try:
            before = [m for m in shipped if m.version < 17]
            await _migrate(conn, before)
            (a, b) = await generate(conn, accounts=2, per_account=15, keys=False)
            rows = await conn.fetch(
                "SELECT id, seq, account_id, amount, created_at, tx_id FROM ledger_entries"
                " ORDER BY seq"
            )
            await _migrate(conn, shipped)
            assert (
                await conn.fetch(
                    "SELECT id, seq, account_id, amount, created_at, tx_id FROM ledger_entries"
                    " ORDER BY seq"
                )
                == rows
            )
            assert await conn.fetchval("SELECT count(DISTINCT tableoid) FROM ledger_entries") == (
                MONTHS
            )
            refs = await conn.fetch(
                "SELECT DISTINCT confrelid::regclass::text AS target FROM pg_constraint"
                " WHERE contype = 'f' AND conname NOT LIKE 'ledger_entries_%'"
                " AND confrelid IN ('ledger_entries'::regclass, 'ledger_entry_keys'::regclass)"
            )
            assert [r["target"] for r in refs] == ["ledger_entry_keys"]
            expires = datetime.now(UTC) + timedelta(days=30)
            lot = await ledger.post_entry(
                conn,
                account_id=a,
                amount=1_000,
                kind="grant",
                idempotency_key="after-0017",
                reason="t",
                expires_at=expires,
            )
            hold = uuid.uuid4()
            await ledger.reserve_hold(conn, hold_id=hold, account_id=a, amount=900, ttl_seconds=60)
            await ledger.settle_hold(conn, hold, ledger.Usage(1, 1, 800))
            assert (
                await conn.fetchval("SELECT seq FROM ledger_entries WHERE id = $1", lot.entry_id)
                > (rows[-1]["seq"])
            )
            replay = await ledger.post_entry(
                conn,
                account_id=b,
                amount=GRANT,
                kind="grant",
                idempotency_key=f"gen-grant-{b}",
                reason="generated",
            )
            assert replay.replayed
            for report in (await ledger.verify_ledger(conn), await ledger.verify_incremental(conn)):
                assert report.ok, report.problems
        finally:
            await conn.close()
    finally:
        await drop_database(services, name)


async def _migrate(conn: asyncpg.Connection, shipped: list[migrations.Migration]) -> None:
    """Apply ``shipped`` (a prefix of the package's migrations) as the runner does."""
    from unittest import mock

    with mock.patch.object(migrations, "available", lambda: shipped):
        await migrations.migrate(conn)


async def test_the_server_makes_partitions_ahead_even_when_its_prune_fails(
    scratch: Scratch, settings: Settings, services: Services
) -> None:
    db = scratch.owner
    newest = f"ledger_entries_p{_month_start(-12):%Y%m}"  # the furthest month migrate made
    await db.execute(f'DROP TABLE "{newest}"')
    await db.execute("DELETE FROM ledger_partitions WHERE name = $1", newest)
    # The serving role may no longer delete webhook events: every prune fails.
    await db.execute(f'REVOKE DELETE ON webhook_events FROM "{services.app_role}"')
    fast = replace(settings.config, retention=RetentionConfig(interval_seconds=0.1))
    async with running(replace(settings, database_url=scratch.app_url, config=fast)):
        for _ in range(200):
            if await db.fetchval("SELECT 1 FROM ledger_partitions WHERE name = $1", newest):
                break
            await asyncio.sleep(0.05)
    guards = await db.fetchval(
        "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " WHERE c.relname = $1"
        " AND t.tgname IN ('ledger_entries_no_truncate', 'ledger_entries_append_only')",
        newest,
    )
    assert guards == 2, f"{newest} was not made again with its guards"
    await _clean(db)


async def test_checks_and_guards_hold_on_an_old_partition(scratch: Scratch) -> None:
    """Every CHECK of the parent is on each partition, and a row of an old month is
    refused a bad value and an UPDATE or DELETE even by the owner, triggers on."""
    db = scratch.owner
    async with db.acquire() as conn:
        [account] = await generate(conn, accounts=1, per_account=10)
    oldest = await _partition_of_oldest_month(db)
    checks = (
        "SELECT array_agg(conname::text ORDER BY conname) FROM pg_constraint"
        " WHERE conrelid = $1::regclass AND contype = 'c'"
    )
    parent = await db.fetchval(checks, "ledger_entries")
    assert len(parent) >= 8 and await db.fetchval(checks, oldest) == parent
    when = _month_start(MONTHS - 1) + timedelta(days=2)
    # A negative grant; an expiry date on a debit.
    for kind, amount, expires in (("grant", -5, None), ("debit", -5, when)):
        # Routed by the parent, or written to the partition itself (which has no
        # identity of its own: the seq is given).
        for table, seq_col, seq in (("ledger_entries", "", ""), (oldest, ", seq", ", 10000000")):
            with pytest.raises(asyncpg.CheckViolationError):
                await db.execute(
                    f"INSERT INTO {table} (id, account_id, kind, amount, idempotency_key,"
                    f" fingerprint, hold_id, expires_at, created_at, balance_after{seq_col})"
                    f" VALUES ($1, $2, $3, $4, $5, '\\x00', $6, $7, $8, 0{seq})",
                    uuid.uuid4(),
                    account,
                    kind,
                    amount,
                    f"bad-{uuid.uuid4()}",
                    uuid.uuid4() if kind == "debit" else None,
                    expires,
                    when,
                )
    row = await db.fetchval(f"SELECT id FROM {oldest} WHERE kind = 'debit' LIMIT 1")
    for statement in (
        f"UPDATE {oldest} SET amount = amount - 1 WHERE id = $1",
        f"DELETE FROM {oldest} WHERE id = $1",
        "UPDATE ledger_entries SET reason = 'edited' WHERE id = $1",
    ):
        with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
            await db.execute(statement, row)
    await _clean(db)
