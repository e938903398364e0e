"""Calling the upstream provider: pooled connections, timeouts, retries, fallback.

A call is retried (tenacity: exponential backoff with jitter, honouring the
upstream's ``Retry-After``) and then sent to the model's next deployment only
until the upstream has answered 200 — nothing has reached the client before
that, so a retry can never duplicate output.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from creditgate.config import Deployment, Model
from creditgate.errors import ApiError, UpstreamBadRequest, UpstreamError, UpstreamTimeout
from creditgate.http.metrics import UPSTREAM_FIRST_BYTE, UPSTREAM_REQUESTS

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
PASS_THROUGH_STATUSES = frozenset({400, 404, 409, 413, 422})
ATTEMPTS_PER_DEPLOYMENT = 3
MAX_RETRY_AFTER = 10.0  # seconds: longer waits fail over instead


class _Retryable(Exception):
    """An upstream failure worth another attempt."""

    def __init__(self, error: ApiError, retry_after: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after


@dataclass(slots=True)
class UpstreamCall:
    """An upstream response with status 200, its body not yet read."""

    response: aiohttp.ClientResponse
    deployment: Deployment
    attempts: int
    started: float  # monotonic time the successful attempt began

    def release(self) -> None:
        self.response.release()

    def close(self) -> None:
        """Drop the connection (used when the client went away mid-stream)."""
        self.response.close()


_backoff = wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.05)


def _wait(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    backoff = _backoff(state)
    if isinstance(exc, _Retryable) and exc.retry_after is not None:
        return max(backoff, exc.retry_after)
    return backoff


async def _error_message(resp: aiohttp.ClientResponse) -> str:
    try:
        raw = await resp.content.read(64 * 1024)
        body = orjson.loads(raw)
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        if isinstance(message, str) and message:
            return message
    except (TimeoutError, orjson.JSONDecodeError, aiohttp.ClientError, AttributeError):
        pass
    return f"the upstream answered {resp.status}"


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds <= MAX_RETRY_AFTER else None


class UpstreamClient:
    """One pooled aiohttp session for every upstream."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def open(self, model: Model, body: dict[str, Any]) -> UpstreamCall:
        """Send the chat completion to the model's deployments in order until one answers 200.

        Raises UpstreamBadRequest (the request's own fault, status kept),
        UpstreamTimeout (504) or UpstreamError (502).
        """
        attempts = 0
        last: ApiError = UpstreamError("The upstream provider failed.")
        for deployment in model.deployments:
            payload = orjson.dumps({**body, "model": deployment.model})
            try:
                async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(ATTEMPTS_PER_DEPLOYMENT),
                    wait=_wait,
                    retry=retry_if_exception(lambda e: isinstance(e, _Retryable)),
                    reraise=True,
                ):
                    with attempt:
                        attempts += 1
                        return await self._attempt(model, deployment, payload, attempts)
            except _Retryable as e:
                last = e.error
        raise last

    async def _attempt(
        self, model: Model, deployment: Deployment, payload: bytes, attempts: int
    ) -> UpstreamCall:
        t = model.timeouts
        headers = {"Content-Type": "application/json"}
        if deployment.upstream.api_key:
            headers["Authorization"] = f"Bearer {deployment.upstream.api_key}"
        timeout = aiohttp.ClientTimeout(total=t.total, connect=t.connect, sock_read=t.idle)
        url = f"{deployment.upstream.base_url}/chat/completions"
        labels = (model.name, deployment.upstream.name)
        started = time.monotonic()
        try:
            async with asyncio.timeout(t.first_byte):
                resp = await self._session.post(url, data=payload, headers=headers, timeout=timeout)
        except TimeoutError:
            UPSTREAM_REQUESTS.labels(*labels, "timeout").inc()
            raise _Retryable(
                UpstreamTimeout(f"The upstream sent nothing within {t.first_byte:g} s.")
            ) from None
        except aiohttp.ClientError:
            UPSTREAM_REQUESTS.labels(*labels, "connect_error").inc()
            raise _Retryable(UpstreamError("Could not reach the upstream provider.")) from None
        UPSTREAM_FIRST_BYTE.labels(model.name).observe(time.monotonic() - started)
        if resp.status == 200:
            UPSTREAM_REQUESTS.labels(*labels, "ok").inc()
            return UpstreamCall(resp, deployment, attempts, started)
        with contextlib.closing(resp):
            message = await _error_message(resp)
            UPSTREAM_REQUESTS.labels(*labels, f"http_{resp.status // 100}xx").inc()
            if resp.status in RETRY_STATUSES:
                raise _Retryable(
                    UpstreamError(f"The upstream provider failed ({resp.status}): {message}"),
                    _retry_after(resp),
                )
            if resp.status in PASS_THROUGH_STATUSES:
                raise UpstreamBadRequest(resp.status, message)
            # 401/403 and the rest: our credentials or the provider, not the caller.
            raise UpstreamError(f"The upstream provider refused the call ({resp.status}).")
