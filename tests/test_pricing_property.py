"""Pricing by kind of token and by reported cost, as properties over random mixes and prices.

The oracle is written independently of ``proxy.pricing``: prices are read
from their decimal text as exact rationals (credits per million tokens are
µc per token), every kind is priced on its own, and the sum is rounded up
once.
"""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from creditgate.config import ConfigError, Model, parse_config
from creditgate.proxy.pricing import (
    TokenCounts,
    cost_of,
    counts_from_chat_usage,
    recorded_breakdown,
    reported_cost,
    token_series,
    worst_case_micros,
)

KIND_KEYS = ("cached_input_price", "cache_write_price", "audio_input_price", "audio_output_price")

# Prices as an operator writes them: up to 9 decimal places, up to 10,000 credits per 1M tokens.
prices = st.decimals(min_value=0, max_value=10_000, places=9, allow_nan=False)
tokens = st.integers(min_value=0, max_value=2_000_000)


def model_of(table: dict[str, Any]) -> Model:
    """A model through the real parser, so the config's scaling is part of what is tested."""
    raw = {
        "upstreams": {"main": {"base_url": "http://127.0.0.1:9/v1"}},
        "models": {
            "m": {
                "max_output_tokens": 1000,
                "deployments": [{"upstream": "main", "model": "m"}],
                **table,
            }
        },
        "tiers": {
            "free": {
                "requests_per_minute": 1,
                "tokens_per_minute": 1,
                "max_parallel": 1,
                "messages_per_day": 1,
            }
        },
    }
    return parse_config(raw, {}).models["m"]


@st.composite
def price_tables(draw: st.DrawFn) -> dict[str, Decimal]:
    table = {"input_price": draw(prices), "output_price": draw(prices)}
    for key in KIND_KEYS:
        if draw(st.booleans()):
            table[key] = draw(prices)
    return table


@st.composite
def token_mixes(draw: st.DrawFn) -> TokenCounts:
    cached, write, audio_in = draw(tokens), draw(tokens), draw(tokens)
    audio_out, reasoning = draw(tokens), draw(tokens)
    prompt = cached + write + audio_in + draw(tokens)
    completion = audio_out + reasoning + draw(tokens)
    return TokenCounts(
        prompt,
        completion,
        cached,
        write,
        audio_in,
        audio_out,
        reasoning,
        accepted_prediction=draw(st.integers(0, completion)),
        rejected_prediction=draw(st.integers(0, completion)),
    )


def oracle(table: dict[str, Decimal], c: TokenCounts) -> int:
    """ceil(Σ tokens of each kind × its price) µc; an absent kind price is its side's."""
    p = {k: Fraction(v) for k, v in table.items()}
    p_in, p_out = p["input_price"], p["output_price"]
    exact = (
        (c.input - c.cached_input - c.cache_write - c.audio_input) * p_in
        + c.cached_input * p.get("cached_input_price", p_in)
        + c.cache_write * p.get("cache_write_price", p_in)
        + c.audio_input * p.get("audio_input_price", p_in)
        # reasoning and prediction tokens are completion tokens at the output price
        + (c.output - c.audio_output) * p_out
        + c.audio_output * p.get("audio_output_price", p_out)
    )
    return math.ceil(exact)


@settings(max_examples=400, deadline=None)
@given(table=price_tables(), counts=token_mixes())
@example(  # a third of a µc per token: the ceiling is taken once, over the sum
    table={"input_price": Decimal("0.333333333"), "output_price": Decimal("0.000000001")},
    counts=TokenCounts(3, 1),
)
def test_cost_is_the_exact_ceiling_and_never_above_the_hold(
    table: dict[str, Decimal], counts: TokenCounts
) -> None:
    model = model_of(dict(table))
    cost = cost_of(model, counts)
    assert cost == oracle(table, counts)
    # The hold of a call with these totals bounds the charge, whatever the mix of kinds.
    assert cost <= worst_case_micros(model, counts.input, counts.output)


@settings(max_examples=300, deadline=None)
@given(
    table=price_tables(),
    counts=token_mixes(),
    cost=st.decimals(min_value=0, max_value=1000, places=12, allow_nan=False),
    markup=st.decimals(min_value=0, max_value=100, places=6, allow_nan=False),
)
def test_upstream_pricing_charges_the_reported_cost_times_the_markup(
    table: dict[str, Decimal], counts: TokenCounts, cost: Decimal, markup: Decimal
) -> None:
    model = model_of({**table, "pricing": "upstream", "markup": markup})
    reported = TokenCounts(**{**_fields(counts), "reported_cost": cost})
    assert cost_of(model, reported) == math.ceil(Fraction(cost) * Fraction(markup) * 1_000_000)
    # Without a reported cost the table prices the call; a table-priced model ignores one.
    assert cost_of(model, counts) == oracle(table, counts)
    assert cost_of(model_of(dict(table)), reported) == oracle(table, counts)
    recorded = recorded_breakdown(model, reported)
    assert Decimal(str(recorded.pop("upstream_cost"))) == cost
    assert recorded == counts.breakdown()


def _fields(c: TokenCounts) -> dict[str, Any]:
    return {name: getattr(c, name) for name in c.__slots__}


@settings(max_examples=300, deadline=None)
@given(st.decimals(min_value=0, max_value=999_999, places=10, allow_nan=False))
@example(Decimal("0.0004321"))
@example(Decimal("0.1"))
@example(Decimal("123456.123456789"))
def test_a_reported_json_number_is_read_as_the_decimal_the_upstream_wrote(cost: Decimal) -> None:
    text = format(cost, "f")
    significant = len(cost.normalize().as_tuple().digits)
    if significant > 15:  # beyond what a double keeps: not a price any provider reports
        return
    # The JSON number goes through orjson (a float) as every upstream body does.
    parsed = orjson.loads(f'{{"cost": {text}}}'.encode())["cost"]
    assert reported_cost(parsed) == cost
    assert reported_cost(text) == cost  # a string is read as it is


@pytest.mark.parametrize(
    "value",
    [None, True, -0.001, "-1", "abc", float("inf"), float("nan"), 10**7, "1e-50", [], {}],
)
def test_an_unsound_reported_cost_is_ignored(value: Any) -> None:
    assert reported_cost(value) is None


def test_openai_usage_details_are_read_into_their_kinds() -> None:
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 300,
        "total_tokens": 1300,
        "prompt_tokens_details": {"cached_tokens": 600, "audio_tokens": 100},
        "completion_tokens_details": {
            "reasoning_tokens": 200,
            "audio_tokens": 50,
            "accepted_prediction_tokens": 20,
            "rejected_prediction_tokens": 10,
        },
        "cost": 0.0004321,
    }
    counts = counts_from_chat_usage(usage)
    assert counts == TokenCounts(
        1000,
        300,
        cached_input=600,
        audio_input=100,
        audio_output=50,
        reasoning=200,
        accepted_prediction=20,
        rejected_prediction=10,
        reported_cost=Decimal("0.0004321"),
    )
    assert counts.breakdown() == {
        "input": 1000,
        "output": 300,
        "cached_input": 600,
        "audio_input": 100,
        "audio_output": 50,
        "reasoning": 200,
        "accepted_prediction": 20,
        "rejected_prediction": 10,
    }
    # The metric's series partition each total.
    series = token_series(counts)
    assert sum(n for d, _, n in series if d == "input") == 1000
    assert sum(n for d, _, n in series if d == "output") == 300


def test_markup_is_only_for_upstream_pricing() -> None:
    with pytest.raises(ConfigError, match="markup: only applies"):
        model_of({"input_price": 1, "output_price": 1, "markup": Decimal("1.2")})
    with pytest.raises(ConfigError, match="pricing"):
        model_of({"input_price": 1, "output_price": 1, "pricing": "provider"})
    with pytest.raises(ConfigError, match="markup"):
        model_of({"input_price": 1, "output_price": 1, "pricing": "upstream", "markup": -1})
    m = model_of({"input_price": 1, "output_price": 1, "pricing": "upstream"})
    assert m.markup == 1
