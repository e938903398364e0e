"""Signed webhook receivers: Polar (Standard Webhooks) and Clerk (Svix).

Each receiver verifies the raw body, stores the event once per delivery id
and answers at once; the webhook worker applies stored events afterwards
(``worker.py``), in every process, each event once.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from creditgate.webhooks.clerk import clerk_webhook
from creditgate.webhooks.polar import polar_webhook
from creditgate.webhooks.worker import WAKE, webhook_worker


def setup_webhooks(app: web.Application) -> None:
    """Add the webhook routes and the worker to ``app``."""
    app[WAKE] = asyncio.Event()
    app.cleanup_ctx.append(webhook_worker)
    app.router.add_post("/api/webhooks/polar", polar_webhook)
    app.router.add_post("/api/webhooks/clerk", clerk_webhook)


__all__ = ["setup_webhooks"]
