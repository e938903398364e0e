"""Prometheus metrics: the catalogue, and ``cached_labels`` to record them cheaply.

Below every layer that records them (ledger, throttle, proxy, http), so
recording a sample never imports the web layer. The ``/metrics`` route that
exports them lives in ``http.metrics``. Names are prefixed ``creditgate_``;
labels are bounded (route templates, models from config, outcomes) — never a
user, key or account id.

``cached_labels(METRIC)(*values)``: prometheus-client's ``labels()``
validates and joins the values and takes a lock on every call (~2.4 µs); the
hot path records about ten labelled samples per request. Our label values are
bounded, so the children are kept in a bounded cache and ``labels()`` runs
once per combination. A cached child is the same object ``labels()``
returns, so what is exported does not change.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)

HTTP_REQUESTS = Counter(
    "creditgate_http_requests_total",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
CONNECTIONS_REFUSED = Counter(
    "creditgate_http_connections_refused_total",
    "Connections answered 503 and closed at once: the process had [http] max_connections open.",
)
HTTP_LATENCY = Histogram(
    "creditgate_http_request_duration_seconds",
    "Time from request to the last byte of the response.",
    ["route", "method"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_REQUESTS = Counter(
    "creditgate_upstream_requests_total",
    "Upstream calls by model, deployment and outcome.",
    ["model", "deployment", "outcome"],
)
UPSTREAM_FIRST_BYTE = Histogram(
    "creditgate_upstream_first_byte_seconds",
    "Time to the upstream's response headers (time to first token for streams).",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_DURATION = Histogram(
    "creditgate_upstream_duration_seconds",
    "Time a completion spent waiting on the upstream (streams: until its last event).",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
PROXY_OVERHEAD = Histogram(
    "creditgate_proxy_overhead_seconds",
    "Time creditgate added to a completion: its whole duration minus the upstream wait.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1),
)
HOLDS_ACTIVE = Gauge(
    "creditgate_holds_active",
    "Holds not yet ended (calls in flight, or left by a dead process until they expire).",
    multiprocess_mode="livemax",
)
STREAM_ENDS = Counter(
    "creditgate_stream_ends_total",
    "Streamed completions by model and how they ended: done, client_gone,"
    " idle_timeout, total_timeout, read_error, eof, malformed, error_event.",
    ["model", "end"],
)
TOKENS = Counter(
    "creditgate_tokens_total",
    "Tokens charged, by model, direction (input/output) and kind: input text, cached,"
    " cache_write, audio; output text, audio, reasoning. A direction's kinds add up to"
    " its total.",
    ["model", "direction", "kind"],
)
CREDITS_CHARGED = Counter(
    "creditgate_credits_charged_micros_total",
    "Micro-credits debited for completions, by model.",
    ["model"],
)
THROTTLE_DECISIONS = Counter(
    "creditgate_throttle_decisions_total",
    "Throttle decisions by the limit that decided and the result.",
    ["limit", "result"],
)
HOLDS_EXPIRED = Counter(
    "creditgate_holds_expired_total",
    "Holds released by the sweeper after their expiry (a process died mid-call).",
)
CREDITS_EXPIRED = Counter(
    "creditgate_credits_expired_micros_total",
    "Micro-credits of granted lots written off at their expiry.",
)
LEDGER_LATENCY = Histogram(
    "creditgate_ledger_operation_seconds",
    "Ledger statement latency by operation.",
    ["operation"],
    buckets=_LATENCY_BUCKETS,
)
REDIS_DEGRADED = Gauge(
    "creditgate_throttle_degraded",
    "1 while Redis is unreachable and the throttle runs on its fallback policy.",
    multiprocess_mode="max",
)


M = TypeVar("M", bound=MetricWrapperBase)

MAX_CHILDREN = 4096  # per metric: far above what bounded labels produce


def cached_labels(metric: M) -> Callable[..., M]:
    """``metric.labels`` with its children cached (positional label values only)."""
    return functools.lru_cache(maxsize=MAX_CHILDREN)(metric.labels)
