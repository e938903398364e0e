"""Which deployment of a model to try first, second, …: priority, then weight.

Deployments are grouped by ``priority`` (lower first; by default each
deployment's position in the config list, so a plain list is tried in order).
Within a group of equal priority the order is a weighted random permutation
(Efraimidis–Spirakis: sort by ``u ** (1 / weight)``), so a deployment with
weight 3 is tried first three times as often as one with weight 1, and every
deployment of the group is still tried before the next priority's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from creditgate.config import Deployment


def attempt_order(
    deployments: Sequence[Deployment], rng: random.Random | None = None
) -> list[Deployment]:
    """The deployments in the order one call tries them."""
    if len(deployments) == 1:
        return [deployments[0]]  # the common case: no randomness, no sorting
    draw = (rng or random).random

    def key(d: Deployment) -> tuple[int, float]:
        # Larger u ** (1/w) first; negate so one ascending sort does both keys.
        return (d.priority, -(draw() ** (1.0 / d.weight)))

    return sorted(deployments, key=key)
