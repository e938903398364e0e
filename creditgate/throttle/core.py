"""The throttle: admission against an account's limits, in Redis or, degraded, locally.

One decision is one call of ``admit.lua`` (EVALSHA; redis-py reloads the script
on NOSCRIPT): every limit of the request is checked and taken, or none is.
Redis gets a time budget (``THROTTLE_REDIS_TIMEOUT_MS``); past it, or on any
Redis error, the process marks itself degraded and applies the configured
policy until a background probe finds Redis again:

* ``local``  per-process buckets at the same rates (``local.LocalStore``)
* ``open``   admit everything (no limits, no headers but the limits)
* ``closed`` refuse with 503

While degraded no request waits on Redis: only the probe talks to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from creditgate.errors import RateLimited, ServiceUnavailable
from creditgate.http.metrics import REDIS_DEGRADED, THROTTLE_DECISIONS
from creditgate.logs import log
from creditgate.throttle.day import DayZone
from creditgate.throttle.limits import Bucket, Limits
from creditgate.throttle.local import LocalStore

_ADMIT = resources.files(__package__).joinpath("admit.lua").read_text("utf-8")
_RENEW = resources.files(__package__).joinpath("renew.lua").read_text("utf-8")
# What "Redis is not answering" looks like: its own errors, sockets, the budget.
_REDIS_DOWN = (RedisError, OSError, TimeoutError)
POLICIES = ("local", "open", "closed")


def format_duration(ms: int) -> str:
    """A reset time as OpenAI writes it: ``20ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h0m0s``."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    total_s, rem_ms = divmod(ms, 1000)
    h, rest = divmod(total_s, 3600)
    m, s = divmod(rest, 60)
    sec = f"{s}.{rem_ms:03d}".rstrip("0").rstrip(".") + "s"
    if h:
        return f"{h}h{m}m{sec}"
    if m:
        return f"{m}m{sec}"
    return sec


@dataclass(slots=True)
class Admission:
    """An admitted request: what it took, to correct and give back when it ends."""

    limits: Limits
    tokens: int  # taken from each tokens-per-minute bucket
    lease_id: str
    day: int  # the calendar day its message was counted on
    store: str  # "redis" | "local" | "open": where to give it back
    headers: dict[str, str] = field(default_factory=dict)
    finished: bool = False


@dataclass(frozen=True, slots=True)
class Check:
    """What ``check`` found, without taking anything (for quota pre-flight checks)."""

    allowed: bool
    limit: str | None  # the limit that refuses, when not allowed
    retry_after: int | None  # whole seconds; None when waiting cannot help
    headers: dict[str, str]


class Throttle:
    """Admission control against resolved ``Limits``, shared through Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        policy: str = "local",
        timeout_ms: int = 50,
        lease_ttl_ms: int = 60_000,
        day_zone: DayZone | None = None,
        probe_interval: float = 0.5,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self._redis = redis
        self._admit = redis.register_script(_ADMIT)
        self._renew = redis.register_script(_RENEW)
        self._policy = policy
        self._timeout = timeout_ms / 1000
        self.lease_ttl_ms = lease_ttl_ms
        self.day_zone = day_zone or DayZone()
        self._probe_interval = probe_interval
        self._local = LocalStore()
        self._healthy = True
        self._probe: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        # Admissions holding a lease, renewed while they run.
        self._live: dict[str, Admission] = {}

    @property
    def degraded(self) -> bool:
        """True while Redis is considered unreachable and the policy applies."""
        return not self._healthy

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load the scripts (best effort) and start the lease keeper."""
        try:
            async with asyncio.timeout(max(self._timeout, 1.0)):
                await self._load_scripts()
        except _REDIS_DOWN as exc:
            self._degrade(exc)
        self._keeper = asyncio.create_task(self._keep_leases())

    async def aclose(self) -> None:
        """Stop the background tasks (the Redis client is the caller's)."""
        for task in (self._keeper, self._probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # ------------------------------------------------------------ decisions

    async def admit(self, limits: Limits, tokens: int, *, required_tokens: int = 0) -> Admission:
        """Take a request, its tokens, a parallel lease and a daily message, or raise 429.

        ``tokens`` is the worst case (prompt estimate + output cap); a request
        larger than a whole minute's tokens takes the whole bucket (it waits
        for a full one) and is corrected by its actual usage in ``finish``.
        ``required_tokens`` (the prompt estimate) larger than a minute's
        tokens can never be served: 429 without Retry-After.
        """
        tpm = limits.value("tokens_per_minute")
        if required_tokens > tpm:
            THROTTLE_DECISIONS.labels("tokens_per_minute", "refused").inc()
            raise RateLimited(
                f"Request too large for tokens per minute: limit {tpm}, this prompt alone is "
                f"about {required_tokens}. Shorten the prompt; waiting will not help.",
                details={"limit": "tokens_per_minute", "retryAfter": None},
                headers=_limit_headers(limits),
            )
        tokens = min(tokens, tpm)
        lease_id = uuid.uuid4().hex
        costs = {
            "requests_per_minute": 1,
            "tokens_per_minute": tokens,
            "max_parallel": lease_id,
            "messages_per_day": 1,
        }
        keys, args = self._call(limits, "a", costs, limits.buckets)
        out, store = await self._decide(keys, args)
        if out is None:  # policy "open"
            THROTTLE_DECISIONS.labels("all", "admitted").inc()
            day = self.day_zone.day_number()
            return Admission(limits, tokens, lease_id, day, store, _limit_headers(limits))
        headers = _headers(limits, out)
        if out[0]:
            THROTTLE_DECISIONS.labels("all", "admitted").inc()
            admission = Admission(limits, tokens, lease_id, out[3], store, headers)
            self._live[lease_id] = admission
            return admission
        bucket = limits.buckets[out[1] - 1]
        THROTTLE_DECISIONS.labels(bucket.name, "refused").inc()
        retry_after = max(1, math.ceil(out[2] / 1000))
        headers["Retry-After"] = str(retry_after)
        raise RateLimited(
            _refusal_message(bucket, retry_after),
            details={"limit": bucket.name, "retryAfter": retry_after},
            headers=headers,
        )

    async def check(self, limits: Limits, tokens: int, *, required_tokens: int = 0) -> Check:
        """Would ``admit`` take this request now? Takes nothing from any limit."""
        tpm = limits.value("tokens_per_minute")
        if required_tokens > tpm:
            return Check(False, "tokens_per_minute", None, _limit_headers(limits))
        costs = {
            "requests_per_minute": 1,
            "tokens_per_minute": min(tokens, tpm),
            "max_parallel": "x",
            "messages_per_day": 1,
        }
        keys, args = self._call(limits, "q", costs, limits.buckets)
        out, _ = await self._decide(keys, args)
        if out is None:
            return Check(True, None, None, _limit_headers(limits))
        if out[0]:
            return Check(True, None, None, _headers(limits, out))
        return Check(
            False,
            limits.buckets[out[1] - 1].name,
            max(1, math.ceil(out[2] / 1000)),
            _headers(limits, out),
        )

    async def finish(self, admission: Admission, actual_tokens: int | None) -> None:
        """Correct the token buckets by the actual usage and return the lease; once.

        ``actual_tokens`` None means the request was never served (refused by
        the ledger, failed upstream): its estimate and its daily message are
        given back. Never raises: a lease that cannot be returned expires.
        """
        if admission.finished:
            return
        admission.finished = True
        self._live.pop(admission.lease_id, None)
        if admission.store == "open":
            return
        costs: dict[str, int | str] = {
            "tokens_per_minute": (actual_tokens or 0) - admission.tokens,
            "max_parallel": admission.lease_id,
            "messages_per_day": admission.day if actual_tokens is None else "",
        }
        buckets = tuple(b for b in admission.limits.buckets if b.name != "requests_per_minute")
        keys, args = self._call(admission.limits, "r", costs, buckets)
        if admission.store == "local":
            self._local.run(keys, args)
            return
        if not self._healthy:
            return  # Redis is away: the lease expires by itself
        try:
            async with asyncio.timeout(self._timeout):
                await self._admit(keys=keys, args=args)
        except _REDIS_DOWN as exc:
            self._degrade(exc)

    # ------------------------------------------------------------ internals

    def _call(
        self,
        limits: Limits,
        mode: str,
        costs: dict[str, Any],
        buckets: tuple[Bucket, ...],
    ) -> tuple[list[str], list[str | int]]:
        offset, offset_end = self.day_zone.offsets_ms()
        keys: list[str] = []
        args: list[str | int] = [mode, offset, offset_end]
        for b in buckets:
            keys.append(b.key)
            args += (b.kind, b.limit, b.param, costs[b.name])
        return keys, args

    async def _decide(self, keys: list[str], args: list[str | int]) -> tuple[list[int] | None, str]:
        if self._healthy:
            try:
                async with asyncio.timeout(self._timeout):
                    out = await self._admit(keys=keys, args=args)
                return [int(x) for x in out], "redis"
            except _REDIS_DOWN as exc:
                self._degrade(exc)
        if self._policy == "local":
            return self._local.run(keys, args), "local"
        if self._policy == "open":
            return None, "open"
        THROTTLE_DECISIONS.labels("redis_unavailable", "refused").inc()
        raise ServiceUnavailable("The rate limiter is unavailable; retry shortly.")

    def _degrade(self, exc: BaseException) -> None:
        if not self._healthy:
            return
        self._healthy = False
        REDIS_DEGRADED.set(1)
        log.warning(
            "throttle degraded: Redis unreachable, applying the fallback policy",
            extra={"policy": self._policy, "error": type(exc).__name__},
        )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_until_healthy())

    async def _probe_until_healthy(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval)
            try:
                async with asyncio.timeout(max(self._timeout, 0.2)):
                    await self._load_scripts()
            except _REDIS_DOWN:
                continue
            self._healthy = True
            REDIS_DEGRADED.set(0)
            log.info("throttle recovered: Redis reachable, limits shared again")
            return

    async def _load_scripts(self) -> None:
        # Loading is also the probe: a Redis that restarted empty needs them.
        await self._redis.script_load(_ADMIT)
        await self._redis.script_load(_RENEW)

    async def _keep_leases(self) -> None:
        """Renew the leases of requests in flight every third of their lifetime."""
        interval = self.lease_ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                await self._renew_live()
            except Exception:  # the keeper must outlive any one failure
                log.warning("lease renewal failed", exc_info=True)

    async def _renew_live(self) -> None:
        live = list(self._live.values())
        remote = [a for a in live if a.store == "redis"]
        for a in live:
            if a.store == "local":
                self._local.renew(_lease_keys(a.limits), a.lease_id, self.lease_ttl_ms)
        if not remote or not self._healthy:
            return
        try:
            async with asyncio.timeout(max(self._timeout, 1.0)):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for a in remote:
                        await self._renew(
                            keys=_lease_keys(a.limits),
                            args=[a.lease_id, self.lease_ttl_ms],
                            client=pipe,
                        )
                    await pipe.execute()
        except _REDIS_DOWN as exc:
            self._degrade(exc)


def _lease_keys(limits: Limits) -> list[str]:
    return [b.key for b in limits.buckets if b.kind == "p"]


def _refusal_message(bucket: Bucket, retry_after: int) -> str:
    whose = "this API key's" if bucket.scope == "key" else "your"
    if bucket.name == "max_parallel":
        return (
            f"Too many requests in flight: {whose} limit is {bucket.limit} at a time. "
            "Retry when one of them has finished."
        )
    return (
        f"Rate limit reached for {whose} {bucket.name} ({bucket.limit}); "
        f"retry after {retry_after} s."
    )


def _limit_headers(limits: Limits) -> dict[str, str]:
    return {
        "x-ratelimit-limit-requests": str(limits.value("requests_per_minute")),
        "x-ratelimit-limit-tokens": str(limits.value("tokens_per_minute")),
    }


def _headers(limits: Limits, out: list[int]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers from the tightest bucket of each kind."""
    best: dict[str, tuple[int, int, int]] = {}
    for i, b in enumerate(limits.buckets):
        if b.kind != "b":
            continue
        remaining, reset = out[4 + 2 * i], out[5 + 2 * i]
        if b.name not in best or remaining < best[b.name][1]:
            best[b.name] = (b.limit, remaining, reset)
    headers = {}
    for name, suffix in (("requests_per_minute", "requests"), ("tokens_per_minute", "tokens")):
        limit, remaining, reset = best[name]
        headers[f"x-ratelimit-limit-{suffix}"] = str(limit)
        headers[f"x-ratelimit-remaining-{suffix}"] = str(remaining)
        headers[f"x-ratelimit-reset-{suffix}"] = format_duration(reset)
    return headers
