"""The [polar] table and product names: validated at start, the field named."""

from __future__ import annotations

import tomllib
from decimal import Decimal

import pytest

from creditgate.billing.polar_events import Unprocessable, refund_target
from creditgate.config import ConfigError, parse_config
from tests.billing_support import billing_toml


def test_the_test_config_parses_with_its_products() -> None:
    config = parse_config(
        tomllib.loads(billing_toml("http://127.0.0.1:9/v1"), parse_float=Decimal), {}
    )
    pro = next(p for p in config.products.values() if p.kind == "subscription")
    assert (pro.credits_micros, pro.tier, pro.plan_name) == (25_000_000, "pro", "Pro")
    assert config.polar.batch_size == 7


def test_bad_polar_settings_name_the_field() -> None:
    base = billing_toml("http://127.0.0.1:9/v1")
    broken = base.replace('meter_property = "credits"', 'meter_property = "bytes"')
    with pytest.raises(ConfigError, match=r"polar\.meter_property"):
        parse_config(tomllib.loads(broken, parse_float=Decimal), {})
    broken = base.replace("batch_size = 7", "batch_size = 7\nbogus = 1")
    with pytest.raises(ConfigError, match=r"polar\.bogus: unknown field"):
        parse_config(tomllib.loads(broken, parse_float=Decimal), {})
    broken = base.replace('success_url = "https://', 'success_url = "ftp://')
    with pytest.raises(ConfigError, match=r"polar\.success_url"):
        parse_config(tomllib.loads(broken, parse_float=Decimal), {})


@pytest.mark.parametrize(
    ("status", "refunded", "refundable", "expected"),
    [
        ("partially_refunded", 250, 750, 2_500_000),  # a quarter of 10 credits
        ("partially_refunded", 1, 2, 3_333_333),  # rounded down: never more than refunded
        ("refunded", 1000, 0, 10_000_000),
        ("refunded", 0, 0, 10_000_000),  # fully refunded, whatever the amounts say
        ("paid", 0, 1000, 0),
    ],
)
def test_refund_target_is_the_refunded_share(
    status: str, refunded: int, refundable: int, expected: int
) -> None:
    facts = {"status": status, "refunded_amount": refunded, "refundable_amount": refundable}
    assert refund_target(10_000_000, facts) == expected


def test_a_partial_refund_without_amounts_is_never_guessed() -> None:
    """It used to take the whole grant back."""
    with pytest.raises(Unprocessable):
        refund_target(10_000_000, {"status": "partially_refunded"})
