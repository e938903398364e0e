"""The ledger's closed sets of strings, as types: what the database's CHECKs allow.

Each mirrors a CHECK of migration 0001 (the database stays the authority);
as Literal types, strict mypy refuses a misspelt kind or outcome before the
database would.
"""

from __future__ import annotations

from typing import Literal, get_args

# ledger_entries.kind
EntryKind = Literal["grant", "debit", "adjustment", "reversal", "expiry"]
ENTRY_KINDS: tuple[EntryKind, ...] = get_args(EntryKind)
# The kinds ``post_entry`` writes (debits come from holds, expiry from its sweep).
PostedKind = Literal["grant", "adjustment", "reversal"]
# holds.outcome, once a hold has ended
HoldOutcome = Literal["settled", "released", "expired"]
# accounts.kind: a Clerk user's or organization's account
AccountKind = Literal["user", "org"]
