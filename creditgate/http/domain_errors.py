"""The one place a domain refusal becomes an API error (status, code, type).

The ledger and the throttle raise their own exceptions (``ledger.errors``,
``throttle.errors``), which know nothing of HTTP; this table gives each its
answer. The message and details pass through unchanged, so what clients see
is what the domain wrote. The envelope middleware and the CLI use it.
"""

from __future__ import annotations

from creditgate import errors
from creditgate.domain_errors import DomainError
from creditgate.ledger import errors as ledger
from creditgate.throttle import errors as throttle

# Looked up along the raised class's MRO, so a subclass gets its base's answer.
ANSWERS: dict[type[DomainError], type[errors.ApiError]] = {
    ledger.AccountNotFound: errors.NotFound,
    ledger.HoldNotFound: errors.NotFound,
    ledger.HoldEnded: errors.Conflict,
    ledger.CreditsExhausted: errors.InsufficientCredits,
    ledger.KeyBudgetExceeded: errors.KeyBudgetExceeded,
    ledger.IdempotencyConflict: errors.Conflict,
    ledger.OverdraftInUse: errors.Conflict,
    ledger.InvalidArgument: errors.ValidationError,
    throttle.Throttled: errors.RateLimited,
    throttle.ThrottleUnavailable: errors.ServiceUnavailable,
    throttle.UnknownTarget: errors.NotFound,
    throttle.InvalidLimits: errors.ValidationError,
}


def api_error(exc: DomainError) -> errors.ApiError:
    """The API error answering ``exc``; a domain error with no entry is a 500."""
    for cls in type(exc).__mro__:
        answer = ANSWERS.get(cls)
        if answer is not None:
            headers = exc.headers if isinstance(exc, throttle.Throttled) else None
            return answer(exc.message, details=exc.details, headers=headers)
    return errors.InternalError("Internal server error.")
