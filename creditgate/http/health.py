"""``GET /health`` (the process is up) and ``GET /ready`` (it can serve)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from creditgate import migrations
from creditgate.http.state import STATE
from creditgate.webkit.envelope import json_response
from creditgate.webkit.openapi import Endpoint, obj


async def health(request: web.Request) -> web.Response:
    """Liveness: answers while the event loop runs; touches nothing else."""
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: Postgres answers with every migration applied, and Redis answers."""
    st = request.app[STATE]
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(2):
            async with st.db.acquire() as conn:
                todo = await migrations.pending(conn)
        checks["postgres"] = "ok"
        checks["migrations"] = "ok" if not todo else f"pending: {', '.join(todo)}"
    except Exception:  # any failure means "not ready", never a 500
        checks["postgres"] = "unavailable"
    try:
        async with asyncio.timeout(1):
            await st.redis.ping()
        checks["redis"] = "ok"
    except Exception:
        checks["redis"] = "unavailable"
    ok = all(v == "ok" for v in checks.values())
    return json_response(
        {"status": "ready" if ok else "not ready", "checks": checks}, status=200 if ok else 503
    )


ENDPOINTS = (
    Endpoint(
        "GET",
        "/health",
        health,
        "Liveness",
        "operations",
        "none",
        response=obj({"status": {"const": "ok"}}, "status"),
        envelope=False,
    ),
    Endpoint(
        "GET",
        "/ready",
        ready,
        "Readiness: Postgres with every migration applied, and Redis",
        "operations",
        "none",
        response=obj(
            {"status": {"enum": ["ready", "not ready"]}, "checks": {"type": "object"}},
            "status",
            "checks",
        ),
        also=(503,),
        envelope=False,
    ),
)
