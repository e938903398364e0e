"""The webhook worker: applies stored events right after they arrive, in every process.

A receiver wakes its own process's worker after storing an event; every
worker also polls for due events (retries, and events whose process died
before applying them). ``process_pending`` hands each event to one worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from aiohttp import web

from creditgate.billing.polar_events import apply_polar_event
from creditgate.config import Config
from creditgate.logs import log
from creditgate.resources import RESOURCES
from creditgate.webhooks.clerk_events import apply_clerk_event
from creditgate.webhooks.store import Applier, Processed, process_pending

POLL_SECONDS = 5.0
WAKE = web.AppKey("creditgate.webhooks.wake", asyncio.Event)


def appliers(config: Config) -> dict[str, Applier]:
    """Each webhook source's effects."""

    async def polar(conn: asyncpg.Connection, event_type: str, facts: dict[str, Any]) -> str:
        return await apply_polar_event(conn, config, event_type, facts)

    return {"polar": polar, "clerk": apply_clerk_event}


async def process_now(pool: asyncpg.Pool, config: Config) -> Processed:
    """Apply every due event now (tests and operators)."""
    return await process_pending(pool, appliers(config))


def wake_worker(app: web.Application) -> None:
    """Tell this process's worker an event is waiting."""
    wake = app.get(WAKE)
    if wake is not None:
        wake.set()


async def webhook_worker(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: run the worker for the app's lifetime."""
    st = app[RESOURCES]
    wake = app[WAKE]
    handlers = appliers(st.settings.config)

    async def work_forever() -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), POLL_SECONDS)
            wake.clear()
            try:
                await process_pending(st.db, handlers)
            except Exception:
                log.warning("webhook worker round failed", exc_info=True)

    task = asyncio.create_task(work_forever())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
