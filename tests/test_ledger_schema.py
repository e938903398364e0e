"""The database itself refuses what would break the ledger's invariants."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from creditgate import ledger


async def test_entries_are_append_only(db: asyncpg.Pool, customer_factory) -> None:
    c = await customer_factory(5)
    entry_id = await db.fetchval(
        "SELECT id FROM ledger_entries WHERE account_id = $1", c.account.id
    )
    with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
        await db.execute("UPDATE ledger_entries SET amount = 1 WHERE id = $1", entry_id)
    with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
        await db.execute("DELETE FROM ledger_entries WHERE id = $1", entry_id)
    with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
        await db.execute("TRUNCATE ledger_entries CASCADE")
    assert (
        await db.fetchval("SELECT amount FROM ledger_entries WHERE id = $1", entry_id) == 5_000_000
    )


async def test_a_hold_ends_once_and_changes_nothing_else(
    db: asyncpg.Pool, customer_factory
) -> None:
    c = await customer_factory(1)
    hold = await ledger.reserve_hold(
        db, hold_id=uuid.uuid4(), account_id=c.account.id, amount=100, ttl_seconds=60
    )
    with pytest.raises(asyncpg.RestrictViolationError, match="only be ended"):
        await db.execute("UPDATE holds SET amount = 1 WHERE id = $1", hold.id)
    with pytest.raises(asyncpg.RestrictViolationError):
        await db.execute("DELETE FROM holds WHERE id = $1", hold.id)
    assert await ledger.release_hold(db, hold.id)
    with pytest.raises(asyncpg.RestrictViolationError, match="already ended"):
        await db.execute(
            "UPDATE holds SET outcome = 'settled', ended_at = now() WHERE id = $1", hold.id
        )


async def test_check_refuses_overspend_whatever_the_application_does(
    db: asyncpg.Pool, customer_factory
) -> None:
    c = await customer_factory(1)
    with pytest.raises(asyncpg.CheckViolationError, match="available_within_overdraft"):
        await db.execute(
            "UPDATE account_balances SET reserved = reserved + 1000001 WHERE account_id = $1",
            c.account.id,
        )


async def test_every_account_gets_one_balance_row(db: asyncpg.Pool) -> None:
    import asyncio

    external = f"user_{uuid.uuid4().hex}"
    accounts = await asyncio.gather(
        *(ledger.ensure_account(db, "user", external) for _ in range(10))
    )
    assert len({a.id for a in accounts}) == 1
    assert (
        await db.fetchval(
            "SELECT count(*) FROM account_balances WHERE account_id = $1", accounts[0].id
        )
        == 1
    )


async def test_reserve_settle_release_basics(db: asyncpg.Pool, customer_factory) -> None:
    c = await customer_factory("0.001")  # 1000 µc
    h = await ledger.reserve_hold(
        db, hold_id=uuid.uuid4(), account_id=c.account.id, amount=800, ttl_seconds=60
    )
    # A repeat of the same hold id reserves nothing more.
    again = await ledger.reserve_hold(
        db, hold_id=h.id, account_id=c.account.id, amount=800, ttl_seconds=60
    )
    assert again == h
    with pytest.raises(ledger_errors().CreditsExhausted):
        await ledger.reserve_hold(
            db, hold_id=uuid.uuid4(), account_id=c.account.id, amount=201, ttl_seconds=60
        )
    s = await ledger.settle_hold(db, h.id, ledger.Usage(10, 10, 300))
    assert (s.debited, s.uncollected, s.replayed) == (300, 0, False)
    replay = await ledger.settle_hold(db, h.id, ledger.Usage(10, 10, 300))
    assert (replay.entry_id, replay.debited, replay.replayed) == (s.entry_id, 300, True)
    bal = await ledger.get_balance(db, c.account.id)
    assert (bal.balance, bal.reserved) == (700, 0)


def ledger_errors():
    from creditgate.ledger import errors

    return errors
