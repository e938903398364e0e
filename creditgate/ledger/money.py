"""Micro-credit arithmetic: the only conversions between credits and µc.

Money is an ``int`` of micro-credits (1 credit = 1,000,000 µc) everywhere
inside creditgate; credits appear only at the edges (API bodies, CLI
arguments), parsed exactly with ``Decimal``.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

MICROS_PER_CREDIT = 1_000_000
# A balance beyond this is a bug or an attack, not a purchase; it also keeps
# every amount exactly representable as a JSON number (2**53).
MAX_MICROS = 10**15


class MoneyError(ValueError):
    """An amount of credits that cannot be represented exactly."""


def credits_to_micros(value: object) -> int:
    """Parse a credit amount (int, Decimal, or decimal string) into µc, exactly.

    Floats are accepted only through their shortest decimal form (``repr``),
    which is what the JSON text said; more than 6 decimals is refused, never
    rounded.
    """
    if isinstance(value, bool):
        raise MoneyError("amount must be a number")
    if isinstance(value, float):
        value = repr(value)
    if not isinstance(value, int | str | Decimal):
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
