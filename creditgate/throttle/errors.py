"""What the throttle refuses, in its own terms (no HTTP status here).

``http.domain_errors`` maps ``Throttled`` to 429, ``ThrottleUnavailable`` to
503, ``UnknownTarget`` to 404 and ``InvalidLimits`` to 400.
"""

from __future__ import annotations

from typing import Any

from creditgate.domain_errors import DomainError


class ThrottleError(DomainError):
    """A refusal by the throttle."""


class Throttled(ThrottleError):
    """A limit is exhausted. ``details`` names it and when to retry (``retryAfter``,
    None when waiting cannot help); ``headers`` are the rate-limit headers of the
    decision (``x-ratelimit-*``, ``Retry-After``) for the reply."""

    def __init__(self, message: str, *, details: Any, headers: dict[str, str]) -> None:
        super().__init__(message, details=details)
        self.headers = headers


class ThrottleUnavailable(ThrottleError):
    """Redis is away and the policy is ``closed``: nothing can be admitted."""


class UnknownTarget(ThrottleError):
    """No account (or API key) of that id to hold to limits or to override."""


class InvalidLimits(ThrottleError):
    """An operator's limit overrides that cannot be applied; ``details`` lists each problem."""
