"""Throttle: per-account limits in Redis, all checked and taken in one Lua call.

Limits (the account's tier, tightened or loosened by an operator's account
override, tightened by an API key's override): requests per minute and tokens
per minute (continuously refilled token buckets), parallel requests (leases
that expire, so a crashed process cannot hold a slot), messages per calendar
day. A request takes from every limit or from none; after the call ``finish``
corrects the token buckets by the actual usage and returns the lease.

Modules: ``limits`` (resolution), ``overrides`` (storage and cache), ``core``
(the decision and the Redis failure policy), ``local`` (the per-process
fallback), ``day`` (the calendar day's zone), ``admin`` (operator routes).
"""

from creditgate.throttle.core import (
    POLICIES,
    Admission,
    Check,
    Standing,
    Throttle,
    format_duration,
)
from creditgate.throttle.day import DayZone
from creditgate.throttle.errors import Throttled, ThrottleError, ThrottleUnavailable
from creditgate.throttle.limits import LIMIT_NAMES, Limits, Overrides, resolve
from creditgate.throttle.overrides import LimitsCache

__all__ = [
    "LIMIT_NAMES",
    "POLICIES",
    "Admission",
    "Check",
    "DayZone",
    "Limits",
    "LimitsCache",
    "Overrides",
    "Standing",
    "Throttle",
    "ThrottleError",
    "ThrottleUnavailable",
    "Throttled",
    "format_duration",
    "resolve",
]
