"""Small pure pieces: config validation, pricing, SSE splitting, durations, money."""

from __future__ import annotations

import tomllib
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from creditgate.config import ConfigError, load_config, parse_config
from creditgate.ledger.money import MoneyError, credits_to_micros, micros_to_credits
from creditgate.proxy.pricing import cost_micros, estimate_prompt_tokens
from creditgate.proxy.sse import EventSplitter, event_data
from creditgate.throttle import format_duration

GOOD = """
[upstreams.main]
base_url = "http://127.0.0.1:1/v1"
[models.m]
input_price = 0.15
output_price = 0.6
max_output_tokens = 10
deployments = [{ upstream = "main", model = "x" }]
[tiers.free]
requests_per_minute = 1
tokens_per_minute = 1
max_parallel = 1
messages_per_day = 1
"""


def parse(text: str, env: dict[str, str] | None = None):
    return parse_config(tomllib.loads(text, parse_float=Decimal), env or {})


def test_example_and_dev_configs_load() -> None:
    assert "mock-model" in load_config(None, {}).models
    assert load_config("creditgate.example.toml", {}).tiers["free"].requests_per_minute == 20


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (("input_price = 0.15", 'input_price = "cheap"'), "models.m.input_price"),
        (("input_price = 0.15", "input_price = -1"), "models.m.input_price"),
        (("input_price = 0.15", "input_price = 0.0000000001"), "models.m.input_price"),
        (("max_output_tokens = 10", "max_output_tokens = 0"), "models.m.max_output_tokens"),
        (('upstream = "main"', 'upstream = "nope"'), "models.m.deployments[0].upstream"),
        (("[tiers.free]", "[tiers.paid]"), "tiers.free"),
        (("max_parallel = 1", "max_parallel = true"), "tiers.free.max_parallel"),
        (('base_url = "http', 'base_url = "ftp'), "upstreams.main.base_url"),
        (("max_parallel = 1", "max_parallel = 1\nspeed = 3"), "tiers.free.speed"),
    ],
)
def test_bad_config_names_the_field(change: tuple[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(GOOD.replace(*change))
    assert str(exc.value).startswith(field)


def test_upstream_base_url_env_overrides_main() -> None:
    cfg = parse(GOOD, {"UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1/"})
    assert cfg.models["m"].deployments[0].upstream.base_url == "http://127.0.0.1:9/v1"


def test_cost_is_exact_ceiling() -> None:
    m = parse(GOOD).models["m"]
    # 3·0.15 + 7·0.6 = 4.65 → 5 µc
    assert cost_micros(m, 3, 7) == 5
    assert cost_micros(m, 0, 0) == 0
    # 20·0.15 = 3 exactly: no rounding up of an exact value
    assert cost_micros(m, 20, 0) == 3


@given(st.integers(0, 10**7), st.integers(0, 10**7))
def test_cost_matches_fraction_arithmetic(i: int, o: int) -> None:
    import math
    from fractions import Fraction

    m = parse(GOOD).models["m"]
    assert cost_micros(m, i, o) == math.ceil(i * Fraction("0.15") + o * Fraction("0.6"))


def test_prompt_estimate() -> None:
    msgs = [
        {"role": "user", "content": "abcdefg"},
        {"role": "user", "content": [{"type": "text", "text": "é"}]},
    ]
    # An upper bound: one token per UTF-8 byte, + 8 per message.
    assert estimate_prompt_tokens(msgs) == (7 + 8) + (2 + 8)


@given(st.lists(st.binary(min_size=0, max_size=40), max_size=20), st.sampled_from([b"\n", b"\r\n"]))
def test_splitter_reassembles_events_cut_anywhere(cuts: list[bytes], eol: bytes) -> None:
    events = [b"data: " + str(i).encode() + eol + eol for i in range(5)]
    stream = b"".join(events)
    # cut the stream at arbitrary points
    points = sorted({len(c) % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    splitter = EventSplitter()
    got = [e for p in pieces for e in splitter.feed(p)]
    assert got == events
    assert [event_data(e) for e in got] == [str(i).encode() for i in range(5)]
    assert splitter.rest() == b""


def test_event_data_forms() -> None:
    assert event_data(b": keep-alive\n\n") is None
    assert event_data(b"data:x\ndata: y\n\n") == b"x\ny"


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (20, "20ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (360_000, "6m0s"),
        (3_600_000, "1h0m0s"),
        (61_010, "1m1.01s"),
    ],
)
def test_durations_like_openai(ms: int, text: str) -> None:
    assert format_duration(ms) == text


def test_money_parsing_is_exact() -> None:
    assert credits_to_micros("0.000001") == 1
    assert credits_to_micros(12.5) == 12_500_000
    assert credits_to_micros(0.1) == 100_000
    assert credits_to_micros(-3) == -3_000_000
    for bad in ("0.0000001", "abc", True, None, float("nan"), "1e20"):
        with pytest.raises(MoneyError):
            credits_to_micros(bad)
    assert micros_to_credits(1_500_000) == Decimal("1.5")
    assert micros_to_credits(2_000_000) == 2


@pytest.mark.parametrize("text", ["1e999999", "-1e999999", "1e-999999999", "1E+31"])
def test_credit_amounts_beyond_decimals_range_are_refused_not_crashed(text: str) -> None:
    with pytest.raises(MoneyError):
        credits_to_micros(text)


@pytest.mark.parametrize(
    "text",
    [
        " 5 ",
        "5 ",
        "1_000",
        "１２",
        "٣",
        "1e3",
        "1E3",
        "+5",
        "5.",
        ".5",
        "0x10",
        "1.1234567",
        "Infinity",
        "NaN",
        "",
        "-",
        "5\x00",
        "1" * 41,
    ],
)
def test_an_amount_as_text_has_one_grammar(text: str) -> None:
    # Decimal() and int() accept spaces, "_", exponents and any Unicode digit;
    # an amount accepts -?[0-9]+(.[0-9]{1,6})? only.
    with pytest.raises(MoneyError):
        credits_to_micros(text)


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        ("5", 5_000_000),
        ("-1.5", -1_500_000),
        ("007", 7_000_000),
        ("0.000001", 1),
        (0.000015, 15),
        (1000.0, 1_000_000_000),
        (3, 3_000_000),
    ],
)
def test_amounts_in_the_grammar_and_json_numbers_parse_exactly(value: object, micros: int) -> None:
    assert credits_to_micros(value) == micros


@pytest.mark.parametrize("value", [1e-7, 0.0000015, 1.2345678, float("nan"), float("inf"), True])
def test_a_json_number_past_six_decimals_or_not_finite_is_refused(value: object) -> None:
    # JSON numbers follow the text grammar: at most 6 decimals, finite, never a bool.
    with pytest.raises(MoneyError):
        credits_to_micros(value)


def test_a_polar_time_that_is_not_iso_8601_is_unprocessable() -> None:
    from creditgate.billing.polar_events import Unprocessable, _ts

    assert _ts("2026-01-31T12:00:00Z") is not None and _ts(None) is None
    with pytest.raises(Unprocessable):
        _ts("yesterday")
