"""Verified webhook deliveries: stored once per delivery id, applied later.

The receivers answer as soon as the event is stored (Polar wants a reply
within seconds); ``process_pending`` applies stored events — each inside one
transaction that also marks it processed, so an effect and its "done" mark
commit together. A redelivery of a stored id inserts nothing: the primary key
``(source, webhook_id)`` makes "applied once" a database fact.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from creditgate.billing.metrics import WEBHOOKS
from creditgate.billing.polar_events import RetryLater, Unprocessable
from creditgate.domain_errors import DomainError
from creditgate.errors import ApiError
from creditgate.ledger.db import Db
from creditgate.logs import log

# Applies one event's facts on a connection inside a transaction; returns a
# short outcome for the operator.
Applier = Callable[[asyncpg.Connection, str, dict[str, Any]], Awaitable[str]]

MAX_ATTEMPTS = 20  # with the backoff below: about 11 hours of retrying
_BACKOFF_BASE_S = 10
_BACKOFF_MAX_S = 3600


async def record_event(
    db: Db, source: str, webhook_id: str, event_type: str, facts: dict[str, Any]
) -> bool:
    """Store a verified delivery; False when this id was already stored (a redelivery)."""
    stored = await db.fetchval(
        """
        INSERT INTO webhook_events (source, webhook_id, event_type, facts)
        VALUES ($1, $2, $3, $4::jsonb)
        ON CONFLICT (source, webhook_id) DO NOTHING
        RETURNING true
        """,
        source,
        webhook_id,
        event_type,
        orjson.dumps({k: v for k, v in facts.items() if v is not None}).decode(),
    )
    return stored is True


@dataclass(frozen=True, slots=True)
class Processed:
    applied: int = 0
    retrying: int = 0
    failed: int = 0


async def process_pending(
    pool: asyncpg.Pool, appliers: dict[str, Applier], limit: int = 100
) -> Processed:
    """Apply due pending events, oldest first; safe in every process at once.

    ``FOR UPDATE SKIP LOCKED`` hands each event to one worker. An event whose
    account is not known yet (RetryLater) or that hit an unexpected error is
    retried with backoff, up to MAX_ATTEMPTS; an Unprocessable one is marked
    failed at once. Either way the error is logged and kept in ``outcome``.
    """
    applied = retrying = failed = 0
    async with pool.acquire() as conn:
        for _ in range(limit):
            async with conn.transaction():
                row = await conn.fetchrow(
                    """
                    SELECT source, webhook_id, event_type, facts::text AS facts, attempts
                    FROM webhook_events
                    WHERE status = 'pending' AND next_attempt_at <= now()
                    ORDER BY next_attempt_at, received_at
                    LIMIT 1
                    FOR UPDATE SKIP LOCKED
                    """
                )
                if row is None:
                    break
                key = (row["source"], row["webhook_id"])
                ids = {"source": key[0], "webhook_id": key[1], "type": row["event_type"]}
                try:
                    async with conn.transaction():  # a savepoint: effects or nothing
                        outcome = await appliers[row["source"]](
                            conn, row["event_type"], orjson.loads(row["facts"])
                        )
                except (Unprocessable, ApiError, DomainError) as e:
                    await _mark_failed(conn, key, str(e))
                    WEBHOOKS.labels(key[0], "failed").inc()
                    log.error("webhook event cannot be applied", extra=ids | {"error": str(e)})
                    failed += 1
                    continue
                except Exception as e:
                    # RetryLater is expected (an account not known yet); anything
                    # else is unexpected, so its traceback is logged too.
                    attempts = row["attempts"] + 1
                    give_up = attempts >= MAX_ATTEMPTS
                    await _mark_retry(conn, key, attempts, str(e) or type(e).__name__, give_up)
                    WEBHOOKS.labels(key[0], "failed" if give_up else "retrying").inc()
                    log.warning(
                        "webhook event not applied; giving up"
                        if give_up
                        else "webhook event not applied; will retry",
                        exc_info=not isinstance(e, RetryLater),
                        extra=ids | {"error": str(e), "attempts": attempts},
                    )
                    failed += give_up
                    retrying += not give_up
                    continue
                await conn.execute(
                    """
                    UPDATE webhook_events
                    SET status = 'processed', processed_at = now(), attempts = attempts + 1,
                        outcome = $3
                    WHERE source = $1 AND webhook_id = $2
                    """,
                    *key,
                    outcome[:500],
                )
                WEBHOOKS.labels(key[0], "processed").inc()
                log.info("webhook event applied", extra=ids | {"outcome": outcome})
                applied += 1
    return Processed(applied, retrying, failed)


async def _mark_failed(conn: asyncpg.Connection, key: tuple[str, str], error: str) -> None:
    await conn.execute(
        """
        UPDATE webhook_events
        SET status = 'failed', attempts = attempts + 1, outcome = $3
        WHERE source = $1 AND webhook_id = $2
        """,
        *key,
        error[:500],
    )


async def _mark_retry(
    conn: asyncpg.Connection, key: tuple[str, str], attempts: int, error: str, give_up: bool
) -> None:
    delay = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2 ** (attempts - 1))
    await conn.execute(
        """
        UPDATE webhook_events
        SET status = $3, attempts = $4, outcome = $5,
            next_attempt_at = now() + $6::integer * interval '1 second'
        WHERE source = $1 AND webhook_id = $2
        """,
        *key,
        "failed" if give_up else "pending",
        attempts,
        error[:500],
        delay,
    )
