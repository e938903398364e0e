"""Group commit: batched reserves and settles behave as the calls one by one would.

With ``lanes=1`` the first call of a burst runs alone and the rest wait for it,
then run as one batch — so each test knows exactly which calls were batched.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import asyncpg
import orjson
import pytest

from creditgate import ledger
from creditgate.ledger.errors import CreditsExhausted, HoldEnded
from creditgate.ledger.group_commit import GroupCommit


async def account_with(db: asyncpg.Pool, micros: int) -> uuid.UUID:
    acct = await ledger.ensure_account(db, "user", f"user_{uuid.uuid4().hex}")
    if micros:
        await ledger.post_entry(
            db,
            account_id=acct.id,
            amount=micros,
            kind="grant",
            idempotency_key=f"t:{uuid.uuid4()}",
            reason="test",
        )
    return acct.id


async def balance(db: asyncpg.Pool, acct: uuid.UUID) -> tuple[int, int]:
    row = await db.fetchrow(
        "SELECT balance, reserved FROM account_balances WHERE account_id = $1", acct
    )
    return row["balance"], row["reserved"]


async def outcome(coro: object) -> object:
    try:
        return await coro  # type: ignore[misc]
    except (CreditsExhausted, HoldEnded) as e:
        return type(e)


async def test_batched_reserves_grant_what_fits_in_arrival_order(db: asyncpg.Pool) -> None:
    acct = await account_with(db, 1000)
    gc = GroupCommit(db, lanes=1)
    amounts = [600, 300, 300, 100, 50]  # one by one: yes, yes, no, yes, no
    ids = [uuid.uuid4() for _ in amounts]
    results = await asyncio.gather(
        *(
            outcome(gc.reserve(hold_id=i, account_id=acct, amount=a, ttl_seconds=60))
            for i, a in zip(ids, amounts, strict=True)
        )
    )
    assert [r if isinstance(r, type) else r.amount for r in results] == [  # type: ignore[union-attr]
        600,
        300,
        CreditsExhausted,
        100,
        CreditsExhausted,
    ]
    assert gc.batched_calls == 1  # the 300 that fit the batch's prefix; the rest retried alone
    assert await balance(db, acct) == (1000, 1000)
    for i, r in zip(ids, results, strict=True):
        if not isinstance(r, type):
            await ledger.release_hold(db, i)


async def test_batched_settles_chain_the_running_balance(db: asyncpg.Pool) -> None:
    acct = await account_with(db, 10_000)
    gc = GroupCommit(db, lanes=1)
    holds = [
        await ledger.reserve_hold(
            db, hold_id=uuid.uuid4(), account_id=acct, amount=500, ttl_seconds=60
        )
        for _ in range(12)
    ]
    costs = [random.randint(0, 500) for _ in holds]
    settled = await asyncio.gather(
        *(gc.settle(h.id, ledger.Usage(1, 1, c)) for h, c in zip(holds, costs, strict=True))
    )
    assert gc.batched_calls == 11 and gc.alone_calls == 1
    assert [s.debited for s in settled] == costs
    assert all(s.uncollected == 0 and not s.replayed for s in settled)
    assert await balance(db, acct) == (10_000 - sum(costs), 0)
    rows = await db.fetch(
        "SELECT id, amount, balance_after FROM ledger_entries WHERE account_id = $1 ORDER BY seq",
        acct,
    )
    running = 0
    for r in rows:
        running += r["amount"]
        assert r["balance_after"] == running
    # Each caller got its own entry.
    assert {s.entry_id for s in settled} == {r["id"] for r in rows[1:]}


async def test_a_batch_whose_debits_would_be_capped_settles_one_by_one(
    db: asyncpg.Pool,
) -> None:
    acct = await account_with(db, 100)
    other = await account_with(db, 1000)
    gc = GroupCommit(db, lanes=1)
    first = await ledger.reserve_hold(
        db, hold_id=uuid.uuid4(), account_id=other, amount=10, ttl_seconds=60
    )
    h1 = await ledger.reserve_hold(
        db, hold_id=uuid.uuid4(), account_id=acct, amount=50, ttl_seconds=60
    )
    h2 = await ledger.reserve_hold(
        db, hold_id=uuid.uuid4(), account_id=acct, amount=50, ttl_seconds=60
    )
    s0, s1, s2 = await asyncio.gather(
        gc.settle(first.id, ledger.Usage(1, 1, 5)),  # runs alone: the others batch
        gc.settle(h1.id, ledger.Usage(1, 1, 80)),  # over its hold, nothing else available
        gc.settle(h2.id, ledger.Usage(1, 1, 10)),
    )
    # One by one: h1 takes what its hold frees (50), 30 uncollected; h2 its 10.
    assert (s1.debited, s1.uncollected) == (50, 30)
    assert (s2.debited, s2.uncollected) == (10, 0)
    assert s0.debited == 5
    assert gc.batched_calls == 0
    assert await balance(db, acct) == (40, 0)


async def test_a_batch_answers_replays_conflicts_and_new_settles_alike(db: asyncpg.Pool) -> None:
    acct = await account_with(db, 10_000)
    gc = GroupCommit(db, lanes=1)
    done, released, live1, live2, first = [
        await ledger.reserve_hold(
            db, hold_id=uuid.uuid4(), account_id=acct, amount=100, ttl_seconds=60
        )
        for _ in range(5)
    ]
    before = await ledger.settle_hold(db, done.id, ledger.Usage(1, 1, 40))
    await ledger.release_hold(db, released.id)
    results = await asyncio.gather(
        outcome(gc.settle(first.id, ledger.Usage(1, 1, 1))),
        outcome(gc.settle(done.id, ledger.Usage(1, 1, 40))),
        outcome(gc.settle(released.id, ledger.Usage(1, 1, 40))),
        outcome(gc.settle(live1.id, ledger.Usage(1, 1, 70))),
        outcome(gc.settle(live2.id, ledger.Usage(1, 1, 30))),
    )
    replay, conflict = results[1], results[2]
    assert replay.entry_id == before.entry_id and replay.replayed  # type: ignore[union-attr]
    assert conflict is HoldEnded
    assert [r.debited for r in results[3:]] == [70, 30]  # type: ignore[union-attr]
    assert gc.batched_calls == 2
    assert await balance(db, acct) == (10_000 - 40 - 1 - 70 - 30, 0)


async def test_a_repeated_hold_id_in_one_batch_reserves_once(db: asyncpg.Pool) -> None:
    acct = await account_with(db, 1000)
    gc = GroupCommit(db, lanes=1)
    first, again = uuid.uuid4(), uuid.uuid4()
    holds = await asyncio.gather(
        gc.reserve(hold_id=first, account_id=acct, amount=10, ttl_seconds=60),
        gc.reserve(hold_id=again, account_id=acct, amount=200, ttl_seconds=60),
        gc.reserve(hold_id=again, account_id=acct, amount=200, ttl_seconds=60),
    )
    assert holds[1] == holds[2]
    assert await balance(db, acct) == (1000, 210)
    for h in (first, again):
        await ledger.release_hold(db, h)


async def test_a_reserve_whose_caller_left_holds_nothing(db: asyncpg.Pool) -> None:
    acct = await account_with(db, 1000)
    gc = GroupCommit(db, lanes=1)
    first = asyncio.ensure_future(
        gc.reserve(hold_id=uuid.uuid4(), account_id=acct, amount=10, ttl_seconds=60)
    )
    gone_id = uuid.uuid4()
    gone = asyncio.ensure_future(
        gc.reserve(hold_id=gone_id, account_id=acct, amount=20, ttl_seconds=60)
    )
    kept = asyncio.ensure_future(
        gc.reserve(hold_id=uuid.uuid4(), account_id=acct, amount=30, ttl_seconds=60)
    )
    await asyncio.sleep(0)  # queued behind the first
    gone.cancel()
    held = [await first, await kept]
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert await balance(db, acct) == (1000, 40)
    outcome_of_gone = await db.fetchval("SELECT outcome FROM holds WHERE id = $1", gone_id)
    assert outcome_of_gone in (None, "released")  # never created, or released at once
    for h in held:
        await ledger.release_hold(db, h.id)


async def test_many_concurrent_calls_on_tight_accounts_never_overspend(
    db: asyncpg.Pool,
) -> None:
    accounts = [await account_with(db, 20_000) for _ in range(3)]
    gc = GroupCommit(db, lanes=3, max_batch=16)
    charged: list[int] = []

    async def call(i: int) -> None:
        acct = accounts[i % 3]
        try:
            hold = await gc.reserve(
                hold_id=uuid.uuid4(), account_id=acct, amount=1000, ttl_seconds=60
            )
        except CreditsExhausted:
            return
        await asyncio.sleep(random.random() / 100)
        # Some calls cost more than they held (the upstream ignored max_tokens).
        s = await gc.settle(hold.id, ledger.Usage(1, 1, random.choice([0, 400, 1000, 1500])))
        charged.append(s.debited)

    await asyncio.gather(*(call(i) for i in range(150)))
    assert gc.batched_calls > 0
    rows = await db.fetch(
        "SELECT balance, reserved, overdraft_limit FROM account_balances"
        " WHERE account_id = ANY($1::uuid[])",
        accounts,
    )
    assert all(r["reserved"] == 0 and r["balance"] >= 0 for r in rows)
    assert sum(charged) == 60_000 - sum(r["balance"] for r in rows)


async def test_batched_settles_keep_each_calls_own_tokens_by_kind(db: asyncpg.Pool) -> None:
    """The batch statement's breakdown array lines up with its holds (issue 17)."""
    acct = await account_with(db, 10_000)
    gc = GroupCommit(db, lanes=1)
    holds = [
        await ledger.reserve_hold(
            db, hold_id=uuid.uuid4(), account_id=acct, amount=500, ttl_seconds=60
        )
        for _ in range(12)
    ]
    usages = [
        ledger.Usage(
            100 + i,
            10 + i,
            i,
            # some calls without kinds: SQL NULL beside JSON in the same array
            breakdown=None
            if i % 4 == 0
            else (("input", 100 + i), ("output", 10 + i), ("reasoning", i)),
        )
        for i in range(12)
    ]
    settled = await asyncio.gather(
        *(gc.settle(h.id, u) for h, u in zip(holds, usages, strict=True))
    )
    assert gc.batched_calls == 11
    for s, u in zip(settled, usages, strict=True):
        stored = await db.fetchval("SELECT breakdown FROM ledger_entries WHERE id = $1", s.entry_id)
        assert (orjson.loads(stored) if stored is not None else None) == (
            dict(u.breakdown) if u.breakdown is not None else None
        )
