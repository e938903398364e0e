"""The errors creditgate answers with (DESIGN.md §2).

Route modules raise these (the domain raises its own, ``domain_errors``, mapped
to these by ``http.domain_errors``); ``webkit.envelope`` renders them as
``{"error": {code, message, type, details?}, "correlationId"}``. ``type`` keeps
OpenAI clients' error handling working.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ApiError(Exception):
    """An error with an HTTP status, a stable code and a message for the caller."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "INTERNAL_SERVER_ERROR"
    type: ClassVar[str] = "server_error"
    # The connection cannot serve another request after this answer.
    close_connection: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The ``error`` object of the envelope."""
        err: dict[str, Any] = {"code": self.code, "message": self.message, "type": self.type}
        if self.details is not None:
            err["details"] = self.details
        return err


class ValidationError(ApiError):
    status, code, type = 400, "VALIDATION_ERROR", "invalid_request_error"


class Unauthorized(ApiError):
    status, code, type = 401, "UNAUTHORIZED", "authentication_error"


class InsufficientCredits(ApiError):
    status, code, type = 402, "INSUFFICIENT_CREDITS", "insufficient_quota"


class KeyBudgetExceeded(ApiError):
    status, code, type = 402, "KEY_BUDGET_EXCEEDED", "insufficient_quota"


class Forbidden(ApiError):
    status, code, type = 403, "FORBIDDEN", "permission_error"


class NotFound(ApiError):
    status, code, type = 404, "NOT_FOUND", "not_found_error"


class ModelNotFound(ApiError):
    status, code, type = 404, "MODEL_NOT_FOUND", "invalid_request_error"


class MethodNotAllowed(ApiError):
    status, code, type = 405, "METHOD_NOT_ALLOWED", "invalid_request_error"


class Conflict(ApiError):
    status, code, type = 409, "CONFLICT", "invalid_request_error"


class PayloadTooLarge(ApiError):
    status, code, type = 413, "PAYLOAD_TOO_LARGE", "invalid_request_error"


class RequestTimeout(ApiError):
    """The client sent its body too slowly (``[http] body_timeout_seconds``)."""

    status, code, type = 408, "REQUEST_TIMEOUT", "invalid_request_error"
    close_connection = True  # the rest of the body may still trickle in


class ClientDisconnected(ApiError):
    """The client left before its request was read: nginx's 499, a client outcome, not ours."""

    status, code, type = 499, "CLIENT_DISCONNECTED", "invalid_request_error"


class RateLimited(ApiError):
    status, code, type = 429, "RATE_LIMITED", "rate_limit_error"


class InternalError(ApiError):
    status, code, type = 500, "INTERNAL_SERVER_ERROR", "server_error"


class UpstreamError(ApiError):
    status, code, type = 502, "UPSTREAM_ERROR", "api_error"


class ServiceUnavailable(ApiError):
    status, code, type = 503, "SERVICE_UNAVAILABLE", "api_error"


class UpstreamTimeout(ApiError):
    status, code, type = 504, "UPSTREAM_TIMEOUT", "api_error"


class UpstreamBadRequest(ApiError):
    """The upstream refused the request itself (its 4xx); keeps the upstream's status."""

    code, type = "UPSTREAM_BAD_REQUEST", "invalid_request_error"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status  # type: ignore[misc]
