"""``GET /api/subscription`` and ``DELETE /api/subscription``: the caller's plan, and cancelling it.

The state is what Polar's ``subscription.*`` webhooks stored
(``billing.polar_events``). When it is older than ``[polar]
subscription_max_age_seconds``, GET asks Polar for the subscription
(``subscriptions.get``) and applies the answer exactly as a webhook carrying
it would be applied (newest ``modified_at`` wins, tier from the live plan);
if Polar does not answer, the stored state is served.

DELETE asks Polar to cancel at the end of the period
(``subscriptions.update(id, cancel_at_period_end=True)``) and records only
that it asked: the stored state — ``cancelAtPeriodEnd``, and later the tier —
changes when Polar's webhook confirms it. A second DELETE before that does
not call Polar again.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

import asyncpg
from aiohttp import web
from polar import PolarError
from polar.v2026_10 import PolarAsync
from polar.v2026_10.errors import ResourceNotFound, SubscriptionsUpdate403Error
from polar.v2026_10.outputs import AlreadyCanceledSubscription

from creditgate import ledger
from creditgate.auth import authenticate, require_session
from creditgate.billing.checkout import POLAR, polar_failed
from creditgate.billing.client import call_with_retries, polar_slot
from creditgate.billing.polar_events import (
    RetryLater,
    Unprocessable,
    apply_polar_event,
    facts_of,
)
from creditgate.errors import Conflict, NotFound, ServiceUnavailable
from creditgate.ledger.balances import LIVE_PLAN_STATUSES
from creditgate.ledger.entries import iso
from creditgate.logs import log
from creditgate.resources import RESOURCES, Resources
from creditgate.webkit.envelope import data_response
from creditgate.webkit.openapi import (
    BOOL,
    CREDITS,
    MICROS,
    STR,
    TIME,
    Endpoint,
    Schema,
    nullable,
    obj,
)

# The caller's subscription: a live one first (as the balance's plan), else
# the most recent. Credits granted: as the balance's creditLimit, since the
# period started.
_CURRENT = """
SELECT s.id, s.product_id, s.plan, s.status, s.current_period_start, s.current_period_end,
       s.cancel_at_period_end, s.cancel_requested_at, s.updated_at, s.refreshed_at,
       -- Asked, and no state stored since (a later one without the cancellation,
       -- e.g. after an "uncancel" in the portal, supersedes the request).
       s.cancel_requested_at IS NOT NULL AND s.cancel_requested_at >= s.updated_at
           AS cancel_pending,
       GREATEST(s.updated_at, s.refreshed_at) < now() - $3::integer * interval '1 second'
           AS stale,
       a.tier,
       (SELECT COALESCE(SUM(e.amount), 0)::bigint FROM ledger_entries e
        WHERE e.account_id = s.account_id AND e.kind IN ('grant', 'reversal')
          AND (s.current_period_start IS NULL OR e.created_at >= s.current_period_start))
           AS granted
FROM subscriptions s JOIN accounts a ON a.id = s.account_id
WHERE s.account_id = $1
ORDER BY s.status = ANY($2::text[]) DESC, s.current_period_start DESC NULLS LAST,
         s.source_modified_at DESC
LIMIT 1
"""


def _view(row: asyncpg.Record) -> dict[str, Any]:
    def when(name: str) -> str | None:
        return iso(row[name]) if row[name] is not None else None

    granted = max(0, row["granted"])
    return {
        "id": row["id"],
        "productId": row["product_id"],
        "plan": row["plan"],
        "tier": row["tier"],
        "status": row["status"],
        "currentPeriodStart": when("current_period_start"),
        "currentPeriodEnd": when("current_period_end"),
        "cancelAtPeriodEnd": row["cancel_at_period_end"],
        "cancelRequestedAt": when("cancel_requested_at"),
        "creditsGranted": ledger.micros_to_credits(granted),
        "creditsGrantedMicros": granted,
        "updatedAt": iso(row["updated_at"]),
        "refreshedAt": when("refreshed_at"),
    }


async def _current(db: Any, st: Resources, account_id: uuid.UUID) -> asyncpg.Record | None:
    max_age = st.settings.config.polar.subscription_max_age_seconds
    row: asyncpg.Record | None = await db.fetchrow(
        _CURRENT, account_id, list(LIVE_PLAN_STATUSES), max_age
    )
    return row


# After a failed refresh a subscription is not asked for again for this long
# (per process): while Polar is down, GETs serve the stored state at once
# instead of each waiting on Polar's retries.
REFRESH_BACKOFF_SECONDS = 30.0
_MAX_BACKOFFS = 10_000  # bounded memory: the whole map is forgotten beyond it
_refresh_failed: dict[str, float] = {}  # subscription id → monotonic time to retry


def _backing_off(subscription_id: str) -> bool:
    until = _refresh_failed.get(subscription_id)
    return until is not None and time.monotonic() < until


def _failed(subscription_id: str) -> None:
    if len(_refresh_failed) >= _MAX_BACKOFFS:
        _refresh_failed.clear()
    _refresh_failed[subscription_id] = time.monotonic() + REFRESH_BACKOFF_SECONDS


async def refresh_from_polar(st: Resources, polar: PolarAsync, subscription_id: str) -> bool:
    """Apply Polar's current state of the subscription as its webhook would; False on
    failure, or without asking while a recent failure's back-off lasts."""
    cfg = st.settings.config.polar
    ids = {"subscription_id": subscription_id}
    if _backing_off(subscription_id):
        return False
    try:
        current = await call_with_retries(
            cfg,
            lambda: polar.subscriptions.get(subscription_id),
            attempts=2,
            max_wait_seconds=2.0,
        )
    except PolarError as e:
        _failed(subscription_id)
        log.warning(
            "subscription refresh from Polar failed; serving the stored state",
            extra={**ids, "error": type(e).__name__, "status": getattr(e, "status_code", None)},
        )
        return False
    facts = facts_of("subscription.updated", dataclasses.asdict(current))
    try:
        async with st.db.acquire() as conn, conn.transaction():
            outcome = await apply_polar_event(
                conn, st.settings.config, "subscription.updated", facts
            )
            await conn.execute(
                "UPDATE subscriptions SET refreshed_at = now() WHERE id = $1", subscription_id
            )
    except (RetryLater, Unprocessable) as e:
        _failed(subscription_id)
        log.warning(
            "subscription refresh not applicable; serving the stored state",
            extra={**ids, "error": str(e)[:200]},
        )
        return False
    _refresh_failed.pop(subscription_id, None)
    log.info("subscription refreshed from Polar", extra={**ids, "outcome": outcome})
    return True


async def get_subscription(request: web.Request) -> web.Response:
    """The caller's subscription as Polar's webhooks (or a refresh) last described it."""
    st = request.app[RESOURCES]
    principal = await authenticate(request)
    row = await _current(st.db, st, principal.account_id)
    if row is None:
        raise NotFound("This account has no subscription.")
    polar = request.app.get(POLAR)
    if (
        row["stale"]
        and polar is not None
        and st.settings.config.polar.subscription_max_age_seconds > 0
        and await refresh_from_polar(st, polar, row["id"])
    ):
        row = await _current(st.db, st, principal.account_id)
        assert row is not None
    return data_response(request, _view(row))


async def cancel_subscription(request: web.Request) -> web.Response:
    """Ask Polar to cancel the caller's live subscription at the end of its period.

    202 once asked (the state changes with Polar's webhook); 200 when it is
    already set to cancel; 404 without a live subscription. Session-only: a
    person's act, like checkout.
    """
    st = request.app[RESOURCES]
    principal = await require_session(request)
    polar = request.app.get(POLAR)
    if polar is None:
        raise ServiceUnavailable("Billing is not configured: POLAR_ACCESS_TOKEN is not set.")
    cfg = st.settings.config.polar
    async with polar_slot(), st.db.acquire() as conn, conn.transaction():
        row = await _current(conn, st, principal.account_id)
        if row is None or row["status"] not in LIVE_PLAN_STATUSES:
            raise NotFound("This account has no active subscription to cancel.")
        # One cancellation request per subscription at a time: a concurrent
        # DELETE waits, then finds this one's request and does not repeat it.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            f"subscription-cancel:{row['id']}",
        )
        row = await _current(conn, st, principal.account_id)
        assert row is not None
        if row["cancel_at_period_end"]:
            return data_response(request, _view(row))
        if row["cancel_pending"]:
            return data_response(request, _view(row), status=202)
        subscription_id: str = row["id"]
        try:
            await call_with_retries(
                cfg,
                lambda: polar.subscriptions.update(subscription_id, cancel_at_period_end=True),
                attempts=2,
                max_wait_seconds=2.0,
            )
        except SubscriptionsUpdate403Error as e:
            if not isinstance(e.error, AlreadyCanceledSubscription):
                raise Conflict("Polar refused: this subscription is not active.") from None
            # Already set to cancel in Polar (its webhook is on the way): asked.
        except ResourceNotFound:
            raise NotFound("Polar does not know this subscription.") from None
        except PolarError as e:
            raise polar_failed(e) from None
        await conn.execute(
            "UPDATE subscriptions SET cancel_requested_at = now() WHERE id = $1", subscription_id
        )
        row = await _current(conn, st, principal.account_id)
        assert row is not None
    log.info(
        "subscription cancellation requested",
        extra={"account_id": str(principal.account_id), "subscription_id": subscription_id},
    )
    return data_response(request, _view(row), status=202)


_VIEW: dict[str, Schema] = {
    "id": STR,
    "productId": STR,
    "plan": STR,
    "tier": {**STR, "description": "the account's tier now"},
    "status": {**STR, "description": "Polar's: active, trialing, past_due, canceled, …"},
    "currentPeriodStart": nullable(TIME),
    "currentPeriodEnd": nullable(TIME),
    "cancelAtPeriodEnd": BOOL,
    "cancelRequestedAt": nullable(
        {**TIME, "description": "when DELETE asked Polar to cancel (until its webhook)"}
    ),
    "creditsGranted": CREDITS,
    "creditsGrantedMicros": MICROS,
    "updatedAt": TIME,
    "refreshedAt": nullable(TIME),
}
SUBSCRIPTION: Schema = obj(_VIEW, *_VIEW)
ENDPOINTS = (
    Endpoint(
        "GET",
        "/api/subscription",
        get_subscription,
        "The caller's subscription (from Polar's webhooks; refreshed from Polar when old)",
        "billing",
        "caller",
        response=SUBSCRIPTION,
        errors=(404, 503),
    ),
    Endpoint(
        "DELETE",
        "/api/subscription",
        cancel_subscription,
        "Cancel the caller's plan at the end of its period, through Polar",
        "billing",
        "session",
        response=SUBSCRIPTION,
        status=202,
        also=(200,),
        errors=(404, 409, 502, 503),
    ),
)
