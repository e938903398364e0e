"""Prometheus metrics of the Polar adapter and the webhook receivers.

Same conventions as ``creditgate.metrics``: ``creditgate_`` prefix,
bounded labels only (sources, outcomes, reasons — never an account or event
id). The gauges are set by the one process holding the export (or
reconciliation) lock; ``livemax`` makes a multi-process scrape report that
process's value and forget a dead one's.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

USAGE_PENDING = Gauge(
    "creditgate_polar_usage_pending_events",
    "Settled debits not yet acknowledged by Polar (nor parked).",
    multiprocess_mode="livemax",
)
USAGE_OLDEST_PENDING = Gauge(
    "creditgate_polar_usage_oldest_pending_seconds",
    "Age of the oldest settled debit not yet acknowledged by Polar (0 when none).",
    multiprocess_mode="livemax",
)
USAGE_EXPORTED = Counter(
    "creditgate_polar_usage_exported_total",
    "Usage events Polar acknowledged (inserted or already known).",
)
USAGE_PARKED = Counter(
    "creditgate_polar_usage_parked_total",
    "Usage events Polar refused on their own (422); parked for an operator.",
)
USAGE_EXPORT_FAILURES = Counter(
    "creditgate_polar_usage_export_failures_total",
    "Export rounds that ended without progress, by reason.",
    ["reason"],
)
METER_DRIFT = Gauge(
    "creditgate_polar_meter_drift_units",
    "Units outside the lag and tolerance (Polar's meter quantities by event time vs the"
    " ledger's exported units), summed over customers and hours of the last reconciled window.",
    multiprocess_mode="livemax",
)
METER_DRIFT_ACCOUNTS = Gauge(
    "creditgate_polar_meter_drift_accounts",
    "Customers whose drift exceeded the tolerance after the allowed lag, last reconciled window.",
    multiprocess_mode="livemax",
)
WEBHOOKS = Counter(
    "creditgate_webhooks_total",
    "Webhook deliveries by source and outcome "
    "(queued, duplicate, ignored, refused, processed, failed).",
    ["source", "outcome"],
)
REFUND_DEBT = Counter(
    "creditgate_refund_debt_micros_total",
    "Refunded credits that could not be taken back because they were already spent.",
)
