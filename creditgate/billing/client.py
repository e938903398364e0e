"""The Polar API client (polar-sdk 1.x) and the retry policy every Polar call shares."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from polar import PolarError, PolarNetworkError, PolarServerError
from polar.base import PolarRateLimitError
from polar.v2026_10 import Environment, PolarAsync
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from creditgate.config import PolarConfig, Settings
from creditgate.logs import log

T = TypeVar("T")

# Worth another try: Polar down or slow (5xx, network errors, timeouts —
# httpx's timeouts surface as PolarNetworkError) or asking us to slow down.
# Any other 4xx is a request Polar will refuse again.
TRANSIENT = (PolarServerError, PolarNetworkError, PolarRateLimitError)


# Requests that call Polar while holding a database connection (a checkout's
# or a cancellation's advisory lock) take a slot first, so a slow Polar can
# hold at most this many of a process's pool connections, never the pool the
# proxy needs. Waiting for a slot holds no connection.
POLAR_CALLS_HOLDING_A_CONNECTION = 4
# One set of slots per event loop (a semaphore belongs to the loop it waits on).
_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


@asynccontextmanager
async def polar_slot() -> AsyncIterator[None]:
    """One of the ``POLAR_CALLS_HOLDING_A_CONNECTION`` slots of this process."""
    loop = asyncio.get_running_loop()
    slots = _slots.get(loop)
    if slots is None:
        slots = _slots[loop] = asyncio.Semaphore(POLAR_CALLS_HOLDING_A_CONNECTION)
    async with slots:
        yield


class PolarUnreadable(PolarError):
    """Polar answered something polar-sdk could not read (it raised ValueError)."""


def make_polar(settings: Settings) -> PolarAsync | None:
    """A Polar client for these settings, or None when POLAR_ACCESS_TOKEN is unset."""
    if settings.polar_access_token is None:
        return None
    env: Environment = "production" if settings.polar_environment == "production" else "sandbox"
    return PolarAsync(
        settings.polar_access_token,
        environment=env,
        base_url=settings.polar_base_url,  # overrides the environment's URL when set
        timeout=settings.config.polar.request_timeout_seconds,
        organization_id=settings.config.polar.organization_id,
    )


class _WaitHonouringRetryAfter:
    """Exponential backoff with jitter, except a 429 waits what its Retry-After says."""

    def __init__(self, cfg: PolarConfig, ceiling: float | None) -> None:
        self._backoff = wait_exponential_jitter(
            multiplier=cfg.retry_initial_seconds,
            max=cfg.retry_max_seconds,
            jitter=cfg.retry_initial_seconds,
        )
        # Never sleep longer than this, even on Polar's word.
        self._ceiling = ceiling if ceiling is not None else max(cfg.retry_max_seconds, 60.0)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, PolarRateLimitError) and exc.retry_after is not None:
            return float(min(max(exc.retry_after, 0), self._ceiling))
        return float(min(self._backoff(state), self._ceiling))


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    log.warning(
        "polar call failed; retrying",
        extra={
            "attempt": state.attempt_number,
            "error": type(exc).__name__,
            "status": getattr(exc, "status_code", None),
            "wait_s": round(state.upcoming_sleep, 3),
        },
    )


async def call_with_retries(
    cfg: PolarConfig,
    call: Callable[[], Awaitable[T]],
    *,
    attempts: int | None = None,
    max_wait_seconds: float | None = None,
) -> T:
    """Run ``call`` with tenacity: backoff with jitter, Retry-After honoured.

    Gives up after ``attempts`` (default ``cfg.max_attempts``) attempts and
    re-raises the last error; errors that are not transient are raised at once.
    ``max_wait_seconds`` caps each pause (a person waiting on the answer).
    """
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT),
        wait=_WaitHonouringRetryAfter(cfg, max_wait_seconds),
        stop=stop_after_attempt(attempts or cfg.max_attempts),
        before_sleep=_log_retry,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            try:
                return await call()
            except ValueError as e:
                # polar-sdk raises a bare ValueError on a 200 whose body is not
                # JSON and on a Retry-After it cannot read: a Polar failure too.
                raise PolarUnreadable(f"unreadable Polar response ({type(e).__name__})") from e
    raise AssertionError("unreachable: tenacity either returns or re-raises")
