"""The base of every refusal the domain (ledger, throttle) raises.

A domain error says what went wrong in the domain's own terms and carries no
HTTP status: ``http.domain_errors`` is the one place that maps each class to
the API error clients see (status, code, type). A refusal is final — the
caller's request is wrong or cannot be served as asked — unlike a failure of
a backing service (a lost connection), which may be retried.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """A refusal: a message for the caller and optional structured details."""

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
