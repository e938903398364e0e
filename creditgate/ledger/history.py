"""An account's ledger entries, newest first, in cursor pages (``GET /api/user/usage``).

Every query is scoped by the account id the caller was authenticated as; a
cursor only says where the previous page ended, so a cursor from another
account or another filter can never show rows the caller may not see.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from creditgate.ledger.db import Db
from creditgate.ledger.entries import ENTRY_KINDS, iso
from creditgate.ledger.errors import InvalidArgument
from creditgate.ledger.money import micros_to_credits

MAX_PAGE = 200
_CURSOR = re.compile(r"^e([1-9][0-9]{0,17})$")  # a bigint seq: 18 digits always fit


# Where an entry came from, read off its kind and idempotency key (every writer
# uses its own key namespace), so no column or migration is needed for it.
SOURCES = ("admin", "polar_order", "refund", "expiry", "usage", "usage_record", "dev", "other")
_KEY_SOURCES = (
    ("admin:", "admin"),
    ("polar:order:", "polar_order"),
    ("polar:refund:", "refund"),
    ("usage:", "usage_record"),
    ("dev:", "dev"),
)
_DEFAULT_DESCRIPTION = {
    "admin": "granted by an operator",
    "polar_order": "Polar order",
    "refund": "Polar refund",
    "expiry": "unused credits expired",
    "usage": "model usage",
    "usage_record": "recorded usage",
    "dev": "creditgate dev demo credits",
}


# The token kinds a debit's breakdown may hold (proxy.pricing.TokenCounts'
# fields, which the ledger does not import: it is below the proxy).
KINDS = (
    "input",
    "output",
    "cached_input",
    "cache_write",
    "audio_input",
    "audio_output",
    "reasoning",
    "accepted_prediction",
    "rejected_prediction",
)


def camel(kind: str) -> str:
    """``cached_input`` → ``cachedInput``: a kind as the JSON API names it."""
    head, *rest = kind.split("_")
    return head + "".join(w.capitalize() for w in rest)


def entry_source(kind: str, idempotency_key: str) -> str:
    """The ``SOURCES`` name of an entry of ``kind`` written under ``idempotency_key``."""
    if kind == "expiry":
        return "expiry"
    for prefix, source in _KEY_SOURCES:
        if idempotency_key.startswith(prefix):
            return source
    return "usage" if kind == "debit" else "other"


@dataclass(frozen=True, slots=True)
class EntryView:
    seq: int
    id: uuid.UUID
    kind: str
    amount: int
    model: str | None
    input_tokens: int | None
    output_tokens: int | None
    request_id: str | None
    estimated: bool
    expires_at: datetime | None
    created_at: datetime
    reason: str | None = None
    source: str = "other"
    breakdown: dict[str, Any] | None = None  # the debit's tokens by kind (migration 0012)

    @property
    def tokens(self) -> dict[str, int] | None:
        """The entry's tokens by kind, camel-cased (``input``, ``output``,
        ``cachedInput``, …: the non-zero kinds), or None for an entry without
        tokens. Entries recorded before kinds were kept show their two totals.
        The upstream's reported cost stays in the ledger: it is not the
        caller's (a reseller's margin)."""
        if self.breakdown is not None:
            return {
                camel(k): v for k, v in self.breakdown.items() if isinstance(v, int) and k in KINDS
            }
        if self.input_tokens is None and self.output_tokens is None:
            return None
        return {"input": self.input_tokens or 0, "output": self.output_tokens or 0}

    @property
    def description(self) -> str:
        """What the entry is, for people: its reason, else one derived from its source."""
        if self.reason:
            return self.reason
        if self.source in ("usage", "usage_record") and self.model:
            tokens = f"{self.input_tokens or 0} input, {self.output_tokens or 0} output tokens"
            return f"{self.model}: {tokens}"
        return _DEFAULT_DESCRIPTION.get(self.source, self.kind)

    def as_json(self) -> dict[str, Any]:
        """One entry of DESIGN.md §9's usage shape (plus ``expiresAt`` of expiring grants).

        ``source`` says where it came from (``SOURCES``) and ``description``
        what it is: the grant's reason ("welcome", "Polar order …"), or a
        description derived from the source.
        """
        return {
            "source": self.source,
            "description": self.description,
            "id": str(self.id),
            "kind": self.kind,
            "amount": micros_to_credits(self.amount),
            "amountMicros": self.amount,
            "model": self.model,
            "inputTokens": self.input_tokens,
            "outputTokens": self.output_tokens,
            "requestId": self.request_id,
            "estimated": self.estimated,
            "tokens": self.tokens,
            "expiresAt": iso(self.expires_at) if self.expires_at else None,
            "createdAt": iso(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class Page:
    entries: list[EntryView]
    next_cursor: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "entries": [e.as_json() for e in self.entries],
            "nextCursor": self.next_cursor,
        }


def encode_cursor(seq: int) -> str:
    """An opaque cursor for 'entries older than ``seq``'."""
    return base64.urlsafe_b64encode(f"e{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The seq a cursor of ``encode_cursor`` stands for; InvalidArgument otherwise."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    m = _CURSOR.match(raw)
    if m is None:
        raise InvalidArgument(
            "The cursor is not one this API gave out; pass nextCursor unchanged.",
            details=[{"path": "cursor", "message": "invalid cursor"}],
        )
    return int(m.group(1))


async def list_entries(
    db: Db,
    account_id: uuid.UUID,
    *,
    limit: int = 50,
    cursor: str | None = None,
    kinds: tuple[str, ...] = (),
    since: datetime | None = None,
    until: datetime | None = None,
) -> Page:
    """The account's entries newest first: at most ``limit``, older than ``cursor``.

    ``kinds`` keeps only those kinds; ``since`` (inclusive) and ``until``
    (exclusive) bound ``createdAt``. The predicates are added only when used,
    so each shape of query keeps an index-friendly plan.
    """
    assert 1 <= limit <= MAX_PAGE, limit
    assert all(k in ENTRY_KINDS for k in kinds), kinds
    conditions = ["account_id = $1"]
    args: list[Any] = [account_id]
    if cursor is not None:
        args.append(decode_cursor(cursor))
        conditions.append(f"seq < ${len(args)}")
    if kinds:
        args.append(list(kinds))
        conditions.append(f"kind = ANY(${len(args)}::text[])")
    if since is not None:
        args.append(since)
        conditions.append(f"created_at >= ${len(args)}")
    if until is not None:
        args.append(until)
        conditions.append(f"created_at < ${len(args)}")
    args.append(limit + 1)
    # Only fixed column names and numbered placeholders are joined in: no input
    # reaches the SQL text.
    where = " AND ".join(conditions)
    sql = (
        "SELECT seq, id, kind, amount, model, input_tokens, output_tokens, request_id,"  # noqa: S608
        f" estimated, expires_at, created_at, reason, idempotency_key, breakdown"
        f" FROM ledger_entries WHERE {where}"
        f" ORDER BY seq DESC LIMIT ${len(args)}"
    )
    rows = await db.fetch(sql, *args)
    entries = []
    for r in rows[:limit]:
        fields = dict(r)
        key = fields.pop("idempotency_key")
        raw = fields.pop("breakdown")
        breakdown = orjson.loads(raw) if raw is not None else None
        entries.append(
            EntryView(**fields, source=entry_source(fields["kind"], key), breakdown=breakdown)
        )
    more = len(rows) > limit
    return Page(entries, encode_cursor(entries[-1].seq) if more else None)
