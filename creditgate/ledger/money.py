"""Micro-credit arithmetic: the only conversions between credits and µc.

Money is an ``int`` of micro-credits (1 credit = 1,000,000 µc) everywhere
inside creditgate; credits appear only at the edges (API bodies, CLI
arguments), parsed exactly with ``Decimal``.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

MICROS_PER_CREDIT = 1_000_000
# A balance beyond this is a bug or an attack, not a purchase; it also keeps
# every amount exactly representable as a JSON number (2**53).
MAX_MICROS = 10**15


class MoneyError(ValueError):
    """An amount of credits that cannot be represented exactly."""


# The one grammar of an amount written as text: ASCII digits only, no sign
# but "-", no spaces, underscores or exponents (Python's Decimal and int accept
# all of those, and any Unicode digit).
_AMOUNT = re.compile(r"-?[0-9]+(?:\.[0-9]{1,6})?", re.ASCII)
# Longer text is refused before it is parsed: 10**15 µc is 10 integer digits.
_MAX_AMOUNT_CHARS = 40


def credits_to_micros(value: object) -> int:
    """Parse a credit amount into µc, exactly, or raise MoneyError.

    Accepted: a string matching ``-?[0-9]+(\\.[0-9]{1,6})?`` (ASCII), a JSON
    number with at most 6 decimals (an int, or a float through its shortest
    decimal form, ``repr``), or a Decimal (internal callers). Everything else —
    spaces, ``_``, ``+``, exponents, non-ASCII digits, more than 6 decimals —
    is refused, never rounded.
    """
    if isinstance(value, bool):
        raise MoneyError("amount must be a number")
    if isinstance(value, float):
        # A JSON number: its shortest decimal form is what the JSON said (repr
        # writes 0.000015 as 1.5e-05, so no text grammar here); the decimal
        # and size checks below apply. inf/nan never come out of JSON.
        value = Decimal(repr(value))
    elif isinstance(value, str):
        if len(value) > _MAX_AMOUNT_CHARS or _AMOUNT.fullmatch(value) is None:
            raise MoneyError(
                f"{value[:_MAX_AMOUNT_CHARS]!r} is not an amount: write digits,"
                " an optional leading '-' and at most 6 decimals (e.g. \"12.5\")"
            )
    elif not isinstance(value, int | Decimal):
        raise MoneyError("amount must be a number")
    try:
        d = Decimal(value)
    except InvalidOperation:
        raise MoneyError(f"{value!r} is not a number") from None
    if not d.is_finite():
        raise MoneyError("amount must be finite")
    # Exponents past the context's range would overflow (or round to 0) below.
    if not d.is_zero() and not -30 <= d.adjusted() <= 30:
        raise MoneyError(
            "amount is too large" if d.adjusted() > 0 else "amount has more than 6 decimal places"
        )
    micros = d * MICROS_PER_CREDIT
    if micros != micros.to_integral_value():
        raise MoneyError("amount has more than 6 decimal places")
    if abs(micros) > MAX_MICROS:
        raise MoneyError("amount is too large")
    return int(micros)


def micros_to_credits(micros: int) -> int | Decimal:
    """Credits for display: an exact Decimal (an int when whole)."""
    q, r = divmod(micros, MICROS_PER_CREDIT)
    if r == 0:
        return q
    return Decimal(micros).scaleb(-6).normalize()
