"""Expiring credits: which credits a debit uses, and what expires (ARCHITECTURE.md)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from creditgate import ledger

C = 1_000_000  # µc per credit


async def grant(
    db: asyncpg.Pool, account_id: uuid.UUID, credits: int, expires_at: datetime | None = None
) -> uuid.UUID:
    posted = await ledger.post_entry(
        db,
        account_id=account_id,
        amount=credits * C,
        kind="grant",
        idempotency_key=f"t:{uuid.uuid4()}",
        reason="test",
        expires_at=expires_at,
    )
    return posted.entry_id


async def spend(db: asyncpg.Pool, account_id: uuid.UUID, micros: int) -> uuid.UUID:
    """One call: reserve exactly its cost, settle it."""
    hold = await ledger.reserve_hold(
        db, hold_id=uuid.uuid4(), account_id=account_id, amount=micros, ttl_seconds=600
    )
    s = await ledger.settle_hold(db, hold.id, ledger.Usage(1, 1, micros))
    return s.entry_id


async def lots(db: asyncpg.Pool, account_id: uuid.UUID) -> dict[uuid.UUID, int]:
    rows = await db.fetch("SELECT id, remaining FROM credit_lots WHERE account_id = $1", account_id)
    return {r["id"]: r["remaining"] for r in rows}


async def new_account(db: asyncpg.Pool) -> uuid.UUID:
    return (await ledger.ensure_account(db, "user", f"user_{uuid.uuid4().hex}")).id


def days(n: float) -> datetime:
    return datetime.now(UTC) + timedelta(days=n)


async def test_a_debit_uses_the_soonest_expiring_credits_first(db: asyncpg.Pool) -> None:
    acct = await new_account(db)
    await grant(db, acct, 100)  # never expires: used last
    later = await grant(db, acct, 100, days(30))
    sooner = await grant(db, acct, 100, days(7))
    entry = await spend(db, acct, 150 * C)
    assert await lots(db, acct) == {sooner: 0, later: 50 * C}
    uses = await db.fetch(
        "SELECT lot_id, amount FROM credit_lot_uses WHERE entry_id = $1 ORDER BY amount DESC",
        entry,
    )
    assert [(u["lot_id"], u["amount"]) for u in uses] == [(sooner, 100 * C), (later, 50 * C)]
    # Past every lot, the credits that never expire pay.
    await spend(db, acct, 100 * C)
    assert await lots(db, acct) == {sooner: 0, later: 0}
    assert (await ledger.get_balance(db, acct)).balance == 50 * C


async def test_the_remainder_expires_once_even_with_many_sweepers(db: asyncpg.Pool) -> None:
    acct = await new_account(db)
    await grant(db, acct, 10)
    lot = await grant(db, acct, 30, datetime.now(UTC) - timedelta(seconds=1))  # already due
    await spend(db, acct, 12 * C)  # 12 of the lot's 30 used
    results = await asyncio.gather(*(ledger.expire_lot(db, lot) for _ in range(6)))
    assert sorted(results) == [0, 0, 0, 0, 0, 18 * C]
    assert await lots(db, acct) == {lot: 0}
    rows = await db.fetch(
        "SELECT amount, lot_id, reason FROM ledger_entries WHERE account_id = $1"
        " AND kind = 'expiry'",
        acct,
    )
    assert [(r["amount"], r["lot_id"]) for r in rows] == [(-18 * C, lot)]
    assert (await ledger.get_balance(db, acct)).balance == 10 * C


async def test_a_lot_not_yet_due_does_not_expire(db: asyncpg.Pool) -> None:
    acct = await new_account(db)
    lot = await grant(db, acct, 5, days(1))
    assert await ledger.expire_lot(db, lot) == 0
    assert await lots(db, acct) == {lot: 5 * C}


async def test_credits_backing_a_live_hold_expire_only_after_it_ends(db: asyncpg.Pool) -> None:
    acct = await new_account(db)
    lot = await grant(db, acct, 100, datetime.now(UTC) - timedelta(seconds=1))
    hold = await ledger.reserve_hold(
        db, hold_id=uuid.uuid4(), account_id=acct, amount=80 * C, ttl_seconds=600
    )
    # Only what no hold backs is written off now.
    assert await ledger.expire_lot(db, lot) == 20 * C
    # The call that held the rest is charged from the (overdue) lot...
    await ledger.settle_hold(db, hold.id, ledger.Usage(1, 1, 30 * C))
    assert await lots(db, acct) == {lot: 50 * C}
    # ...and the rest of the lot goes at the next sweep.
    assert await ledger.expire_lot(db, lot) == 50 * C
    bal = await ledger.get_balance(db, acct)
    assert (bal.balance, bal.reserved) == (0, 0)


async def test_a_grant_into_debt_pays_the_debt_first(db: asyncpg.Pool) -> None:
    acct = await new_account(db)
    await ledger.set_overdraft_limit(db, acct, 50 * C)
    await spend(db, acct, 40 * C)  # balance -40 (overdraft)
    lot = await grant(db, acct, 100, days(3))
    row = await db.fetchrow(
        "SELECT granted, initial, remaining FROM credit_lots WHERE id = $1", lot
    )
    assert dict(row) == {"granted": 100 * C, "initial": 60 * C, "remaining": 60 * C}
    bal = await ledger.get_balance(db, acct)
    assert bal.balance == 60 * C


async def test_a_refund_entry_also_uses_soonest_expiring_credits(db: asyncpg.Pool) -> None:
    acct = await new_account(db)
    lot = await grant(db, acct, 10, days(1))
    await grant(db, acct, 10)
    await ledger.post_entry(
        db,
        account_id=acct,
        amount=-4 * C,
        kind="reversal",
        idempotency_key=f"t:{uuid.uuid4()}",
        reason="refund",
    )
    assert await lots(db, acct) == {lot: 6 * C}


async def test_overdraft_limit_is_settable_and_never_below_what_is_used(db: asyncpg.Pool) -> None:
    acct = await new_account(db)
    await grant(db, acct, 1)
    with pytest.raises(ledger_errors().CreditsExhausted):
        await spend(db, acct, 2 * C)
    assert await ledger.set_overdraft_limit(db, acct, 2 * C) == 2 * C
    await spend(db, acct, 2 * C)  # available -1 now
    with pytest.raises(ledger_errors().OverdraftInUse):
        await ledger.set_overdraft_limit(db, acct, C // 2)
    assert await ledger.set_overdraft_limit(db, acct, C) == C
    with pytest.raises(ledger_errors().AccountNotFound):
        await ledger.set_overdraft_limit(db, uuid.uuid4(), 0)


# ---------------------------------------------------------------- the database refuses


async def test_database_refuses_to_bend_lots(db: asyncpg.Pool) -> None:
    acct = await new_account(db)
    lot = await grant(db, acct, 10, days(1))
    await spend(db, acct, C)
    with pytest.raises(asyncpg.RestrictViolationError, match="only shrink"):
        await db.execute("UPDATE credit_lots SET remaining = remaining + 1 WHERE id = $1", lot)
    with pytest.raises(asyncpg.RestrictViolationError, match="only shrink"):
        await db.execute("UPDATE credit_lots SET expires_at = now() WHERE id = $1", lot)
    with pytest.raises(asyncpg.RestrictViolationError):
        await db.execute("DELETE FROM credit_lots WHERE id = $1", lot)
    for sql in (
        "UPDATE credit_lot_uses SET amount = 1 WHERE lot_id = $1",
        "DELETE FROM credit_lot_uses WHERE lot_id = $1",
    ):
        with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
            await db.execute(sql, lot)
    with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
        await db.execute("TRUNCATE credit_lot_uses CASCADE")
    with pytest.raises(asyncpg.RestrictViolationError):
        await db.execute("TRUNCATE credit_lots CASCADE")


async def _raw_entry(db: asyncpg.Pool, acct: uuid.UUID, **cols: object) -> None:
    values = {
        "id": uuid.uuid4(),
        "account_id": acct,
        "idempotency_key": f"raw:{uuid.uuid4()}",
        "fingerprint": b"x",
        **cols,
    }
    names = ", ".join(values)
    marks = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    # An entry needs its key row (migration 0017), written in the same statement.
    await db.execute(
        f"WITH k AS (INSERT INTO ledger_entry_keys (id, idempotency_key) VALUES ($1, $3))"
        f" INSERT INTO ledger_entries ({names}) VALUES ({marks})",
        *values.values(),
    )


async def test_database_refuses_entries_that_break_the_rules(db: asyncpg.Pool) -> None:
    acct = await new_account(db)
    lot = await grant(db, acct, 10, days(1))
    # An expiry before the lot is due, or of more than it holds.
    with pytest.raises(asyncpg.CheckViolationError, match="does not fit lot"):
        await _raw_entry(db, acct, kind="expiry", amount=-C, lot_id=lot, balance_after=9 * C)
    # Every new entry records the balance after it.
    with pytest.raises(asyncpg.CheckViolationError, match="balance_after_recorded"):
        await _raw_entry(db, acct, kind="adjustment", amount=C)
    # A debit always belongs to a hold; only a grant can expire.
    with pytest.raises(asyncpg.CheckViolationError, match="debit_has_hold"):
        await _raw_entry(db, acct, kind="debit", amount=-1, balance_after=0)
    with pytest.raises(asyncpg.CheckViolationError, match="expiry_only_on_grants"):
        await _raw_entry(
            db, acct, kind="adjustment", amount=C, balance_after=11 * C, expires_at=days(1)
        )
    assert await lots(db, acct) == {lot: 10 * C}


def ledger_errors():  # type: ignore[no-untyped-def]
    from creditgate.ledger import errors

    return errors
