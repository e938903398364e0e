"""``POST /api/checkout`` and ``POST /api/billing-portal``: buying credits, managing the plan.

A checkout is created for the caller's account with ``external_customer_id``
= the account id and ``metadata.accountId`` (copied by Polar onto the order
and the subscription), so the webhook can always find the account. A caller
asking again for the same product gets their still-open checkout back rather
than a new one; a per-(account, product) advisory lock makes two concurrent
requests create one.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp import web
from polar import PolarClientError, PolarError
from polar.v2026_10 import PolarAsync
from polar.v2026_10.outputs import Checkout

from creditgate.auth import Principal, require_session
from creditgate.billing.client import call_with_retries, polar_slot
from creditgate.config import PolarConfig
from creditgate.errors import NotFound, ServiceUnavailable, UpstreamError, ValidationError
from creditgate.logs import log
from creditgate.resources import RESOURCES
from creditgate.webkit.envelope import data_response, read_json_object
from creditgate.webkit.openapi import BOOL, STR, Endpoint, obj

POLAR = web.AppKey("creditgate.polar", PolarAsync)
# An open checkout this close to its expiry is not handed out again.
_REUSE_MARGIN = timedelta(minutes=10)


def _polar(request: web.Request) -> PolarAsync:
    polar = request.app.get(POLAR)
    if polar is None:
        raise ServiceUnavailable("Billing is not configured: POLAR_ACCESS_TOKEN is not set.")
    return polar


async def _caller(request: web.Request) -> Principal:
    # Session-only (DESIGN.md §2): buying and managing a plan is the signed-in
    # person's act, not an app's holding an API key (→ 403).
    return await require_session(request)


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def polar_failed(e: PolarError) -> UpstreamError:
    log.warning(
        "polar request failed",
        extra={"error": type(e).__name__, "status": getattr(e, "status_code", None)},
    )
    return UpstreamError("Polar is not answering as expected; retry shortly.")


async def create_checkout(request: web.Request) -> web.Response:
    """``{product}`` → ``{url, checkoutId, reused}``: a Polar checkout for the caller."""
    st = request.app[RESOURCES]
    principal = await _caller(request)
    polar = _polar(request)
    body = await read_json_object(request)
    product_id = body.get("product")
    products = st.settings.config.products
    if not isinstance(product_id, str) or product_id not in products:
        raise ValidationError(
            "Unknown product: send one of the configured Polar product ids.",
            details=[
                {"path": "product", "message": f"expected one of {sorted(products)}"},
            ],
        )
    unknown = sorted(set(body) - {"product"})
    if unknown:
        raise ValidationError(
            f"Unknown field {unknown[0]!r}.",
            details=[{"path": k, "message": "unknown field"} for k in unknown],
        )
    cfg = st.settings.config.polar
    async with polar_slot(), st.db.acquire() as conn, conn.transaction():
        # One checkout creation per account and product at a time: the
        # second request waits and then finds the first one's checkout.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            f"checkout:{principal.account_id}:{product_id}",
        )
        reused = await _open_checkout(conn, polar, cfg, principal.account_id, product_id)
        if reused is not None:
            return data_response(request, reused | {"reused": True})
        try:
            # A person is waiting: one quick retry, then a 502 they can retry.
            checkout = await call_with_retries(
                cfg,
                lambda: _new_checkout(polar, cfg, principal.account_id, product_id),
                attempts=2,
                max_wait_seconds=2.0,
            )
        except PolarError as e:
            raise polar_failed(e) from None
        await conn.execute(
            """
            INSERT INTO polar_checkouts (id, account_id, product_id, url, status, expires_at)
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT (id) DO NOTHING
            """,
            checkout.id,
            principal.account_id,
            product_id,
            checkout.url,
            checkout.status,
            _ts(checkout.expires_at),
        )
    log.info(
        "polar checkout created",
        extra={"account_id": str(principal.account_id), "checkout_id": checkout.id},
    )
    return data_response(
        request, {"url": checkout.url, "checkoutId": checkout.id, "reused": False}, status=201
    )


async def _new_checkout(
    polar: PolarAsync, cfg: PolarConfig, account_id: uuid.UUID, product_id: str
) -> Checkout:
    args: dict[str, Any] = {
        "products": [product_id],
        "external_customer_id": str(account_id),
        "metadata": {"accountId": str(account_id)},
    }
    if cfg.success_url is not None:
        args["success_url"] = cfg.success_url
    return await polar.checkouts.create(**args)


async def _open_checkout(
    conn: asyncpg.Connection,
    polar: PolarAsync,
    cfg: PolarConfig,
    account_id: uuid.UUID,
    product_id: str,
) -> dict[str, Any] | None:
    """The caller's checkout for this product that Polar still has open, if any."""
    row = await conn.fetchrow(
        """
        SELECT id, url FROM polar_checkouts
        WHERE account_id = $1 AND product_id = $2 AND status = 'open'
          AND expires_at > now() + $3::interval
        ORDER BY created_at DESC
        LIMIT 1
        """,
        account_id,
        product_id,
        _REUSE_MARGIN,
    )
    if row is None:
        return None
    # Webhooks may lag: ask Polar whether it is still open before handing it out.
    try:
        current = await call_with_retries(cfg, lambda: polar.checkouts.get(row["id"]), attempts=1)
    except PolarError:
        return None  # unknown: a fresh checkout is the safe answer
    if current.status == "open" and _ts(current.expires_at) > datetime.now(UTC) + _REUSE_MARGIN:
        return {"url": row["url"], "checkoutId": row["id"]}
    await conn.execute(
        "UPDATE polar_checkouts SET status = $2 WHERE id = $1", row["id"], current.status
    )
    return None


async def billing_portal(request: web.Request) -> web.Response:
    """``{url}``: a Polar customer-portal session for the caller's account."""
    st = request.app[RESOURCES]
    principal = await _caller(request)
    polar = _polar(request)
    cfg = st.settings.config.polar
    args: dict[str, Any] = {"external_customer_id": str(principal.account_id)}
    if cfg.portal_return_url is not None:
        args["return_url"] = cfg.portal_return_url
    try:
        session = await call_with_retries(
            cfg, lambda: polar.customer_sessions.create(**args), attempts=2, max_wait_seconds=2.0
        )
    except PolarClientError as e:
        if e.status_code in (404, 422):
            raise NotFound(
                "This account has no Polar customer yet: buy a plan or credits first."
            ) from None
        raise polar_failed(e) from None
    except PolarError as e:
        raise polar_failed(e) from None
    return data_response(request, {"url": session.customer_portal_url})


ENDPOINTS = (
    Endpoint(
        "POST",
        "/api/checkout",
        create_checkout,
        "A Polar checkout for a product (the caller's open one is reused)",
        "billing",
        "session",
        request=obj(
            {"product": {**STR, "description": "a configured Polar product id"}}, "product"
        ),
        response=obj({"url": STR, "checkoutId": STR, "reused": BOOL}, "url", "checkoutId"),
        also=(200,),
        status=201,
        errors=(502, 503),
    ),
    Endpoint(
        "POST",
        "/api/billing-portal",
        billing_portal,
        "A Polar customer-portal URL for the caller",
        "billing",
        "session",
        response=obj({"url": STR}, "url"),
        errors=(404, 502, 503),
    ),
)
