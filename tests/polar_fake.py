"""A local Polar for the tests: the endpoints creditgate uses, on the real wire format.

The server answers what polar-sdk 1.x (``polar.v2026_10``) expects — every
response body is built from the SDK's own output types and checked by loading
it back with ``polar.deserialize`` — and behaves like Polar where it matters:

* ``POST /v1/events/ingest`` validates each event as Polar does (one invalid
  event → 422 for the whole batch, ``loc`` naming it), deduplicates on
  ``external_id`` forever (first write wins) and answers ``{inserted, duplicates}``;
* ``GET /v1/customer-meters/`` sums the ingested events' metadata property
  per customer since the customer's last billing-cycle reset (``reset_meter``),
  plus a per-test offset, paged;
* ``GET /v1/meters/{id}/quantities`` sums the same property by event
  timestamp in hourly/daily UTC buckets, per external (or Polar) customer id
  or for all, untouched by resets — as Polar computes it from the events;
* ``POST/GET /v1/checkouts/`` and ``POST /v1/customer-sessions/``;
* ``GET /v1/subscriptions/{id}`` and ``PATCH /v1/subscriptions/{id}`` (cancel
  at period end, as ``subscriptions.update(id, cancel_at_period_end=True)``
  sends it): tests put a subscription in with ``put_subscription``; the PATCH
  changes it here only — Polar's webhook is the test's to deliver.

It can lose an acknowledged event on the way (``lose``: counted as
inserted, never stored). It can fail on demand: 5xx, 429 with Retry-After, responses slower than the
client's timeout (before or after storing the events), or hanging after
storing them until released (so a test can kill the exporter in between).

It runs on its own thread and event loop for the whole test session, like
one Polar organization: the session's ledger is exported to it test after
test, so its meters stay comparable with the ledger's exported totals.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import threading
import time
import types
import typing
import uuid
from collections import Counter, deque
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web
from polar import deserialize
from polar.v2026_10 import outputs

TOKEN = "polar_oat_test_token"
METER_ID = "5f0f6f53-77f4-4f4e-8a3c-0d4b8d9c2a11"
EVENT_NAME = "llm_usage"


# ---------------------------------------------------------------- SDK-shaped bodies


def example(tp: Any, name: str = "") -> Any:
    """A minimal valid JSON value of an SDK output type (nullable → null, lists empty)."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return None
    if origin is typing.Literal:
        return typing.get_args(tp)[0]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return None if type(None) in args else example(args[0], name)
    if origin is typing.Annotated:
        return example(typing.get_args(tp)[0], name)
    if origin is list:
        return []
    if origin is dict:
        return {}
    if tp is str:
        return "2026-01-01T00:00:00Z" if name.endswith(("_at", "_start", "_end")) else "x"
    if tp is bool:
        return False
    if tp is int:
        return 0
    if tp is float:
        return 0.0
    if tp is typing.Any:
        return None
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return {
            f.name: example(hints[f.name], f.name)
            for f in dataclasses.fields(tp)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
    raise TypeError(f"no example for {tp!r}")


def sdk_body(tp: Any, **overrides: Any) -> dict[str, Any]:
    """``example(tp)`` with ``overrides`` (nested dicts merged), checked against the SDK."""
    body = example(tp)
    _merge(body, overrides)
    deserialize(body, tp)  # raises if the SDK could not load it
    return dict(body)


def _merge(into: dict[str, Any], overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------- webhook payloads


def order_payload(
    *,
    order_id: str,
    account_id: str | None,
    product_id: str,
    billing_reason: str = "purchase",
    status: str = "paid",
    amount: int = 1000,
    refunded_amount: int = 0,
    customer_id: str = "c0ffee00-0000-4000-8000-000000000001",
    subscription_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    modified_at: datetime | None = None,
) -> dict[str, Any]:
    """An ``Order`` as Polar sends it in ``order.*`` webhooks."""
    now = modified_at or datetime.now(UTC)
    return sdk_body(
        outputs.Order,
        id=order_id,
        created_at=iso(now - timedelta(minutes=1)),
        modified_at=iso(now),
        status=status,
        paid=True,
        subtotal_amount=amount,
        net_amount=amount,
        total_amount=amount,
        refunded_amount=refunded_amount,
        refundable_amount=amount - refunded_amount,
        currency="usd",
        billing_reason=billing_reason,
        customer_id=customer_id,
        product_id=product_id,
        subscription_id=subscription_id,
        metadata=metadata if metadata is not None else {},
        customer={"id": customer_id, "external_id": account_id, "email": "buyer@example.com"},
        description="Credits",
    )


def subscription_payload(
    *,
    subscription_id: str,
    account_id: str,
    product_id: str,
    status: str,
    modified_at: datetime | None,
    created_at: datetime,
    period_start: datetime,
    period_end: datetime,
    cancel_at_period_end: bool = False,
    customer_id: str = "c0ffee00-0000-4000-8000-000000000002",
) -> dict[str, Any]:
    """A ``Subscription`` as Polar sends it in ``subscription.*`` webhooks."""
    return sdk_body(
        outputs.Subscription,
        id=subscription_id,
        created_at=iso(created_at),
        modified_at=iso(modified_at) if modified_at else None,
        amount=2000,
        currency="usd",
        recurring_interval="month",
        recurring_interval_count=1,
        status=status,
        current_period_start=iso(period_start),
        current_period_end=iso(period_end),
        cancel_at_period_end=cancel_at_period_end,
        customer_id=customer_id,
        product_id=product_id,
        metadata={"accountId": account_id},
        customer={"id": customer_id, "external_id": account_id},
    )


def customer_payload(*, customer_id: str, account_id: str | None) -> dict[str, Any]:
    """A ``Customer`` as Polar sends it in ``customer.*`` webhooks."""
    return sdk_body(
        outputs.CustomerIndividual,
        id=customer_id,
        external_id=account_id,
        email="someone@example.com",
        modified_at=iso(datetime.now(UTC)),
    )


def webhook_body(event_type: str, data: dict[str, Any]) -> bytes:
    """The JSON body of a Polar webhook delivery."""
    return orjson.dumps(
        {"type": event_type, "timestamp": iso(datetime.now(UTC)), "api_version": "2026-10"}
        | {"data": data}
    )


def sign_polar(
    body: bytes, secret: str, *, webhook_id: str | None = None, at: datetime | None = None
) -> dict[str, str]:
    """Standard Webhooks headers signed as Polar signs them.

    Polar's HMAC key is the whole secret string's UTF-8 bytes, ``whsec_``
    prefix included. svix's signer (Standard Webhooks) takes a ``bytes``
    secret as the key as it is, where it would base64-decode a ``str`` one.
    """
    from svix.webhooks import Webhook

    webhook_id = webhook_id or f"msg_{uuid.uuid4().hex}"
    at = at or datetime.now(UTC)
    signature = Webhook(secret.encode()).sign(webhook_id, at, body.decode())
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


def sign_clerk(
    body: bytes, secret: str, *, svix_id: str | None = None, at: datetime | None = None
) -> dict[str, str]:
    """Svix headers signed with svix's own signer, as Clerk's deliveries are."""
    from svix.webhooks import Webhook

    svix_id = svix_id or f"msg_{uuid.uuid4().hex}"
    at = at or datetime.now(UTC)
    signature = Webhook(secret).sign(svix_id, at, body.decode())
    return {
        "svix-id": svix_id,
        "svix-timestamp": str(int(at.timestamp())),
        "svix-signature": signature,
        "content-type": "application/json",
    }


def new_svix_secret() -> str:
    return "whsec_" + base64.b64encode(uuid.uuid4().bytes + uuid.uuid4().bytes).decode()


# ---------------------------------------------------------------- the server


@dataclasses.dataclass
class Failure:
    """One scripted answer to the next ingest request."""

    # "status" | "rate_limit" | "slow_before" | "slow_after" | "hang_after" | "invalid_request"
    kind: str
    status: int = 500
    retry_after: int = 1
    seconds: float = 2.0


class FakePolar:
    """State and behaviour of the local Polar; thread-safe (it serves on its own loop)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: dict[str, dict[str, Any]] = {}  # external_id → first event
        self.received: Counter[str] = Counter()  # external_id → times sent
        self.ingest_requests = 0
        self.failures: deque[Failure] = deque()
        self.invalid_external_ids: set[str] = set()
        self.meter_offsets: dict[str, float] = {}  # consumed_units only
        self.meter_resets: dict[str, float] = {}  # customer → consumed at the last reset
        self.lost_external_ids: set[str] = set()  # acknowledged, then lost
        self.ingested_at: dict[str, datetime] = {}  # external_id → when stored
        self.quantity_requests = 0
        self.meter_property = "credits"  # what the meter sums (creditgate's default)
        self.checkouts: dict[str, dict[str, Any]] = {}
        self.customers: set[str] = set()  # external customer ids Polar knows
        self.subscriptions: dict[str, dict[str, Any]] = {}  # id → Subscription body
        self.subscription_requests: Counter[tuple[str, str]] = Counter()  # (method, id) → n
        self.hanging = threading.Event()  # set while a request hangs after storing
        # Set: checkout creations wait at Polar until it is cleared.
        self.hold_checkouts = threading.Event()
        self.checkouts_waiting = 0
        self.release = threading.Event()
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ control

    def reset_behaviour(self) -> None:
        """Forget scripted failures and offsets (the stored events stay: Polar's memory)."""
        with self.lock:
            self.failures.clear()
            self.invalid_external_ids.clear()
            self.meter_offsets.clear()
            self.lost_external_ids.clear()
            self.hanging.clear()
            self.release.set()  # nothing may stay hung into the next test

    def lose(self, *external_ids: str) -> None:
        """Acknowledge these events when they come, as inserted, and never count them."""
        with self.lock:
            self.lost_external_ids.update(external_ids)

    def count_extra(self, customer: str, at: datetime, value: float) -> None:
        """An event creditgate never sent (another producer on the meter): Polar counts more."""
        key = f"extra:{uuid.uuid4()}"
        event = {
            "name": EVENT_NAME,
            "external_customer_id": customer,
            "external_id": key,
            "timestamp": iso(at),
            "metadata": {self.meter_property: value},
        }
        with self.lock:
            self.events[key] = event
            self.ingested_at[key] = datetime.now(UTC)
            self.customers.add(customer)

    def reset_meter(self, customer: str) -> None:
        """A billing cycle ends for ``customer``: its ``consumed_units`` restart at 0
        (Polar resets a subscription customer's meter after invoicing)."""
        with self.lock:
            self.meter_resets[customer] = self._consumed_locked().get(customer, 0.0)

    def fail(self, *failures: Failure) -> None:
        with self.lock:
            self.failures.extend(failures)

    def put_subscription(self, body: dict[str, Any]) -> None:
        """Polar's current state of a subscription (a ``subscription_payload``)."""
        with self.lock:
            self.subscriptions[body["id"]] = dict(body)

    def subscription_calls(self, method: str, subscription_id: str) -> int:
        with self.lock:
            return self.subscription_requests[(method, subscription_id)]

    def times_received(self, external_id: str) -> int:
        with self.lock:
            return self.received[external_id]

    def stored(self, external_id: str) -> dict[str, Any] | None:
        with self.lock:
            return self.events.get(external_id)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            runner = web.AppRunner(self.app(), access_log=None)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}"
            self._runner = runner
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="fake-polar", daemon=True)
        self._thread.start()
        assert ready.wait(10), "the fake Polar did not start"

    def stop(self) -> None:
        self.release.set()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    # ------------------------------------------------------------ HTTP

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post("/v1/events/ingest", self.ingest)
        app.router.add_get("/v1/customer-meters/", self.customer_meters)
        app.router.add_get("/v1/meters/{id}/quantities", self.meter_quantities)
        app.router.add_post("/v1/checkouts/", self.create_checkout)
        app.router.add_get("/v1/checkouts/{id}", self.get_checkout)
        app.router.add_post("/v1/customer-sessions/", self.customer_session)
        app.router.add_get("/v1/subscriptions/{id}", self.get_subscription)
        app.router.add_patch("/v1/subscriptions/{id}", self.update_subscription)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "Unauthorized", "detail": "bad token"}, status=401)
        if request.headers.get("Polar-Version") != "2026-10":
            return web.json_response({"detail": "unexpected API version"}, status=400)
        response: web.StreamResponse = await handler(request)
        return response

    @staticmethod
    def _invalid(loc: list[str | int], msg: str) -> web.Response:
        return web.json_response(
            {"detail": [{"loc": loc, "msg": msg, "type": "value_error"}]}, status=422
        )

    def _validate(self, i: int, event: Any) -> web.Response | None:
        loc: list[str | int] = ["body", "events", i]
        if not isinstance(event, dict):
            return self._invalid(loc, "not an object")
        name = event.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= 128:
            return self._invalid([*loc, "name"], "name must be 1-128 characters")
        if ("customer_id" in event) == ("external_customer_id" in event):
            return self._invalid(loc, "exactly one of customer_id, external_customer_id")
        if "timestamp" in event:
            try:
                at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
            except (AttributeError, ValueError):
                return self._invalid([*loc, "timestamp"], "invalid datetime")
            if at.tzinfo is None:
                return self._invalid([*loc, "timestamp"], "timezone required")
            if at > datetime.now(UTC):
                return self._invalid([*loc, "timestamp"], "timestamp must be in the past")
        metadata = event.get("metadata", {})
        if not isinstance(metadata, dict) or len(metadata) > 50:
            return self._invalid([*loc, "metadata"], "at most 50 pairs")
        for key, value in metadata.items():
            bad_str = isinstance(value, str) and not 1 <= len(value) <= 500
            if len(key) > 40 or bad_str or not isinstance(value, str | int | float | bool):
                return self._invalid([*loc, "metadata", key], "invalid metadata value")
        if event.get("external_id") in self.invalid_external_ids:
            return self._invalid([*loc, "external_id"], "refused for this test")
        return None

    async def ingest(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self.lock:
            self.ingest_requests += 1
            failure = self.failures.popleft() if self.failures else None
        if failure is not None and failure.kind == "status":
            return web.json_response({"detail": "boom"}, status=failure.status)
        if failure is not None and failure.kind == "rate_limit":
            return web.json_response(
                {"detail": "Rate limit exceeded"},
                status=429,
                headers={"Retry-After": str(failure.retry_after)},
            )
        if failure is not None and failure.kind == "invalid_request":
            # A 422 about the request, not its events (as a wrong organization is).
            return self._invalid(["body", "organization_id"], "not an organization of this token")
        if failure is not None and failure.kind == "slow_before":
            await asyncio.sleep(failure.seconds)  # the client gives up; nothing stored
            return web.json_response({"inserted": 0, "duplicates": 0})
        events = body.get("events")
        if not isinstance(events, list):
            return self._invalid(["body", "events"], "list required")
        for i, event in enumerate(events):
            refusal = self._validate(i, event)
            if refusal is not None:
                return refusal
        inserted = duplicates = 0
        with self.lock:
            for event in events:
                key = event.get("external_id") or f"anon:{uuid.uuid4()}"
                self.received[key] += 1
                if key in self.events:
                    duplicates += 1  # first write wins, forever
                    continue
                if key in self.lost_external_ids:
                    inserted += 1  # acknowledged, and lost on the way
                    continue
                self.events[key] = event
                self.ingested_at[key] = datetime.now(UTC)
                self.customers.add(event["external_customer_id"])
                inserted += 1
        if failure is not None and failure.kind == "slow_after":
            await asyncio.sleep(failure.seconds)  # stored, but the client gives up
        if failure is not None and failure.kind == "hang_after":
            self.release.clear()
            self.hanging.set()
            deadline = time.monotonic() + 60
            while not self.release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            self.hanging.clear()
        return web.json_response(
            sdk_body(outputs.EventsIngestResponse, inserted=inserted, duplicates=duplicates)
        )

    def _metered_locked(self) -> list[tuple[str, datetime, float]]:
        """(external customer id, event timestamp, value) of every event the meter
        counts (its filter: name = llm_usage); call with the lock held."""
        out = []
        for key, event in self.events.items():
            if event.get("name") != EVENT_NAME:
                continue
            at = self.ingested_at[key]  # Polar's default timestamp: ingestion
            if "timestamp" in event:
                at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
            value = event.get("metadata", {}).get(self.meter_property, 0)
            out.append((event["external_customer_id"], at.astimezone(UTC), float(value)))
        return out

    def _consumed_locked(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for customer, _, value in self._metered_locked():
            totals[customer] = totals.get(customer, 0.0) + value
        return totals

    def _meter_items(self, meter_id: str | None, external: str | None) -> list[dict[str, Any]]:
        if meter_id not in (None, METER_ID):
            return []
        with self.lock:
            totals = self._consumed_locked()
            for customer, at_reset in self.meter_resets.items():
                totals[customer] = totals.get(customer, 0.0) - at_reset
            for customer, offset in self.meter_offsets.items():
                totals[customer] = totals.get(customer, 0.0) + offset
        items = []
        for customer, consumed in sorted(totals.items()):
            if external is not None and customer != external:
                continue
            polar_customer = str(uuid.uuid5(uuid.NAMESPACE_URL, customer))
            items.append(
                sdk_body(
                    outputs.CustomerMeter,
                    id=str(uuid.uuid5(uuid.NAMESPACE_OID, customer)),
                    customer_id=polar_customer,
                    meter_id=METER_ID,
                    consumed_units=consumed,
                    credited_units=0,
                    balance=-consumed,
                    customer={"id": polar_customer, "external_id": customer},
                    meter={"id": METER_ID, "name": "LLM usage"},
                )
            )
        return items

    async def customer_meters(self, request: web.Request) -> web.Response:
        q = request.query
        page, limit = int(q.get("page", "1")), int(q.get("limit", "10"))
        items = self._meter_items(q.get("meter_id"), q.get("external_customer_id"))
        max_page = max(1, -(-len(items) // limit))
        body = {
            "items": items[(page - 1) * limit : page * limit],
            "pagination": {"total_count": len(items), "max_page": max_page},
        }
        deserialize(body, outputs.ListResourceCustomerMeter)
        return web.json_response(body)

    async def meter_quantities(self, request: web.Request) -> web.Response:
        """Polar's ``GET /v1/meters/{id}/quantities``: one bucket per step of
        ``generate_series(start, end, interval)``, each summing the events whose
        timestamp truncated to the interval is the bucket's (Polar's query)."""
        with self.lock:
            self.quantity_requests += 1
        if request.match_info["id"] != METER_ID:
            return self._not_found()
        q = request.query
        steps = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
        limits = {"hour": 7, "day": 366}  # Polar's MAX_INTERVAL_DAYS
        interval = q.get("interval", "")
        if interval not in steps:
            return self._invalid(["query", "interval"], "this fake knows hour and day")
        if q.get("timezone", "UTC") != "UTC":
            return self._invalid(["query", "timezone"], "this fake knows UTC only")
        bounds = []
        for name in ("start_timestamp", "end_timestamp"):
            try:
                at = datetime.fromisoformat(q.get(name, "").replace("Z", "+00:00"))
            except ValueError:
                return self._invalid(["query", name], "invalid datetime")
            bounds.append(at if at.tzinfo else at.replace(tzinfo=UTC))
        start, end = bounds
        if (end.date() - start.date()).days > limits[interval]:
            return self._invalid(["query"], "the interval is too small for this range")
        externals = set(q.getall("external_customer_id", []))
        polar_ids = set(q.getall("customer_id", []))

        def trunc(at: datetime) -> datetime:
            at = at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
            return at.replace(hour=0) if interval == "day" else at

        sums: dict[datetime, float] = {}
        with self.lock:
            for customer, at, value in self._metered_locked():
                polar_id = str(uuid.uuid5(uuid.NAMESPACE_URL, customer))
                if (externals or polar_ids) and not (
                    customer in externals or polar_id in polar_ids
                ):
                    continue
                sums[trunc(at)] = sums.get(trunc(at), 0.0) + value
        quantities, at = [], start
        while at <= end:
            quantities.append({"timestamp": iso(at), "quantity": sums.get(trunc(at), 0.0)})
            at += steps[interval]
        body = {"quantities": quantities, "total": sum(x["quantity"] for x in quantities)}
        deserialize(body, outputs.MeterQuantities)
        return web.json_response(body)

    async def create_checkout(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.hold_checkouts.is_set():
            with self.lock:
                self.checkouts_waiting += 1
            while self.hold_checkouts.is_set():
                await asyncio.sleep(0.02)
            with self.lock:
                self.checkouts_waiting -= 1
        products = body.get("products")
        if not isinstance(products, list) or not products:
            return self._invalid(["body", "products"], "at least one product")
        checkout_id = str(uuid.uuid4())
        external = body.get("external_customer_id")
        checkout = {
            "id": checkout_id,
            "status": "open",
            "url": f"https://sandbox.polar.sh/checkout/polar_c_{uuid.uuid4().hex}",
            "expires_at": iso(datetime.now(UTC) + timedelta(hours=1)),
            "external_customer_id": external,
            "metadata": body.get("metadata", {}),
            "product_id": products[0],
            "success_url": body.get("success_url") or "https://example.com/success",
        }
        with self.lock:
            self.checkouts[checkout_id] = checkout
            if external:
                self.customers.add(external)
        return web.json_response(self._checkout_body(checkout), status=201)

    async def get_checkout(self, request: web.Request) -> web.Response:
        with self.lock:
            checkout = self.checkouts.get(request.match_info["id"])
        if checkout is None:
            return web.json_response(
                {"error": "ResourceNotFound", "detail": "Not found"}, status=404
            )
        return web.json_response(self._checkout_body(checkout))

    @staticmethod
    def _checkout_body(checkout: dict[str, Any]) -> dict[str, Any]:
        return sdk_body(
            outputs.Checkout,
            id=checkout["id"],
            status=checkout["status"],
            url=checkout["url"],
            expires_at=checkout["expires_at"],
            success_url=checkout["success_url"],
            external_customer_id=checkout["external_customer_id"],
            metadata=checkout["metadata"],
            product_id=checkout["product_id"],
            client_secret="polar_c_secret",
        )

    async def customer_session(self, request: web.Request) -> web.Response:
        body = await request.json()
        external = body.get("external_customer_id")
        with self.lock:
            known = external in self.customers
        if not known:
            return self._invalid(["body", "external_customer_id"], "Customer does not exist.")
        return web.json_response(
            sdk_body(
                outputs.CustomerSession,
                id=str(uuid.uuid4()),
                token="polar_cst_x",
                expires_at=iso(datetime.now(UTC) + timedelta(hours=1)),
                customer_portal_url=f"https://sandbox.polar.sh/portal?customer_session_token={uuid.uuid4().hex}",
                customer_id=str(uuid.uuid5(uuid.NAMESPACE_URL, external)),
                customer={"external_id": external},
            ),
            status=201,
        )

    @staticmethod
    def _not_found() -> web.Response:
        return web.json_response({"error": "ResourceNotFound", "detail": "Not found"}, status=404)

    async def get_subscription(self, request: web.Request) -> web.Response:
        sub_id = request.match_info["id"]
        with self.lock:
            self.subscription_requests[("GET", sub_id)] += 1
            body = self.subscriptions.get(sub_id)
        if body is None:
            return self._not_found()
        deserialize(body, outputs.Subscription)
        return web.json_response(body)

    async def update_subscription(self, request: web.Request) -> web.Response:
        """Polar's subscription update, for the one form creditgate sends: cancel at period end."""
        sub_id = request.match_info["id"]
        change = await request.json()
        with self.lock:
            self.subscription_requests[("PATCH", sub_id)] += 1
            body = self.subscriptions.get(sub_id)
            if body is None:
                return self._not_found()
            if set(change) - {
                "cancel_at_period_end",
                "customer_cancellation_reason",
                "customer_cancellation_comment",
            }:
                return self._invalid(["body"], "only a cancellation is supported here")
            if body["status"] not in ("active", "trialing"):
                return web.json_response(
                    {"error": "InactiveSubscription", "detail": "not active"}, status=403
                )
            wanted = change.get("cancel_at_period_end")
            if wanted is True and body["cancel_at_period_end"]:
                return web.json_response(
                    {"error": "AlreadyCanceledSubscription", "detail": "already canceled"},
                    status=403,
                )
            now = iso(datetime.now(UTC))
            body = {
                **body,
                "cancel_at_period_end": bool(wanted),
                "canceled_at": now if wanted else None,
                "ends_at": body["current_period_end"] if wanted else None,
                "modified_at": now,
            }
            self.subscriptions[sub_id] = body
        deserialize(body, outputs.Subscription)
        return web.json_response(body)
