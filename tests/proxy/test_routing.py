"""Deployments from config, and the order one call tries them in."""

from __future__ import annotations

import random
import tomllib
from collections import Counter
from decimal import Decimal

import pytest

from creditgate.config import ConfigError, load_config, parse_config
from creditgate.proxy.routing import attempt_order

BASE = """
[upstreams.a]
base_url = "http://127.0.0.1:1/v1"
[upstreams.b]
base_url = "http://127.0.0.1:2/v1"
[tiers.free]
requests_per_minute = 1
tokens_per_minute = 1
max_parallel = 1
messages_per_day = 1
[models.m]
input_price = 1
output_price = 1
max_output_tokens = 10
"""


def model(deployments: str, extra: str = ""):
    text = BASE + f"deployments = {deployments}\n{extra}"
    return parse_config(tomllib.loads(text, parse_float=Decimal), {}).models["m"]


def test_defaults_keep_the_list_order_and_name_by_upstream() -> None:
    m = model('[{ upstream = "a", model = "x" }, { upstream = "b", model = "y" }]')
    assert [(d.name, d.priority, d.weight) for d in m.deployments] == [("a", 0, 1), ("b", 1, 1)]
    rng = random.Random(1)
    assert all([d.name for d in attempt_order(m.deployments, rng)] == ["a", "b"] for _ in range(50))
    assert m.max_messages == 2048 and m.public and m.max_tokens_field == "max_tokens"


def test_priority_orders_groups_and_weight_shares_first_attempts() -> None:
    m = model(
        """[
        { upstream = "a", model = "x", name = "a1", priority = 1, weight = 3 },
        { upstream = "a", model = "x", name = "a2", priority = 1, weight = 1 },
        { upstream = "b", model = "y", name = "b1", priority = 2 },
        { upstream = "b", model = "z", name = "b0", priority = 0 },
    ]"""
    )
    rng = random.Random(7)
    firsts: Counter[str] = Counter()
    for _ in range(4000):
        order = [d.name for d in attempt_order(m.deployments, rng)]
        assert order[0] == "b0" and order[3] == "b1"  # priorities, lowest first
        assert sorted(order[1:3]) == ["a1", "a2"]  # the whole group before the next
        firsts[order[1]] += 1
    share = firsts["a1"] / 4000
    assert 0.72 < share < 0.78, share  # weight 3 of 4 (uniform would be 0.5)


@pytest.mark.parametrize(
    ("deployments", "extra", "field"),
    [
        (
            # Two models on one upstream get derived names (issue 16); the same
            # model twice there still needs names.
            '[{ upstream = "a", model = "x" }, { upstream = "a", model = "x" }]',
            "",
            "deployments[1].name",
        ),
        ('[{ upstream = "a", model = "x", weight = 0 }]', "", "deployments[0].weight"),
        ('[{ upstream = "a", model = "x", priority = "high" }]', "", "deployments[0].priority"),
        ('[{ upstream = "a", model = "x", region = "eu" }]', "", "deployments[0].region"),
        ("[]", "", "deployments"),
        ('[{ upstream = "a", model = "x" }]', "max_messages = 0", "max_messages"),
        ('[{ upstream = "a", model = "x" }]', 'public = "yes"', "public"),
        ('[{ upstream = "a", model = "x" }]', 'max_tokens_field = "limit"', "max_tokens_field"),
        ('[{ upstream = "a", model = "x" }]', "timeouts = { idle = 0 }", "timeouts.idle"),
    ],
)
def test_bad_model_config_names_the_field(deployments: str, extra: str, field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        model(deployments, extra)
    assert str(exc.value).startswith(f"models.m.{field}"), str(exc.value)


def test_the_example_config_documents_a_routed_model() -> None:
    config = load_config("creditgate.example.toml", {})
    routed = [m for m in config.models.values() if len(m.deployments) > 1]
    assert routed, "the example should show fallback and weights"
    assert any(d.weight > 1 for m in routed for d in m.deployments)
