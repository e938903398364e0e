"""The one-statement ledger calls under concurrency on one busy account."""

from __future__ import annotations

import asyncio
import random
import uuid

import asyncpg

from creditgate import ledger
from creditgate.ledger.errors import CreditsExhausted


async def test_concurrent_settles_over_their_holds_never_fail_on_a_busy_account(
    db: asyncpg.Pool,
) -> None:
    """Regression: a settle's UPDATE once computed the new balance from its
    snapshot row, which PostgreSQL checks against the CHECK before it sees the
    concurrent update — a spurious CheckViolation (a 500, and a call never charged)."""
    for round_ in range(3):
        acct = await ledger.ensure_account(db, "user", f"user_{uuid.uuid4().hex}")
        await ledger.post_entry(
            db,
            account_id=acct.id,
            amount=20_000,
            kind="grant",
            idempotency_key=f"t:{uuid.uuid4()}",
            reason="test",
        )
        charged: list[int] = []

        async def call(acct: ledger.Account, charged: list[int]) -> None:
            try:
                hold = await ledger.reserve_hold(
                    db, hold_id=uuid.uuid4(), account_id=acct.id, amount=1000, ttl_seconds=60
                )
            except CreditsExhausted:
                return
            await asyncio.sleep(random.random() / 100)
            cost = random.choice([0, 400, 1000, 1500])  # 1500: more than was held
            s = await ledger.settle_hold(db, hold.id, ledger.Usage(1, 1, cost))
            charged.append(s.debited)

        await asyncio.gather(*(call(acct, charged) for _ in range(60)))
        bal = await ledger.get_balance(db, acct.id)
        assert bal.reserved == 0 and bal.balance >= 0, round_
        assert sum(charged) == 20_000 - bal.balance
