"""Which accounts may have their upstream call started before they are admitted.

At concurrency 1 the throttle's admission, the ledger's reservation and the
upstream call are each a round trip; run one after the other they are most of
what creditgate adds to a call. For an account whose calls were recently
admitted and reserved, the upstream call starts with the admission, and the
admission then the reservation are made while it runs. The answer is never
sent (nor a stream's first byte) before both are confirmed, and a refusal
(429, 402, 503) cancels the upstream call. So the client sees exactly what
the sequential path would give it, nothing is served without a hold, and the
ledger is written only for admitted calls, as before.

What speculation can cost is the operator's: an upstream call started for a
request that is then refused. That is bounded per account and process: an
account is only speculated for after one of its calls was admitted and
reserved, and any refusal puts it back on the sequential path for
``cooldown`` seconds (an account out of credits or over its limits stays
there while it keeps being refused). ``creditgate_upstream_speculation_total``
counts the calls dropped this way.
"""

from __future__ import annotations

import time
import uuid


class Speculation:
    """Per process: the accounts whose upstream call may start with their admission."""

    __slots__ = ("_until", "cooldown", "enabled", "max_accounts")

    def __init__(
        self, *, enabled: bool = True, cooldown: float = 60.0, max_accounts: int = 100_000
    ) -> None:
        assert cooldown >= 0 and max_accounts > 0, (cooldown, max_accounts)
        self.enabled = enabled
        self.cooldown = cooldown
        self.max_accounts = max_accounts
        # account → monotonic time from which it may be speculated for. Absent:
        # never admitted here (or forgotten), so not until its next success.
        self._until: dict[uuid.UUID, float] = {}

    def allowed(self, account_id: uuid.UUID) -> bool:
        """Whether this account's upstream call may start before its admission."""
        until = self._until.get(account_id)
        return until is not None and until <= time.monotonic()

    def admitted(self, account_id: uuid.UUID) -> None:
        """A call of the account was admitted and reserved: it may be speculated
        for from now on (after any cooldown still running)."""
        if self.enabled:
            self._put(account_id, self._until.get(account_id, 0.0))

    def refused(self, account_id: uuid.UUID) -> None:
        """A call of the account was refused: sequential for ``cooldown`` seconds.
        An account never admitted here stays out (it waits for an admission)."""
        if account_id in self._until:
            self._put(account_id, time.monotonic() + self.cooldown)

    def _put(self, account_id: uuid.UUID, until: float) -> None:
        self._until.pop(account_id, None)  # re-inserted: the newest last
        self._until[account_id] = until
        if len(self._until) > self.max_accounts:
            del self._until[next(iter(self._until))]  # the least recently seen
