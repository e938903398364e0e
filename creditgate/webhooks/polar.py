"""``POST /api/webhooks/polar``: Polar's Standard Webhooks, verified, stored, answered fast.

Verification is polar-sdk's ``polar.webhooks.validate_event`` on the raw body
with ``POLAR_WEBHOOK_SECRET`` used whole (Polar's HMAC key is the secret
string itself, ``whsec_`` prefix included). It is given the event types we
handle and a loader that keeps the verified JSON as it is: creditgate reads
only the few fields it needs, so a newer Polar payload cannot make a paid
order fail to load — and the SDK's typed loader, which takes seconds to build
on a process's first event, stays out of the reply path.

Missing signature headers → 400; a bad signature or a timestamp more than 5
minutes off → 401; without a configured secret the route refuses everything
(503) rather than accept unsigned events. Nothing is written for any of them.

A verified event of a type we handle is stored once per ``webhook-id`` and
answered 202; the webhook worker applies it right after
(``billing.polar_events``). Redeliveries answer 200 and change nothing;
types we do not handle answer 200 and are logged by type.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from polar.webhooks import (
    PolarWebhookError,
    PolarWebhookUnknownTypeError,
    PolarWebhookVerificationError,
    validate_event,
)

from creditgate.billing.metrics import WEBHOOKS
from creditgate.billing.polar_events import HANDLED, facts_of
from creditgate.errors import ServiceUnavailable, Unauthorized, ValidationError
from creditgate.logs import log
from creditgate.resources import RESOURCES
from creditgate.webhooks.store import record_event
from creditgate.webhooks.worker import wake_worker
from creditgate.webkit.envelope import data_response, read_body
from creditgate.webkit.textguard import strings_problem

SIGNATURE_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


def required_headers(request: web.Request, names: tuple[str, ...]) -> dict[str, str]:
    """The request's headers, lower-cased; 400 naming any missing signature header."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    missing = [h for h in names if not headers.get(h)]
    if missing:
        raise ValidationError(
            f"Missing webhook signature header(s): {', '.join(missing)}.",
            details=[{"path": f"headers.{h}", "message": "required"} for h in missing],
        )
    return headers


def _as_is(event: dict[str, Any]) -> dict[str, Any]:
    return event


def verified_event(body: bytes, headers: dict[str, str], secret: str) -> dict[str, Any] | None:
    """The verified event; None for a verified event of a type we do not handle."""
    try:
        return validate_event(body, headers, secret, HANDLED, _as_is)
    except PolarWebhookVerificationError:
        raise Unauthorized("Invalid webhook signature, or its timestamp is too old.") from None
    except PolarWebhookUnknownTypeError:
        return None
    except PolarWebhookError:
        raise ValidationError("The webhook body is not a JSON event.") from None


async def polar_webhook(request: web.Request) -> web.Response:
    """Verify, store once, answer; the worker applies the event afterwards."""
    st = request.app[RESOURCES]
    secret = st.settings.polar_webhook_secret
    if secret is None:
        WEBHOOKS.labels("polar", "refused").inc()
        raise ServiceUnavailable(
            "Polar webhooks are refused: POLAR_WEBHOOK_SECRET is not configured."
        )
    headers = required_headers(request, SIGNATURE_HEADERS)
    body = await read_body(request)
    try:
        event = verified_event(body, headers, secret)
    except (Unauthorized, ValidationError):
        WEBHOOKS.labels("polar", "refused").inc()
        raise
    if event is None:
        WEBHOOKS.labels("polar", "ignored").inc()
        log.info("polar webhook of a type not handled; ignored", extra={"type": _type_of(body)})
        return data_response(request, {"received": True, "ignored": True})
    event_type: str = event["type"]
    data = event.get("data")
    try:
        if not isinstance(data, dict):
            raise ValueError("the event has no data object")
        facts = facts_of(event_type, data)
        # Postgres refuses NUL in jsonb: a verified event carrying one is unreadable.
        nul_at = strings_problem(facts)
        if nul_at is not None:
            raise ValueError(f"data.{nul_at} holds NUL (\\u0000)")
    except ValueError as e:
        WEBHOOKS.labels("polar", "refused").inc()
        raise ValidationError(f"The {event_type} event cannot be read: {e}.") from None
    webhook_id = headers["webhook-id"][:255]
    stored = await record_event(st.db, "polar", webhook_id, event_type, facts)
    WEBHOOKS.labels("polar", "queued" if stored else "duplicate").inc()
    if stored:
        wake_worker(request.app)
    return data_response(
        request, {"received": True, "duplicate": not stored}, status=202 if stored else 200
    )


def _type_of(body: bytes) -> str | None:
    """The ``type`` of a verified body, for the log line of an ignored event."""
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    kind = event.get("type") if isinstance(event, dict) else None
    return kind[:100] if isinstance(kind, str) else None
