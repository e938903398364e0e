"""Clerk's signing keys: fetched with PyJWT's ``PyJWKClient``, looked up on the loop.

The hot path — a token whose ``kid`` is known — is a dict lookup: no thread,
no network. The JWKS is fetched

* once at start (in the background, so a Clerk outage does not stop the start),
* when a token names an unknown ``kid`` — at most once per ``refetch_interval``
  (30 s) while Clerk answers, so tokens with made-up kids cannot make creditgate
  hammer Clerk; a rotated-in key is picked up by the first token that uses it;
  while the latest fetch failed, every unknown kid is a 503 (never a 401: the
  token may be good) and retries the fetch at most once per ``failure_backoff``,
* in the background when the set is older than ``max_age`` (keys Clerk
  removed stop verifying within that time).

``PyJWKClient`` is synchronous (urllib), so each fetch runs in a worker thread
(``asyncio.to_thread``) and the event loop stays free. Fetches are
single-flight: concurrent requests wait for the one fetch under way, so at
most one thread is ever busy with it. A thread is cheap for something this
rare, and it keeps PyJWT doing the parsing and validation of the key set.
"""

from __future__ import annotations

import asyncio
import math
import time

from jwt import PyJWK, PyJWKClient

from creditgate.errors import ServiceUnavailable, Unauthorized
from creditgate.logs import log


class JwksKeys:
    """The RS256 signing keys of one JWKS URL, by ``kid``."""

    def __init__(
        self,
        url: str,
        *,
        refetch_interval: float = 30.0,
        max_age: float = 300.0,
        failure_backoff: float = 2.0,
        timeout: float = 5.0,
    ) -> None:
        # PyJWKClient's own caches are off: this class caches, so that the
        # unknown-kid refetch policy and the loop/thread split are explicit.
        # A User-Agent of our own: some CDNs refuse urllib's default one.
        self._client = PyJWKClient(
            url, cache_jwk_set=False, timeout=timeout, headers={"User-Agent": "creditgate"}
        )
        self._refetch_interval = refetch_interval
        self._max_age = max_age
        self._failure_backoff = failure_backoff
        self._keys: dict[str, PyJWK] = {}
        self._loaded_at: float | None = None  # monotonic time of the last good fetch
        self._unknown_kid_fetch_at = -math.inf  # the last refetch an unknown kid caused
        self._failed_at = -math.inf  # the last failed fetch
        self._fetching: asyncio.Task[None] | None = None

    def prefetch(self) -> None:
        """Start loading the key set in the background (at start-up)."""
        self._start_fetch()

    async def close(self) -> None:
        """Wait for a fetch under way (its thread cannot be cancelled)."""
        task = self._fetching
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def key(self, kid: str) -> PyJWK:
        """The signing key ``kid``.

        Unauthorized (401) when the JWKS has no such key; ServiceUnavailable
        (503) when it cannot be fetched and the key is not already known.
        """
        key = self._keys.get(kid)
        if key is not None:
            if self._loaded_at is not None and time.monotonic() - self._loaded_at > self._max_age:
                self._start_fetch()  # stale-while-revalidate: this request does not wait
            return key
        return await self._key_after_fetch(kid)

    async def _key_after_fetch(self, kid: str) -> PyJWK:
        asked = time.monotonic()
        if self._fetching is not None:
            # A fetch is under way (start-up, or another request's unknown kid):
            # its result answers this request too.
            await self._wait(self._fetching)
        elif (
            self._last_fetch_failed()
            or asked - self._unknown_kid_fetch_at >= self._refetch_interval
        ):
            # After a failed fetch the 30 s spacing does not apply: Clerk is
            # retried (after the short back-off) until it answers again.
            if asked - self._failed_at < self._failure_backoff:
                raise _unavailable()  # Clerk just failed us: do not retry on every request
            self._unknown_kid_fetch_at = asked
            await self._wait(self._start_fetch())
        key = self._keys.get(kid)
        if key is not None:
            return key
        if self._last_fetch_failed():
            # No keys at all, or the JWKS was unreachable when last asked: the
            # token may well be good, so "retry", not "who are you?" — every
            # time until a fetch succeeds, not only for the request that saw
            # the failure.
            raise _unavailable()
        raise Unauthorized("The session token's signing key is unknown.")

    def _last_fetch_failed(self) -> bool:
        """True before the first good fetch, and while the latest fetch failed."""
        return self._loaded_at is None or self._failed_at > self._loaded_at

    async def _wait(self, task: asyncio.Task[None]) -> None:
        # Shielded: a cancelled request must not cancel the shared fetch.
        await asyncio.shield(task)

    def _start_fetch(self) -> asyncio.Task[None]:
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.create_task(self._fetch())
        return self._fetching

    async def _fetch(self) -> None:
        started = time.monotonic()
        try:
            found = await asyncio.to_thread(self._client.get_signing_keys, True)
        except Exception as e:  # unreachable, not JSON, no usable keys: all "no new keys"
            # An outage keeps the keys already known: tokens they signed still verify.
            self._failed_at = time.monotonic()
            log.warning(
                "clerk jwks fetch failed",
                extra={"error": type(e).__name__, "known_keys": len(self._keys)},
            )
            return
        finally:
            self._fetching = None
        keys = {
            k.key_id: k
            for k in found
            if k.key_id and k.key_type == "RSA" and k.algorithm_name == "RS256"
        }
        self._keys = keys
        self._loaded_at = time.monotonic()
        log.info(
            "clerk jwks loaded",
            extra={
                "keys": len(keys),
                "ignored": len(found) - len(keys),
                "ms": round((self._loaded_at - started) * 1000, 1),
            },
        )


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "Session tokens cannot be verified right now (Clerk's signing keys are unreachable);"
        " retry shortly.",
        headers={"Retry-After": "2"},
    )
