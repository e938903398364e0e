"""``POST /api/webhooks/polar``: Polar's Standard Webhooks, verified, stored, answered fast.

Verification is polar-sdk's ``validate_event`` on the raw body with
``POLAR_WEBHOOK_SECRET`` used whole (Polar's HMAC key is the secret string
itself, ``whsec_`` prefix included). Missing signature headers → 400; a bad
signature or a timestamp more than 5 minutes off → 401; without a configured
secret the route refuses everything (503) rather than accept unsigned events.
Nothing is written for any of them.

A verified event of a type we handle is stored once per ``webhook-id`` and
answered 202; the webhook worker applies it right after
(``billing.polar_events``). Redeliveries answer 200 and change nothing;
types we do not handle answer 200 and are logged by type.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from polar import PolarDeserializationError
from polar.v2026_10.webhooks import (
    PolarWebhookError,
    PolarWebhookUnknownTypeError,
    PolarWebhookVerificationError,
    validate_event,
)

from creditgate.billing.metrics import WEBHOOKS
from creditgate.billing.polar_events import HANDLED, facts_of
from creditgate.errors import ServiceUnavailable, Unauthorized, ValidationError
from creditgate.http.envelope import data_response
from creditgate.http.state import STATE
from creditgate.logs import log
from creditgate.webhooks.store import record_event
from creditgate.webhooks.worker import wake_worker

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


def verified_body(body: bytes, headers: dict[str, str], secret: str) -> dict[str, Any] | None:
    """The verified event as JSON; None for a verified event of a type unknown to the SDK.

    A payload the SDK cannot load into its own types, but whose signature
    verified, is still processed: creditgate reads only the few fields it
    needs, so a newer Polar API must not make a paid order get lost.
    """
    try:
        validate_event(body, headers, secret)
    except PolarWebhookVerificationError:
        raise Unauthorized("Invalid webhook signature, or its timestamp is too old.") from None
    except PolarWebhookUnknownTypeError:
        return None
    except PolarWebhookError as e:
        if not isinstance(e.__cause__, PolarDeserializationError):
            raise ValidationError("The webhook body is not a JSON event.") from None
        log.warning("polar webhook payload does not match the SDK's schema; reading it raw")
    event = orjson.loads(body)
    assert isinstance(event, dict)
    return event


async def polar_webhook(request: web.Request) -> web.Response:
    """Verify, store once, answer; the worker applies the event afterwards."""
    st = request.app[STATE]
    secret = st.settings.polar_webhook_secret
    if secret is None:
        WEBHOOKS.labels("polar", "refused").inc()
        raise ServiceUnavailable(
            "Polar webhooks are refused: POLAR_WEBHOOK_SECRET is not configured."
        )
    headers = required_headers(request, SIGNATURE_HEADERS)
    body = await request.read()
    try:
        event = verified_body(body, headers, secret)
    except (Unauthorized, ValidationError):
        WEBHOOKS.labels("polar", "refused").inc()
        raise
    event_type = event.get("type") if event is not None else None
    if event is None or event_type not in HANDLED:
        WEBHOOKS.labels("polar", "ignored").inc()
        log.info("polar webhook of a type not handled; ignored", extra={"type": event_type})
        return data_response(request, {"received": True, "ignored": True})
    assert isinstance(event_type, str)
    data = event.get("data")
    try:
        if not isinstance(data, dict):
            raise ValueError("the event has no data object")
        facts = facts_of(event_type, data)
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
