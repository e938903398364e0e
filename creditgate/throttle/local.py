"""Per-process limits: the fallback while Redis is unreachable (policy ``local``).

The same algorithm as ``admit.lua``, on the same arguments, in this process's
memory and on its clock. Each process counts alone, so N processes admit up to
N times an account's limits while degraded; that is the price of serving at
all, and the ``creditgate_throttle_degraded`` gauge says it is being paid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from creditgate.throttle.script import Head, scope_limits

_PERIOD = 60_000
_DAY_MS = 86_400_000
_SWEEP_EVERY = 1024  # decisions between sweeps of idle state


@dataclass(slots=True)
class _Scope:
    """What admit.lua keeps in a scope's hash (levels scaled by the period)."""

    rl: int | None = None
    rt: int = 0
    tl: int | None = None
    tt: int = 0
    day: int = -1
    count: int = 0
    expires: int = 0


@dataclass(slots=True)
class _Leases:
    expiry: dict[str, int] = field(default_factory=dict)
    expires: int = 0


def _level(level: int | None, last: int, limit: int, now: int) -> int:
    cap = limit * _PERIOD
    if level is None:
        return cap
    return min(cap, level + (now - last) * limit) if now > last else level


class LocalStore:
    """In-memory scopes and leases, run like the Redis script."""

    def __init__(self) -> None:
        self._scopes: dict[str, _Scope] = {}
        self._leases: dict[str, _Leases] = {}
        self._ops = 0

    def __len__(self) -> int:
        return len(self._scopes) + len(self._leases)

    def run(self, keys: list[str], args: list[str | int]) -> list[int]:
        """One decision, with the script's arguments and result (see ``admit.lua``)."""
        now = time.monotonic_ns() // 1_000_000
        wall = time.time_ns() // 1_000_000
        self._ops += 1
        if self._ops % _SWEEP_EVERY == 0:
            self._sweep(now)
        head = Head.from_args(args)
        mode, lease, lease_ttl = head.mode, head.lease, head.lease_ttl_ms
        day = (wall + head.offset_ms) // _DAY_MS
        day_end_in = (day + 1) * _DAY_MS - head.offset_end_ms - wall
        limits = scope_limits(args)
        scopes = [self._scopes.get(keys[2 * i]) or _Scope() for i in range(len(limits))]
        leases = [self._leases.get(keys[2 * i + 1]) or _Leases() for i in range(len(limits))]
        for ls in leases:
            ls.expiry = {k: exp for k, exp in ls.expiry.items() if exp > now}

        if mode == "r":
            correction = head.tokens
            give_back = head.messages != "" and int(head.messages) == day
            for i, (rpm, tpm, par, per_day) in enumerate(limits):
                st = scopes[i]
                if tpm > 0 and correction != 0:
                    tl = _level(st.tl, st.tt, tpm, now) - correction * _PERIOD
                    st.tl, st.tt = min(tpm * _PERIOD, tl), now
                    self._keep(keys[2 * i], st, rpm, tpm, now, day_end_in)
                if per_day > 0 and give_back and st.day == day and st.count > 0:
                    st.count -= 1
                if par > 0 and lease:
                    leases[i].expiry.pop(lease, None)
            return [1, 0, 0, day]

        need_req, need_tok = head.requests * _PERIOD, head.tokens * _PERIOD
        need_msg = int(head.messages)
        allowed, deciding, retry = 1, 0, 0

        def refuse(index: int, wait: int) -> None:
            nonlocal allowed, deciding, retry
            allowed = 0
            if deciding == 0 or wait > retry:
                deciding, retry = index, wait

        levels: list[tuple[int, int, int]] = []
        for i, (rpm, tpm, par, per_day) in enumerate(limits):
            st, base = scopes[i], 4 * i
            rl = _level(st.rl, st.rt, rpm, now) if rpm > 0 else 0
            tl = _level(st.tl, st.tt, tpm, now) if tpm > 0 else 0
            count = st.count if st.day == day else 0
            if rpm > 0 and need_req > 0 and rl < need_req:
                refuse(base + 1, -(-(need_req - rl) // rpm))
            if tpm > 0 and need_tok > 0 and tl < need_tok:
                refuse(base + 2, -(-(need_tok - tl) // tpm))
            if par > 0 and lease and len(leases[i].expiry) >= par:
                refuse(base + 3, 1000)
            if per_day > 0 and need_msg > 0 and count + need_msg > per_day:
                refuse(base + 4, day_end_in)
            levels.append((rl, tl, count))

        take = mode == "a" and allowed == 1
        out = [allowed, deciding, retry, day]
        for i, (rpm, tpm, par, per_day) in enumerate(limits):
            rl, tl, count = levels[i]
            st, ls = scopes[i], leases[i]
            if take:
                if rpm > 0:
                    rl -= need_req
                    st.rl, st.rt = rl, now
                if tpm > 0:
                    tl -= need_tok
                    st.tl, st.tt = tl, now
                if per_day > 0:
                    count += need_msg
                    st.day, st.count = day, count
                self._keep(keys[2 * i], st, rpm, tpm, now, day_end_in)
                if par > 0 and lease:
                    ls.expiry[lease] = now + lease_ttl
                    ls.expires = now + lease_ttl + 1000
                    self._leases[keys[2 * i + 1]] = ls
            out += (
                [rl // _PERIOD if rl > 0 else 0, -(-(rpm * _PERIOD - rl) // rpm)]
                if rpm
                else [-1, 0]
            )
            out += (
                [tl // _PERIOD if tl > 0 else 0, -(-(tpm * _PERIOD - tl) // tpm)]
                if tpm
                else [-1, 0]
            )
            out.append(max(0, par - len(ls.expiry)) if par else -1)
            out.append(max(0, per_day - count) if per_day else -1)
        return out

    def _keep(self, key: str, st: _Scope, rpm: int, tpm: int, now: int, day_end_in: int) -> None:
        ms = 0
        if rpm > 0 and st.rl is not None:
            ms = max(ms, -(-(rpm * _PERIOD - st.rl) // rpm))
        if tpm > 0 and st.tl is not None:
            ms = max(ms, -(-(tpm * _PERIOD - st.tl) // tpm))
        if st.count > 0:
            ms = max(ms, day_end_in + 60_000)
        st.expires = now + ms + 1000
        self._scopes[key] = st

    def renew(self, keys: list[str], lease: str, ttl_ms: int) -> None:
        """Extend a live lease of a request still in flight (see ``renew.lua``)."""
        now = time.monotonic_ns() // 1_000_000
        for key in keys:
            ls = self._leases.get(key)
            if ls is not None and ls.expiry.get(lease, 0) > now:
                ls.expiry[lease] = now + ttl_ms
                ls.expires = max(ls.expires, now + ttl_ms + 1000)

    def _sweep(self, now: int) -> None:
        for key in [k for k, s in self._scopes.items() if s.expires <= now]:
            del self._scopes[key]
        for key in [k for k, s in self._leases.items() if s.expires <= now]:
            del self._leases[key]
