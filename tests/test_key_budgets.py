"""Per-key budgets in the ledger: holds count against the key's period, settle,
release, expiry and the late debit move it, the batch reserve honours it, and
the period boundary is exact (the database's rule, at explicit instants)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from creditgate import ledger
from creditgate.auth import create_api_key
from creditgate.ledger import budgets
from creditgate.ledger.errors import CreditsExhausted, KeyBudgetExceeded
from creditgate.ledger.group_commit import GroupCommit
from tests.conftest import Services


async def _keyed_account(
    db: asyncpg.Pool | asyncpg.Connection,
    credits: int,
    budget: int | None,
    period: str | None = None,
) -> tuple[uuid.UUID, uuid.UUID]:
    account = await ledger.ensure_account(db, "user", f"user_{uuid.uuid4().hex}")
    if credits:
        await ledger.post_entry(
            db,
            account_id=account.id,
            amount=credits,
            kind="grant",
            idempotency_key=f"test:{uuid.uuid4()}",
            reason="test",
        )
    key = await create_api_key(db, account.id, "budgeted")
    if budget is not None:
        await budgets.set_key_budget(db, key.id, budget, period)
    return account.id, key.id


async def _reserve(
    db: asyncpg.Pool, account_id: uuid.UUID, key_id: uuid.UUID | None, amount: int
) -> ledger.Hold:
    return await ledger.reserve_hold(
        db,
        hold_id=uuid.uuid4(),
        account_id=account_id,
        amount=amount,
        ttl_seconds=60,
        key_id=key_id,
        budget_zone="Europe/Berlin",
    )


async def _state(db: asyncpg.Pool, key_id: uuid.UUID) -> budgets.KeyBudget:
    got = await budgets.key_budget(db, key_id, "Europe/Berlin")
    assert got is not None
    return got


async def test_holds_count_against_the_budget_and_settle_release_move_them(
    db: asyncpg.Pool,
) -> None:
    account_id, key_id = await _keyed_account(db, 10_000, 1_000, "day")
    a = await _reserve(db, account_id, key_id, 400)
    b = await _reserve(db, account_id, key_id, 400)
    s = await _state(db, key_id)
    assert (s.spent, s.reserved, s.remaining) == (0, 800, 200)
    with pytest.raises(KeyBudgetExceeded) as refused:
        await _reserve(db, account_id, key_id, 300)
    d = refused.value.details
    assert d["budgetMicros"] == 1_000 and d["spentMicros"] == 0 and d["reservedMicros"] == 800
    assert d["remainingMicros"] == 200 and d["spendableMicros"] == 200
    assert d["budgetPeriod"] == "day" and d["resetsAt"].endswith("Z")
    # The refusal wrote nothing: the account still has everything but the two holds.
    assert (await ledger.get_balance(db, account_id)).reserved == 800

    await ledger.settle_hold(db, a.id, ledger.Usage(10, 10, 150))  # 250 of 400 back
    assert (await _state(db, key_id)).spent == 150
    await ledger.release_hold(db, b.id)  # all 400 back
    s = await _state(db, key_id)
    assert (s.spent, s.reserved, s.remaining) == (150, 0, 850)
    # A repeat of a settle or a release changes nothing.
    await ledger.settle_hold(db, a.id, ledger.Usage(10, 10, 150))
    assert not await ledger.release_hold(db, b.id)
    assert (await _state(db, key_id)).spent == 150
    await _reserve(db, account_id, key_id, 850)  # exactly what is left fits
    with pytest.raises(KeyBudgetExceeded):
        await _reserve(db, account_id, key_id, 1)


async def test_expiry_gives_the_hold_back_and_a_late_debit_is_still_spent(
    db: asyncpg.Pool,
) -> None:
    account_id, key_id = await _keyed_account(db, 10_000, 1_000, None)
    hold = await _reserve(db, account_id, key_id, 600)
    assert await ledger.release_hold(db, hold.id, expired=True)  # what the sweeper does
    assert (await _state(db, key_id)).reserved == 0
    settled = await ledger.settle_hold(db, hold.id, ledger.Usage(5, 5, 500))
    assert settled.debited == 500
    s = await _state(db, key_id)
    assert (s.spent, s.reserved, s.resets_at, s.period) == (500, 0, None, None)


async def test_the_tighter_limit_is_named_and_both_say_what_is_spendable(
    db: asyncpg.Pool,
) -> None:
    account_id, key_id = await _keyed_account(db, 300, 1_000, "month")
    with pytest.raises(CreditsExhausted) as refused:
        await _reserve(db, account_id, key_id, 500)
    assert refused.value.details["spendableMicros"] == 300
    # A key without a budget, or a session: only the account counts.
    _, other_key = await _keyed_account(db, 1, None)
    with pytest.raises(CreditsExhausted) as refused:
        await _reserve(db, account_id, None, 500)
    assert refused.value.details["spendableMicros"] == 300
    assert (await budgets.key_budgets(db, [other_key], "UTC")) == {}


async def test_a_budget_of_zero_refuses_every_priced_call_but_free_ones_pass(
    db: asyncpg.Pool,
) -> None:
    account_id, key_id = await _keyed_account(db, 10_000, 0, "week")
    with pytest.raises(KeyBudgetExceeded):
        await _reserve(db, account_id, key_id, 1)
    hold = await _reserve(db, account_id, key_id, 0)
    await ledger.settle_hold(db, hold.id, ledger.Usage(1, 0, 0))


async def test_a_new_period_starts_from_zero_and_old_holds_settle_in_their_own(
    db: asyncpg.Pool,
) -> None:
    account_id, key_id = await _keyed_account(db, 100_000, 1_000, "day")
    old = await _reserve(db, account_id, key_id, 700)
    # The period this hold counted in, as recorded on it.
    start = await db.fetchval("SELECT budget_period_start FROM holds WHERE id = $1", old.id)
    # Move this key's spend and hold to yesterday's period, as if the day had
    # turned since the reserve (the rows are moved, not the clock: the
    # boundary itself is tested below at explicit instants).
    yesterday = start - timedelta(days=1)
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("ALTER TABLE holds DISABLE TRIGGER holds_end_once")
        try:
            await conn.execute(
                "UPDATE holds SET budget_period_start = $2 WHERE id = $1", old.id, yesterday
            )
        finally:
            await conn.execute("ALTER TABLE holds ENABLE TRIGGER holds_end_once")
        await conn.execute(
            "UPDATE key_budget_spend SET period_start = $2 WHERE key_id = $1", key_id, yesterday
        )
    s = await _state(db, key_id)
    assert (s.spent, s.reserved) == (0, 0)  # today's period is untouched
    today = await _reserve(db, account_id, key_id, 1_000)
    # Yesterday's hold settles into yesterday's row, not today's.
    await ledger.settle_hold(db, old.id, ledger.Usage(1, 1, 650))
    rows = await db.fetch(
        "SELECT period_start, spent, reserved FROM key_budget_spend WHERE key_id = $1"
        " ORDER BY period_start",
        key_id,
    )
    assert [(r["spent"], r["reserved"]) for r in rows] == [(650, 0), (0, 1_000)]
    await ledger.release_hold(db, today.id)


@pytest.mark.parametrize(
    ("period", "zone", "at", "start", "end"),
    [
        # Berlin's day turns at 23:00 UTC in winter, 22:00 in summer.
        (
            "day",
            "Europe/Berlin",
            "2026-01-15T22:59:59.999999Z",
            "2026-01-14T23:00Z",
            "2026-01-15T23:00Z",
        ),
        ("day", "Europe/Berlin", "2026-01-15T23:00:00Z", "2026-01-15T23:00Z", "2026-01-16T23:00Z"),
        # The day the clocks go forward is 23 hours long.
        ("day", "Europe/Berlin", "2026-03-29T12:00Z", "2026-03-28T23:00Z", "2026-03-29T22:00Z"),
        # Weeks start on Monday (2026-03-30 is one).
        ("week", "Europe/Berlin", "2026-03-29T21:59:59Z", "2026-03-22T23:00Z", "2026-03-29T22:00Z"),
        ("week", "Europe/Berlin", "2026-03-29T22:00Z", "2026-03-29T22:00Z", "2026-04-05T22:00Z"),
        ("month", "UTC", "2026-02-28T23:59:59.999999Z", "2026-02-01T00:00Z", "2026-03-01T00:00Z"),
        ("month", "UTC", "2026-03-01T00:00Z", "2026-03-01T00:00Z", "2026-04-01T00:00Z"),
        (
            "month",
            "America/New_York",
            "2026-12-31T23:00Z",
            "2026-12-01T05:00Z",
            "2027-01-01T05:00Z",
        ),
    ],
)
async def test_period_boundaries_are_exact_in_the_zone(
    db: asyncpg.Pool, period: str, zone: str, at: str, start: str, end: str
) -> None:
    got = await budgets.period_bounds(db, period, zone, datetime.fromisoformat(at))
    assert got == (datetime.fromisoformat(start), datetime.fromisoformat(end))


async def test_the_state_at_an_instant_reads_that_instants_period(db: asyncpg.Pool) -> None:
    account_id, key_id = await _keyed_account(db, 10_000, 1_000, "day")
    hold = await _reserve(db, account_id, key_id, 300)
    _, end = await budgets.period_bounds(db, "day", "Europe/Berlin", datetime.now(UTC))
    assert end is not None
    last = await budgets.key_budget(db, key_id, "Europe/Berlin", end - timedelta(microseconds=1))
    nxt = await budgets.key_budget(db, key_id, "Europe/Berlin", end)
    assert last is not None and nxt is not None
    assert (last.reserved, last.resets_at) == (300, end)
    assert (nxt.reserved, nxt.remaining) == (0, 1_000)  # the reset: a fresh row
    await ledger.release_hold(db, hold.id)


async def test_lifetime_period_has_no_reset(db: asyncpg.Pool) -> None:
    start, end = await budgets.period_bounds(db, None, "UTC", datetime.now(UTC))
    assert end is None
    assert start.year == 1  # '-infinity', as asyncpg reads it (datetime.min)


async def test_the_batch_reserve_never_passes_a_budget(db: asyncpg.Pool) -> None:
    account_id, key_id = await _keyed_account(db, 1_000_000, 10_000, "month")
    _, free_key = await _keyed_account(db, 1, None)
    free_account = await db.fetchval("SELECT account_id FROM api_keys WHERE id = $1", free_key)
    await ledger.post_entry(
        db,
        account_id=free_account,
        amount=1_000_000,
        kind="grant",
        idempotency_key=f"test:{uuid.uuid4()}",
        reason="test",
    )
    gc = GroupCommit(db, lanes=1, max_batch=64, budget_zone="Europe/Berlin")
    futures = [
        gc.reserve_soon(
            hold_id=uuid.uuid4(),
            account_id=account_id if i % 2 else free_account,
            amount=700,
            ttl_seconds=60,
            key_id=key_id if i % 2 else free_key,
        )
        for i in range(80)
    ]
    results = await asyncio.gather(*futures, return_exceptions=True)
    budgeted = [r for i, r in enumerate(results) if i % 2]
    other = [r for i, r in enumerate(results) if not i % 2]
    assert sum(isinstance(r, ledger.Hold) for r in budgeted) == 10_000 // 700
    assert all(isinstance(r, KeyBudgetExceeded) for r in budgeted if not isinstance(r, ledger.Hold))
    assert all(isinstance(r, ledger.Hold) for r in other)  # another key is not held back
    assert gc.batched_calls > 0
    s = await _state(db, key_id)
    assert s.reserved == 14 * 700 <= s.budget
    holds = [r for r in results if isinstance(r, ledger.Hold)]
    settles = [gc.settle_soon(h.id, ledger.Usage(1, 1, 500)) for h in holds]
    await asyncio.gather(*settles)
    s = await _state(db, key_id)
    assert (s.spent, s.reserved) == (14 * 500, 0)


async def test_verify_finds_a_spend_row_that_does_not_match_its_holds(
    db: asyncpg.Pool,
) -> None:
    account_id, key_id = await _keyed_account(db, 10_000, 1_000, "day")
    hold = await _reserve(db, account_id, key_id, 300)
    await db.execute("UPDATE key_budget_spend SET reserved = 0 WHERE key_id = $1", key_id)
    report = await ledger.verify_ledger(db)
    assert any("key budget spend" in p["problem"] for p in report.problems)
    # The incremental run finds it too: the period of a live hold is recounted.
    report = await ledger.verify_incremental(db)
    assert any("key budget spend" in p["problem"] for p in report.problems)
    await db.execute("UPDATE key_budget_spend SET reserved = 300 WHERE key_id = $1", key_id)
    await ledger.release_hold(db, hold.id)
    assert (await ledger.verify_ledger(db)).ok


@pytest.mark.parametrize("budgeted", [False, True])
async def test_a_budget_adds_no_statement_to_reserve_or_settle(
    services: Services, db: asyncpg.Pool, budgeted: bool
) -> None:
    """The hot path's statements, counted on the wire: one reserve, one settle,
    with or without a key budget (BENCHMARKS.md measures what they cost)."""
    account_id, key_id = await _keyed_account(db, 100_000, 50_000 if budgeted else None, "day")
    conn = await asyncpg.connect(services.database_url)  # the serving role, as a server
    sent: list[str] = []
    conn.add_query_logger(lambda record: sent.append(record.query))
    try:
        gc = GroupCommit(conn, lanes=1, budget_zone="Europe/Berlin")
        hold = await gc.reserve(
            hold_id=uuid.uuid4(), account_id=account_id, amount=1_000, ttl_seconds=60, key_id=key_id
        )
        assert len(sent) == 1 and "INSERT INTO holds" in sent[0]
        await gc.settle(hold.id, ledger.Usage(1, 1, 700))
        assert len(sent) == 2
    finally:
        await conn.close()
    state = await budgets.key_budget(db, key_id, "Europe/Berlin")
    if budgeted:
        assert state is not None and (state.spent, state.reserved) == (700, 0)
    else:
        assert state is None


# ---------------------------------------------------------------- a burst, as a property

_BURST = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 400)),  # (key: 0, 1 budgeted, 2 none; amount)
    min_size=2,
    max_size=24,
)


async def _burst(url: str, credits: int, budgets_: tuple[int, int], calls: list[Any]) -> None:
    conn = await asyncpg.connect(url)
    try:
        account_id, k0 = await _keyed_account(conn, credits, budgets_[0], "day")
        k1 = (await create_api_key(conn, account_id, "second")).id
        await budgets.set_key_budget(conn, k1, budgets_[1], "month")
        k2 = (await create_api_key(conn, account_id, "third")).id
        keys = [k0, k1, k2]
        gc = GroupCommit(conn, lanes=1, budget_zone="Europe/Berlin")
        got = await asyncio.gather(
            *(
                gc.reserve(
                    hold_id=uuid.uuid4(),
                    account_id=account_id,
                    amount=amount,
                    ttl_seconds=60,
                    key_id=keys[k],
                )
                for k, amount in calls
            ),
            return_exceptions=True,
        )
        held = [0, 0, 0]
        for (k, amount), g in zip(calls, got, strict=True):
            if isinstance(g, ledger.Hold):
                held[k] += amount
            else:
                assert isinstance(g, CreditsExhausted | KeyBudgetExceeded), g
        # Never past a budget nor the credits; and nothing refused that fits at the
        # end (the burst only ever takes: what was refused could not fit later).
        assert held[0] <= budgets_[0] and held[1] <= budgets_[1]
        assert sum(held) <= credits
        room = credits - sum(held)
        for (k, amount), g in zip(calls, got, strict=True):
            if isinstance(g, BaseException):
                key_left = budgets_[k] - held[k] if k < 2 else None
                assert amount > room or (key_left is not None and amount > key_left)
                if isinstance(g, KeyBudgetExceeded):
                    assert key_left is not None and amount > key_left
        bal = await ledger.get_balance(conn, account_id)
        assert bal.reserved == sum(held)
        for k in (0, 1):
            state = await budgets.key_budget(conn, keys[k], "Europe/Berlin")
            assert state is not None and (state.reserved, state.spent) == (held[k], 0)
        report = await ledger.verify_ledger(conn)
        assert report.ok, report.problems
    finally:
        await conn.close()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    credits=st.integers(0, 3_000),
    budgets_=st.tuples(st.integers(0, 1_500), st.integers(0, 1_500)),
    calls=_BURST,
)
def test_a_burst_of_reserves_never_passes_budgets_or_credits(
    services: Services, credits: int, budgets_: tuple[int, int], calls: list[Any]
) -> None:
    asyncio.run(_burst(services.owner_url, credits, budgets_, calls))


async def test_the_sweeper_gives_an_expired_hold_back_to_its_budget(db: asyncpg.Pool) -> None:
    account_id, key_id = await _keyed_account(db, 10_000, 1_000, "day")
    hold = await ledger.reserve_hold(
        db,
        hold_id=uuid.uuid4(),
        account_id=account_id,
        amount=900,
        ttl_seconds=0,  # expired at once: a crashed process's hold
        key_id=key_id,
        budget_zone="Europe/Berlin",
    )
    assert (await _state(db, key_id)).reserved == 900
    assert await ledger.sweep_expired_holds(db) >= 1
    assert await db.fetchval("SELECT outcome FROM holds WHERE id = $1", hold.id) == "expired"
    s = await _state(db, key_id)
    assert (s.spent, s.reserved, s.remaining) == (0, 0, 1_000)
