"""Cross-process cache invalidation: Postgres LISTEN/NOTIFY on ``creditgate_invalidate``.

Each process caches API key lookups, session accounts and resolved limits for
a few seconds. Triggers (migration 0009) notify at commit when a key is
revoked or changed ('k:<key id>') or an account is closed, re-tiered or given
new limits ('a:<account id>'); this listener drops the matching entries from
every registered cache, so the change holds on every process well within a
second. It keeps one dedicated connection (LISTEN is session state: never a
pooled one). If that connection drops it reconnects with back-off, and on every
(re)connect clears the caches whole — notifications sent while it was away are
lost — so the caches' own TTL only matters while Postgres is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from typing import Protocol

import asyncpg

from creditgate.logs import log

CHANNEL = "creditgate_invalidate"
# A listener connection is checked this often: a silently dead TCP peer is
# noticed (and reconnected) within this time.
_HEALTH_INTERVAL = 5.0
_RETRY_INITIAL = 0.5
_RETRY_MAX = 5.0


class Invalidatable(Protocol):
    """A cache the listener can drop entries from."""

    def forget_account(self, account_id: uuid.UUID) -> None: ...

    def forget_key(self, key_id: uuid.UUID) -> None: ...

    def clear(self) -> None: ...


def parse(payload: str) -> tuple[str, uuid.UUID] | None:
    """``'a:<uuid>'`` → ("a", id), ``'k:<uuid>'`` → ("k", id); None for anything else."""
    kind, _, rest = payload.partition(":")
    if kind not in ("a", "k"):
        return None
    try:
        return kind, uuid.UUID(rest)
    except ValueError:
        return None


class CacheInvalidation:
    """Listens for invalidations and applies them to ``caches``."""

    def __init__(self, database_url: str, caches: Sequence[Invalidatable]) -> None:
        self._url = database_url
        self._caches = tuple(caches)
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()  # set while LISTEN is in place

    def start(self) -> None:
        """Connect and listen in the background (a Postgres outage does not stop the start)."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def apply(self, payload: str) -> None:
        """Drop what one notification names from every cache."""
        parsed = parse(payload)
        if parsed is None:
            log.warning("cache invalidation payload ignored", extra={"length": len(payload)})
            return
        kind, ident = parsed
        for cache in self._caches:
            if kind == "a":
                cache.forget_account(ident)
            else:
                cache.forget_key(ident)

    async def _run(self) -> None:
        delay = _RETRY_INITIAL
        while True:
            try:
                await self._listen_once()
                delay = _RETRY_INITIAL  # it was up: the next failure starts fresh
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
                log.warning(
                    "cache invalidation listener disconnected; caches fall back to their TTL",
                    extra={"error": type(e).__name__, "retry_in": delay},
                )
            self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX)

    async def _listen_once(self) -> None:
        """One connection's life: LISTEN, clear the caches, then watch the connection."""
        async with asyncio.timeout(10):
            conn = await asyncpg.connect(
                self._url, server_settings={"application_name": "creditgate-invalidation"}
            )
        lost = asyncio.get_running_loop().create_future()

        def on_notify(_c: object, _pid: int, _channel: str, payload: object) -> None:
            self.apply(str(payload))

        def on_lost(_c: object) -> None:
            if not lost.done():
                lost.set_result(None)

        try:
            conn.add_termination_listener(on_lost)
            await conn.add_listener(CHANNEL, on_notify)
            # Whatever changed while no one listened is unknown: start afresh.
            for cache in self._caches:
                cache.clear()
            self.connected.set()
            log.info("cache invalidation listener connected")
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_HEALTH_INTERVAL):
                        await asyncio.shield(lost)
                if lost.done():
                    raise OSError("the listener connection was closed")
                async with asyncio.timeout(_HEALTH_INTERVAL):
                    await conn.execute("SELECT 1")
        finally:
            conn.terminate()
