"""Incremental ``verify`` (issue 19): it reads what is new since its checkpoint.

Each test has a migrated database of its own, since several tamper with the
ledger as the owner would (triggers disabled): the session's must stay clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from creditgate import ledger
from tests.conftest import Services
from tests.scratch_db import Scratch, scratch_ledger


@pytest.fixture
async def scratch(services: Services) -> AsyncIterator[Scratch]:
    async with scratch_ledger(services, "cg_verify") as db:
        yield db


async def _account(db: asyncpg.Pool, name: str, credits: int = 100) -> uuid.UUID:
    acct = await ledger.ensure_account(db, "user", name)
    await ledger.post_entry(
        db,
        account_id=acct.id,
        amount=credits * 1_000_000,
        kind="grant",
        idempotency_key=f"grant-{name}",
        reason="test",
    )
    return acct.id


async def _calls(db: asyncpg.Pool, account: uuid.UUID, n: int) -> None:
    """``n`` metered calls: a hold each, settled (a debit) or released."""
    for i in range(n):
        hold = uuid.uuid4()
        await ledger.reserve_hold(
            db, hold_id=hold, account_id=account, amount=5_000, ttl_seconds=60
        )
        if i % 3 == 2:
            await ledger.release_hold(db, hold)
        else:
            await ledger.settle_hold(db, hold, ledger.Usage(10, 20, 1_000 + i))


def _problems(report: ledger.Report) -> set[str]:
    return {p["problem"].split(" (")[0] for p in report.problems}


async def test_first_run_is_full_then_only_new_entries_are_read(scratch: Scratch) -> None:
    db = scratch.owner
    a, b = await _account(db, "user_a"), await _account(db, "user_b")
    await _calls(db, a, 9)  # 6 debits
    first = await ledger.verify_incremental(db)
    assert first.ok, first.problems
    assert (first.mode, first.entries, first.checkpoint_advanced) == ("full", 8, True)

    await _calls(db, b, 6)  # 4 debits
    await ledger.post_entry(
        db, account_id=a, amount=-7, kind="adjustment", idempotency_key="adj", reason="t"
    )
    second = await ledger.verify_incremental(db)
    assert second.ok, second.problems
    assert second.mode == "incremental"
    assert (second.entries, second.checkpointed_entries) == (5, 8)

    third = await ledger.verify_incremental(db)
    assert third.ok and (third.entries, third.checkpointed_entries) == (0, 13)
    full = await ledger.verify_ledger(db)
    assert full.ok and full.entries == 13


async def test_an_entry_in_flight_at_the_checkpoint_is_checked_by_the_next_run(
    scratch: Scratch,
) -> None:
    """seq order is not commit order across accounts: the xmin high-water mark covers it."""
    db = scratch.owner
    a, b = await _account(db, "user_a"), await _account(db, "user_b")
    assert (await ledger.verify_incremental(db)).ok
    async with db.acquire() as slow:
        tx = slow.transaction()
        await tx.start()
        # Written first (lower seq), committed last.
        await ledger.post_entry(
            slow, account_id=a, amount=3, kind="adjustment", idempotency_key="slow", reason="t"
        )
        await ledger.post_entry(
            db, account_id=b, amount=4, kind="adjustment", idempotency_key="fast", reason="t"
        )
        mid = await ledger.verify_incremental(db)
        assert mid.ok and mid.entries == 1 and mid.checkpoint_advanced
        await tx.commit()
    after = await ledger.verify_incremental(db)
    assert after.ok, after.problems
    assert after.entries >= 1  # the slow entry, never skipped
    assert (await ledger.verify_ledger(db)).ok


async def test_tampering_with_a_new_entry_is_found(scratch: Scratch) -> None:
    db = scratch.owner
    a = await _account(db, "user_a")
    assert (await ledger.verify_incremental(db)).ok
    await _calls(db, a, 3)
    await db.execute("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only")
    await db.execute(
        "UPDATE ledger_entries SET amount = amount - 1"
        " WHERE seq = (SELECT max(seq) FROM ledger_entries)"
    )
    await db.execute("ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_append_only")
    report = await ledger.verify_incremental(db)
    assert not report.ok and not report.checkpoint_advanced
    found = _problems(report)
    assert "balance row differs from the ledger" in found
    assert any(p.startswith("running balance broken") for p in found)
    # The checkpoint did not move: the next run still finds it.
    assert not (await ledger.verify_incremental(db)).ok


async def test_a_tampered_breakdown_of_a_new_debit_is_found(scratch: Scratch) -> None:
    db = scratch.owner
    a = await _account(db, "user_b")
    assert (await ledger.verify_incremental(db)).ok
    hold = uuid.uuid4()
    await ledger.reserve_hold(db, hold_id=hold, account_id=a, amount=5_000, ttl_seconds=60)
    kinds = (("input", 10), ("output", 20), ("cached_input", 4))
    await ledger.settle_hold(db, hold, ledger.Usage(10, 20, 1_000, breakdown=kinds))
    assert (await ledger.verify_incremental(db)).ok
    hold = uuid.uuid4()
    await ledger.reserve_hold(db, hold_id=hold, account_id=a, amount=5_000, ttl_seconds=60)
    await ledger.settle_hold(db, hold, ledger.Usage(10, 20, 1_000, breakdown=kinds))
    await db.execute("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only")
    await db.execute(
        """UPDATE ledger_entries SET breakdown = '{"input": 10, "output": 20, "cached_input": 11}'
        WHERE hold_id = $1""",
        hold,
    )
    await db.execute("ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_append_only")
    report = await ledger.verify_incremental(db)
    assert not report.ok and report.mode == "incremental"
    assert any("tokens by kind" in p["problem"] for p in report.problems)


async def test_old_entries_are_left_to_full(scratch: Scratch) -> None:
    """Documented: the incremental run does not re-read checkpointed entries."""
    db = scratch.owner
    a = await _account(db, "user_a")
    await _calls(db, a, 3)
    assert (await ledger.verify_incremental(db)).ok
    await db.execute("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only")
    await db.execute(
        "UPDATE ledger_entries SET reason = 'rewritten' WHERE seq = (SELECT min(seq) FROM"
        " ledger_entries)"
    )
    await db.execute(
        "UPDATE ledger_entries SET amount = amount + 1 WHERE seq = (SELECT min(seq) FROM"
        " ledger_entries)"
    )
    await db.execute("ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_append_only")
    assert (await ledger.verify_incremental(db)).ok
    full = await ledger.verify_ledger(db)
    assert "balance row differs from the ledger" in _problems(full)


async def test_a_balance_row_without_new_entries_is_still_checked(scratch: Scratch) -> None:
    db = scratch.owner
    a = await _account(db, "user_a")
    await _account(db, "user_b")
    assert (await ledger.verify_incremental(db)).ok
    await db.execute("UPDATE account_balances SET balance = balance + 1 WHERE account_id = $1", a)
    assert "balance row differs from the ledger" in _problems(await ledger.verify_incremental(db))


async def test_a_settled_hold_without_its_debit_is_found(scratch: Scratch) -> None:
    db = scratch.owner
    a = await _account(db, "user_a")
    assert (await ledger.verify_incremental(db)).ok
    # A call "settled" with nothing charged: no entry is new, the hold is.
    await db.execute(
        "INSERT INTO holds (id, account_id, amount, expires_at, outcome, ended_at)"
        " VALUES ($1, $2, 5000, now() + interval '1 minute', 'settled', now())",
        uuid.uuid4(),
        a,
    )
    report = await ledger.verify_incremental(db)
    assert any(p.startswith("hold ended without exactly the debits") for p in _problems(report))


async def test_the_serving_role_verifies_but_never_moves_the_checkpoint(
    scratch: Scratch,
) -> None:
    db = scratch.owner
    a = await _account(db, "user_a")
    assert (await ledger.verify_incremental(db)).ok
    await _calls(db, a, 2)
    app = await asyncpg.connect(scratch.app_url)
    try:
        report = await ledger.verify_incremental(app)
        assert report.ok and report.entries == 2 and not report.checkpoint_advanced
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.execute("UPDATE verify_account_checkpoints SET balance = 0")
    finally:
        await app.close()
    assert (await ledger.verify_incremental(db)).entries == 2


async def test_expiring_credits_are_checked_in_new_entries(scratch: Scratch) -> None:
    db = scratch.owner
    a = await _account(db, "user_a")
    assert (await ledger.verify_incremental(db)).ok
    await ledger.post_entry(
        db,
        account_id=a,
        amount=50_000,
        kind="grant",
        idempotency_key="lot",
        reason="t",
        expires_at=datetime(2100, 1, 1, tzinfo=UTC),
    )
    await _calls(db, a, 3)
    report = await ledger.verify_incremental(db)
    assert report.ok and report.entries == 3
    # A lot tampered with (remaining raised) after the checkpoint, used by a new debit.
    await db.execute("ALTER TABLE credit_lots DISABLE TRIGGER credit_lots_only_shrink")
    await db.execute("UPDATE credit_lots SET remaining = remaining + 1")
    await db.execute("ALTER TABLE credit_lots ENABLE TRIGGER credit_lots_only_shrink")
    await _calls(db, a, 1)
    assert any(
        p.startswith("credit lot does not add up")
        for p in _problems(await ledger.verify_incremental(db))
    )


def test_the_cli_advances_the_checkpoint_through_the_owner_url(scratch: Scratch) -> None:
    """``verify`` checks as DATABASE_URL; the owner's URL, when set, writes the checkpoint."""
    owner_url = scratch.owner_url

    def cli(*argv: str, **env: str) -> dict[str, object]:
        proc = subprocess.run(
            [sys.executable, "-m", "creditgate", "verify", "--json", *argv],
            env={**os.environ, "DATABASE_URL": scratch.app_url, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        report: dict[str, object] = json.loads(proc.stdout)
        return report

    first = cli()
    assert first["mode"] == "full" and first["checkpointAdvanced"] is False
    assert first["warnings"] == []
    second = cli(MIGRATE_DATABASE_URL=owner_url)
    assert second["mode"] == "full" and second["checkpointAdvanced"] is True
    assert second["warnings"] == []
    third = cli()
    assert third["mode"] == "incremental" and third["entries"] == 0
    full = cli("--full", MIGRATE_DATABASE_URL=owner_url)
    assert full["mode"] == "full" and full["checkpointAdvanced"] is True


async def test_a_hold_written_by_a_transaction_open_at_the_checkpoint_is_checked_next(
    scratch: Scratch,
) -> None:
    """The holds window opens at the oldest open transaction, whose holds it cannot see yet."""
    db = scratch.owner
    a = await _account(db, "user_a")
    assert (await ledger.verify_incremental(db)).ok
    async with db.acquire() as slow:
        tx = slow.transaction()
        await tx.start()
        await slow.execute("SELECT 1")  # the transaction (and its now()) begins
        # A hold "settled" with no debit (a bug), created_at = this transaction's start,
        # which is older than the checkpoint taken before it commits.
        await slow.execute(
            "INSERT INTO holds (id, account_id, amount, expires_at, outcome, ended_at)"
            " VALUES ($1, $2, 5000, now() + interval '1 minute', 'settled', now())",
            uuid.uuid4(),
            a,
        )
        await _calls(db, a, 1)
        mid = await ledger.verify_incremental(db)
        assert mid.ok and mid.checkpoint_advanced
        await tx.commit()
    report = await ledger.verify_incremental(db)
    assert any(p.startswith("hold ended without exactly the debits") for p in _problems(report))
