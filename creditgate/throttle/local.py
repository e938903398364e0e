"""Per-process limits: the fallback while Redis is unreachable (policy ``local``).

The same algorithm as ``admit.lua``, on the same arguments, in this process's
memory and on its clock. Each process counts alone, so N processes admit up to
N times an account's limits while degraded; that is the price of serving at
all, and the ``creditgate_throttle_degraded`` gauge says it is being paid.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

_DAY_MS = 86_400_000
_SWEEP_EVERY = 1024  # decisions between sweeps of idle state


@dataclass(slots=True)
class _Bucket:
    level: int
    last: int
    expires: int = 0


@dataclass(slots=True)
class _Leases:
    expiry: dict[str, int] = field(default_factory=dict)
    expires: int = 0


@dataclass(slots=True)
class _Day:
    day: int
    count: int
    expires: int = 0


class LocalStore:
    """In-memory buckets, leases and day counters, run like the Redis script."""

    def __init__(self) -> None:
        self._state: dict[str, _Bucket | _Leases | _Day] = {}
        self._ops = 0

    def __len__(self) -> int:
        return len(self._state)

    def run(self, keys: list[str], args: list[str | int]) -> list[int]:
        """One decision, with the script's arguments and result (see ``admit.lua``)."""
        now = time.monotonic_ns() // 1_000_000
        wall = time.time_ns() // 1_000_000
        self._ops += 1
        if self._ops % _SWEEP_EVERY == 0:
            self._sweep(now)
        mode = str(args[0])
        offset, offset_end = int(args[1]), int(args[2])
        day = (wall + offset) // _DAY_MS
        day_end_in = (day + 1) * _DAY_MS - offset_end - wall
        allowed, deciding, retry = 1, 0, 0
        seen: list[tuple[_Bucket | _Leases | _Day, int]] = []

        for i, key in enumerate(keys):
            kind, limit, param, cost = args[3 + 4 * i : 7 + 4 * i]
            limit, param = int(limit), int(param)
            wait = -1
            if kind == "b":
                cap = limit * param
                b = self._state.get(key)
                if not isinstance(b, _Bucket) or b.expires <= now:
                    b = _Bucket(cap, now)
                if now > b.last:
                    b.level = min(cap, b.level + (now - b.last) * limit)
                    b.last = now
                scaled = int(cost) * param
                if mode != "r" and scaled > 0 and b.level < scaled:
                    wait = -(-(scaled - b.level) // limit)
                seen.append((b, scaled))
            elif kind == "p":
                p = self._state.get(key)
                if not isinstance(p, _Leases):
                    p = _Leases()
                p.expiry = {lease: exp for lease, exp in p.expiry.items() if exp > now}
                if mode != "r" and len(p.expiry) >= limit:
                    wait = 1000  # a slot frees when one of the caller's requests ends
                seen.append((p, 0))
            else:
                d = self._state.get(key)
                if not isinstance(d, _Day) or d.day != day:
                    d = _Day(day, 0)
                if mode != "r" and d.count + int(cost) > limit:
                    wait = day_end_in
                seen.append((d, 0))
            if wait >= 0:
                allowed = 0
                if deciding == 0 or wait > retry:
                    deciding, retry = i + 1, wait

        take = (mode == "a" and allowed == 1) or mode == "r"
        out = [allowed, deciding, retry, day]
        for i, key in enumerate(keys):
            _, limit_s, param_s, cost = args[3 + 4 * i : 7 + 4 * i]
            limit, param = int(limit_s), int(param_s)
            state, scaled = seen[i]
            if isinstance(state, _Bucket):
                cap = limit * param
                if take and scaled != 0:
                    state.level = min(cap, state.level - scaled)
                    state.expires = now + math.ceil((cap - state.level) / limit) + 1000
                    self._state[key] = state
                out += [max(0, state.level) // param, -(-(cap - state.level) // limit)]
            elif isinstance(state, _Leases):
                lease = str(cost)
                if take and lease:
                    if mode == "r":
                        state.expiry.pop(lease, None)
                    else:
                        state.expiry[lease] = now + param
                        state.expires = now + param + 1000
                        self._state[key] = state
                out += [max(0, limit - len(state.expiry)), 0]
            else:
                if mode == "a" and take and int(cost):
                    state.count += int(cost)
                    state.expires = now + day_end_in + 60_000
                    self._state[key] = state
                elif mode == "r" and str(cost) != "" and int(cost) == day and state.count > 0:
                    state.count -= 1
                out += [max(0, limit - state.count), day_end_in]
        return out

    def _sweep(self, now: int) -> None:
        for key in [k for k, s in self._state.items() if s.expires <= now]:
            del self._state[key]

    def renew(self, keys: list[str], lease: str, ttl_ms: int) -> None:
        """Extend a live lease of a request still in flight (see ``renew.lua``)."""
        now = time.monotonic_ns() // 1_000_000
        for key in keys:
            p = self._state.get(key)
            if isinstance(p, _Leases) and p.expiry.get(lease, 0) > now:
                p.expiry[lease] = now + ttl_ms
                p.expires = max(p.expires, now + ttl_ms + 1000)
