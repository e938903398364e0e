"""The ``/metrics`` route (Prometheus exposition).

The catalogue itself is ``creditgate.metrics`` (below every layer that
records it); its names are re-exported here for existing imports.
"""

from __future__ import annotations

import hmac
import os

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from creditgate.errors import Unauthorized
from creditgate.metrics import (
    CONNECTIONS_REFUSED as CONNECTIONS_REFUSED,
)
from creditgate.metrics import (
    CREDITS_CHARGED as CREDITS_CHARGED,
)
from creditgate.metrics import (
    CREDITS_EXPIRED as CREDITS_EXPIRED,
)
from creditgate.metrics import (
    HOLDS_ACTIVE as HOLDS_ACTIVE,
)
from creditgate.metrics import (
    HOLDS_EXPIRED as HOLDS_EXPIRED,
)
from creditgate.metrics import (
    HTTP_LATENCY as HTTP_LATENCY,
)
from creditgate.metrics import (
    HTTP_REQUESTS as HTTP_REQUESTS,
)
from creditgate.metrics import (
    LEDGER_LATENCY as LEDGER_LATENCY,
)
from creditgate.metrics import (
    PROXY_OVERHEAD as PROXY_OVERHEAD,
)
from creditgate.metrics import (
    REDIS_DEGRADED as REDIS_DEGRADED,
)
from creditgate.metrics import (
    STREAM_ENDS as STREAM_ENDS,
)
from creditgate.metrics import (
    THROTTLE_DECISIONS as THROTTLE_DECISIONS,
)
from creditgate.metrics import (
    TOKENS as TOKENS,
)
from creditgate.metrics import (
    UPSTREAM_DURATION as UPSTREAM_DURATION,
)
from creditgate.metrics import (
    UPSTREAM_FIRST_BYTE as UPSTREAM_FIRST_BYTE,
)
from creditgate.metrics import (
    UPSTREAM_REQUESTS as UPSTREAM_REQUESTS,
)
from creditgate.webkit.openapi import Endpoint


async def metrics_route(request: web.Request) -> web.Response:
    """Prometheus exposition; requires ``METRICS_TOKEN`` as a bearer token when set."""
    from creditgate.http.state import STATE

    token = request.app[STATE].settings.metrics_token
    if token is not None:
        supplied = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not supplied.isascii() or not hmac.compare_digest(supplied.encode(), token.encode()):
            raise Unauthorized("The metrics endpoint requires its bearer token.")
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        # Under `serve --workers N`: the sum over every worker, whichever answers.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest()
    resp = web.Response(body=body)
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return resp


ENDPOINTS = (
    Endpoint(
        "GET",
        "/metrics",
        metrics_route,
        "Prometheus exposition (bearer METRICS_TOKEN when set)",
        "operations",
        "metrics",
        response={"type": "string"},
        envelope=False,
        media="text/plain",
        errors=(401,),
    ),
)
