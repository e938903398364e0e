"""The Polar adapter: usage export (outbox), reconciliation, checkout, portal, subscription.

The ledger stays the source of truth; Polar bills from it. Nothing here
writes money: grants and reversals go through ``creditgate.ledger``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from creditgate.billing import subscription
from creditgate.billing.checkout import ENDPOINTS as CHECKOUT_ENDPOINTS
from creditgate.billing.checkout import POLAR
from creditgate.billing.client import make_polar
from creditgate.billing.export import UsageExporter
from creditgate.billing.reconcile import run_periodically
from creditgate.logs import log
from creditgate.resources import RESOURCES

ENDPOINTS = (*CHECKOUT_ENDPOINTS, *subscription.ENDPOINTS)


def setup_billing(app: web.Application) -> None:
    """When Polar is configured: its client and background tasks (routes: ``ENDPOINTS``)."""
    polar = make_polar(app[RESOURCES].settings)
    if polar is not None:
        app[POLAR] = polar
    app.cleanup_ctx.append(_polar_tasks)


async def _polar_tasks(app: web.Application) -> AsyncIterator[None]:
    """The Polar client, the usage exporter and the periodic reconciliation."""
    settings = app[RESOURCES].settings
    polar = app.get(POLAR)
    if polar is None:
        # `creditgate dev` runs without Polar on purpose: no warning there.
        report = log.debug if settings.dev else log.warning
        report("POLAR_ACCESS_TOKEN is not set: usage is not exported, checkout is off")
        yield
        return
    assert settings.database_url is not None
    cfg = settings.config.polar
    tasks = [asyncio.create_task(UsageExporter(polar, cfg).run(settings.database_url))]
    if cfg.meter_id is not None and cfg.reconcile_interval_seconds > 0:
        tasks.append(asyncio.create_task(run_periodically(settings.database_url, polar, cfg)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await polar.__aexit__(None, None, None)


__all__ = ["ENDPOINTS", "POLAR", "setup_billing"]
