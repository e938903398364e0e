"""Parsing the values users send (query strings, JSON fields, CLI arguments).

Each parser appends ``{path, message}`` to a problems list instead of raising,
so one 400 can list every problem of a request (DESIGN.md §2).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from typing import Any

Problems = list[dict[str, str]]


def parse_time(value: Any, path: str, problems: Problems) -> datetime | None:
    """An RFC 3339 / ISO 8601 time (``2026-01-31T12:00:00Z``) or date (midnight UTC).

    A time without an offset is read as UTC.
    """
    if not isinstance(value, str) or not value:
        problems.append({"path": path, "message": "expected an ISO 8601 date or time"})
        return None
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(), UTC)
        parsed = datetime.fromisoformat(value)
        # In UTC now: an offset at the calendar's edge (9999-12-31T23:59-01:00)
        # has no UTC time, which the database driver would fail on later.
        return parsed.astimezone(UTC) if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        problems.append({"path": path, "message": f"{value!r} is not an ISO 8601 date or time"})
        return None


def parse_text(value: Any, path: str, limit: int, problems: Problems) -> str | None:
    """A required non-empty string of at most ``limit`` printable characters."""
    if not isinstance(value, str) or not value.strip():
        problems.append({"path": path, "message": "required: a non-empty string"})
        return None
    if len(value) > limit or not value.isprintable():
        problems.append({"path": path, "message": f"at most {limit} printable characters"})
        return None
    return value


def parse_int(text: str, path: str, problems: Problems, *, low: int, high: int) -> int | None:
    """A whole number in ``low..high`` from a query string or argument."""
    try:
        value = int(text, 10)
    except ValueError:
        problems.append({"path": path, "message": f"expected an integer {low}..{high}"})
        return None
    if not low <= value <= high:
        problems.append({"path": path, "message": f"must be {low}..{high}, got {value}"})
        return None
    return value


def parse_kinds(texts: list[str], allowed: tuple[str, ...], problems: Problems) -> tuple[str, ...]:
    """Entry kinds, comma-separated and/or repeated; each must be one of ``allowed``."""
    kinds: list[str] = []
    for text in texts:
        for kind in text.split(","):
            kind = kind.strip()
            if kind not in allowed:
                problems.append(
                    {"path": "kind", "message": f"{kind!r} is not one of {', '.join(allowed)}"}
                )
            elif kind not in kinds:
                kinds.append(kind)
    return tuple(kinds)
