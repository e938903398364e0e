"""The notification worker: delivers queued low-balance alerts, off every request path.

Every server process runs one. It wakes when Postgres announces a crossing
(``LISTEN creditgate_low_balance``; the trigger's ``pg_notify`` is delivered at
commit) and polls every ``poll_interval_seconds`` besides, for alerts whose
process died mid-delivery and for a listener connection that dropped. Each
claimed alert is delivered in a task of its own (at most ``MAX_IN_FLIGHT``
at once), so a slow or failing receiver never holds up other accounts' alerts
— and no completion ever waits for any of it.

``creditgate_low_balance_total`` counts crossings: it is increased once per
alert, by the process that claims it first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import yarl
from aiohttp import web
from prometheus_client import Counter

from creditgate.config import NotificationsConfig
from creditgate.ledger.db import Db
from creditgate.logs import log
from creditgate.notify.outbox import Alert, claim_alerts, finish_alert
from creditgate.notify.sender import deliver, max_delivery_seconds
from creditgate.preferences import delivery_target
from creditgate.resources import RESOURCES

CHANNEL = "creditgate_low_balance"
MAX_IN_FLIGHT = 64

LOW_BALANCE = Counter(
    "creditgate_low_balance_total",
    "Low-balance threshold crossings (one per crossing, notification URL or not).",
)
NOTIFICATIONS = Counter(
    "creditgate_notifications_total",
    "Low-balance webhooks by outcome: sent, failed (after every retry), skipped (no URL).",
    ["outcome"],
)


class AlertWorker:
    """Claims due alerts and delivers each one once (or marks why not)."""

    def __init__(self, cfg: NotificationsConfig) -> None:
        self._cfg = cfg
        self._lease = max_delivery_seconds(cfg)
        self._tasks: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()

    def bind(self, db: Db, session: aiohttp.ClientSession) -> None:
        """The database and HTTP client to work with (at the app's start)."""
        self._db = db
        self._session = session

    async def run_once(self) -> int:
        """Claim what is due (within the in-flight bound) and start delivering it."""
        room = MAX_IN_FLIGHT - len(self._tasks)
        if room <= 0:
            return 0
        alerts = await claim_alerts(self._db, room, self._lease)
        for alert in alerts:
            if alert.first_claim:
                LOW_BALANCE.inc()
            task = asyncio.create_task(self._handle(alert))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(alerts)

    async def drain(self) -> None:
        """Wait for the deliveries in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _handle(self, alert: Alert) -> None:
        ids = {"alert_id": str(alert.id), "account_id": str(alert.account_id)}
        try:
            target = await delivery_target(self._db, alert.account_id)
            if target is None:
                await finish_alert(self._db, alert.id, "skipped", "no notification URL")
                NOTIFICATIONS.labels("skipped").inc()
                log.info("low balance crossed; no notification URL", extra=ids)
                return
            url, secret = target
            allowed = self._cfg.allowed_hosts
            if allowed and (yarl.URL(url).host or "").lower() not in allowed:
                # Set before the operator narrowed allowed_hosts: never sent.
                await finish_alert(self._db, alert.id, "failed", "host not allowed")
                NOTIFICATIONS.labels("failed").inc()
                log.warning("low-balance webhook host not allowed; not sent", extra=ids)
                return
            try:
                status = await deliver(self._session, url, secret, alert, self._cfg)
            except Exception as e:  # every retry spent: recorded, never raised further
                error = type(e).__name__ + (f" {e.status}" if hasattr(e, "status") else "")
                await finish_alert(self._db, alert.id, "failed", error[:500])
                NOTIFICATIONS.labels("failed").inc()
                log.warning(
                    "low-balance webhook not delivered", extra={**ids, "error": error[:200]}
                )
                return
            await finish_alert(self._db, alert.id, "sent")
            NOTIFICATIONS.labels("sent").inc()
            log.info("low-balance webhook delivered", extra={**ids, "status": status})
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            # The database failed: the lease runs out and a process claims it again.
            log.warning("low-balance alert left for a retry", exc_info=True, extra=ids)

    async def run(self, database_url: str) -> None:
        """Deliver alerts for as long as the process runs."""
        listener: asyncpg.Connection | None = None
        try:
            while True:
                if listener is None or listener.is_closed():
                    listener = await self._listen(database_url)
                try:
                    await self.run_once()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    log.warning("low-balance alert round failed", exc_info=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self._cfg.poll_interval_seconds)
                self.wake.clear()
        finally:
            if listener is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(listener.close(timeout=2))
            for task in list(self._tasks):
                task.cancel()

    async def _listen(self, database_url: str) -> asyncpg.Connection | None:
        """A connection LISTENing for crossings, or None (then polling alone finds them)."""
        try:
            conn = await asyncpg.connect(
                database_url, server_settings={"application_name": "creditgate-notify"}
            )
            await conn.add_listener(CHANNEL, lambda *_: self.wake.set())
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            log.warning("low-balance listener unavailable; polling only", exc_info=True)
            return None
        return conn


NOTIFIER = web.AppKey("creditgate.notify.worker", AlertWorker)


def setup_notifications(app: web.Application) -> None:
    """Add the alert worker to ``app`` (it starts after the database pool)."""
    app[NOTIFIER] = AlertWorker(app[RESOURCES].settings.config.notifications)
    app.cleanup_ctx.append(_notification_worker)


async def _notification_worker(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: the alert worker for the app's lifetime."""
    st = app[RESOURCES]
    assert st.settings.database_url is not None
    session = aiohttp.ClientSession(skip_auto_headers=("User-Agent",))
    worker = app[NOTIFIER]
    worker.bind(st.db, session)
    task = asyncio.create_task(worker.run(st.settings.database_url))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await session.close()
