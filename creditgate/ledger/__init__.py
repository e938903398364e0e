"""The ledger: accounts, entries, holds and balances — the only code that writes money.

Amounts are ``int`` micro-credits. Every write is one SQL statement with an
idempotency key, and the database enforces the invariants (append-only
entries, holds ended once, available ≥ -overdraft limit).
"""

from creditgate.ledger.accounts import (
    Account,
    close_account,
    ensure_account,
    get_account,
    resolve_account,
    set_account_tier,
)
from creditgate.ledger.balances import Balance, get_balance
from creditgate.ledger.entries import Posted, post_entry
from creditgate.ledger.holds import (
    Hold,
    Settlement,
    Usage,
    release_hold,
    reserve_hold,
    settle_hold,
    sweep_expired_holds,
)
from creditgate.ledger.money import credits_to_micros, micros_to_credits
from creditgate.ledger.reversals import Reversal, account_debt, requested_total, reverse_up_to
from creditgate.ledger.verify import Report, verify_ledger

__all__ = [
    "Account",
    "Balance",
    "Hold",
    "Posted",
    "Report",
    "Reversal",
    "Settlement",
    "Usage",
    "account_debt",
    "close_account",
    "credits_to_micros",
    "ensure_account",
    "get_account",
    "get_balance",
    "micros_to_credits",
    "post_entry",
    "release_hold",
    "requested_total",
    "reserve_hold",
    "resolve_account",
    "reverse_up_to",
    "set_account_tier",
    "settle_hold",
    "sweep_expired_holds",
    "verify_ledger",
]
