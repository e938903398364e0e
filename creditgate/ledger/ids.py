"""Ids of holds and ledger entries: time-ordered UUIDs (RFC 9562 version 7).

A version 7 UUID starts with its creation time in milliseconds, so the ids a
server makes sort in the order they were made. Every index keyed by them
(``holds`` and ``ledger_entry_keys`` primary keys, each partition's
``(id, created_at)``, the ``hold_id`` indexes, the ``'hold:' || id``
idempotency keys) then takes its inserts at its right-most pages, which stay
in memory, instead of at a random page of an index that outgrows memory
with history: the reason reserve and settle cost the same at 10 million
entries as on an empty ledger (docs/capacity.md). Uniqueness does not rest on
the clock: the rest of each id is a counter and random bits (uuid-utils,
after Rust's ``uuid`` crate), and the database's unique indexes hold anyway.
"""

from __future__ import annotations

import uuid

from uuid_utils.compat import uuid7


def time_ordered_id() -> uuid.UUID:
    """A new version 7 UUID (a standard ``uuid.UUID``), later than this process's previous one."""
    return uuid7()
