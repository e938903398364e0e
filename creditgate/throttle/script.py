"""admit.lua's arguments and reply by name: the one place that knows their positions.

The layout is admit.lua's header; this module mirrors it once, so the rest of
the throttle (``core``, the ``local`` fallback) reads fields, never indexes.

Arguments (``ARGV``): the per-call ``Head`` (ARGV[1..8]: mode, the day zone's
offset now and at the day's end, lease TTL, requests, tokens, lease id,
messages), then four limits per scope (``Limits.scope_args``: requests/min,
tokens/min, parallel, messages/day; 0 = not limited). The first
``HEAD_PREFIX`` head values change only with the day zone's offsets, so their
encoding is cached.

Reply of modes "a" (admit) and "q" (query), a ``Decision``::

    [allowed, deciding, retry_after_ms, day,
     then per scope s (6 values from 4 + 6*(s-1)):
     requests remaining, requests reset ms, tokens remaining, tokens reset ms,
     parallel remaining, messages remaining]          (-1 where not limited)

``deciding`` is 4(s-1)+k for the refusing limit k of scope s (k = 1
requests, 2 tokens, 3 parallel, 4 messages; 0 = none). Modes "r" (return)
and "c" (cancel) reply ``[1, 0, 0, day]``, an ``Ack``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args, overload

from creditgate.throttle.limits import LIMIT_NAMES, LimitName

# "a" admit, "q" query, "r" return, "c" cancel (see admit.lua's ARGV[1]).
Mode = Literal["a", "q", "r", "c"]
_MODES: tuple[Mode, ...] = get_args(Mode)
DecidingModes = Literal["a", "q"]
AckModes = Literal["r", "c"]

HEAD_LEN = 8  # ARGV[1..8]; the scopes' limits follow
HEAD_PREFIX = 4  # mode, offsets, lease TTL: the head values whose encoding is cached
_LIMITS_PER_SCOPE = 4
_REPLY_HEAD = 4  # allowed, deciding, retry_after_ms, day
_PER_SCOPE = 6  # the per-scope values of a Decision


class Head(NamedTuple):
    """ARGV[1..8]: the arguments that change per call (admit.lua's header)."""

    mode: Mode
    offset_ms: int  # the day zone's offset from UTC now
    offset_end_ms: int  # … and at the day's end
    lease_ttl_ms: int
    requests: int  # to take ("r": unused)
    tokens: int  # to take ("r": the correction, actual - taken)
    lease: str  # the lease id, "" for none
    messages: int | str  # to take ("r": the admission's day number, "" for none)

    def args(self) -> list[str | int]:
        """The head in ARGV order (its fields' order)."""
        return list(self)

    @classmethod
    def from_args(cls, args: Sequence[str | int]) -> Head:
        """The head of a full argument list (how the local fallback reads a call)."""
        mode = next((m for m in _MODES if m == args[0]), None)
        if mode is None:
            raise ValueError(f"unknown admit.lua mode {args[0]!r}")
        return cls(
            mode,
            int(args[1]),
            int(args[2]),
            int(args[3]),
            int(args[4]),
            int(args[5]),
            str(args[6]),
            args[7] if args[7] == "" else int(args[7]),
        )


def scope_limits(args: Sequence[str | int]) -> list[tuple[int, int, int, int]]:
    """Each scope's (requests/min, tokens/min, parallel, messages/day) from a full argument list."""
    rest = args[HEAD_LEN:]
    return [
        (int(rest[i]), int(rest[i + 1]), int(rest[i + 2]), int(rest[i + 3]))
        for i in range(0, len(rest), _LIMITS_PER_SCOPE)
    ]


class ScopeReply(NamedTuple):
    """One scope's standing after a decision (-1 remaining: not limited in this scope)."""

    requests_remaining: int
    requests_reset_ms: int
    tokens_remaining: int
    tokens_reset_ms: int
    parallel_remaining: int
    messages_remaining: int


class Deciding(NamedTuple):
    """The limit that refused: which scope (0 = the account's) and which limit."""

    scope: int
    limit: LimitName


class Decision(NamedTuple):
    """Reply of modes "a" and "q": the decision and every scope's standing."""

    allowed: bool
    deciding: Deciding | None  # None when nothing refused
    retry_after_ms: int
    day: int  # the calendar day number the script counted messages on
    scopes: tuple[ScopeReply, ...]


class Ack(NamedTuple):
    """Reply of modes "r" and "c": done, on this day number."""

    day: int


@overload
def decode(mode: DecidingModes, raw: Sequence[int]) -> Decision: ...
@overload
def decode(mode: AckModes, raw: Sequence[int]) -> Ack: ...
@overload
def decode(mode: Mode, raw: Sequence[int]) -> Decision | Ack: ...
def decode(mode: Mode, raw: Sequence[int]) -> Decision | Ack:
    """admit.lua's reply (from Redis or ``LocalStore``) to a call in ``mode``, by name."""
    if len(raw) < _REPLY_HEAD or (len(raw) - _REPLY_HEAD) % _PER_SCOPE:
        raise ValueError(f"admit.lua reply of unexpected length {len(raw)}")
    if mode in ("r", "c"):
        return Ack(raw[3])
    index = raw[1]
    deciding = None
    if index > 0:
        scope, k = divmod(index - 1, _LIMITS_PER_SCOPE)
        deciding = Deciding(scope, LIMIT_NAMES[k])
    # Named tuples: this runs on every request, and builds in a fraction of a
    # frozen dataclass's time.
    scopes = tuple(
        [ScopeReply(*raw[b : b + _PER_SCOPE]) for b in range(_REPLY_HEAD, len(raw), _PER_SCOPE)]
    )
    return Decision(raw[0] == 1, deciding, raw[2], raw[3], scopes)
