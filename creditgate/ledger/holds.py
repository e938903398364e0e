"""Holds: the two-phase reservation of one call's worst-case cost.

``reserve_hold`` → ``settle_hold(actual cost)`` or ``release_hold``. A hold ends
exactly once; the database refuses a second end (trigger) and a second debit
(unique ``hold_id``). Each function is one SQL statement, so it commits or
does nothing, and takes the account's balance row lock for the shortest time.

Invariants (checked by ``verify``):
  * ``reserved`` = SUM(amount of live holds) of the account;
  * a settled hold has exactly one debit entry, a released one none;
  * ``balance - reserved >= -overdraft_limit`` (CHECK on the row).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

import asyncpg
import orjson

from creditgate.ledger.db import Db
from creditgate.ledger.errors import (
    AccountNotFound,
    CreditsExhausted,
    HoldEnded,
    HoldNotFound,
    IdempotencyConflict,
)
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


_RESERVE = """
WITH b AS (
    UPDATE account_balances
    SET reserved = reserved + $3, updated_at = now()
    WHERE account_id = $2 AND balance - reserved - $3 >= -overdraft_limit
    RETURNING account_id
)
INSERT INTO holds (id, account_id, amount, request_id, model, expires_at)
SELECT $1, b.account_id, $3, $4, $5, now() + $6::integer * interval '1 second'
FROM b
RETURNING id
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
) -> Hold:
    """Reserve ``amount`` µc of the account's available credits.

    Raises CreditsExhausted when ``amount`` does not fit the available
    balance plus the overdraft limit. ``hold_id`` is the idempotency key: a
    repeat returns the existing hold and reserves nothing more.
    """
    assert amount >= 0, amount
    try:
        got = await db.fetchval(
            _RESERVE, hold_id, account_id, amount, request_id, model, ttl_seconds
        )
    except asyncpg.UniqueViolationError:
        got = None  # a repeat of this hold id: fall through to the lookup
    if got is not None:
        return Hold(hold_id, account_id, amount)
    row = await db.fetchrow("SELECT account_id, amount FROM holds WHERE id = $1", hold_id)
    if row is not None:
        if (row["account_id"], row["amount"]) != (account_id, amount):
            raise IdempotencyConflict("hold id reused with a different reservation")
        return Hold(hold_id, account_id, amount)
    bal = await db.fetchrow(
        "SELECT balance - reserved AS available, overdraft_limit FROM account_balances"
        " WHERE account_id = $1",
        account_id,
    )
    if bal is None:
        raise AccountNotFound("no such account")
    raise CreditsExhausted(
        "Insufficient credits: this request may cost up to "
        f"{micros_to_credits(amount)} credits, {micros_to_credits(bal['available'])} available.",
        details={
            "requiredMicros": amount,
            "availableMicros": bal["available"],
            "overdraftLimitMicros": bal["overdraft_limit"],
        },
    )


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

# End the hold, debit the actual cost (capped so available stays within the
# overdraft limit), release the rest of the reservation — in one statement,
# built by the posting rule (ledger/posting.py: the hold row is ended, so
# locked, before the balance row; the debit is computed from the locked row).
_SETTLE = posting_statement(
    before_lock=[
        """h AS (
    UPDATE holds SET outcome = 'settled', ended_at = now()
    WHERE id = $1 AND ended_at IS NULL
    RETURNING account_id, amount, request_id, model
)"""
    ],
    lock_where="account_id = (SELECT account_id FROM h)",
    before_entries=[
        """d AS (
    SELECT h.account_id, h.amount AS held, h.request_id, h.model,
           LEAST($2::bigint, locked.balance - locked.reserved + h.amount + locked.overdraft_limit)
               AS debit
    FROM h JOIN locked USING (account_id)
)"""
    ],
    entries=Entries(
        source="d",
        values=_DEBIT_OF_HOLD,
    ),
    reserved=" - d.held",
    balance_join="JOIN d USING (account_id)",
    result="SELECT d.debit AS debited FROM d JOIN balanced USING (account_id)",
)

# A hold the sweeper expired while its call was still running: the call's
# usage is real, so it is debited anyway (nothing is reserved any more).
_LATE_DEBIT = posting_statement(
    before_lock=[
        """h AS (
    SELECT account_id, request_id, model FROM holds WHERE id = $1 AND outcome = 'expired'
)"""
    ],
    lock_where="account_id = (SELECT account_id FROM h)",
    before_entries=[
        """d AS (
    SELECT h.account_id, h.request_id, h.model,
           GREATEST(0, LEAST($2::bigint,
                             locked.balance - locked.reserved + locked.overdraft_limit)) AS debit
    FROM h JOIN locked USING (account_id)
)"""
    ],
    entries=Entries(
        source="d",
        values={**_DEBIT_OF_HOLD, "reason": "'settled after hold expiry'"},
    ),
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
    entry_id = uuid.uuid4()
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


_RELEASE = """
WITH h AS (
    UPDATE holds SET outcome = $2, ended_at = now()
    WHERE id = $1 AND ended_at IS NULL
    RETURNING account_id, amount
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
