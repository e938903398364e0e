"""Throttle: per-account limits in Redis, all checked and taken in one Lua call.

Limits (from the account's tier): requests per minute and tokens per minute
(continuously refilled token buckets), parallel requests (leases that expire,
so a crashed process cannot hold a slot), messages per calendar day. A request
takes from every limit or from none; after the call ``finish`` corrects the
token bucket by the actual usage and returns the lease.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from dataclasses import dataclass, field
from importlib import resources

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from creditgate.config import Tier
from creditgate.errors import RateLimited, ServiceUnavailable
from creditgate.http.metrics import REDIS_DEGRADED, THROTTLE_DECISIONS

_SCRIPT = resources.files(__name__).joinpath("admit.lua").read_text("utf-8")
_MINUTE_MS = 60_000
LIMIT_NAMES = ("requests_per_minute", "tokens_per_minute", "max_parallel", "messages_per_day")


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
    """An admitted request: what it took, to give back in ``finish``."""

    account_id: uuid.UUID
    tier: Tier
    tokens: int
    lease_id: str
    headers: dict[str, str] = field(default_factory=dict)


class Throttle:
    """Admission control against the account's tier limits."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        lease_ttl_ms: int = 15 * 60_000,
        on_redis_error: str = "closed",
    ) -> None:
        assert on_redis_error in ("open", "closed"), on_redis_error
        self._redis = redis
        self._script = redis.register_script(_SCRIPT)
        self._lease_ttl_ms = lease_ttl_ms
        self._on_redis_error = on_redis_error

    def _keys_and_args(
        self, account_id: uuid.UUID, tier: Tier, tokens: int, lease_id: str, mode: str
    ) -> tuple[list[str], list[str | int]]:
        tag = f"cg:{{{account_id}}}"
        day = dt.datetime.now(dt.UTC).strftime("%Y%m%d")
        keys = [f"{tag}:rpm", f"{tag}:tpm", f"{tag}:par", f"{tag}:day:{day}"]
        request_cost = 1 if mode == "1" else 0
        args: list[str | int] = [
            "b",
            tier.requests_per_minute,
            _MINUTE_MS,
            request_cost,
            "b",
            tier.tokens_per_minute,
            _MINUTE_MS,
            tokens,
            "p",
            tier.max_parallel,
            self._lease_ttl_ms,
            lease_id,
            "d",
            tier.messages_per_day,
            0,
            request_cost,
            mode,
        ]
        return keys, args

    async def admit(self, account_id: uuid.UUID, tier: Tier, tokens: int) -> Admission:
        """Take one request, ``tokens`` tokens, a lease and a daily message, or raise 429."""
        lease_id = uuid.uuid4().hex
        keys, args = self._keys_and_args(account_id, tier, tokens, lease_id, "1")
        try:
            out = await self._script(keys=keys, args=args)
        except (RedisError, OSError):
            REDIS_DEGRADED.set(1)
            THROTTLE_DECISIONS.labels("redis", self._on_redis_error).inc()
            if self._on_redis_error == "open":
                return Admission(account_id, tier, tokens, lease_id)
            raise ServiceUnavailable("The rate limiter is unavailable; retry shortly.") from None
        REDIS_DEGRADED.set(0)
        allowed, failing, retry_ms = int(out[0]), int(out[1]), int(out[2])
        headers = {
            "x-ratelimit-limit-requests": str(tier.requests_per_minute),
            "x-ratelimit-remaining-requests": str(out[3]),
            "x-ratelimit-reset-requests": format_duration(int(out[4])),
            "x-ratelimit-limit-tokens": str(tier.tokens_per_minute),
            "x-ratelimit-remaining-tokens": str(out[5]),
            "x-ratelimit-reset-tokens": format_duration(int(out[6])),
        }
        if allowed:
            THROTTLE_DECISIONS.labels("all", "admitted").inc()
            return Admission(account_id, tier, tokens, lease_id, headers)
        limit = LIMIT_NAMES[failing - 1]
        THROTTLE_DECISIONS.labels(limit, "refused").inc()
        if retry_ms < 0:
            raise RateLimited(
                f"Request too large: it needs {tokens} tokens, more than your tier's "
                f"{limit} ({tier.tokens_per_minute}). Lower max_tokens or the prompt.",
                details={"limit": limit, "retryAfter": None},
                headers=headers,
            )
        retry_after = max(1, math.ceil(retry_ms / 1000))
        headers["Retry-After"] = str(retry_after)
        raise RateLimited(
            f"Rate limit reached for {limit}; retry after {retry_after} s.",
            details={"limit": limit, "retryAfter": retry_after},
            headers=headers,
        )

    async def finish(self, admission: Admission, actual_tokens: int) -> None:
        """Correct the token bucket by the actual usage and return the lease."""
        keys, args = self._keys_and_args(
            admission.account_id,
            admission.tier,
            actual_tokens - admission.tokens,
            admission.lease_id,
            "r",
        )
        try:
            await self._script(keys=keys, args=args)
        except (RedisError, OSError):
            REDIS_DEGRADED.set(1)  # the lease expires by itself
