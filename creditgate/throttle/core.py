"""The throttle: admission against an account's limits, in Redis or, degraded, locally.

One decision is one call of ``admit.lua`` (EVALSHA on the process's pipelined
connection, ``resp.RedisPipe``; the script is loaded again on NOSCRIPT): every
limit of the request is checked and taken, or none is. Redis gets a time
budget (``THROTTLE_REDIS_TIMEOUT_MS``): a request whose call misses it is
decided by the configured policy; a connection error, or three misses in a
row, mark the process degraded, and the policy decides every request until a
background probe finds Redis again:

* ``local``  per-process buckets at the same rates (``local.LocalStore``)
* ``open``   admit everything (no limits, no headers but the limits)
* ``closed`` refuse (ThrottleUnavailable: 503)

While degraded no request waits on Redis: only the probe talks to it.

A parallel lease whose admit or release reply never came (a stall, a reset
connection) may sit in Redis with nobody holding it. Its id is known before
the admit is sent, so it is remembered as an orphan and cancelled (admit.lua
mode "c": a tombstone that also stops an admit still queued in Redis) as soon
as Redis answers again — the probe's recovery, or a moment after a single
missed reply — instead of blocking the account's slots for the lease TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from creditgate.config import THROTTLE_POLICIES, ThrottlePolicy
from creditgate.logs import log
from creditgate.metrics import REDIS_DEGRADED, THROTTLE_DECISIONS
from creditgate.throttle.cluster import ClusterPipe
from creditgate.throttle.day import DayZone
from creditgate.throttle.errors import Throttled, ThrottleUnavailable
from creditgate.throttle.limits import LIMIT_NAMES, LimitName, Limits, ScopeName
from creditgate.throttle.local import LocalStore
from creditgate.throttle.resp import RedisDown, RedisPipe, RedisReplyError, encode_args
from creditgate.throttle.script import HEAD_PREFIX, Decision, Head, Mode, decode

# The Redis-down policies, defined once (config validates THROTTLE_ON_REDIS_ERROR).
POLICIES = THROTTLE_POLICIES
# Where an admission was decided, so where it is given back.
Store = Literal["redis", "local", "open"]
_ADMITTED = THROTTLE_DECISIONS.labels("all", "admitted")
# Consecutive calls over the time budget that mark Redis as hung (one slow
# moment only sends that one request to the fallback).
_TIMEOUTS_TO_DEGRADE = 3
# Orphaned leases remembered for cancellation; beyond this their TTL frees them.
_MAX_ORPHANS = 100_000


@dataclass(frozen=True, slots=True)
class _ScriptCall:
    """One call of admit.lua: the limits' (pre-encoded) keys and arguments, and the head."""

    limits: Limits
    head: Head  # mode … messages: the arguments that change per call

    @property
    def keys(self) -> list[str]:
        return list(self.limits.keys)

    @property
    def args(self) -> list[str | int]:
        return [*self.head.args(), *self.limits.scope_args]


@dataclass(frozen=True, slots=True)
class _Script:
    text: str
    sha: str
    evalsha: bytes  # "EVALSHA <sha>", encoded

    @classmethod
    def load(cls, name: str) -> _Script:
        text = resources.files(__package__).joinpath(name).read_text("utf-8")
        # SHA-1 is how Redis names a script (EVALSHA), not a security measure.
        sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
        return cls(text, sha, encode_args(("EVALSHA", sha)))


_ADMIT = _Script.load("admit.lua")
_RENEW = _Script.load("renew.lua")


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
    store: Store  # where to give it back
    headers: dict[str, str] = field(default_factory=dict)
    finished: bool = False


@dataclass(frozen=True, slots=True)
class Standing:
    """One limit as ``check`` found it: the tightest scope's value, what is left, when full."""

    limit: int
    remaining: int | None  # None: unknown (Redis away under the "open" policy)
    reset_ms: int | None  # until full again; None for parallel (a call's end frees a slot)


@dataclass(frozen=True, slots=True)
class Check:
    """What ``check`` found, without taking anything (for quota pre-flight checks)."""

    allowed: bool
    limit: LimitName | None  # the limit that refuses, when not allowed
    retry_after: int | None  # whole seconds; None when waiting cannot help
    headers: dict[str, str]
    # Each limit of LIMIT_NAMES, before this request would take anything.
    standings: dict[LimitName, Standing] = field(default_factory=dict)


class Throttle:
    """Admission control against resolved ``Limits``, shared through Redis."""

    def __init__(
        self,
        redis: RedisPipe | ClusterPipe,
        *,
        policy: ThrottlePolicy = "local",
        timeout_ms: int = 50,
        lease_ttl_ms: int = 60_000,
        day_zone: DayZone | None = None,
        probe_interval: float = 0.5,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self._redis = redis
        self._policy: ThrottlePolicy = policy
        self._timeout = timeout_ms / 1000
        self.lease_ttl_ms = lease_ttl_ms
        self.day_zone = day_zone or DayZone()
        self._probe_interval = probe_interval
        self._local = LocalStore()
        self._healthy = True
        self._timeouts = 0  # consecutive calls over the budget
        self._probe: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        # Admissions holding a lease, renewed while they run.
        self._live: dict[str, Admission] = {}
        self._prefixes: dict[tuple[str | int, ...], bytes] = {}
        # Give-backs of admissions that arrived too late (held until done).
        self._undoing: set[asyncio.Future[Any]] = set()
        # Leases that may be in Redis with nobody holding them: lease id → its
        # cancel call, sent once Redis answers (``_cancel_orphans``).
        self._orphans: dict[str, _ScriptCall] = {}
        self._cancelling: asyncio.Task[None] | None = None

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
        except (RedisDown, RedisReplyError, TimeoutError) as exc:
            self._degrade(exc)
        self._keeper = asyncio.create_task(self._keep_leases())

    async def aclose(self) -> None:
        """Stop the background tasks (the Redis connection is the caller's)."""
        for task in (self._keeper, self._probe, self._cancelling, *self._undoing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # ------------------------------------------------------------ decisions

    async def admit(self, limits: Limits, tokens: int, *, required_tokens: int = 0) -> Admission:
        """Take a request, its tokens, a parallel lease and a daily message, or raise Throttled.

        ``tokens`` is the worst case (prompt estimate + output cap); a request
        larger than a whole minute's tokens takes the whole bucket (it waits
        for a full one) and is corrected by its actual usage in ``finish``.
        ``required_tokens`` (the prompt estimate) larger than a minute's
        tokens can never be served: Throttled without Retry-After.
        """
        tpm = limits.value("tokens_per_minute")
        if required_tokens > tpm:
            THROTTLE_DECISIONS.labels("tokens_per_minute", "refused").inc()
            raise Throttled(
                f"Request too large for tokens per minute: limit {tpm}, this prompt alone is "
                f"about {required_tokens}. Shorten the prompt; waiting will not help.",
                details={"limit": "tokens_per_minute", "retryAfter": None},
                headers=_limit_headers(limits),
            )
        tokens = min(tokens, tpm)
        lease_id = os.urandom(12).hex()
        out, store = await self._decide(self._call(limits, "a", 1, tokens, lease_id, 1))
        if out is None:  # policy "open"
            THROTTLE_DECISIONS.labels("all", "admitted").inc()
            day = self.day_zone.day_number()
            return Admission(limits, tokens, lease_id, day, store, _limit_headers(limits))
        headers = _headers(limits, out)
        if out.allowed:
            _ADMITTED.inc()
            admission = Admission(limits, tokens, lease_id, out.day, store, headers)
            self._live[lease_id] = admission
            return admission
        scope, name, value = _deciding(limits, out)
        THROTTLE_DECISIONS.labels(name, "refused").inc()
        retry_after = max(1, math.ceil(out.retry_after_ms / 1000))
        headers["Retry-After"] = str(retry_after)
        raise Throttled(
            _refusal_message(scope, name, value, retry_after),
            details={"limit": name, "retryAfter": retry_after},
            headers=headers,
        )

    async def check(self, limits: Limits, tokens: int, *, required_tokens: int = 0) -> Check:
        """Would ``admit`` take this request now? Takes nothing from any limit."""
        tpm = limits.value("tokens_per_minute")
        out, _ = await self._decide(self._call(limits, "q", 1, min(tokens, tpm), "x", 1))
        standings = self._standings(limits, out)
        if required_tokens > tpm:
            return Check(False, "tokens_per_minute", None, _limit_headers(limits), standings)
        if out is None:
            return Check(True, None, None, _limit_headers(limits), standings)
        if out.allowed:
            return Check(True, None, None, _headers(limits, out), standings)
        return Check(
            False,
            _deciding(limits, out)[1],
            max(1, math.ceil(out.retry_after_ms / 1000)),
            _headers(limits, out),
            standings,
        )

    def _standings(self, limits: Limits, out: Decision | None) -> dict[LimitName, Standing]:
        """Each limit's tightest scope, from the script's per-scope reply (admit.lua)."""
        offset, offset_end = self.day_zone.offsets_ms()
        now_ms = int(time.time() * 1000)
        day = (now_ms + offset) // 86_400_000
        to_midnight = (day + 1) * 86_400_000 - offset_end - now_ms
        found: dict[LimitName, Standing] = {}
        for k, name in enumerate(LIMIT_NAMES):
            best: Standing | None = None
            for i, scope in enumerate(limits.scopes):
                value = scope.values[k]
                if value <= 0:
                    continue
                remaining: int | None = None
                reset: int | None = None
                if out is not None:
                    got = out.scopes[i]
                    remaining, reset = (
                        (got.requests_remaining, got.requests_reset_ms),
                        (got.tokens_remaining, got.tokens_reset_ms),
                        (got.parallel_remaining, None),
                        (got.messages_remaining, to_midnight),
                    )[k]
                elif k == 3:
                    reset = to_midnight
                candidate = Standing(value, remaining, reset)
                if best is None or (
                    candidate.remaining is not None
                    and (best.remaining is None or candidate.remaining < best.remaining)
                ):
                    best = candidate
            assert best is not None  # the account scope limits all four
            found[name] = best
        return found

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
        call = self._call(
            admission.limits,
            "r",
            0,
            (actual_tokens or 0) - admission.tokens,
            admission.lease_id,
            admission.day if actual_tokens is None else "",
        )
        if admission.store == "local":
            self._local.run(call.keys, call.args)
            return
        if self._healthy and await self._call_redis(call) is not None:
            return
        # The release did not happen or its reply was lost: the token
        # correction is lost, the lease is cancelled once Redis answers.
        self._orphan(admission.limits, admission.lease_id)

    # ------------------------------------------------------------ internals

    def _call(
        self,
        limits: Limits,
        mode: Mode,
        requests: int,
        tokens: int,
        lease: str,
        messages: int | str,
    ) -> _ScriptCall:
        """The script's keys and arguments (see admit.lua)."""
        offset, offset_end = self.day_zone.offsets_ms()
        head = Head(mode, offset, offset_end, self.lease_ttl_ms, requests, tokens, lease, messages)
        return _ScriptCall(limits, head)

    async def _decide(self, call: _ScriptCall) -> tuple[Decision | None, Store]:
        """The decision of an admit or query call, and where it was made (None: "open")."""
        # Only admit ("a") and query ("q") calls come here: both reply a Decision.
        if self._healthy:
            raw = await self._call_redis(call)
            if raw is not None:
                return decode("a", raw), "redis"
        if self._policy == "local":
            return decode("a", self._local.run(call.keys, call.args)), "local"
        if self._policy == "open":
            return None, "open"
        THROTTLE_DECISIONS.labels("redis_unavailable", "refused").inc()
        raise ThrottleUnavailable("The rate limiter is unavailable; retry shortly.")

    async def _call_redis(self, call: _ScriptCall) -> list[int] | None:
        """admit.lua's raw reply within the time budget, or None (and maybe degraded).

        Raw, because the transport does not care about the mode: callers read
        it through ``script.decode``.
        """
        limits = call.limits
        head = call.head.args()
        count = 3 + len(limits.keys) + len(head) + len(limits.scope_args)
        # Everything but the per-request values was encoded once.
        encoded = b"".join(
            (
                _ADMIT.evalsha,
                limits.keys_resp,
                self._head_prefix(head[:HEAD_PREFIX]),
                encode_args(head[HEAD_PREFIX:]),
                limits.scope_args_resp,
            )
        )
        reply: asyncio.Future[Any] | None = None
        deadline = asyncio.get_running_loop().time() + self._timeout
        try:
            try:
                reply = self._redis.request(count, encoded)
                out: list[int] = await _within(reply, deadline)
            except RedisReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                # Redis restarted or flushed its scripts: load once, call again.
                async with asyncio.timeout_at(deadline):
                    await self._redis.execute("SCRIPT", "LOAD", _ADMIT.text)
                reply = self._redis.request(count, encoded)
                out = await _within(reply, deadline)
        except TimeoutError as exc:
            if call.head.mode == "a":
                # It may still be admitted in Redis after this request moved on:
                # given back if its reply comes, cancelled once Redis answers if not.
                self._orphan(limits, call.head.lease)
                if reply is not None:
                    reply.add_done_callback(lambda done: self._undo_late(call, done))
            self._timeouts += 1
            if self._timeouts >= _TIMEOUTS_TO_DEGRADE:
                self._degrade(exc)
            return None
        except (RedisDown, RedisReplyError) as exc:
            if call.head.mode == "a" and reply is not None:
                self._orphan(limits, call.head.lease)  # it may have been written
            self._degrade(exc)
            return None
        self._timeouts = 0
        return out

    def _head_prefix(self, prefix: list[str | int]) -> bytes:
        """mode, offsets and lease TTL, encoded: a handful of values, cached."""
        key = tuple(prefix)
        cached = self._prefixes.get(key)
        if cached is None:
            if len(self._prefixes) > 64:  # the day zone's offsets change twice a year
                self._prefixes.clear()
            cached = self._prefixes[key] = encode_args(prefix)
        return cached

    def _undo_late(self, call: _ScriptCall, reply: asyncio.Future[Any]) -> None:
        """Give back an admission Redis made after its caller stopped waiting."""
        if reply.cancelled() or reply.exception() is not None:
            return  # unknown: the orphan's cancel stays due
        late = decode("a", reply.result())
        if not late.allowed:
            self._orphans.pop(call.head.lease, None)  # refused: no lease was taken
            return
        undo = self._call(call.limits, "r", 0, -call.head.tokens, call.head.lease, late.day)
        task = asyncio.ensure_future(self._call_redis(undo))
        self._undoing.add(task)
        task.add_done_callback(self._undoing.discard)

    async def _eval(self, script: _Script, numkeys: int, body: bytes, count: int) -> Any:
        """EVALSHA of ``count`` encoded keys and arguments; loads the script on NOSCRIPT."""
        encoded = script.evalsha + encode_args((numkeys,)) + body
        try:
            return await self._redis.execute_encoded(3 + count, encoded)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # Redis restarted or flushed its scripts: load once, call again.
        await self._redis.execute("SCRIPT", "LOAD", script.text)
        return await self._redis.execute_encoded(3 + count, encoded)

    def _orphan(self, limits: Limits, lease_id: str) -> None:
        """Remember a lease nobody may hold, to cancel it as soon as Redis answers."""
        if not limits.lease_keys or len(self._orphans) >= _MAX_ORPHANS:
            return  # no parallel limit: no lease; too many: their TTL frees them
        self._orphans[lease_id] = self._call(limits, "c", 0, 0, lease_id, "")
        if self._healthy and (self._cancelling is None or self._cancelling.done()):
            self._cancelling = asyncio.create_task(self._cancel_orphans_soon())

    async def _cancel_orphans_soon(self) -> None:
        # A moment's wait: one missed reply is usually a slow moment, and its
        # admit's late reply may still come (and give everything back itself).
        await asyncio.sleep(self._probe_interval)
        while self._orphans and self._healthy:
            await self._cancel_orphans()
            await asyncio.sleep(self._probe_interval)

    async def _cancel_orphans(self) -> None:
        """Send every orphan's cancel; those answered are done (cancels are idempotent)."""
        pending = list(self._orphans.items())
        outs = await asyncio.gather(*(self._call_redis(call) for _, call in pending))
        for (lease_id, call), out in zip(pending, outs, strict=True):
            if out is not None and self._orphans.get(lease_id) is call:
                del self._orphans[lease_id]
        if pending:
            log.info(
                "throttle cancelled orphaned leases",
                extra={"cancelled": len(pending) - len(self._orphans), "left": len(self._orphans)},
            )

    def _degrade(self, exc: BaseException) -> None:
        if not self._healthy:
            return
        self._healthy = False
        REDIS_DEGRADED.set(1)
        log.warning(
            "throttle degraded: Redis unreachable, applying the fallback policy",
            extra={"policy": self._policy, "error": type(exc).__name__, "detail": str(exc)[:200]},
        )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_until_healthy())

    async def _probe_until_healthy(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval)
            try:
                async with asyncio.timeout(max(self._timeout, 0.2)):
                    await self._load_scripts()
            except (RedisDown, RedisReplyError, TimeoutError):
                self._redis.reset()  # a hung connection must not be reused
                continue
            self._healthy = True
            self._timeouts = 0
            REDIS_DEGRADED.set(0)
            log.info("throttle recovered: Redis reachable, limits shared again")
            # First thing: free the slots of leases whose replies the outage lost.
            if self._orphans and (self._cancelling is None or self._cancelling.done()):
                self._cancelling = asyncio.create_task(self._cancel_orphans_now())
            return

    async def _cancel_orphans_now(self) -> None:
        await self._cancel_orphans()
        if self._orphans and self._healthy:
            await self._cancel_orphans_soon()

    async def _load_scripts(self) -> None:
        # Loading is also the probe: a Redis that restarted empty needs them.
        await self._redis.execute("SCRIPT", "LOAD", _ADMIT.text)
        await self._redis.execute("SCRIPT", "LOAD", _RENEW.text)

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
                self._local.renew(a.limits.lease_keys, a.lease_id, self.lease_ttl_ms)
        if not remote or not self._healthy:
            return
        # Concurrent calls on the shared connection: written as one pipeline.
        try:
            async with asyncio.timeout(max(self._timeout, 1.0)):
                await asyncio.gather(
                    *(
                        self._eval(
                            _RENEW,
                            len(a.limits.lease_keys),
                            encode_args([*a.limits.lease_keys, a.lease_id, self.lease_ttl_ms]),
                            len(a.limits.lease_keys) + 2,
                        )
                        for a in remote
                    )
                )
        except (RedisDown, RedisReplyError, TimeoutError) as exc:
            self._degrade(exc)


async def _within(reply: asyncio.Future[Any], deadline: float) -> Any:
    """``reply``'s result if it comes by ``deadline`` (loop time), else TimeoutError.

    ``reply`` itself is never cancelled — not by the deadline, nor by the
    caller's cancellation — so a late reply can still be read (``_undo_late``).
    The same as ``asyncio.timeout`` around ``asyncio.shield(reply)``, with one
    timer and one callback instead of a Timeout, a second future and two
    callbacks: this runs twice per request.
    """
    if reply.done():
        return reply.result()
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object) -> None:
        if not waiter.done():
            waiter.set_result(None)

    reply.add_done_callback(wake)
    timer = loop.call_at(deadline, wake, None)
    try:
        await waiter
    finally:
        timer.cancel()
        reply.remove_done_callback(wake)
    if not reply.done():
        raise TimeoutError
    return reply.result()


def _deciding(limits: Limits, out: Decision) -> tuple[ScopeName, LimitName, int]:
    """(scope, limit name, its value) of a refusal's deciding limit."""
    assert out.deciding is not None  # a refusal names its limit
    scope = limits.scopes[out.deciding.scope]
    return scope.name, out.deciding.limit, scope.values[LIMIT_NAMES.index(out.deciding.limit)]


def _refusal_message(scope: ScopeName, name: LimitName, value: int, retry_after: int) -> str:
    whose = "this API key's" if scope == "key" else "your"
    if name == "max_parallel":
        return (
            f"Too many requests in flight: {whose} limit is {value} at a time. "
            "Retry when one of them has finished."
        )
    return f"Rate limit reached for {whose} {name} ({value}); retry after {retry_after} s."


def _limit_headers(limits: Limits) -> dict[str, str]:
    return {
        "x-ratelimit-limit-requests": str(limits.value("requests_per_minute")),
        "x-ratelimit-limit-tokens": str(limits.value("tokens_per_minute")),
    }


def _headers(limits: Limits, out: Decision) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers, from the scope with the least remaining of each."""
    headers: dict[str, str] = {}
    for k, suffix in ((0, "requests"), (1, "tokens")):
        best: tuple[int, int, int] | None = None
        for i, scope in enumerate(limits.scopes):
            limit = scope.values[k]
            got = out.scopes[i]
            remaining, reset = (
                (got.requests_remaining, got.requests_reset_ms)
                if k == 0
                else (got.tokens_remaining, got.tokens_reset_ms)
            )
            if limit > 0 and (best is None or remaining < best[1]):
                best = (limit, remaining, reset)
        assert best is not None  # the account scope limits both
        headers[f"x-ratelimit-limit-{suffix}"] = str(best[0])
        headers[f"x-ratelimit-remaining-{suffix}"] = str(best[1])
        headers[f"x-ratelimit-reset-{suffix}"] = format_duration(best[2])
    return headers
