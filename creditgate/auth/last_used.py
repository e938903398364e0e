"""``api_keys.last_used_at``, kept cheaply: noted in memory, written in batches.

Writing the column on every request would turn each authenticated call into a
database write. Instead each process notes a key's use at most once per
``every`` seconds (a dict lookup on the hot path) and a background task writes
what it noted in one statement every ``flush_interval`` seconds. The column is
therefore accurate to about ``every + flush_interval`` seconds, and never moves
backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime

from creditgate.ledger.db import Db
from creditgate.logs import log


class LastUsedRecorder:
    """Notes API-key uses in memory; ``flush`` writes them to ``api_keys``."""

    def __init__(self, db: Db, every: float = 60.0, flush_interval: float = 10.0) -> None:
        self._db = db
        self._every = every
        self._flush_interval = flush_interval
        self._noted: dict[uuid.UUID, float] = {}  # key id → monotonic time of the last note
        self._pending: dict[uuid.UUID, datetime] = {}  # key id → when it was used
        self._task: asyncio.Task[None] | None = None

    def note(self, key_id: uuid.UUID, now: float | None = None) -> None:
        """Record that ``key_id`` was used now, unless it was noted under ``every`` s ago."""
        now = time.monotonic() if now is None else now
        last = self._noted.get(key_id)
        if last is not None and now - last < self._every:
            return
        self._noted[key_id] = now
        self._pending[key_id] = datetime.now(UTC)

    @property
    def pending(self) -> int:
        """How many key uses wait to be written."""
        return len(self._pending)

    async def flush(self) -> int:
        """Write the noted uses in one statement; return how many keys were written."""
        if not self._pending:
            return 0
        batch, self._pending = self._pending, {}
        try:
            await self._db.execute(
                """
                UPDATE api_keys k SET last_used_at = v.at
                FROM unnest($1::uuid[], $2::timestamptz[]) AS v(id, at)
                WHERE k.id = v.id AND (k.last_used_at IS NULL OR k.last_used_at < v.at)
                """,
                list(batch),
                list(batch.values()),
            )
        except BaseException:
            # Keep them for the next flush (newer notes win).
            self._pending = batch | self._pending
            raise
        # Forget notes old enough to be taken again, so the dict stays bounded
        # by the keys used in the last minute.
        horizon = time.monotonic() - self._every
        self._noted = {k: t for k, t in self._noted.items() if t > horizon}
        return len(batch)

    def start(self) -> None:
        """Flush every ``flush_interval`` seconds in the background."""

        async def flush_forever() -> None:
            while True:
                await asyncio.sleep(self._flush_interval)
                try:
                    await self.flush()
                except Exception:
                    log.warning("api key last_used_at flush failed", exc_info=True)

        self._task = asyncio.create_task(flush_forever())

    async def stop(self) -> None:
        """Stop the background task and write what is still pending."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.flush()
        except Exception:
            log.warning("api key last_used_at flush failed at shutdown", exc_info=True)
