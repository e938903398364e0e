"""Labelled metric children, looked up once: ``cached_labels(METRIC)(*values)``.

prometheus-client's ``labels()`` validates and joins the values and takes a
lock on every call (~2.4 µs); the hot path records about ten labelled
samples per request. Our label values are bounded (route templates, methods,
statuses, models and deployments from config, fixed outcomes), so the
children are kept in a bounded cache and ``labels()`` runs once per
combination. A cached child is the same object ``labels()`` returns, so what
is exported does not change.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)

MAX_CHILDREN = 4096  # per metric: far above what bounded labels produce


def cached_labels(metric: M) -> Callable[..., M]:
    """``metric.labels`` with its children cached (positional label values only)."""
    return functools.lru_cache(maxsize=MAX_CHILDREN)(metric.labels)
