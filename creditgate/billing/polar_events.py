"""What Polar's webhook events do to creditgate: grants, reversals, plans, links.

The receiver (``creditgate.webhooks.polar``) keeps only the *facts* of an
event — ids, amounts, states, timestamps; never an email — and the webhook
worker applies them here, inside one transaction that also marks the event
processed. Every effect is idempotent on its own as well:

* ``order.paid`` grants the product's credits once per order (key
  ``polar:order:{id}``); each subscription cycle is a new order, so each
  period grants once.
* ``order.refunded`` takes back the refunded share of what the order granted,
  as far as the account can cover it: what calls in flight reserve is taken
  when their holds end, and only what was already spent is recorded as debt
  (``ledger.reverse_up_to``). A refund that overtakes its ``order.paid``
  grants first, so the two always net out.
* ``subscription.*`` keeps the newest state of each subscription by the
  object's own ``modified_at`` (delivery order is not guaranteed) and sets the
  account's tier from its live plan.
* ``customer.*`` links the Polar customer to the account.
* ``checkout.*`` keeps the status of checkouts we created, so an open one can
  be reused.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from creditgate import ledger
from creditgate.billing.metrics import REFUND_DEBT
from creditgate.config import DEFAULT_TIER, Config
from creditgate.ledger.balances import LIVE_PLAN_STATUSES
from creditgate.logs import log

# Orders that buy credits. A mid-period plan change (subscription_update) and
# the metered-usage invoice (subscription_meter_cycle) grant nothing.
GRANTING_REASONS = ("purchase", "subscription_create", "subscription_cycle")

SUBSCRIPTION_EVENTS = frozenset(
    f"subscription.{s}"
    for s in (
        "created",
        "updated",
        "active",
        "canceled",
        "uncanceled",
        "revoked",
        "cycled",
        "past_due",
        "paused",
        "resumed",
    )
)
CUSTOMER_EVENTS = frozenset(
    ("customer.created", "customer.updated", "customer.deleted", "customer.state_changed")
)
CHECKOUT_EVENTS = frozenset(("checkout.created", "checkout.updated", "checkout.expired"))
ORDER_EVENTS = frozenset(("order.paid", "order.refunded"))
HANDLED = ORDER_EVENTS | SUBSCRIPTION_EVENTS | CUSTOMER_EVENTS | CHECKOUT_EVENTS


class RetryLater(Exception):
    """The event cannot be applied yet (e.g. its account is not known yet)."""


class Unprocessable(Exception):
    """The event can never be applied as it is; an operator must look at it."""


# ---------------------------------------------------------------- facts


def _s(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) and value else None


def _i(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _customer_refs(obj: dict[str, Any]) -> dict[str, str | None]:
    customer = obj.get("customer") if isinstance(obj.get("customer"), dict) else {}
    metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    assert isinstance(customer, dict) and isinstance(metadata, dict)
    return {
        "customer_id": _s(obj, "customer_id") or _s(customer, "id"),
        "customer_external_id": _s(customer, "external_id") or _s(obj, "external_customer_id"),
        "metadata_account_id": _s(metadata, "accountId"),
    }


def facts_of(event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    """The fields of a verified event's ``data`` that applying it needs.

    Raises ValueError when the object has no id (nothing could be applied).
    """
    object_id = _s(data, "id")
    if object_id is None:
        raise ValueError("the event's object has no id")
    facts: dict[str, Any] = {
        "id": object_id,
        "modified_at": _s(data, "modified_at") or _s(data, "created_at"),
    }
    if event_type in ORDER_EVENTS:
        facts |= _customer_refs(data) | {
            "status": _s(data, "status"),
            "product_id": _s(data, "product_id"),
            "subscription_id": _s(data, "subscription_id"),
            "checkout_id": _s(data, "checkout_id"),
            "billing_reason": _s(data, "billing_reason"),
            "units": _i(data, "units"),
            "refunded_amount": _i(data, "refunded_amount"),
            "refundable_amount": _i(data, "refundable_amount"),
        }
    elif event_type in SUBSCRIPTION_EVENTS:
        facts |= _customer_refs(data) | {
            "status": _s(data, "status"),
            "product_id": _s(data, "product_id"),
            "current_period_start": _s(data, "current_period_start"),
            "current_period_end": _s(data, "current_period_end"),
            "cancel_at_period_end": data.get("cancel_at_period_end") is True,
        }
    elif event_type in CUSTOMER_EVENTS:
        facts |= {"external_id": _s(data, "external_id")}
    elif event_type in CHECKOUT_EVENTS:
        facts |= {"status": _s(data, "status")}
    return facts


def _ts(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise Unprocessable(f"not an ISO 8601 time: {text!r}") from None


# ---------------------------------------------------------------- applying


async def apply_polar_event(
    conn: asyncpg.Connection, config: Config, event_type: str, facts: dict[str, Any]
) -> str:
    """Apply one event's facts inside the caller's transaction; a short outcome."""
    if event_type == "order.paid":
        return (await _grant_order(conn, config, facts))[1]
    if event_type == "order.refunded":
        return await _refund_order(conn, config, facts)
    if event_type in SUBSCRIPTION_EVENTS:
        return await _subscription(conn, config, facts)
    if event_type in CUSTOMER_EVENTS:
        return await _customer(conn, event_type, facts)
    if event_type in CHECKOUT_EVENTS:
        return await _checkout(conn, facts)
    return "ignored"


async def _account_exists(conn: asyncpg.Connection, ref: str | None) -> uuid.UUID | None:
    if ref is None:
        return None
    try:
        account_id = uuid.UUID(ref)
    except ValueError:
        return None
    found = await conn.fetchval("SELECT id FROM accounts WHERE id = $1", account_id)
    return found if isinstance(found, uuid.UUID) else None


async def resolve_account(conn: asyncpg.Connection, facts: dict[str, Any]) -> uuid.UUID:
    """The account an order or subscription belongs to (DESIGN.md §9).

    The customer's external id (set by our checkout), else ``metadata.accountId``,
    else an earlier ``customer.*`` link. RetryLater when none names an account
    yet — a customer event may still be on its way.
    """
    for ref in (facts.get("customer_external_id"), facts.get("metadata_account_id")):
        account_id = await _account_exists(conn, ref)
        if account_id is not None:
            return account_id
    if facts.get("customer_id"):
        linked = await conn.fetchval(
            "SELECT account_id FROM polar_customers WHERE customer_id = $1",
            facts["customer_id"],
        )
        if isinstance(linked, uuid.UUID):
            return linked
    raise RetryLater("no account for this Polar customer (yet)")


async def _link_customer(
    conn: asyncpg.Connection, customer_id: str | None, account_id: uuid.UUID
) -> None:
    if customer_id is None:
        return
    await conn.execute(
        """
        INSERT INTO polar_customers (customer_id, account_id) VALUES ($1, $2)
        ON CONFLICT (customer_id) DO UPDATE
        SET account_id = EXCLUDED.account_id, deleted_at = NULL, updated_at = now()
        WHERE polar_customers.account_id <> EXCLUDED.account_id
           OR polar_customers.deleted_at IS NOT NULL
        """,
        customer_id,
        account_id,
    )


@dataclass(frozen=True, slots=True)
class _Order:
    order_id: str
    account_id: uuid.UUID
    granted: int


async def _grant_order(
    conn: asyncpg.Connection, config: Config, facts: dict[str, Any]
) -> tuple[_Order | None, str]:
    order_id: str = facts["id"]
    # The row lock serialises every event of this order (paid, refunds).
    done = await conn.fetchrow(
        "SELECT account_id, granted FROM polar_orders WHERE order_id = $1 FOR UPDATE", order_id
    )
    if done is not None:
        return _Order(order_id, done["account_id"], done["granted"]), "already granted"
    reason = facts.get("billing_reason")
    if reason not in GRANTING_REASONS:
        return None, f"billing reason {reason}: nothing to grant"
    product = config.products.get(facts.get("product_id") or "")
    if product is None:
        raise Unprocessable(
            f"order {order_id} is for product {facts.get('product_id')}, not in the config"
        )
    account_id = await resolve_account(conn, facts)
    units = facts.get("units") or 1
    amount = product.credits_micros * max(1, int(units))
    entry_id = None
    if amount > 0:
        posted = await ledger.post_entry(
            conn,
            account_id=account_id,
            amount=amount,
            kind="grant",
            idempotency_key=f"polar:order:{order_id}",
            reason=f"Polar order {order_id}",
        )
        entry_id = posted.entry_id
    # The row lock above cannot cover an order seen for the first time by two
    # workers at once: the second one's grant is then a replay of the first
    # (same key, nothing written) and this insert fails on the primary key,
    # so its transaction rolls back and the event is retried — and found done.
    await conn.execute(
        """
        INSERT INTO polar_orders
            (order_id, account_id, product_id, subscription_id, billing_reason, granted,
             grant_entry_id)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        """,
        order_id,
        account_id,
        product.id,
        facts.get("subscription_id"),
        reason,
        amount,
        entry_id,
    )
    await _link_customer(conn, facts.get("customer_id"), account_id)
    if facts.get("checkout_id"):
        await conn.execute(
            "UPDATE polar_checkouts SET status = 'succeeded' WHERE id = $1 AND status = 'open'",
            facts["checkout_id"],
        )
    log.info(
        "polar order granted",
        extra={"order_id": order_id, "account_id": str(account_id), "micros": amount},
    )
    return _Order(order_id, account_id, amount), f"granted {amount} µc"


def refund_target(granted: int, facts: dict[str, Any]) -> int:
    """µc to have taken back in total: the refunded share of the order's grant."""
    if facts.get("status") == "refunded":
        return granted
    refunded: int = facts.get("refunded_amount") or 0
    base = refunded + (facts.get("refundable_amount") or 0)
    if base <= 0:
        # Not fully refunded, and no amounts to take a share of: never guess
        # (taking it all back would be a guess too); an operator looks at it.
        raise Unprocessable("a partial refund without refunded or refundable amounts")
    return granted * min(refunded, base) // base


async def _refund_order(conn: asyncpg.Connection, config: Config, facts: dict[str, Any]) -> str:
    order, note = await _grant_order(conn, config, facts)
    if order is None or order.granted == 0:
        return f"nothing to reverse ({note})"
    grant_key = f"polar:order:{order.order_id}"
    target = refund_target(order.granted, facts)
    delta = target - await ledger.requested_total(conn, grant_key)
    if delta <= 0:
        return "already reversed"
    reversal = await ledger.reverse_up_to(
        conn,
        account_id=order.account_id,
        amount=delta,
        # Keyed by the total to have taken back: two events with one refunded
        # amount but other refundable amounts are two targets, not a conflict
        # (the order's row lock serialises them, so each adds only its delta).
        idempotency_key=f"polar:refund:{order.order_id}:target:{target}",
        reverses=grant_key,
        reason=f"Polar refund of order {order.order_id}",
    )
    if reversal.debt:
        REFUND_DEBT.inc(reversal.debt)
        log.warning(
            "refund larger than the credits left; the rest recorded as debt",
            extra={
                "order_id": order.order_id,
                "account_id": str(order.account_id),
                "reversed_micros": reversal.reversed,
                "debt_micros": reversal.debt,
            },
        )
    if reversal.pending:
        log.info(
            "refund of reserved credits pending until their holds end",
            extra={
                "order_id": order.order_id,
                "account_id": str(order.account_id),
                "pending_micros": reversal.pending,
            },
        )
    return (
        f"reversed {reversal.reversed} µc, pending {reversal.pending} µc, debt {reversal.debt} µc"
    )


async def _subscription(conn: asyncpg.Connection, config: Config, facts: dict[str, Any]) -> str:
    account_id = await resolve_account(conn, facts)
    product_id = facts.get("product_id") or ""
    product = config.products.get(product_id)
    modified = _ts(facts.get("modified_at"))
    if modified is None or facts.get("status") is None:
        raise Unprocessable("subscription without status or timestamps")
    stored = await conn.fetchval(
        """
        INSERT INTO subscriptions AS s
            (id, account_id, product_id, plan, tier, status, current_period_start,
             current_period_end, cancel_at_period_end, source_modified_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
        ON CONFLICT (id) DO UPDATE
        SET account_id = EXCLUDED.account_id, product_id = EXCLUDED.product_id,
            plan = EXCLUDED.plan, tier = EXCLUDED.tier, status = EXCLUDED.status,
            current_period_start = EXCLUDED.current_period_start,
            current_period_end = EXCLUDED.current_period_end,
            cancel_at_period_end = EXCLUDED.cancel_at_period_end,
            source_modified_at = EXCLUDED.source_modified_at, updated_at = now()
        WHERE s.source_modified_at < EXCLUDED.source_modified_at
        RETURNING id
        """,
        facts["id"],
        account_id,
        product_id,
        product.plan_name if product else product_id,
        product.tier if product else None,
        facts["status"],
        _ts(facts.get("current_period_start")),
        _ts(facts.get("current_period_end")),
        bool(facts.get("cancel_at_period_end")),
        modified,
    )
    await _link_customer(conn, facts.get("customer_id"), account_id)
    tier = await conn.fetchval(
        """
        SELECT tier FROM subscriptions
        WHERE account_id = $1 AND status = ANY($2::text[]) AND tier IS NOT NULL
        ORDER BY current_period_start DESC NULLS LAST, source_modified_at DESC
        LIMIT 1
        """,
        account_id,
        list(LIVE_PLAN_STATUSES),
    )
    await ledger.set_account_tier(conn, account_id, tier or DEFAULT_TIER)
    if stored is None:
        return f"older than the stored state; tier {tier or DEFAULT_TIER}"
    return f"status {facts['status']}; tier {tier or DEFAULT_TIER}"


async def _customer(conn: asyncpg.Connection, event_type: str, facts: dict[str, Any]) -> str:
    if event_type == "customer.deleted":
        await conn.execute(
            "UPDATE polar_customers SET deleted_at = now(), updated_at = now()"
            " WHERE customer_id = $1 AND deleted_at IS NULL",
            facts["id"],
        )
        return "unlinked"
    if facts.get("external_id") is None:
        return "no external id: nothing to link"
    account_id = await _account_exists(conn, facts["external_id"])
    if account_id is None:
        raise RetryLater("the customer's external id names no account (yet)")
    await _link_customer(conn, facts["id"], account_id)
    return "linked"


async def _checkout(conn: asyncpg.Connection, facts: dict[str, Any]) -> str:
    status = facts.get("status")
    if status is None:
        return "no status"
    updated = await conn.execute(
        """
        UPDATE polar_checkouts SET status = $2, source_modified_at = $3
        WHERE id = $1 AND (source_modified_at IS NULL OR source_modified_at < $3)
        """,
        facts["id"],
        status,
        _ts(facts.get("modified_at")),
    )
    return f"status {status}" if updated != "UPDATE 0" else "not ours, or older"
