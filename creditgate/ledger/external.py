"""Usage recorded from outside the proxy (``POST /api/usage/record``): a debit with its hold.

Every debit belongs to a hold (migration 0002's CHECK). A recorded usage is
reserved and settled at once: one statement locks the balance row, checks the
cost fits (the available balance, or the overdraft too when the caller allows
it), inserts a hold already *settled* for exactly the cost, its debit entry,
the ``usage_records`` row, and updates the balance — all or nothing. So it
reads in the ledger exactly like a proxied call (kind ``debit``, a settled
hold, ``balance_after``), and the usage exporter sends it to Polar the same
way, once.

Idempotency is the entry's unique key: a repeat with the same request returns
the first result and writes nothing; with another request it is an IdempotencyConflict.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from creditgate.ledger.db import Db
from creditgate.ledger.entries import iso
from creditgate.ledger.errors import AccountNotFound, CreditsExhausted, IdempotencyConflict
from creditgate.ledger.history import camel
from creditgate.ledger.ids import time_ordered_id
from creditgate.ledger.money import micros_to_credits
from creditgate.ledger.posting import Entries, posting_statement


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """What to record: the money (``cost``) and what the caller said about it."""

    account_id: uuid.UUID
    client_key: str  # the caller's idempotency key (unique per account)
    cost: int  # µc, ≥ 0
    cost_source: str  # "tokens" | "explicit"
    model: str | None
    input_tokens: int | None
    output_tokens: int | None
    occurred_at: datetime | None  # None: now
    metadata: dict[str, Any]
    allow_overdraft: bool
    recorded_by: str
    request_id: str | None = None
    # The tokens by kind, as a proxied debit keeps them (snake_case kinds,
    # ``input`` and ``output`` included); None when only a cost was given.
    breakdown: Mapping[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Recorded:
    """A recorded usage's entry, the same for the first call and every replay."""

    entry_id: uuid.UUID
    hold_id: uuid.UUID
    account_id: uuid.UUID
    cost: int  # µc debited
    balance: int  # the account's balance right after the entry
    model: str | None
    input_tokens: int | None
    output_tokens: int | None
    occurred_at: datetime
    metadata: dict[str, Any]
    created_at: datetime
    replayed: bool
    breakdown: Mapping[str, int] | None = None

    def as_json(self) -> dict[str, Any]:
        """The API's answer: the entry and the balance right after it."""
        return {
            "entryId": str(self.entry_id),
            "holdId": str(self.hold_id),
            "accountId": str(self.account_id),
            "cost": micros_to_credits(self.cost),
            "costMicros": self.cost,
            "balance": micros_to_credits(self.balance),
            "balanceMicros": self.balance,
            "model": self.model,
            "inputTokens": self.input_tokens,
            "outputTokens": self.output_tokens,
            "tokens": (
                {camel(k): v for k, v in self.breakdown.items()}
                if self.breakdown is not None
                else None
            ),
            "occurredAt": iso(self.occurred_at),
            "metadata": self.metadata,
            "createdAt": iso(self.created_at),
        }


def idempotency_key(account_id: uuid.UUID, client_key: str) -> str:
    """The ledger key of a recorded usage: the caller's key, per account."""
    return f"usage:{account_id}:{client_key}"


def fingerprint(record: UsageRecord) -> bytes:
    """What identifies the request behind a key (the same key with another is a 409).

    The kinds beyond the two totals count only when there are any, so a
    record made before kinds were kept replays with the same fingerprint."""
    extra: dict[str, Any] = {}
    if record.breakdown is not None and set(record.breakdown) - {"input", "output"}:
        extra["tokens"] = dict(record.breakdown)
    text = orjson.dumps(
        {
            **extra,
            "account": str(record.account_id),
            "cost": record.cost,
            "source": record.cost_source,
            "model": record.model,
            "in": record.input_tokens,
            "out": record.output_tokens,
            "at": record.occurred_at.isoformat() if record.occurred_at else None,
            "metadata": record.metadata,
            "overdraft": record.allow_overdraft,
        },
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(b"usage|" + text).digest()


# One statement, by the posting rule (ledger/posting.py): the balance row
# locked and the cost tested against it (ok; without allow_overdraft the
# available balance must cover it, with it the overdraft limit too — the
# row's CHECK stays the last word); a hold inserted already settled (h); its
# debit from the locked row; the usage record (u); the balance. A repeated
# key fails the entry's unique index and rolls the whole statement back, hold
# included.
_RECORD = posting_statement(
    lock_where="account_id = $2",
    before_entries=[
        """ok AS (
    SELECT * FROM locked
    WHERE locked.balance - locked.reserved - $3
          >= CASE WHEN $4 THEN -locked.overdraft_limit ELSE 0 END
)""",
        """h AS (
    INSERT INTO holds (id, account_id, amount, request_id, model, expires_at, outcome, ended_at)
    SELECT $5, ok.account_id, $3, $6, $7, now(), 'settled', now() FROM ok
    RETURNING id AS hold_id, account_id
)""",
    ],
    entries=Entries(
        source="h",
        values={
            "id": "$1",
            "kind": "'debit'",
            "amount": "-$3::bigint",
            "idempotency_key": "$8",
            "fingerprint": "$9",
            "hold_id": "h.hold_id",
            "request_id": "$6",
            "model": "$7",
            "input_tokens": "$10",
            "output_tokens": "$11",
            "estimated": "false",
            "uncollected": "0",
            "reason": "'recorded usage'",
            "breakdown": "$17::jsonb",
        },
        returning=["id", "created_at"],
    ),
    after_entries=[
        """u AS (
    INSERT INTO usage_records
        (entry_id, account_id, client_key, occurred_at, metadata, cost_source, allow_overdraft,
         recorded_by)
    SELECT posted.id, posted.account_id, $12, COALESCE($13, posted.created_at), $14::jsonb,
           $15, $4, $16
    FROM posted
    RETURNING occurred_at
)"""
    ],
    result="SELECT balanced.balance, posted.created_at, u.occurred_at"
    " FROM posted JOIN balanced USING (account_id), u",
)

_FIND = """
SELECT e.id, e.hold_id, e.account_id, e.fingerprint, -e.amount AS cost, e.balance_after,
       e.model, e.input_tokens, e.output_tokens, e.created_at, r.occurred_at, r.metadata,
       e.breakdown
FROM ledger_entry_keys k
JOIN ledger_entries e ON e.id = k.id AND e.created_at = k.created_at
JOIN usage_records r ON r.entry_id = e.id
WHERE k.idempotency_key = $1
"""


async def record_usage(db: Db, record: UsageRecord) -> Recorded:
    """Debit ``record.cost`` for usage that did not go through the proxy; once per key.

    Raises CreditsExhausted when the cost does not fit the available
    balance (or, with ``allow_overdraft``, the overdraft limit either);
    IdempotencyConflict when the key was used with another request; AccountNotFound for
    an unknown account.
    """
    assert record.cost >= 0, record.cost
    key = idempotency_key(record.account_id, record.client_key)
    print_ = fingerprint(record)
    found = await _replay(db, key, print_)
    if found is not None:
        return found
    entry_id, hold_id = time_ordered_id(), time_ordered_id()
    try:
        row = await db.fetchrow(
            _RECORD,
            entry_id,
            record.account_id,
            record.cost,
            record.allow_overdraft,
            hold_id,
            record.request_id,
            record.model,
            key,
            print_,
            record.input_tokens,
            record.output_tokens,
            record.client_key,
            record.occurred_at,
            orjson.dumps(record.metadata).decode(),
            record.cost_source,
            record.recorded_by,
            orjson.dumps(dict(record.breakdown)).decode() if record.breakdown is not None else None,
        )
    except asyncpg.UniqueViolationError:
        row = None  # a concurrent request with this key won: answer its result
    except asyncpg.CheckViolationError as e:
        if e.constraint_name != "available_within_overdraft":
            raise
        row = None  # the overdraft limit changed under us: refused below
    if row is not None:
        return Recorded(
            entry_id,
            hold_id,
            record.account_id,
            record.cost,
            row["balance"],
            record.model,
            record.input_tokens,
            record.output_tokens,
            row["occurred_at"],
            record.metadata,
            row["created_at"],
            replayed=False,
            breakdown=record.breakdown,
        )
    found = await _replay(db, key, print_)
    if found is not None:
        return found
    bal = await db.fetchrow(
        "SELECT balance - reserved AS available, overdraft_limit FROM account_balances"
        " WHERE account_id = $1",
        record.account_id,
    )
    if bal is None:
        raise AccountNotFound("no such account")
    room = bal["available"] + (bal["overdraft_limit"] if record.allow_overdraft else 0)
    hint = (
        ""
        if record.allow_overdraft or bal["overdraft_limit"] == 0
        else " Send allowOverdraft: true to let it use the account's overdraft limit."
    )
    raise CreditsExhausted(
        f"Insufficient credits: this usage costs {micros_to_credits(record.cost)} credits,"
        f" {micros_to_credits(max(room, 0))} can be charged.{hint}",
        details={
            "requiredMicros": record.cost,
            "availableMicros": bal["available"],
            "overdraftLimitMicros": bal["overdraft_limit"],
            "allowOverdraft": record.allow_overdraft,
        },
    )


async def _replay(db: Db, key: str, print_: bytes) -> Recorded | None:
    row = await db.fetchrow(_FIND, key)
    if row is None:
        return None
    if row["fingerprint"] != print_:
        raise IdempotencyConflict("This idempotency key was already used with a different request.")
    return Recorded(
        row["id"],
        row["hold_id"],
        row["account_id"],
        row["cost"],
        row["balance_after"],
        row["model"],
        row["input_tokens"],
        row["output_tokens"],
        row["occurred_at"],
        orjson.loads(row["metadata"]),
        row["created_at"],
        replayed=True,
        breakdown=orjson.loads(row["breakdown"]) if row["breakdown"] is not None else None,
    )
