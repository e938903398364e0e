"""Holds: the two-phase reservation of one call's worst-case cost.

``reserve_hold`` → ``settle_hold(actual cost)`` or ``release_hold``. A hold ends
exactly once; the database refuses a second end (trigger) and a second debit
(unique ``hold_id``). Each function is one SQL statement, so it commits or
does nothing, and takes the account's balance row lock for the shortest time.

Invariants (checked by ``verify``):
  * ``reserved`` = SUM(amount of live holds) of the account;
  * a settled hold has exactly one debit entry, a released one none;
  * ``balance - reserved >= -overdraft_limit`` (CHECK on the row);
  * per budgeted API key and period (``key_budget_spend``): ``reserved`` =
    SUM(its live holds), ``spent`` = SUM(their debits); the reserve keeps
    ``spent + reserved <= budget`` (``ledger/budgets.py``).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from creditgate.ledger.db import Db
from creditgate.ledger.errors import (
    AccountNotFound,
    CreditsExhausted,
    HoldEnded,
    HoldNotFound,
    IdempotencyConflict,
    KeyBudgetExceeded,
)
from creditgate.ledger.ids import time_ordered_id
from creditgate.ledger.kinds import HoldOutcome
from creditgate.ledger.money import micros_to_credits
from creditgate.ledger.posting import Entries, posting_statement


@dataclass(frozen=True, slots=True)
class Hold:
    id: uuid.UUID
    account_id: uuid.UUID
    amount: int


@dataclass(frozen=True, slots=True)
class Usage:
    """What a call consumed, as the proxy measured it."""

    input_tokens: int
    output_tokens: int
    cost: int  # µc, from proxy.pricing
    estimated: bool = False
    # The tokens by kind (proxy.pricing.recorded_breakdown) as (kind, value)
    # pairs — immutable, so a Usage stays hashable — kept on the debit entry
    # (column ``breakdown``, a JSON object); None: only the two totals are known.
    breakdown: tuple[tuple[str, int | str], ...] | None = None


def breakdown_json(usage: Usage) -> str | None:
    """The debit's ``breakdown`` as JSON text for a jsonb parameter (None: SQL NULL)."""
    if usage.breakdown is None:
        return None
    return orjson.dumps(dict(usage.breakdown)).decode()


@dataclass(frozen=True, slots=True)
class Settlement:
    entry_id: uuid.UUID
    debited: int  # µc actually taken (≤ cost: the overdraft limit caps it)
    uncollected: int  # cost - debited
    replayed: bool  # True when the hold had already been settled


# One statement, one round trip: the account's balance row is locked first
# (FOR UPDATE reads its latest version), then, when the key has a budget, the
# key's spend row of the current period is taken by an upsert whose ON CONFLICT
# condition is evaluated on the latest row — only if the balance fits; the
# balance and the hold follow only if both fit. Every writer of a spend row
# holds its account's balance row lock first, so that lock orders them all.
# $7 key id (NULL: a session), $8 the budget's time zone.
_RESERVE = """
WITH kb AS (
    SELECT key_id, budget, creditgate_budget_period_start(period, $8, now()) AS period_start
    FROM key_budgets WHERE key_id = $7
),
bal AS (
    SELECT account_id, balance, reserved, overdraft_limit
    FROM account_balances WHERE account_id = $2
    FOR UPDATE
),
ks AS (
    INSERT INTO key_budget_spend AS s (key_id, period_start, reserved)
    SELECT kb.key_id, kb.period_start, $3
    FROM kb, bal
    WHERE bal.balance - bal.reserved - $3 >= -bal.overdraft_limit AND $3 <= kb.budget
    ON CONFLICT (key_id, period_start) DO UPDATE
        SET reserved = s.reserved + EXCLUDED.reserved
        WHERE s.spent + s.reserved + EXCLUDED.reserved <= (SELECT budget FROM kb)
    RETURNING s.period_start
),
b AS (
    -- The CHECK's columns from the locked row (ledger/posting.py).
    UPDATE account_balances a
    SET reserved = bal.reserved + $3, balance = bal.balance,
        overdraft_limit = bal.overdraft_limit, updated_at = now()
    FROM bal
    WHERE a.account_id = bal.account_id
      AND bal.balance - bal.reserved - $3 >= -bal.overdraft_limit
      AND (NOT EXISTS (SELECT 1 FROM kb) OR EXISTS (SELECT 1 FROM ks))
    RETURNING a.account_id
),
ins AS (
    INSERT INTO holds (id, account_id, amount, request_id, model, expires_at, key_id,
                       budget_period_start)
    SELECT $1, b.account_id, $3, $4, $5, now() + $6::integer * interval '1 second', $7,
           (SELECT period_start FROM ks)
    FROM b
    RETURNING id
)
-- The hold, or why not, as the locked rows said (no row: no such account).
SELECT (SELECT id FROM ins) AS id,
       bal.balance - bal.reserved - $3 >= -bal.overdraft_limit AS credits_fit
FROM bal
"""

# Why a reserve was refused, read after the fact (the refusal path only).
_REFUSAL = """
SELECT a.balance - a.reserved AS available, a.overdraft_limit,
       b.budget, b.period,
       COALESCE(s.spent, 0) AS spent, COALESCE(s.reserved, 0) AS key_reserved,
       creditgate_budget_period_end(b.period, $3, now()) AS resets_at
FROM account_balances a
LEFT JOIN key_budgets b ON b.key_id = $2
LEFT JOIN key_budget_spend s
    ON s.key_id = b.key_id
   AND s.period_start = creditgate_budget_period_start(b.period, $3, now())
WHERE a.account_id = $1
"""


async def reserve_hold(
    db: Db,
    *,
    hold_id: uuid.UUID,
    account_id: uuid.UUID,
    amount: int,
    ttl_seconds: int,
    request_id: str | None = None,
    model: str | None = None,
    key_id: uuid.UUID | None = None,
    budget_zone: str = "UTC",
) -> Hold:
    """Reserve ``amount`` µc of the account's available credits.

    Raises CreditsExhausted when ``amount`` does not fit the available
    balance plus the overdraft limit, KeyBudgetExceeded when it does not fit
    what is left of key ``key_id``'s budget in its current period (periods
    in ``budget_zone``). ``hold_id`` is the idempotency key: a repeat returns
    the existing hold and reserves nothing more.
    """
    assert amount >= 0, amount
    try:
        got = await db.fetchrow(
            _RESERVE,
            hold_id,
            account_id,
            amount,
            request_id,
            model,
            ttl_seconds,
            key_id,
            budget_zone,
        )
    except asyncpg.UniqueViolationError:
        got = None  # a repeat of this hold id: fall through to the lookup
    if got is not None and got["id"] is not None:
        return Hold(hold_id, account_id, amount)
    row = await db.fetchrow("SELECT account_id, amount FROM holds WHERE id = $1", hold_id)
    if row is not None:
        if (row["account_id"], row["amount"]) != (account_id, amount):
            raise IdempotencyConflict("hold id reused with a different reservation")
        return Hold(hold_id, account_id, amount)
    # The credits fitted, so the key's budget is what refused: said so even if
    # the read below (later, unlocked) finds room again.
    key_refused = got is not None and got["credits_fit"]
    raise await refusal(db, account_id, amount, key_id, budget_zone, key_refused=key_refused)


async def refusal(
    db: Db,
    account_id: uuid.UUID,
    amount: int,
    key_id: uuid.UUID | None,
    budget_zone: str,
    *,
    key_refused: bool = False,
) -> CreditsExhausted | KeyBudgetExceeded | AccountNotFound:
    """Why a reserve of ``amount`` did not fit: the account's credits or the key's budget.

    Read after the refused statement (the refusal path only, never a
    success). ``key_refused``: the statement found the credits sufficient, so
    the budget refused. Otherwise, when both fall short now, the tighter one is
    named. Both answers carry what this call could hold now
    (``spendableMicros``: the smaller of the account's room and the budget's),
    from which the proxy derives the ``max_tokens`` the caller could still
    afford.
    """
    row = await db.fetchrow(_REFUSAL, account_id, key_id, budget_zone)
    if row is None:
        return AccountNotFound("no such account")
    room = row["available"] + row["overdraft_limit"]
    details: dict[str, Any] = {
        "requiredMicros": amount,
        "availableMicros": row["available"],
        "overdraftLimitMicros": row["overdraft_limit"],
    }
    if row["budget"] is not None:
        remaining = max(0, row["budget"] - row["spent"] - row["key_reserved"])
        details["spendableMicros"] = max(0, min(room, remaining))
        if key_refused or (remaining < amount and remaining <= room):
            budget = row["budget"]
            resets = row["resets_at"]
            when = f" It resets at {_iso(resets)}." if resets is not None else ""
            return KeyBudgetExceeded(
                "This request does not fit this API key's budget: it may cost up to "
                f"{micros_to_credits(amount)} credits, {micros_to_credits(remaining)} of the "
                f"key's {micros_to_credits(budget)} credits are left.{when}",
                details={
                    "budget": micros_to_credits(budget),
                    "budgetMicros": budget,
                    "budgetPeriod": row["period"],
                    "spent": micros_to_credits(row["spent"]),
                    "spentMicros": row["spent"],
                    "reservedMicros": row["key_reserved"],
                    "remainingMicros": remaining,
                    "resetsAt": _iso(resets),
                    **details,
                },
            )
    else:
        details["spendableMicros"] = max(0, room)
    return CreditsExhausted(
        "Insufficient credits: this request may cost up to "
        f"{micros_to_credits(amount)} credits, {micros_to_credits(row['available'])} available.",
        details=details,
    )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def settle_fingerprint(usage: Usage) -> bytes:
    """What identifies a settlement's request (stored on its debit entry)."""
    text = f"settle|{usage.cost}|{usage.input_tokens}|{usage.output_tokens}|{usage.estimated}"
    return hashlib.sha256(text.encode()).digest()


# The debit of a hold's call ($1 hold id, $2 cost, $3 entry id, $4 fingerprint,
# $5/$6 tokens, $7 estimated, $8 breakdown), from the CTE "d" of each statement below.
_DEBIT_OF_HOLD = {
    "id": "$3",
    "kind": "'debit'",
    "amount": "-d.debit",
    "idempotency_key": "'hold:' || $1::text",
    "fingerprint": "$4",
    "hold_id": "$1",
    "request_id": "d.request_id",
    "model": "d.model",
    "input_tokens": "$5",
    "output_tokens": "$6",
    "estimated": "$7",
    "uncollected": "$2 - d.debit",
    "breakdown": "$8::jsonb",
}

# A budgeted key's spend: the settled hold's amount leaves ``reserved``, its
# debit joins ``spent``, in the period the hold was counted in (after the
# balance row is locked: the order every writer of a spend row takes).
_SPEND_OF_SETTLED = """spend AS (
    UPDATE key_budget_spend s
    SET reserved = s.reserved - d.held, spent = s.spent + d.debit
    FROM d
    WHERE s.key_id = d.key_id AND s.period_start = d.budget_period_start
)"""

# End the hold, debit the actual cost (capped so available stays within the
# overdraft limit), release the rest of the reservation — in one statement,
# built by the posting rule (ledger/posting.py: the hold row is ended, so
# locked, before the balance row; the debit is computed from the locked row).
_SETTLE = posting_statement(
    before_lock=[
        """h AS (
    UPDATE holds SET outcome = 'settled', ended_at = now()
    WHERE id = $1 AND ended_at IS NULL
    RETURNING account_id, amount, request_id, model, key_id, budget_period_start
)"""
    ],
    lock_where="account_id = (SELECT account_id FROM h)",
    before_entries=[
        """d AS (
    SELECT h.account_id, h.amount AS held, h.request_id, h.model, h.key_id,
           h.budget_period_start,
           LEAST($2::bigint, locked.balance - locked.reserved + h.amount + locked.overdraft_limit)
               AS debit
    FROM h JOIN locked USING (account_id)
)"""
    ],
    entries=Entries(
        source="d",
        values=_DEBIT_OF_HOLD,
    ),
    after_entries=[_SPEND_OF_SETTLED],
    reserved=" - d.held",
    balance_join="JOIN d USING (account_id)",
    result="SELECT d.debit AS debited FROM d JOIN balanced USING (account_id)",
)

# A hold the sweeper expired while its call was still running: the call's
# usage is real, so it is debited anyway (nothing is reserved any more).
_LATE_DEBIT = posting_statement(
    before_lock=[
        """h AS (
    SELECT account_id, request_id, model, key_id, budget_period_start
    FROM holds WHERE id = $1 AND outcome = 'expired'
)"""
    ],
    lock_where="account_id = (SELECT account_id FROM h)",
    before_entries=[
        """d AS (
    SELECT h.account_id, h.request_id, h.model, h.key_id, h.budget_period_start,
           GREATEST(0, LEAST($2::bigint,
                             locked.balance - locked.reserved + locked.overdraft_limit)) AS debit
    FROM h JOIN locked USING (account_id)
)"""
    ],
    entries=Entries(
        source="d",
        values={**_DEBIT_OF_HOLD, "reason": "'settled after hold expiry'"},
    ),
    # Its expiry already gave the held amount back: only the debit is spent.
    after_entries=[
        """spend AS (
    UPDATE key_budget_spend s
    SET spent = s.spent + d.debit
    FROM d
    WHERE s.key_id = d.key_id AND s.period_start = d.budget_period_start
)"""
    ],
    result="SELECT d.debit AS debited FROM d JOIN balanced USING (account_id)",
)


async def settle_hold(db: Db, hold_id: uuid.UUID, usage: Usage) -> Settlement:
    """Debit the actual cost of a held call and release the rest of its hold.

    Exactly once: a repeat returns the first settlement and writes nothing.
    Settling a released hold raises HoldEnded. A cost above the hold is still
    debited, as far as the overdraft limit allows; the rest is recorded as
    ``uncollected`` on the entry.
    """
    assert usage.cost >= 0 and usage.input_tokens >= 0 and usage.output_tokens >= 0, usage
    fingerprint = settle_fingerprint(usage)
    entry_id = time_ordered_id()
    args = (
        hold_id,
        usage.cost,
        entry_id,
        fingerprint,
        usage.input_tokens,
        usage.output_tokens,
        usage.estimated,
        breakdown_json(usage),
    )
    debited = await db.fetchval(_SETTLE, *args)
    if debited is not None:
        return Settlement(entry_id, debited, usage.cost - debited, replayed=False)

    for _ in range(2):
        row = await db.fetchrow(
            """
            SELECT h.outcome, e.id, e.amount, e.uncollected
            FROM holds h LEFT JOIN ledger_entries e ON e.hold_id = h.id
            WHERE h.id = $1
            """,
            hold_id,
        )
        if row is None:
            raise HoldNotFound("no such hold")
        if row["id"] is not None:  # already debited: the first result
            return Settlement(row["id"], -row["amount"], row["uncollected"], replayed=True)
        if row["outcome"] != "expired":
            raise HoldEnded(f"hold already ended ({row['outcome']}); it cannot be settled")
        try:
            debited = await db.fetchval(_LATE_DEBIT, *args)
        except asyncpg.UniqueViolationError:
            continue  # a concurrent late settle won: read its result
        assert debited is not None
        return Settlement(entry_id, debited, usage.cost - debited, replayed=False)
    raise AssertionError("unreachable: a late debit neither wrote nor was found")


# A budgeted key's held amount is given back too: its spend row is updated
# after the balance row (a data-modifying CTE nobody reads runs last).
_RELEASE = """
WITH h AS (
    UPDATE holds SET outcome = $2, ended_at = now()
    WHERE id = $1 AND ended_at IS NULL
    RETURNING account_id, amount, key_id, budget_period_start
),
spend AS (
    UPDATE key_budget_spend s
    SET reserved = s.reserved - h.amount
    FROM h
    WHERE s.key_id = h.key_id AND s.period_start = h.budget_period_start
)
UPDATE account_balances a
SET reserved = a.reserved - h.amount, updated_at = now()
FROM h
WHERE a.account_id = h.account_id
RETURNING a.account_id
"""


async def release_hold(db: Db, hold_id: uuid.UUID, *, expired: bool = False) -> bool:
    """End a hold without a charge. Returns False if it had already ended."""
    outcome: HoldOutcome = "expired" if expired else "released"
    return await db.fetchval(_RELEASE, hold_id, outcome) is not None


async def sweep_expired_holds(db: Db, limit: int = 500) -> int:
    """End holds past their expiry (a crashed process's); returns how many.

    A hold whose call recorded progress (``hold_progress``: a stream that
    delivered text before its process died) is settled for that progress,
    marked estimated — served usage is never forgiven; any other is expired
    with no charge. Safe to run in every process at once: each hold ends
    once, whoever is first.
    """
    rows = await db.fetch(
        """
        SELECT h.id, p.input_tokens, p.output_tokens, p.cost
        FROM holds h LEFT JOIN hold_progress p ON p.hold_id = h.id
        WHERE h.ended_at IS NULL AND h.expires_at < now()
        ORDER BY h.expires_at LIMIT $1
        """,
        limit,
    )
    ended = 0
    for r in rows:
        if r["cost"] is None:
            ended += await release_hold(db, r["id"], expired=True)
            continue
        usage = Usage(r["input_tokens"], r["output_tokens"], r["cost"], estimated=True)
        try:
            settlement = await settle_hold(db, r["id"], usage)
        except HoldEnded:
            continue  # ended meanwhile (released by its own process): nothing owed here
        ended += not settlement.replayed
    # Progress of ended holds is of no more use (the charge is on the entry).
    await db.execute(
        "DELETE FROM hold_progress p USING holds h"
        " WHERE h.id = p.hold_id AND h.ended_at IS NOT NULL"
    )
    return ended


async def count_live_holds(db: Db) -> int:
    """Holds not yet ended, over every account (a partial index keeps this cheap)."""
    return int(await db.fetchval("SELECT count(*) FROM holds WHERE ended_at IS NULL"))
