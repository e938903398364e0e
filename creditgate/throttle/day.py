"""The calendar day of ``messages_per_day``: UTC, or a configured IANA zone.

The throttle script finds the day from the Redis server's clock; what it needs
from here is the zone's offset from UTC now and at the coming midnight (they
differ on a daylight-saving day, and the reset time must land on the real
midnight).
"""

from __future__ import annotations

import datetime as dt
import time
import zoneinfo


class DayZone:
    """Offsets of one zone, recomputed at most once a second."""

    def __init__(self, name: str = "UTC") -> None:
        self.name = name
        self._zone = None if name in ("UTC", "Etc/UTC") else zoneinfo.ZoneInfo(name)
        self._from = self._until = 0.0
        self._offsets = (0, 0)

    def offsets_ms(self, now: float | None = None) -> tuple[int, int]:
        """(offset now, offset at the end of today) in ms, for ``now`` (default: the clock)."""
        if self._zone is None:
            return (0, 0)
        now = time.time() if now is None else now
        if self._from <= now < self._until:
            return self._offsets
        local = dt.datetime.fromtimestamp(now, self._zone)
        midnight = dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(), self._zone)
        self._offsets = (_ms(local.utcoffset()), _ms(midnight.utcoffset()))
        self._from, self._until = now, min(now + 1.0, midnight.timestamp())
        return self._offsets

    def day_number(self, now: float | None = None) -> int:
        """Days since 1970-01-01 in the zone: the same number the script computes."""
        now = time.time() if now is None else now
        offset, _ = self.offsets_ms(now)
        return (int(now * 1000) + offset) // 86_400_000


def _ms(delta: dt.timedelta | None) -> int:
    return 0 if delta is None else int(delta.total_seconds() * 1000)
