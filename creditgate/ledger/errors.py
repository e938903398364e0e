"""What the ledger refuses, in the ledger's terms (no HTTP status here).

``http.domain_errors`` maps each class to the API error clients see; the
messages and details are written for the caller and passed on unchanged.
"""

from __future__ import annotations

from creditgate.domain_errors import DomainError


class LedgerError(DomainError):
    """A refusal by the ledger."""


class AccountNotFound(LedgerError):
    """No account with that id (or Clerk id)."""


class HoldNotFound(LedgerError):
    """No hold with that id: settled or released against a hold that does not exist."""


class HoldEnded(LedgerError):
    """The hold already ended (released or expired without a debit) and cannot be settled."""


class CreditsExhausted(LedgerError):
    """The amount does not fit the available credits plus what the overdraft allows."""


class IdempotencyConflict(LedgerError):
    """An idempotency key (or hold id) reused with a different request."""


class OverdraftInUse(LedgerError):
    """An overdraft limit set below what the account already uses."""


class InvalidArgument(LedgerError):
    """An argument the ledger cannot act on (an ambiguous account reference, a foreign cursor)."""


class KeyBudgetExceeded(LedgerError):
    """The amount does not fit what is left of the API key's budget in its period."""
