"""The middleware every request passes: ids, the error envelope, metrics, the access log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp import web

from creditgate.domain_errors import DomainError
from creditgate.errors import (
    ApiError,
    ClientDisconnected,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    ValidationError,
)
from creditgate.http.domain_errors import api_error
from creditgate.http.metrics import HTTP_LATENCY, HTTP_REQUESTS
from creditgate.logs import log
from creditgate.metrics import cached_labels
from creditgate.webkit.envelope import error_response
from creditgate.webkit.ids import (
    ACCOUNT_ID,
    CORRELATION_ID,
    REQUEST_ID,
    RESPONSE_STARTED,
    STARTED,
    pick_id,
)
from creditgate.webkit.textguard import control_problem

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_requests = cached_labels(HTTP_REQUESTS)
_latency = cached_labels(HTTP_LATENCY)

# The database (or Redis) is unreachable: 503, not 500.
UNAVAILABLE = (
    OSError,  # includes ConnectionRefusedError and TimeoutError
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.OperatorInterventionError,
    # A session cut mid-statement can leave asyncpg's protocol mid-operation;
    # releasing it then raises this (asyncpg issue #784) and the pool drops it.
    asyncpg.InternalClientError,
)


def _route(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "unmatched"


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _as_api_error(request: web.Request, exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, DomainError):
        return api_error(exc)  # the ledger's and the throttle's refusals
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        from creditgate.http.state import STATE

        limit = request.app[STATE].settings.config.max_body_bytes
        return PayloadTooLarge(f"The request body is larger than {limit} bytes.")
    if isinstance(exc, web.HTTPNotFound):
        return NotFound(f"No route {request.method} {request.path}.")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return MethodNotAllowed(
            f"{request.method} is not allowed here; use {allowed}.", headers={"Allow": allowed}
        )
    if isinstance(exc, ConnectionResetError) and _client_gone(request):
        # The client's own connection, not a backing service's (a read the
        # handler did itself): the client's outcome, logged at info.
        return ClientDisconnected("The client closed the connection.")
    if isinstance(exc, UNAVAILABLE):
        return ServiceUnavailable("A backing service is unavailable; retry shortly.")
    return InternalError("Internal server error.")


def _check_url_params(request: web.Request) -> None:
    """400 for a control character (NUL above all) in a path or query parameter.

    Ids, names and cursors never hold one, and NUL would reach Postgres as a
    500; checked here once rather than in every handler.
    """
    problems = [
        {"path": name, "message": problem}
        for name, value in (*request.match_info.items(), *request.query.items())
        if (problem := control_problem(name) or control_problem(value)) is not None
    ]
    if problems:
        raise ValidationError("The URL holds a value creditgate refuses.", details=problems)


@web.middleware
async def envelope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Ids in, ids out; every error as the envelope; one metric and log line per request."""
    headers = request.headers
    request_id = request[REQUEST_ID] = pick_id(headers.get("x-request-id"))
    correlation = headers.get("x-correlation-id")
    # Without its own header the correlation id is the request id (the supplied
    # one, or the one just made: a second UUID would correlate nothing).
    request[CORRELATION_ID] = request_id if not correlation else pick_id(correlation)
    started = request[STARTED] = time.perf_counter()
    try:
        _check_url_params(request)
        response = await handler(request)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if isinstance(exc, web.HTTPException) and exc.status < 400:
            raise  # redirects and the like are not errors
        err = _as_api_error(request, exc)
        if err.status >= 500 and not isinstance(exc, (ApiError, DomainError)):
            log.error(
                "unhandled error" if isinstance(err, InternalError) else "backing service error",
                exc_info=exc,
                extra={"request_id": request[REQUEST_ID], "route": _route(request)},
            )
        if request.get(RESPONSE_STARTED):
            raise  # a stream already under way cannot become an error response
        response = error_response(request, err)
    if not response.prepared:
        # Sent now, whole (aiohttp then finds it finished): the metrics and the
        # log line below no longer delay the client's last byte.
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client left; the status it would have had is logged
    route = _route(request)
    elapsed = time.perf_counter() - started
    _requests(route, request.method, response.status).inc()
    _latency(route, request.method).observe(elapsed)
    log.info(
        "request",
        extra={
            "request_id": request[REQUEST_ID],
            "correlation_id": request[CORRELATION_ID],
            "account_id": str(request[ACCOUNT_ID]) if ACCOUNT_ID in request else None,
            "route": route,
            "method": request.method,
            "status": response.status,
            "duration_ms": round(elapsed * 1000, 3),
        },
    )
    return response


async def add_id_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response, streams included, carries both ids."""
    request[RESPONSE_STARTED] = True
    if REQUEST_ID in request:
        response.headers["x-request-id"] = request[REQUEST_ID]
        response.headers["x-correlation-id"] = request[CORRELATION_ID]
