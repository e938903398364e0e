"""Group commit: concurrent reserves (and settles) of one process share one statement.

Under load most of a reserve or settle is fixed cost — a round trip, a
statement, a commit with its WAL flush, and, for a hot account, the wait for
its balance row lock, which is held through that flush. ``GroupCommit``
queues the calls that arrive while earlier ones are in flight and runs each
queue as one multi-row statement (BENCHMARKS.md: about 4× less CPU per pair).
With no queue (light load) a call runs at once, as the plain one-statement
``reserve_hold`` / ``settle_hold``: batching adds no latency of its own.

A batch never weakens an invariant, and its results are those of running its
calls one by one — the batched ones first, then the others, each group in
arrival order:

* reserve: per account, the longest prefix (arrival order) that fits the
  available balance is reserved in one statement; every other call is then
  retried alone, so a call is refused (402) only if it did not fit on its own.
* settle: accounts where no debit would be capped (every running total of
  costs fits the available balance plus the running total of holds released)
  are settled in one statement; the others, and holds no longer live
  (replays, released, expired), go through ``settle_hold`` one by one.
* any failure of a batch statement (a repeated hold id, the CHECK, a
  deadlock, a broken connection) runs all its calls alone — safe even if the
  batch committed and only its reply was lost, each call being idempotent on
  its hold id; the database constraints — the CHECK on
  the balance row, one debit per hold, holds ended once — apply to batches
  exactly as to single statements.

Lock order is the single statements': a hold row before its account's balance
row, balance rows in account id order.

Every reserve is durable: its reply comes after its commit is flushed, so
nothing is served on a hold a crash of Postgres could lose. A reserve whose
caller is gone when its batch commits (cancelled), or whose reply is lost, is
released at once, never left to its TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import asyncpg

from creditgate.domain_errors import DomainError
from creditgate.ledger.db import Db
from creditgate.ledger.holds import (
    Hold,
    Settlement,
    Usage,
    breakdown_json,
    release_hold,
    reserve_hold,
    settle_fingerprint,
    settle_hold,
)
from creditgate.ledger.ids import time_ordered_id
from creditgate.ledger.posting import Entries, posting_statement
from creditgate.ledger.progress import record_progress
from creditgate.logs import log


def _batch_failed(kind: str, batch: list[Any], error: Exception) -> None:
    """A failed batch statement (a constraint, a deadlock, a broken connection)
    changed nothing, or committed and lost its reply: either way its calls run
    alone, which is safe because each is idempotent on its hold id."""
    log.warning(
        "batch failed; its calls run alone",
        extra={"kind": kind, "size": len(batch), "error": type(error).__name__},
    )


# The batch reserve checks each call against its account's room and, for a
# key with a budget, the key's room too (running sums in arrival order); the
# keys' spend rows are then taken by one upsert whose ON CONFLICT condition is
# evaluated on the latest rows (the snapshot may predate a row a concurrent
# statement inserted): a key whose upsert is refused gets none of its calls
# batched — they run alone, as does every call that did not fit. $7 key ids
# (NULL: sessions), $8 the budgets' time zone.
_RESERVE_BATCH = """
WITH req AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::text[],
                         $6::integer[], $7::uuid[])
        WITH ORDINALITY AS r(hold_id, account_id, amount, request_id, model, ttl, key_id, ord)
),
bal AS (
    SELECT account_id, balance, reserved, overdraft_limit,
           balance - reserved + overdraft_limit AS room
    FROM account_balances
    WHERE account_id = ANY($2::uuid[])
    ORDER BY account_id
    FOR UPDATE
),
kb AS (
    SELECT k.key_id, k.budget, k.period_start,
           k.budget - COALESCE(s.spent + s.reserved, 0) AS key_room
    FROM (SELECT key_id, budget,
                 creditgate_budget_period_start(period, $8, now()) AS period_start
          FROM key_budgets WHERE key_id = ANY($7::uuid[])) k
    LEFT JOIN key_budget_spend s USING (key_id, period_start)
),
fits AS (
    SELECT r.*, kb.period_start,
           SUM(r.amount) OVER (PARTITION BY r.account_id ORDER BY r.ord) <= b.room
           AND (kb.key_id IS NULL
                OR SUM(r.amount) OVER (PARTITION BY r.key_id ORDER BY r.ord) <= kb.key_room)
               AS ok
    FROM req r JOIN bal b USING (account_id) LEFT JOIN kb USING (key_id)
),
ks AS (
    INSERT INTO key_budget_spend AS s (key_id, period_start, reserved)
    SELECT key_id, period_start, SUM(amount) FROM fits
    WHERE ok AND period_start IS NOT NULL
    GROUP BY key_id, period_start
    ORDER BY key_id
    ON CONFLICT (key_id, period_start) DO UPDATE
        SET reserved = s.reserved + EXCLUDED.reserved
        WHERE s.spent + s.reserved + EXCLUDED.reserved
              <= (SELECT budget FROM kb WHERE kb.key_id = s.key_id)
    RETURNING key_id
),
go AS (
    SELECT * FROM fits
    WHERE ok AND (period_start IS NULL OR key_id IN (SELECT key_id FROM ks))
),
taken AS (
    -- The CHECK's columns from the locked rows, never from the snapshot (ledger/posting.py).
    UPDATE account_balances a
    SET reserved = b.reserved + s.total, balance = b.balance,
        overdraft_limit = b.overdraft_limit, updated_at = now()
    FROM (SELECT account_id, SUM(amount) AS total FROM go GROUP BY account_id) s
    JOIN bal b USING (account_id)
    WHERE a.account_id = s.account_id
)
INSERT INTO holds (id, account_id, amount, request_id, model, expires_at, key_id,
                   budget_period_start)
SELECT hold_id, account_id, amount, request_id, model, now() + ttl * interval '1 second',
       key_id, period_start
FROM go
RETURNING id
"""

# The batch settle is the posting rule's statement (ledger/posting.py) with
# several entries per account: their balance_after runs in arrival order.
_SETTLE_BATCH = posting_statement(
    before_lock=[
        """req AS (
    SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::uuid[], $4::bytea[], $5::integer[],
                         $6::integer[], $7::boolean[], $8::text[])
        WITH ORDINALITY AS r(hold_id, cost, entry_id, fingerprint, input_tokens,
                             output_tokens, estimated, breakdown, ord)
)""",
        """live AS (
    SELECT r.*, h.account_id, h.amount AS held, h.request_id, h.model, h.key_id,
           h.budget_period_start
    FROM req r JOIN holds h ON h.id = r.hold_id
    WHERE h.ended_at IS NULL
    ORDER BY h.id
    FOR UPDATE OF h
)""",
    ],
    # The array is an InitPlan: every hold of the batch is locked before the
    # first balance row is (the single statements' order: hold, then balance).
    lock_where="account_id = ANY(ARRAY(SELECT account_id FROM live))",
    before_entries=[
        """plan AS (
    SELECT l.*, locked.balance - locked.reserved + locked.overdraft_limit AS room,
           SUM(l.cost) OVER w AS run_cost,
           SUM(l.held) OVER w AS run_held
    FROM live l JOIN locked USING (account_id)
    WINDOW w AS (PARTITION BY l.account_id ORDER BY l.ord)
)""",
        """go AS (
    SELECT * FROM plan
    WHERE account_id IN (
        SELECT account_id FROM plan GROUP BY account_id
        HAVING bool_and(run_cost <= room + run_held)
    )
)""",
        # Locked by live, so every hold of go is ended here.
        """ended AS (
    UPDATE holds SET outcome = 'settled', ended_at = now()
    FROM go
    WHERE holds.id = go.hold_id
)""",
    ],
    entries=Entries(
        source="go",
        values={
            "id": "go.entry_id",
            "kind": "'debit'",
            "amount": "-go.cost",
            "idempotency_key": "'hold:' || go.hold_id::text",
            "fingerprint": "go.fingerprint",
            "hold_id": "go.hold_id",
            "request_id": "go.request_id",
            "model": "go.model",
            "input_tokens": "go.input_tokens",
            "output_tokens": "go.output_tokens",
            "estimated": "go.estimated",
            "uncollected": "0",
            "breakdown": "go.breakdown::jsonb",
        },
        running_order="go.ord",
        returning=["hold_id"],
    ),
    # Budgeted keys: each settled hold's amount leaves its period's reserved
    # and its debit (here the whole cost: no debit of a batch is capped) joins
    # spent — after the balance rows are locked, like every spend row write.
    after_entries=[
        """spend AS (
    UPDATE key_budget_spend s
    SET reserved = s.reserved - g.held, spent = s.spent + g.cost
    FROM (SELECT key_id, budget_period_start, SUM(held) AS held, SUM(cost) AS cost
          FROM go WHERE budget_period_start IS NOT NULL
          GROUP BY key_id, budget_period_start) g
    WHERE s.key_id = g.key_id AND s.period_start = g.budget_period_start
)"""
    ],
    reserved=" - s.held",
    balance_join="JOIN (SELECT account_id, SUM(held) AS held FROM go GROUP BY account_id) s"
    " USING (account_id)",
    result="SELECT (SELECT array_agg(hold_id) FROM posted) AS settled",
)


@dataclass(frozen=True, slots=True)
class _Reserve:
    hold_id: uuid.UUID
    account_id: uuid.UUID
    amount: int
    ttl_seconds: int  # whole seconds: a duration, rounded up by the caller
    request_id: str | None
    model: str | None
    key_id: uuid.UUID | None = None  # the API key (its budget applies), None: a session


@dataclass(frozen=True, slots=True)
class _Settle:
    hold_id: uuid.UUID
    usage: Usage


T = TypeVar("T")
R = TypeVar("R")


class _Queue(Generic[T, R]):
    """Calls waiting for a batch, and at most ``lanes`` batches running at once."""

    def __init__(
        self,
        run: Callable[[list[tuple[T, asyncio.Future[R]]]], Awaitable[None]],
        lanes: int,
        max_batch: int,
    ) -> None:
        self._run = run
        self._lanes = lanes
        self._max_batch = max_batch
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def enqueue(self, item: T) -> asyncio.Future[R]:
        """Queue ``item`` (its batch may start at once); the future of its result."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._dispatch()
        return future

    def _dispatch(self) -> None:
        while self._waiting and self._running < self._lanes:
            batch = self._waiting[: self._max_batch]
            del self._waiting[: self._max_batch]
            self._running += 1
            task = asyncio.create_task(self._lane(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _lane(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            await self._run(batch)
        except Exception as e:  # the connection failed: every call of the batch fails
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
        finally:
            self._running -= 1
            self._dispatch()


async def _answer(future: asyncio.Future[R], call: Callable[[], Awaitable[R]]) -> None:
    """Run one call alone and give its result (or error) to its caller."""
    try:
        result = await call()
    except Exception as e:
        if not future.done():
            future.set_exception(e)
    else:
        if not future.done():
            future.set_result(result)


def _reply_lost(future: asyncio.Future[Any]) -> bool:
    """A reserve that failed otherwise than by a refusal (402, 409, 404): its
    statement may have committed with only its reply lost."""
    return future.exception() is not None and not isinstance(future.exception(), DomainError)


class GroupCommit:
    """``reserve_hold`` and ``settle_hold`` with group commit, for one process's pool.

    ``lanes`` bounds how many batches (so pool connections) run at once per
    kind; calls arriving while all lanes are busy wait for the next batch.
    """

    def __init__(
        self, pool: Db, *, lanes: int = 2, max_batch: int = 64, budget_zone: str = "UTC"
    ) -> None:
        # A single connection works too, with lanes=1 (one statement at a time).
        assert lanes == 1 or isinstance(pool, asyncpg.Pool), "several lanes need a pool"
        self._pool = pool
        self._budget_zone = budget_zone  # the zone of key budgets' periods
        self.batched_calls = 0  # calls done by a multi-row statement
        self.alone_calls = 0  # calls done by the one-statement functions
        self._reserves: _Queue[_Reserve, Hold] = _Queue(
            functools.partial(self._run_reserves, pool), lanes, max_batch
        )
        self._settles: _Queue[_Settle, Settlement] = _Queue(self._run_settles, lanes, max_batch)

    async def reserve(
        self,
        *,
        hold_id: uuid.UUID,
        account_id: uuid.UUID,
        amount: int,
        ttl_seconds: int,
        request_id: str | None = None,
        model: str | None = None,
        key_id: uuid.UUID | None = None,
    ) -> Hold:
        """As ``reserve_hold`` (402 when it does not fit, a repeat returns the hold)."""
        return await self.reserve_soon(
            hold_id=hold_id,
            account_id=account_id,
            amount=amount,
            ttl_seconds=ttl_seconds,
            request_id=request_id,
            model=model,
            key_id=key_id,
        )

    def reserve_soon(
        self,
        *,
        hold_id: uuid.UUID,
        account_id: uuid.UUID,
        amount: int,
        ttl_seconds: int,
        request_id: str | None = None,
        model: str | None = None,
        key_id: uuid.UUID | None = None,
    ) -> asyncio.Future[Hold]:
        """``reserve``, queued now: the future of its hold.

        Cancelling the future gives the credits back: a reserve cancelled before
        it ran never runs, one cancelled while it ran is released. A hold no
        longer wanted once made is ended with ``give_back`` (or as any other).
        """
        assert amount >= 0, amount
        return self._reserves.enqueue(
            _Reserve(hold_id, account_id, amount, ttl_seconds, request_id, model, key_id)
        )

    async def give_back(self, holding: asyncio.Future[Hold]) -> None:
        """End a reservation of ``reserve_soon`` no longer wanted, however far it got:
        cancelled if still queued or running (its lane releases it), released if made."""
        if holding.cancel() or holding.cancelled() or holding.exception() is not None:
            return
        await release_hold(self._pool, holding.result().id)

    async def release(self, hold_id: uuid.UUID) -> bool:
        """As ``release_hold``, alone on the pool (a release waits for nobody)."""
        return await release_hold(self._pool, hold_id)

    async def record_progress(self, hold_id: uuid.UUID, usage: Usage) -> None:
        """As ``progress.record_progress``, alone on the pool."""
        await record_progress(self._pool, hold_id, usage)

    async def settle(self, hold_id: uuid.UUID, usage: Usage) -> Settlement:
        """As ``settle_hold`` (exactly once; a repeat returns the first settlement)."""
        return await self.settle_soon(hold_id, usage)

    def settle_soon(self, hold_id: uuid.UUID, usage: Usage) -> asyncio.Future[Settlement]:
        """``settle``, queued now: the future of its settlement.

        The settlement runs whatever becomes of the future: cancelling it (or
        a caller that stops waiting) never drops a charge. Awaiting it under
        ``asyncio.shield`` keeps the caller's cancellation off it at the cost
        of no task (a coroutine under ``shield`` gets a task of its own).
        """
        assert usage.cost >= 0 and usage.input_tokens >= 0 and usage.output_tokens >= 0, usage
        return self._settles.enqueue(_Settle(hold_id, usage))

    # ------------------------------------------------------------ reserve

    async def _reserve_alone(self, db: Db, r: _Reserve) -> Hold:
        self.alone_calls += 1
        return await reserve_hold(
            db,
            hold_id=r.hold_id,
            account_id=r.account_id,
            amount=r.amount,
            ttl_seconds=r.ttl_seconds,
            request_id=r.request_id,
            model=r.model,
            key_id=r.key_id,
            budget_zone=self._budget_zone,
        )

    async def _run_reserves(
        self, db: Db, batch: list[tuple[_Reserve, asyncio.Future[Hold]]]
    ) -> None:
        reserved: set[uuid.UUID] = set()
        if len(batch) > 1:
            items = [r for r, _ in batch]
            try:
                rows = await db.fetch(
                    _RESERVE_BATCH,
                    [r.hold_id for r in items],
                    [r.account_id for r in items],
                    [r.amount for r in items],
                    [r.request_id for r in items],
                    [r.model for r in items],
                    [r.ttl_seconds for r in items],
                    [r.key_id for r in items],
                    self._budget_zone,
                )
                reserved = {row["id"] for row in rows}
                self.batched_calls += len(reserved)
            except Exception as e:
                _batch_failed("reserve", batch, e)
        # Holds made for callers that left are given back first (rare; their
        # credits are free again before anyone hears the batch's results),
        # then the batch's results, with no wait behind a call run alone.
        released: set[uuid.UUID] = set()
        for r, future in batch:
            if r.hold_id in reserved and future.cancelled():
                released.add(r.hold_id)
                with contextlib.suppress(Exception):
                    await release_hold(self._pool, r.hold_id)
        late: list[uuid.UUID] = []  # callers that left during those releases
        alone: list[tuple[_Reserve, asyncio.Future[Hold]]] = []
        for r, future in batch:
            if r.hold_id in reserved:
                if not future.cancelled():
                    future.set_result(Hold(r.hold_id, r.account_id, r.amount))
                elif r.hold_id not in released:
                    late.append(r.hold_id)
            elif not future.cancelled():
                alone.append((r, future))
        for hold_id in late:
            with contextlib.suppress(Exception):
                await release_hold(self._pool, hold_id)
        for r, future in alone:
            await _answer(future, functools.partial(self._reserve_alone, db, r))
            if future.cancelled() or _reply_lost(future):
                # Cancelled while it ran, or its reply failed (the reserve may
                # have committed): nobody else ends it, so it is given back now
                # (a no-op if it was never made), not at its TTL.
                with contextlib.suppress(Exception):
                    await release_hold(self._pool, r.hold_id)

    # ------------------------------------------------------------ settle

    async def _run_settles(self, batch: list[tuple[_Settle, asyncio.Future[Settlement]]]) -> None:
        settled: set[uuid.UUID] = set()
        entry_ids = {s.hold_id: time_ordered_id() for s, _ in batch}
        if len(batch) > 1 and len(entry_ids) == len(batch):
            items = [s for s, _ in batch]
            try:
                row = await self._pool.fetchrow(
                    _SETTLE_BATCH,
                    [s.hold_id for s in items],
                    [s.usage.cost for s in items],
                    [entry_ids[s.hold_id] for s in items],
                    [settle_fingerprint(s.usage) for s in items],
                    [s.usage.input_tokens for s in items],
                    [s.usage.output_tokens for s in items],
                    [s.usage.estimated for s in items],
                    [breakdown_json(s.usage) for s in items],
                )
                settled = set(row["settled"] or ()) if row is not None else set()
                self.batched_calls += len(settled)
            except Exception as e:
                _batch_failed("settle", batch, e)
        # The batch's results first, with no wait: none waits behind a call run alone.
        alone: list[tuple[_Settle, asyncio.Future[Settlement]]] = []
        for s, future in batch:
            if s.hold_id not in settled:
                alone.append((s, future))
            elif not future.done():
                future.set_result(Settlement(entry_ids[s.hold_id], s.usage.cost, 0, replayed=False))
        for s, future in alone:  # run even for a caller gone: a call's charge is never dropped
            self.alone_calls += 1
            await _answer(future, functools.partial(settle_hold, self._pool, s.hold_id, s.usage))
