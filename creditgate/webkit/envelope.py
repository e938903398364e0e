"""JSON bodies: the ``{data, correlationId}`` envelope and the error envelope."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import ClientConnectionError, ClientPayloadError, web
from aiohttp.web_protocol import RequestPayloadError

from creditgate.errors import ApiError, ClientDisconnected, RequestTimeout, ValidationError
from creditgate.webkit.ids import CORRELATION_ID
from creditgate.webkit.textguard import json_problem

# ``[http] body_timeout_seconds``, set on the app by ``http.app`` (this
# module sits below the application state, so it is handed the one number).
BODY_TIMEOUT = web.AppKey("body_timeout_seconds", float)
# The error shape a route's clients parse, set by the route on its request:
# absent or "openai" → creditgate's envelope (OpenAI-compatible);
# "anthropic" → Anthropic's ``{"type": "error", "error": {type, message}}``.
ERROR_SHAPE = web.RequestKey("error_shape", str)
# Anthropic's error types by status (its SDKs map status codes, the type is informative).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        # Credits are exact decimals; emit their text, never a rounded float.
        return orjson.Fragment(str(value).encode())
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(value: Any) -> bytes:
    """Serialise to JSON bytes (Decimals exactly)."""
    return orjson.dumps(value, default=_default)


def json_response(
    body: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response of ``body`` as is (the OpenAI-compatible routes)."""
    return web.Response(
        body=dumps(body), status=status, content_type="application/json", headers=headers
    )


def data_response(request: web.Request, data: Any, *, status: int = 200) -> web.Response:
    """``{"data": …, "correlationId": …}`` (creditgate's own JSON routes)."""
    return json_response({"data": data, "correlationId": request[CORRELATION_ID]}, status=status)


def written_response(request: web.Request, data: Any, *, replayed: bool) -> web.Response:
    """201 with what an idempotent write wrote; a replay says so (``Idempotent-Replayed``)."""
    response = data_response(request, data, status=201)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def anthropic_error(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """Anthropic's error body; creditgate's ``code`` rides along in the error object."""
    error: dict[str, Any] = {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}
    if code is not None:
        error["code"] = code
    return {"type": "error", "error": error}


def error_response(request: web.Request, err: ApiError) -> web.Response:
    """``{"error": {code, message, type, details?}, "correlationId": …}`` — or, on a
    route whose clients are Anthropic's, ``{"type": "error", "error": {type, message,
    code, details?}, "correlationId": …}`` (same status, same code)."""
    if request.get(ERROR_SHAPE) == "anthropic":
        body = anthropic_error(err.status, err.message, err.code)
        if err.details is not None:
            body["error"]["details"] = err.details
        body["correlationId"] = request.get(CORRELATION_ID)
    else:
        body = {"error": err.body(), "correlationId": request.get(CORRELATION_ID)}
    response = json_response(body, status=err.status, headers=err.headers)
    if err.close_connection:
        response.force_close()
    return response


async def read_body(request: web.Request) -> bytes:
    """The whole request body, read within ``[http] body_timeout_seconds``.

    Reading honours the app's body limit on bytes actually read, so a chunked
    body without Content-Length is refused just the same (413). A client that
    sends too slowly gets 408 and its connection closed; one that leaves
    mid-upload is a ClientDisconnected (499), not a backing-service error.
    """
    timeout = request.app[BODY_TIMEOUT]
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(f"The request body was not received within {timeout:g} s.") from None
    except (ConnectionResetError, ClientPayloadError, ClientConnectionError):
        raise ClientDisconnected("The client closed the connection mid-upload.") from None
    except RequestPayloadError:
        # A body aiohttp cannot decode (corrupt gzip/deflate/br, bad chunking).
        raise ValidationError(
            "The request body could not be decoded; check Content-Encoding and chunking.",
            details=[{"path": "", "message": "undecodable body"}],
        ) from None


async def read_json(request: web.Request) -> Any:
    """The request body parsed as JSON; ValidationError (400) if it is not.

    Also 400: JSON nested deeper than ``textguard.MAX_JSON_DEPTH``, NUL in any
    string, control characters in a field name (the error names the path).
    """
    raw = await read_body(request)
    if not raw:
        raise ValidationError(
            "The request body is empty; send a JSON object.",
            details=[{"path": "", "message": "body is required"}],
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ValidationError(
            "The request body is not valid JSON.",
            details=[{"path": "", "message": str(e)}],
        ) from None
    problem = json_problem(raw, body)
    if problem is not None:
        raise ValidationError(
            "The request body holds a value creditgate refuses.", details=[problem]
        )
    return body


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object (400 for any other JSON value)."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ValidationError(
            "The request body must be a JSON object.",
            details=[{"path": "", "message": f"expected an object, got {type(body).__name__}"}],
        )
    return body
