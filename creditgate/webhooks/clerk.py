"""``POST /api/webhooks/clerk``: Clerk's Svix webhooks, verified, stored, answered fast.

Verified with ``svix.webhooks.Webhook(CLERK_WEBHOOK_SECRET).verify(raw_body,
headers)``. Missing ``svix-*`` headers → 400; a bad signature or a timestamp
more than 5 minutes off → 401; without a (valid) secret the route refuses
everything (503). Nothing is written for any of them. Lifecycle events are
stored once per ``svix-id`` and applied by the webhook worker
(``clerk_events``); other types answer 200 and are logged by type.
"""

from __future__ import annotations

import binascii
import functools

import orjson
from aiohttp import web
from svix.webhooks import Webhook, WebhookVerificationError

from creditgate.billing.metrics import WEBHOOKS
from creditgate.errors import ServiceUnavailable, Unauthorized, ValidationError
from creditgate.logs import log
from creditgate.resources import RESOURCES
from creditgate.webhooks.clerk_events import CLERK_EVENTS, clerk_facts
from creditgate.webhooks.polar import required_headers
from creditgate.webhooks.store import record_event
from creditgate.webhooks.worker import wake_worker
from creditgate.webkit.envelope import data_response, read_body

SIGNATURE_HEADERS = ("svix-id", "svix-timestamp", "svix-signature")


@functools.lru_cache(maxsize=4)
def clerk_verifier(secret: str | None) -> Webhook | None:
    """The Svix verifier for the configured secret; None when unset or malformed."""
    if secret is None:
        return None
    try:
        return Webhook(secret)
    except Exception:  # binascii.Error, EmptyWebhookSecretError, …
        log.error("CLERK_WEBHOOK_SECRET is not a valid Svix secret; Clerk webhooks are refused")
        return None


async def clerk_webhook(request: web.Request) -> web.Response:
    """Verify, store once, answer; the worker applies the event afterwards."""
    st = request.app[RESOURCES]
    verifier = clerk_verifier(st.settings.clerk_webhook_secret)
    if verifier is None:
        WEBHOOKS.labels("clerk", "refused").inc()
        raise ServiceUnavailable(
            "Clerk webhooks are refused: CLERK_WEBHOOK_SECRET is not configured (or not valid)."
        )
    headers = required_headers(request, SIGNATURE_HEADERS)
    body = await read_body(request)
    try:
        # svix raises ValueError / binascii.Error on a malformed signature
        # header rather than its own error: all of them are "not verified".
        verifier.verify(body, headers)
    except (WebhookVerificationError, ValueError, binascii.Error):
        WEBHOOKS.labels("clerk", "refused").inc()
        raise Unauthorized("Invalid webhook signature, or its timestamp is too old.") from None
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        WEBHOOKS.labels("clerk", "refused").inc()
        raise ValidationError("The webhook body is not a JSON event.") from None
    event_type = event.get("type") if isinstance(event, dict) else None
    if not isinstance(event_type, str) or event_type not in CLERK_EVENTS:
        WEBHOOKS.labels("clerk", "ignored").inc()
        log.info("clerk webhook of a type not handled; ignored", extra={"type": event_type})
        return data_response(request, {"received": True, "ignored": True})
    assert isinstance(event, dict) and isinstance(event_type, str)
    data = event.get("data")
    try:
        if not isinstance(data, dict):
            raise ValueError("the event has no data object")
        facts = clerk_facts(event_type, data)
    except ValueError as e:
        WEBHOOKS.labels("clerk", "refused").inc()
        raise ValidationError(f"The {event_type} event cannot be read: {e}.") from None
    stored = await record_event(st.db, "clerk", headers["svix-id"][:255], event_type, facts)
    WEBHOOKS.labels("clerk", "queued" if stored else "duplicate").inc()
    if stored:
        wake_worker(request.app)
    return data_response(
        request, {"received": True, "duplicate": not stored}, status=202 if stored else 200
    )
