"""Property test: random ledger operations against a plain-Python model of the rules.

Hypothesis draws sequences of grant (expiring or not) / adjust / reserve /
settle / release / expire / replay / overdraft steps over two accounts. After
each step the database must agree with the model exactly (balance, reserved,
overdraft, every lot's remainder) and the account-level invariants must hold
in the database itself; after each sequence the whole ledger must verify.

The model is written from the rules in ARCHITECTURE.md, independently of the
SQL: it decides what each step must do (succeed, 402, 409, no-op), and the
test fails on any difference.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from creditgate import ledger
from creditgate.errors import Conflict, InsufficientCredits
from tests.conftest import Services

N_ACCOUNTS = 2


@dataclass
class MLot:
    id: uuid.UUID
    expires_at: datetime
    remaining: int


@dataclass
class MAccount:
    id: uuid.UUID
    balance: int = 0
    reserved: int = 0
    overdraft: int = 0
    lots: list[MLot] = field(default_factory=list)

    @property
    def available(self) -> int:
        return self.balance - self.reserved

    def consume(self, amount: int) -> None:
        """Soonest-expiring lots first (ties by id); the rest from credits that never expire."""
        for lot in sorted(self.lots, key=lambda lot: (lot.expires_at, lot.id)):
            if amount == 0:
                break
            take = min(lot.remaining, amount)
            lot.remaining -= take
            amount -= take


@dataclass
class MHold:
    id: uuid.UUID
    account: int
    amount: int
    ttl: int
    state: str = "live"  # live | settled | released | expired
    result: tuple[uuid.UUID, int, int] | None = None  # (entry id, debited, uncollected)


@dataclass
class MPosted:
    account: int
    amount: int
    kind: str
    key: str
    reason: str
    expires_at: datetime | None
    entry_id: uuid.UUID
    balance: int


# ---------------------------------------------------------------- steps

account_ix = st.integers(0, N_ACCOUNTS - 1)
pick = st.integers(0, 10**6)  # an index into earlier holds / posts, taken modulo their count
steps = st.one_of(
    st.tuples(
        st.just("grant"),
        account_ix,
        st.integers(1, 2000),
        st.sampled_from([None, "past", "past", "future", "future"]),
    ),
    st.tuples(
        st.just("adjust"), account_ix, st.one_of(st.integers(-1500, -1), st.integers(1, 500))
    ),
    st.tuples(st.just("reserve"), account_ix, st.integers(0, 1200), st.sampled_from([3600, 0])),
    st.tuples(st.just("reserve_again"), pick),
    st.tuples(st.just("settle"), pick, st.integers(0, 1500)),
    st.tuples(st.just("release"), pick),
    st.tuples(st.just("expire_lots")),
    st.tuples(st.just("expire_holds")),
    st.tuples(st.just("replay"), pick, st.booleans()),
    st.tuples(st.just("overdraft"), account_ix, st.integers(0, 800)),
)


class Run:
    def __init__(self, url: str, conn: asyncpg.Connection, accounts: list[MAccount]) -> None:
        self.conn_url = url
        self.conn = conn
        self.expired_total = 0
        self.accounts = accounts
        self.holds: list[MHold] = []
        self.posts: list[MPosted] = []
        self.now = datetime.now(UTC)
        self.offsets = itertools.count(1)

    # -- each step: predict with the model, act on the database, compare

    async def grant(self, ix: int, amount: int, expiry: str | None) -> None:
        a = self.accounts[ix]
        expires_at = None
        if expiry == "past":  # already due: the next expire step writes it off
            expires_at = self.now - timedelta(seconds=next(self.offsets))
        elif expiry == "future":
            expires_at = self.now + timedelta(days=1, seconds=next(self.offsets))
        key = f"prop:{uuid.uuid4()}"
        posted = await ledger.post_entry(
            self.conn,
            account_id=a.id,
            amount=amount,
            kind="grant",
            idempotency_key=key,
            reason="property grant",
            expires_at=expires_at,
        )
        live = sum(lot.remaining for lot in a.lots)
        a.balance += amount
        if expires_at is not None:
            initial = min(amount, max(0, a.balance - live))
            a.lots.append(MLot(posted.entry_id, expires_at, initial))
        assert (posted.balance, posted.replayed) == (a.balance, False)
        self.posts.append(
            MPosted(
                ix, amount, "grant", key, "property grant", expires_at, posted.entry_id, a.balance
            )
        )

    async def adjust(self, ix: int, amount: int) -> None:
        a = self.accounts[ix]
        key = f"prop:{uuid.uuid4()}"
        fits = a.available + amount >= -a.overdraft
        try:
            posted = await ledger.post_entry(
                self.conn,
                account_id=a.id,
                amount=amount,
                kind="adjustment",
                idempotency_key=key,
                reason="property adjustment",
            )
        except InsufficientCredits:
            assert not fits
            return
        assert fits
        a.balance += amount
        if amount < 0:
            a.consume(-amount)
        assert posted.balance == a.balance
        self.posts.append(
            MPosted(
                ix,
                amount,
                "adjustment",
                key,
                "property adjustment",
                None,
                posted.entry_id,
                a.balance,
            )
        )

    async def reserve(self, ix: int, amount: int, ttl: int) -> None:
        a = self.accounts[ix]
        hold_id = uuid.uuid4()
        fits = a.available - amount >= -a.overdraft
        try:
            await ledger.reserve_hold(
                self.conn, hold_id=hold_id, account_id=a.id, amount=amount, ttl_seconds=ttl
            )
        except InsufficientCredits:
            assert not fits
            return
        assert fits
        a.reserved += amount
        self.holds.append(MHold(hold_id, ix, amount, ttl))

    async def reserve_again(self, i: int) -> None:
        if not self.holds:
            return
        h = self.holds[i % len(self.holds)]
        got = await ledger.reserve_hold(
            self.conn,
            hold_id=h.id,
            account_id=self.accounts[h.account].id,
            amount=h.amount,
            ttl_seconds=h.ttl,
        )
        assert got.id == h.id  # a repeat: the same hold, nothing more reserved

    async def settle(self, i: int, cost: int) -> None:
        if not self.holds:
            return
        h = self.holds[i % len(self.holds)]
        a = self.accounts[h.account]
        usage = ledger.Usage(1, 1, cost)
        if h.state == "released":
            with pytest.raises(Conflict):
                await ledger.settle_hold(self.conn, h.id, usage)
            return
        s = await ledger.settle_hold(self.conn, h.id, usage)
        if h.result is not None:  # a repeat: the first result, nothing written
            assert (s.entry_id, s.debited, s.uncollected, s.replayed) == (*h.result, True)
            return
        if h.state == "live":
            debit = min(cost, a.available + h.amount + a.overdraft)
            a.reserved -= h.amount
            h.state = "settled"
        else:  # expired by the sweeper while "running": debited without a reservation
            assert h.state == "expired"
            debit = max(0, min(cost, a.available + a.overdraft))
        a.balance -= debit
        a.consume(debit)
        h.result = (s.entry_id, debit, cost - debit)
        assert (s.debited, s.uncollected, s.replayed) == (debit, cost - debit, False)

    async def release(self, i: int) -> None:
        if not self.holds:
            return
        h = self.holds[i % len(self.holds)]
        released = await ledger.release_hold(self.conn, h.id)
        assert released == (h.state == "live")
        if released:
            self.accounts[h.account].reserved -= h.amount
            h.state = "released"

    async def expire_lots(self) -> None:
        # What the sweep must do: per account with credits not backing holds,
        # each due lot (soonest first) loses what it holds, as far as the
        # credits not backing holds allow.
        expected = 0
        for a in self.accounts:
            if a.available <= 0:
                continue
            for lot in sorted(a.lots, key=lambda lot: lot.expires_at):
                if lot.expires_at <= datetime.now(UTC) and lot.remaining > 0:
                    x = min(lot.remaining, max(0, a.available))
                    lot.remaining -= x
                    a.balance -= x
                    expected += x
        # Two sweepers at once (as two server processes would): together they
        # write off exactly what one would.
        other = await asyncpg.connect(self.conn_url)
        try:
            results = await asyncio.gather(
                ledger.sweep_expired_lots(self.conn), ledger.sweep_expired_lots(other)
            )
        finally:
            await other.close()
        self.expired_total += expected
        # Other tests' lots in this database may be due too: count only ours.
        ours = await self.conn.fetchval(
            "SELECT COALESCE(-SUM(amount), 0) FROM ledger_entries"
            " WHERE kind = 'expiry' AND account_id = ANY($1::uuid[])",
            [a.id for a in self.accounts],
        )
        assert ours == self.expired_total, (results, ours, self.expired_total)

    async def expire_holds(self) -> None:
        await ledger.sweep_expired_holds(self.conn)
        for h in self.holds:
            if h.state == "live" and h.ttl == 0:
                h.state = "expired"
                self.accounts[h.account].reserved -= h.amount

    async def replay(self, i: int, same: bool) -> None:
        if not self.posts:
            return
        p = self.posts[i % len(self.posts)]
        kwargs: dict[str, Any] = {
            "account_id": self.accounts[p.account].id,
            "amount": p.amount if same else p.amount * 2,
            "kind": p.kind,
            "idempotency_key": p.key,
            "reason": p.reason,
            "expires_at": p.expires_at,
        }
        if not same:
            with pytest.raises(Conflict):
                await ledger.post_entry(self.conn, **kwargs)
            return
        again = await ledger.post_entry(self.conn, **kwargs)
        assert (again.entry_id, again.balance, again.replayed) == (p.entry_id, p.balance, True)

    async def overdraft(self, ix: int, limit: int) -> None:
        a = self.accounts[ix]
        fits = a.available >= -limit
        try:
            await ledger.set_overdraft_limit(self.conn, a.id, limit)
        except Conflict:
            assert not fits
            return
        assert fits
        a.overdraft = limit

    # -- after every step

    async def check(self) -> None:
        ids = [a.id for a in self.accounts]
        rows = await self.conn.fetch(
            """
            SELECT b.account_id, b.balance, b.reserved, b.overdraft_limit,
                   (SELECT COALESCE(SUM(amount), 0) FROM ledger_entries e
                    WHERE e.account_id = b.account_id) AS entries_total,
                   (SELECT COALESCE(SUM(amount), 0) FROM holds h
                    WHERE h.account_id = b.account_id AND h.ended_at IS NULL) AS live_holds
            FROM account_balances b WHERE b.account_id = ANY($1::uuid[])
            """,
            ids,
        )
        by_id = {r["account_id"]: r for r in rows}
        for a in self.accounts:
            r = by_id[a.id]
            assert (r["balance"], r["reserved"], r["overdraft_limit"]) == (
                a.balance,
                a.reserved,
                a.overdraft,
            )
            assert r["balance"] == r["entries_total"] and r["reserved"] == r["live_holds"]
            assert r["balance"] - r["reserved"] >= -r["overdraft_limit"]
        lots = await self.conn.fetch(
            """
            SELECT l.id, l.remaining, l.initial - COALESCE(
                       (SELECT SUM(amount) FROM credit_lot_uses u WHERE u.lot_id = l.id), 0)
                   AS from_uses
            FROM credit_lots l WHERE l.account_id = ANY($1::uuid[])
            """,
            ids,
        )
        db_lots = {r["id"]: r["remaining"] for r in lots}
        assert all(r["remaining"] == r["from_uses"] for r in lots)
        assert db_lots == {lot.id: lot.remaining for a in self.accounts for lot in a.lots}
        for h in self.holds:
            ended = await self.conn.fetchval("SELECT outcome FROM holds WHERE id = $1", h.id)
            assert ended == (None if h.state == "live" else h.state)


async def _run(url: str, ops: list[tuple[Any, ...]]) -> None:
    conn = await asyncpg.connect(url)
    try:
        accounts = [
            MAccount((await ledger.ensure_account(conn, "user", f"prop_{uuid.uuid4().hex}")).id)
            for _ in range(N_ACCOUNTS)
        ]
        run = Run(url, conn, accounts)
        for op, *args in ops:
            await getattr(run, op)(*args)
            await run.check()
        report = await ledger.verify_ledger(conn)
        assert report.ok, report.problems
    finally:
        await conn.close()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(steps, min_size=8, max_size=40))
def test_random_ledger_operations_match_the_model(services: Services, ops: list[Any]) -> None:
    asyncio.run(_run(services.database_url, ops))
