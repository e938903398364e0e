"""The endpoint table: every route is registered from it, and /openapi.json is made from it.

Each route module declares ``ENDPOINTS`` — method, path, handler, auth, and
the JSON Schemas of its request and response bodies, written beside the
handler that reads and writes them. ``add_endpoints`` registers exactly those
routes, so no route exists without its documentation; ``document`` turns the
same table into the OpenAPI 3.1 document; the test suite (schemathesis)
checks every answer of a live server against it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from creditgate import __version__
from creditgate.webkit.envelope import json_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Schema = dict[str, Any]

# ---------------------------------------------------------------- schema builders

STR: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
BOOL: Schema = {"type": "boolean"}
NUM: Schema = {"type": "number"}
UUID: Schema = {"type": "string", "format": "uuid"}
TIME: Schema = {"type": "string", "format": "date-time"}
CREDITS: Schema = {"type": "number", "description": "credits, at most 6 decimals"}
MICROS: Schema = {"type": "integer", "description": "micro-credits (1 credit = 1,000,000)"}
# Credits as an exact decimal string, ≥ 0 (what a JSON float cannot always say).
CREDITS_TEXT: Schema = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]{1,6})?$"}


def obj(props: Mapping[str, Schema], *required: str, extra: bool = False) -> Schema:
    """An object with ``props``; ``extra`` allows properties not listed."""
    out: Schema = {"type": "object", "properties": dict(props), "additionalProperties": extra}
    if required:
        out["required"] = list(required)
    return out


def nullable(schema: Schema) -> Schema:
    return {"oneOf": [schema, {"type": "null"}]}


def arr(items: Schema, **kw: Any) -> Schema:
    return {"type": "array", "items": items, **kw}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


ERROR: Schema = obj(
    {
        "error": obj(
            {
                "code": STR,
                "message": STR,
                "type": STR,
                "details": {},
                "param": {},
            },
            "code",
            "message",
            "type",
        ),
        "correlationId": nullable(STR),
    },
    "error",
    "correlationId",
)

# Anthropic's error shape (the routes of its Messages API), creditgate's code inside.
ANTHROPIC_ERROR: Schema = obj(
    {
        "type": {"const": "error"},
        "error": obj(
            {"type": STR, "message": STR, "code": STR, "details": {}},
            "type",
            "message",
        ),
        "correlationId": nullable(STR),
    },
    "type",
    "error",
)

# ---------------------------------------------------------------- the table

AUTH_SCHEMES: dict[str, list[dict[str, list[str]]]] = {
    "none": [],
    "caller": [{"apiKey": []}, {"session": []}, {"sessionCookie": []}],
    "session": [{"session": []}, {"sessionCookie": []}],
    "admin": [{"adminToken": []}, {"apiKey": []}, {"session": []}],
    "signature": [],
    "metrics": [{}, {"metricsToken": []}],
}
_AUTH_ERRORS = {"caller": (401, 403), "session": (401, 403), "admin": (401, 403)}

_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    400: "Bad request (VALIDATION_ERROR; `details` lists each problem)",
    401: "Not authenticated (UNAUTHORIZED)",
    402: "Insufficient credits (INSUFFICIENT_CREDITS) or key budget (KEY_BUDGET_EXCEEDED)",
    403: "Authenticated but not allowed (FORBIDDEN)",
    404: "Not found (NOT_FOUND / MODEL_NOT_FOUND)",
    405: "Method not allowed",
    409: "Conflict (CONFLICT), or the upstream's own 409",
    413: "Body too large (PAYLOAD_TOO_LARGE), or the upstream's own 413",
    422: "The upstream refused the request (UPSTREAM_BAD_REQUEST)",
    429: "Rate limited (RATE_LIMITED); Retry-After in seconds",
    500: "A bug (INTERNAL_SERVER_ERROR)",
    502: "Upstream failed (UPSTREAM_ERROR)",
    503: "A backing service is unavailable (SERVICE_UNAVAILABLE)",
    504: "Upstream too slow (UPSTREAM_TIMEOUT)",
}


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    schema: Schema
    where: str = "query"  # "query" | "path"
    description: str = ""
    required: bool = False


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One route: how it is served and how it is documented."""

    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    auth: str  # a key of AUTH_SCHEMES
    request: Schema | None = None  # JSON body
    response: Schema | None = None  # the success body
    status: int = 200
    also: tuple[int, ...] = ()  # other success statuses with the same body
    errors: tuple[int, ...] = ()
    params: tuple[Param, ...] = ()
    envelope: bool = True  # the body is wrapped as {data, correlationId}
    stream: bool = False  # the success may also be text/event-stream
    media: str = "application/json"  # of the success body
    error_shape: str = "openai"  # "anthropic": errors as Anthropic's API shapes them

    def __post_init__(self) -> None:
        assert self.auth in AUTH_SCHEMES, self.auth


def add_endpoints(app: web.Application, endpoints: Iterable[Endpoint]) -> None:
    """Register every endpoint's route, and /openapi.json describing them all."""
    table = list(endpoints)
    doc = document(table)

    async def openapi_route(request: web.Request) -> web.Response:
        return json_response(doc)

    table.append(
        Endpoint(
            "GET",
            "/openapi.json",
            openapi_route,
            "This OpenAPI 3.1 document",
            "operations",
            "none",
            response={"type": "object"},
            envelope=False,
        )
    )
    doc["paths"]["/openapi.json"] = {"get": _operation(table[-1])}
    for e in table:
        app.router.add_route(e.method, e.path, e.handler)


def _body(schema: Schema, envelope: bool) -> Schema:
    if not envelope:
        return schema
    return obj({"data": schema, "correlationId": STR}, "data", "correlationId")


def _operation(e: Endpoint) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": f"{e.method.lower()}_{e.path.strip('/').replace('/', '_')}".replace(
            "{", ""
        ).replace("}", ""),
        "summary": e.summary,
        "tags": [e.tag],
        "security": AUTH_SCHEMES[e.auth],
    }
    params = list(e.params)
    for segment in e.path.split("/"):
        if segment.startswith("{") and not any(p.name == segment[1:-1] for p in params):
            params.append(Param(segment[1:-1], STR, "path"))
    if params:
        op["parameters"] = [
            {
                "name": p.name,
                "in": p.where,
                "required": p.required or p.where == "path",
                "schema": p.schema,
                **({"description": p.description} if p.description else {}),
            }
            for p in params
        ]
    if e.request is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": e.request}},
        }
    success: dict[str, Any] = {"description": _STATUS_TEXT.get(e.status, "OK")}
    if e.response is not None:
        content: dict[str, Any] = {e.media: {"schema": _body(e.response, e.envelope)}}
        if e.stream:
            content["text/event-stream"] = {"schema": {"type": "string"}}
        success["content"] = content
    responses: dict[str, Any] = {str(s): success for s in (e.status, *e.also)}
    errors = set(e.errors) | set(_AUTH_ERRORS.get(e.auth, ())) | {500}
    if e.request is not None:
        errors |= {400, 413}
    if params:
        errors.add(400)  # a control character in a path or query parameter (middlewares)
    for status in sorted(errors):
        responses[str(status)] = {
            "description": _STATUS_TEXT.get(status, "Error"),
            "content": {
                "application/json": {
                    "schema": ref("AnthropicError" if e.error_shape == "anthropic" else "Error")
                }
            },
        }
    op["responses"] = responses
    return op


def document(endpoints: Iterable[Endpoint]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``endpoints``."""
    paths: dict[str, dict[str, Any]] = {}
    for e in endpoints:
        paths.setdefault(e.path, {})[e.method.lower()] = _operation(e)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "creditgate",
            "version": __version__,
            "description": (
                "A metered LLM proxy with a credit ledger. Every error is "
                "`{error: {code, message, type, details?}, correlationId}`; "
                "every response carries x-request-id and x-correlation-id."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR, "AnthropicError": ANTHROPIC_ERROR},
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "cg_… API key"},
                "session": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "Clerk session token",
                },
                "sessionCookie": {"type": "apiKey", "in": "cookie", "name": "__session"},
                "adminToken": {"type": "http", "scheme": "bearer", "description": "ADMIN_TOKEN"},
                "metricsToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "METRICS_TOKEN",
                },
            },
        },
    }
