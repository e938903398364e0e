"""Posted money moves other than call debits: grants, adjustments, reversals."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from creditgate.ledger.db import Db
from creditgate.ledger.errors import AccountNotFound, CreditsExhausted, IdempotencyConflict
from creditgate.ledger.ids import time_ordered_id
from creditgate.ledger.kinds import ENTRY_KINDS as ENTRY_KINDS  # re-exported
from creditgate.ledger.kinds import EntryKind, PostedKind
from creditgate.ledger.money import micros_to_credits
from creditgate.ledger.posting import Entries, posting_statement


@dataclass(frozen=True, slots=True)
class Posted:
    entry_id: uuid.UUID
    account_id: uuid.UUID
    kind: EntryKind
    amount: int  # signed µc
    balance: int  # the account's balance right after the entry (the same on a replay)
    expires_at: datetime | None
    created_at: datetime
    replayed: bool

    def as_json(self) -> dict[str, object]:
        """The entry and the balance right after it: the same for the first call and a replay."""
        return {
            "entryId": str(self.entry_id),
            "accountId": str(self.account_id),
            "kind": self.kind,
            "amount": micros_to_credits(self.amount),
            "amountMicros": self.amount,
            "balance": micros_to_credits(self.balance),
            "balanceMicros": self.balance,
            "expiresAt": iso(self.expires_at) if self.expires_at else None,
            "createdAt": iso(self.created_at),
        }


def iso(when: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, as the API shows every time."""
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


# The posting rule (ledger/posting.py): the balance row locked, the entry
# inserted from it (a repeated key inserts nothing, so changes nothing), the
# balance from the entry.
_POST = posting_statement(
    lock_where="account_id = $2",
    entries=Entries(
        values={
            "id": "$1",
            "kind": "$3",
            "amount": "$4::bigint",
            "idempotency_key": "$5",
            "fingerprint": "$6",
            "reason": "$7",
            "expires_at": "$8",
        },
        on_conflict_do_nothing=True,
        returning=["created_at"],
    ),
    result="SELECT balanced.balance, posted.created_at"
    " FROM posted JOIN balanced USING (account_id)",
)


def _fingerprint(
    account_id: uuid.UUID, kind: str, amount: int, reason: str, expires_at: datetime | None
) -> bytes:
    text = f"{account_id}|{kind}|{amount}|{reason}"
    if expires_at is not None:  # appended only when set: older keys keep their fingerprint
        text += f"|expires:{iso(expires_at)}"
    return hashlib.sha256(text.encode()).digest()


async def post_entry(
    db: Db,
    *,
    account_id: uuid.UUID,
    amount: int,
    kind: PostedKind,
    idempotency_key: str,
    reason: str,
    expires_at: datetime | None = None,
) -> Posted:
    """Post a grant (amount > 0), adjustment or reversal, once per idempotency key.

    A grant with ``expires_at`` makes a lot of credits that expire then
    (migration 0002 allocates debits to it). The same key with the same request
    returns the first result — the same entry and balance — and writes nothing;
    with a different request it raises IdempotencyConflict. A negative amount the
    account cannot cover within its overdraft limit raises CreditsExhausted;
    an unknown account AccountNotFound.
    """
    assert kind in ("grant", "adjustment", "reversal"), kind
    assert amount != 0 and (kind != "grant" or amount > 0), (kind, amount)
    assert expires_at is None or (kind == "grant" and expires_at.tzinfo is not None), expires_at
    fingerprint = _fingerprint(account_id, kind, amount, reason, expires_at)
    entry_id = time_ordered_id()
    try:
        row = await db.fetchrow(
            _POST,
            entry_id,
            account_id,
            kind,
            amount,
            idempotency_key,
            fingerprint,
            reason,
            expires_at,
        )
    except asyncpg.CheckViolationError as e:
        if e.constraint_name != "available_within_overdraft":
            raise
        raise CreditsExhausted(
            f"An adjustment of {micros_to_credits(amount)} credits would take the account"
            " below its overdraft limit.",
            details={"amountMicros": amount},
        ) from None
    if row is not None:
        return Posted(
            entry_id,
            account_id,
            kind,
            amount,
            row["balance"],
            expires_at,
            row["created_at"],
            replayed=False,
        )
    return await _replay(db, idempotency_key, fingerprint, account_id)


async def _replay(
    db: Db, idempotency_key: str, fingerprint: bytes, account_id: uuid.UUID
) -> Posted:
    row = await db.fetchrow(
        """
        SELECT e.id, e.account_id, e.kind, e.amount, e.fingerprint, e.expires_at, e.created_at,
               COALESCE(e.balance_after, a.balance) AS balance
        FROM ledger_entry_keys k
        JOIN ledger_entries e ON e.id = k.id AND e.created_at = k.created_at
        JOIN account_balances a USING (account_id)
        WHERE k.idempotency_key = $1
        """,
        idempotency_key,
    )
    if row is None:
        raise AccountNotFound(f"no account {account_id}")
    if row["fingerprint"] != fingerprint:
        raise IdempotencyConflict("This idempotency key was already used with a different request.")
    return Posted(
        row["id"],
        row["account_id"],
        row["kind"],
        row["amount"],
        row["balance"],
        row["expires_at"],
        row["created_at"],
        replayed=True,
    )
