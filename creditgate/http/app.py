"""The app factory: routes, middleware, and the resources a process shares."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from creditgate import billing, ledger, migrations, webhooks
from creditgate.auth import AUTH, Authenticator
from creditgate.billing import setup_billing
from creditgate.config import Settings
from creditgate.http import (
    admin,
    admin_keys,
    health,
    keys,
    metrics,
    orgs,
    preferences,
    quota,
    usage_record,
    user,
)
from creditgate.http.metrics import CREDITS_EXPIRED, HOLDS_ACTIVE, HOLDS_EXPIRED
from creditgate.http.middlewares import add_id_headers, envelope_middleware
from creditgate.http.state import STATE, State
from creditgate.invalidation import CacheInvalidation
from creditgate.ledger import partitions
from creditgate.ledger.group_commit import GroupCommit
from creditgate.ledger.guards import serving_role_warnings
from creditgate.logs import log
from creditgate.notify import setup_notifications
from creditgate.preferences import DefaultModels
from creditgate.proxy import apis as proxy_apis
from creditgate.proxy import metering
from creditgate.proxy import routes as proxy
from creditgate.proxy.ports import CHAT
from creditgate.proxy.upstream import UpstreamClient
from creditgate.resources import RESOURCES
from creditgate.retention import prune
from creditgate.throttle import DayZone, LimitsCache, Throttle
from creditgate.throttle import admin as throttle_admin
from creditgate.throttle.cluster import make_client, make_pipe
from creditgate.webhooks import setup_webhooks
from creditgate.webkit.drain import drain_middleware, install_drain
from creditgate.webkit.envelope import BODY_TIMEOUT
from creditgate.webkit.openapi import add_endpoints

# Every route, from the tables beside their handlers (they also make /openapi.json).
# At shutdown, how long settlements still retrying in the background (the
# database was failing) get to commit before the pools close; only spent when
# some are pending, and within the drain's margin (webkit.drain).
LATE_SETTLE_SHUTDOWN_SECONDS = 1.0

ENDPOINTS = (
    *proxy.ENDPOINTS,
    *proxy_apis.ENDPOINTS,
    *user.ENDPOINTS,
    *quota.ENDPOINTS,
    *usage_record.ENDPOINTS,
    *preferences.ENDPOINTS,
    *keys.ENDPOINTS,
    *orgs.ENDPOINTS,
    *billing.ENDPOINTS,
    *admin.ENDPOINTS,
    *admin_keys.ENDPOINTS,
    *throttle_admin.ENDPOINTS,
    *webhooks.ENDPOINTS,
    *health.ENDPOINTS,
    *metrics.ENDPOINTS,
)


def create_app(settings: Settings) -> web.Application:
    """A creditgate app for ``settings``; its resources open when it starts."""
    app = web.Application(
        client_max_size=settings.config.max_body_bytes,
        # The drain's inside the envelope: a request it cuts early becomes a 503 envelope.
        middlewares=[envelope_middleware, drain_middleware],
    )
    app[STATE] = State(settings)
    # The narrow views the route modules below http/ use (the same object).
    app[RESOURCES] = app[STATE]
    app[CHAT] = app[STATE]
    app[BODY_TIMEOUT] = settings.config.http_limits.body_timeout_seconds
    install_drain(app, settings.config.shutdown_timeout_seconds)
    app[AUTH] = Authenticator(settings)
    app.on_response_prepare.append(add_id_headers)
    app.cleanup_ctx.append(_resources)
    app.cleanup_ctx.append(_late_settlements)
    app.cleanup_ctx.append(_hold_sweeper)
    app.cleanup_ctx.append(_pruner)
    add_endpoints(app, ENDPOINTS)
    setup_billing(app)
    setup_webhooks(app)
    setup_notifications(app)
    return app


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query when a pooled connection is released.

    The default sends ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`` — one more round trip after every statement, i.e. two per
    completion. Pooled connections never carry session state here (no SET,
    LISTEN, cursors or session-level locks: the exporter's lock has its own
    connection), and asyncpg still rolls back an unfinished transaction.
    """


async def _resources(app: web.Application) -> AsyncIterator[None]:
    st = app[STATE]
    s = st.settings
    if s.database_url is None or s.redis_url is None:
        raise RuntimeError("DATABASE_URL and REDIS_URL are required (or use `creditgate dev`)")
    st.db = await asyncpg.create_pool(
        s.database_url,
        min_size=1,
        max_size=20,
        server_settings={"application_name": "creditgate"},
        reset=_keep_session,
    )
    st.read_db = st.db
    if s.database_read_url is not None:
        # Read-only by default at the session level: a write sent here by
        # mistake fails loudly instead of landing on a replica's primary.
        st.read_db = await asyncpg.create_pool(
            s.database_read_url,
            min_size=1,
            max_size=10,
            server_settings={
                "application_name": "creditgate-read",
                "default_transaction_read_only": "on",
            },
            reset=_keep_session,
        )
    if s.config.ignored_keys:
        # Speculative upstream calls, unflushed reserves and the fixed hold TTL
        # are gone (nothing leaves before its hold is durable; a hold's TTL
        # comes from its call's deadline): old configs load, with this warning.
        log.warning(
            "config keys ignored; they no longer do anything",
            extra={"keys": list(s.config.ignored_keys)},
        )
    st.holds = GroupCommit(
        st.db,
        lanes=s.config.group_commit_lanes,
        max_batch=s.config.group_commit_max_batch,
        # Key budgets' periods follow the calendar of messages_per_day.
        budget_zone=s.config.throttle.day_zone,
    )
    async with st.db.acquire() as conn:
        # Refuses to start on an edited applied migration; pending ones only
        # make /ready answer 503 until `creditgate migrate` has run.
        todo = await migrations.pending(conn)
        # One owner/superuser URL keeps working, but append-only is then only
        # as good as the code: say so at start (docs/operations.md#database-roles).
        for warning in await serving_role_warnings(conn):
            log.warning(warning.message, extra={"role": warning.role, "tables": warning.tables})
    if todo:
        log.warning("migrations pending; run `creditgate migrate`", extra={"pending": todo})
    # A redis+cluster:// URL gives redis-py's RedisCluster (throttle/cluster.py).
    st.redis = make_client(s.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
        skip_auto_headers=("User-Agent",),
    )
    st.upstream = UpstreamClient(session)
    # The throttle's own connection: shared by all requests of this process,
    # pipelined, and waited on at most the time budget.
    budget = s.throttle_redis_timeout_ms / 1000
    throttle_redis = make_pipe(s.redis_url, connect_timeout=max(budget, 0.5))
    lease_ttl_ms = int(s.config.throttle.lease_ttl_seconds * 1000)
    st.throttle = Throttle(
        throttle_redis,
        policy=s.throttle_on_redis_error,
        timeout_ms=s.throttle_redis_timeout_ms,
        lease_ttl_ms=lease_ttl_ms,
        day_zone=DayZone(s.config.throttle.day_zone),
    )
    await st.throttle.start()
    st.limits = LimitsCache(st.db, s.config)
    st.default_models = DefaultModels(st.db)
    auth = app[AUTH]
    await auth.start(st.db)
    st.keys = auth.keys
    # Revocations, closures and limit changes reach this process's caches at once.
    invalidation = CacheInvalidation(s.database_url, (auth.keys, auth.accounts, st.limits))
    invalidation.start()
    try:
        yield
    finally:
        await invalidation.stop()
        await auth.stop()
        await st.throttle.aclose()
        await throttle_redis.aclose()
        await session.close()
        await st.redis.aclose()
        if st.read_db is not st.db:
            await st.read_db.close()
        await st.db.close()


async def _late_settlements(app: web.Application) -> AsyncIterator[None]:
    """At shutdown, before the pools close: let background settlements commit."""
    yield
    await metering.finish_late_settlements(LATE_SETTLE_SHUTDOWN_SECONDS)


@contextlib.asynccontextmanager
async def _in_background(work: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run ``work`` as a task for the duration of the block, cancelled at its end."""
    task = asyncio.create_task(work)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _hold_sweeper(app: web.Application) -> AsyncIterator[None]:
    """Release holds a crashed process left behind, and write off expired credits.

    Runs in every process; both sweeps are safe to run concurrently (each hold
    ends once, each lot write-off locks its account first).
    """
    st = app[STATE]
    config = st.settings.config
    shortest = min(m.timeouts.total for m in config.models.values())
    interval = max(1.0, min(30.0, (shortest + config.settle_margin_seconds) / 10))

    async def sweep_forever() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                expired = await ledger.sweep_expired_holds(st.db)
                # After the holds: an ended hold frees credits a lot write-off may take.
                written_off = await ledger.sweep_expired_lots(st.db)
                HOLDS_ACTIVE.set(await ledger.count_live_holds(st.db))
            except Exception:
                log.warning("ledger sweep failed", exc_info=True)
                continue
            if expired:
                HOLDS_EXPIRED.inc(expired)
                log.info("expired holds released", extra={"count": expired})
            if written_off:
                CREDITS_EXPIRED.inc(written_off)
                log.info("expired credits written off", extra={"micros": written_off})

    async with _in_background(sweep_forever()):
        yield


async def _pruner(app: web.Application) -> AsyncIterator[None]:
    """Delete operational rows past their ``[retention]`` period, every ``interval_seconds``.

    Each round also makes the ledger's partitions ahead (ledger/partitions.py).

    Runs in every process (harmless: each row is deleted once); the first run
    waits one interval, so a fleet restarting at once does not prune at once.
    """
    st = app[STATE]
    retention = st.settings.config.retention

    async def prune_forever() -> None:
        while True:
            await asyncio.sleep(retention.interval_seconds)
            # The ledger's monthly partitions, MONTHS_AHEAD ahead (one look
            # per month when they exist; ledger/partitions.py). First, and on
            # its own: a failing prune must not keep the months from being made.
            try:
                made = await partitions.ensure_ahead(st.db)
            except Exception:
                log.warning("making ledger partitions ahead failed", exc_info=True)
            else:
                if made:
                    log.info("ledger partitions made", extra={"partitions": made})
            try:
                counts = await prune(st.db, retention, now=datetime.now(UTC))
            except Exception:
                log.warning("retention prune failed", exc_info=True)
            else:
                if any(counts.values()):
                    log.info("operational rows pruned", extra={"deleted": counts})

    async with _in_background(prune_forever()):
        yield
