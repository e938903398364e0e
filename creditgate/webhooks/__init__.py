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
from creditgate.webkit.openapi import BOOL, Endpoint, obj


def setup_webhooks(app: web.Application) -> None:
    """Add the webhook worker to ``app`` (routes: ``ENDPOINTS``)."""
    app[WAKE] = asyncio.Event()
    app.cleanup_ctx.append(webhook_worker)


_RECEIPT = obj({"received": {"const": True}, "duplicate": BOOL, "ignored": BOOL}, "received")
ENDPOINTS = (
    Endpoint(
        "POST",
        "/api/webhooks/polar",
        polar_webhook,
        "Polar events (Standard Webhooks signature over the raw body)",
        "webhooks",
        "signature",
        request={"type": "object", "description": "a Polar webhook event"},
        response=_RECEIPT,
        status=202,
        also=(200,),
        errors=(401, 503),
    ),
    Endpoint(
        "POST",
        "/api/webhooks/clerk",
        clerk_webhook,
        "Clerk events (Svix signature over the raw body)",
        "webhooks",
        "signature",
        request={"type": "object", "description": "a Clerk webhook event"},
        response=_RECEIPT,
        status=202,
        also=(200,),
        errors=(401, 503),
    ),
)

__all__ = ["ENDPOINTS", "setup_webhooks"]
