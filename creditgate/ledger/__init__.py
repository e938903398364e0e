"""The ledger: accounts, entries, holds, lots and balances — the only code that writes money.

Amounts are ``int`` micro-credits. Every write carries an idempotency key; the
hot-path writes (reserve, settle, release) are one SQL statement each; and the
database enforces the invariants (append-only entries, holds ended once,
available ≥ -overdraft limit, lots allocated by trigger) — see ARCHITECTURE.md.
"""

from creditgate.ledger.accounts import (
    Account,
    AccountRow,
    close_account,
    ensure_account,
    get_account,
    list_accounts,
    resolve_account,
    set_account_tier,
    set_overdraft_limit,
)
from creditgate.ledger.alerts import (
    Threshold,
    get_low_balance_threshold,
    set_low_balance_threshold,
)
from creditgate.ledger.balances import Balance, get_balance
from creditgate.ledger.budgets import (
    BUDGET_PERIODS,
    KeyBudget,
    key_budget,
    key_budgets,
    set_key_budget,
)
from creditgate.ledger.entries import ENTRY_KINDS, Posted, post_entry
from creditgate.ledger.errors import (
    AccountNotFound,
    CreditsExhausted,
    HoldEnded,
    HoldNotFound,
    IdempotencyConflict,
    InvalidArgument,
    KeyBudgetExceeded,
    LedgerError,
    OverdraftInUse,
)
from creditgate.ledger.expiry import expire_lot, sweep_expired_lots
from creditgate.ledger.external import Recorded, UsageRecord, record_usage
from creditgate.ledger.history import EntryView, Page, list_entries
from creditgate.ledger.holds import (
    Hold,
    Settlement,
    Usage,
    count_live_holds,
    release_hold,
    reserve_hold,
    settle_hold,
    sweep_expired_holds,
)
from creditgate.ledger.money import credits_to_micros, micros_to_credits
from creditgate.ledger.reversals import (
    Reversal,
    account_debt,
    refund_pending,
    requested_total,
    reverse_up_to,
)
from creditgate.ledger.verify import Report, verify_incremental, verify_ledger

__all__ = [
    "BUDGET_PERIODS",
    "ENTRY_KINDS",
    "Account",
    "AccountNotFound",
    "AccountRow",
    "Balance",
    "CreditsExhausted",
    "EntryView",
    "Hold",
    "HoldEnded",
    "HoldNotFound",
    "IdempotencyConflict",
    "InvalidArgument",
    "KeyBudget",
    "KeyBudgetExceeded",
    "LedgerError",
    "OverdraftInUse",
    "Page",
    "Posted",
    "Recorded",
    "Report",
    "Reversal",
    "Settlement",
    "Threshold",
    "Usage",
    "UsageRecord",
    "account_debt",
    "close_account",
    "count_live_holds",
    "credits_to_micros",
    "ensure_account",
    "expire_lot",
    "get_account",
    "get_balance",
    "get_low_balance_threshold",
    "key_budget",
    "key_budgets",
    "list_accounts",
    "list_entries",
    "micros_to_credits",
    "post_entry",
    "record_usage",
    "refund_pending",
    "release_hold",
    "requested_total",
    "reserve_hold",
    "resolve_account",
    "reverse_up_to",
    "set_account_tier",
    "set_key_budget",
    "set_low_balance_threshold",
    "set_overdraft_limit",
    "settle_hold",
    "sweep_expired_holds",
    "sweep_expired_lots",
    "verify_incremental",
    "verify_ledger",
]
