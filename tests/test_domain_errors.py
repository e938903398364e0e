"""The one map from the domain's refusals to API errors (``http.domain_errors``)."""

from __future__ import annotations

from creditgate import errors
from creditgate.domain_errors import DomainError
from creditgate.http.domain_errors import ANSWERS, api_error
from creditgate.ledger import errors as ledger_errors
from creditgate.throttle import errors as throttle_errors


def _leaves() -> list[type[DomainError]]:
    found: list[type[DomainError]] = []
    for module in (ledger_errors, throttle_errors):
        for value in vars(module).values():
            is_error = isinstance(value, type) and issubclass(value, DomainError)
            if is_error and not value.__subclasses__():  # the classes raised, not the bases
                found.append(value)
    return found


def test_every_domain_refusal_has_an_answer_other_than_500() -> None:
    missing = [cls.__name__ for cls in _leaves() if cls not in ANSWERS]
    assert not missing, f"add these to http/domain_errors.ANSWERS: {missing}"
    assert all(
        ANSWERS[cls].status < 500 or cls is throttle_errors.ThrottleUnavailable for cls in _leaves()
    )


def test_message_details_and_headers_pass_through_unchanged() -> None:
    err = api_error(ledger_errors.CreditsExhausted("Insufficient credits: …", details={"a": 1}))
    assert (type(err), err.status, err.code) == (
        errors.InsufficientCredits,
        402,
        "INSUFFICIENT_CREDITS",
    )
    assert (err.message, err.details, err.headers) == ("Insufficient credits: …", {"a": 1}, {})
    refused = throttle_errors.Throttled(
        "slow down", details={"retryAfter": 2}, headers={"Retry-After": "2"}
    )
    err = api_error(refused)
    assert (err.status, err.details, err.headers) == (429, {"retryAfter": 2}, {"Retry-After": "2"})
    assert api_error(ledger_errors.HoldNotFound("no such hold")).status == 404


def test_an_unmapped_domain_error_is_a_500_not_a_leak() -> None:
    class Unplaced(DomainError):
        pass

    err = api_error(Unplaced("internal detail"))
    assert err.status == 500 and err.message == "Internal server error."
