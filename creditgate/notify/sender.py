"""Signed low-balance webhooks: Standard Webhooks headers, svix's signer, tenacity's retries.

The body is ``{type: "balance.low", timestamp, data: {…}}``; the headers are
``webhook-id`` (``msg_`` + the alert id, the same on every attempt, so a
receiver can drop repeats), ``webhook-timestamp`` and ``webhook-signature``
(``v1,`` + base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}`` keyed with the
account's secret, as svix's ``Webhook.sign`` computes it). Any 2xx is
delivered; anything else, a timeout or a network error is retried with
exponential backoff and jitter up to ``max_attempts``; redirects are not
followed.
"""

from __future__ import annotations

from datetime import UTC, datetime

import aiohttp
from svix.webhooks import Webhook
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from creditgate.config import NotificationsConfig
from creditgate.ledger.entries import iso
from creditgate.ledger.money import micros_to_credits
from creditgate.logs import log
from creditgate.notify.outbox import Alert
from creditgate.webkit.envelope import dumps

EVENT_TYPE = "balance.low"


class DeliveryFailed(Exception):
    """The receiver did not answer 2xx."""

    def __init__(self, status: int) -> None:
        super().__init__(f"receiver answered {status}")
        self.status = status


def message_id(alert: Alert) -> str:
    """The alert's ``webhook-id``: stable across attempts and processes."""
    return f"msg_{alert.id.hex}"


def payload(alert: Alert) -> bytes:
    """The JSON body of an alert's webhook."""
    return dumps(
        {
            "type": EVENT_TYPE,
            "timestamp": iso(alert.crossed_at),
            "data": {
                "accountId": str(alert.account_id),
                "threshold": micros_to_credits(alert.threshold),
                "thresholdMicros": alert.threshold,
                "available": micros_to_credits(alert.available),
                "availableMicros": alert.available,
                "balance": micros_to_credits(alert.balance),
                "balanceMicros": alert.balance,
                "crossedAt": iso(alert.crossed_at),
            },
        }
    )


def signed_headers(secret: str, msg_id: str, body: bytes, at: datetime) -> dict[str, str]:
    """Standard Webhooks headers for ``body``, signed with the account's ``whsec_`` secret."""
    signature = Webhook(secret).sign(msg_id, at, body.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
        "Content-Type": "application/json",
        "User-Agent": "creditgate-webhooks",
    }


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    log.info(
        "low-balance webhook attempt failed; retrying",
        extra={
            "attempt": state.attempt_number,
            "error": type(exc).__name__,
            "status": getattr(exc, "status", None),
            "wait_s": round(state.upcoming_sleep, 3),
        },
    )


async def deliver(
    session: aiohttp.ClientSession,
    url: str,
    secret: str,
    alert: Alert,
    cfg: NotificationsConfig,
) -> int:
    """POST the alert, signed, until a 2xx (its status) or ``max_attempts`` (re-raises)."""
    body = payload(alert)
    msg_id = message_id(alert)
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_seconds)
    retrying = AsyncRetrying(
        retry=retry_if_exception_type((DeliveryFailed, aiohttp.ClientError, TimeoutError)),
        wait=wait_exponential_jitter(
            multiplier=cfg.retry_initial_seconds,
            max=cfg.retry_max_seconds,
            jitter=cfg.retry_initial_seconds,
        ),
        stop=stop_after_attempt(cfg.max_attempts),
        before_sleep=_log_retry,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            # Signed per attempt: the timestamp says when this attempt was sent.
            headers = signed_headers(secret, msg_id, body, datetime.now(UTC))
            async with session.post(
                url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as resp:
                await resp.read()
                if not 200 <= resp.status < 300:
                    raise DeliveryFailed(resp.status)
                return resp.status
    raise AssertionError("unreachable: tenacity either returns or re-raises")


def max_delivery_seconds(cfg: NotificationsConfig) -> float:
    """An upper bound of one ``deliver`` call: the lease a claim must hold."""
    return cfg.max_attempts * (cfg.request_timeout_seconds + cfg.retry_max_seconds) + 30.0
