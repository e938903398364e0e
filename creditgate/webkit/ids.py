"""Request and correlation ids (DESIGN.md §9)."""

from __future__ import annotations

import re
import uuid

from aiohttp import web

_WELL_FORMED = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def pick_id(supplied: str | None) -> str:
    """The supplied id when well-formed (1–128 of ``[A-Za-z0-9._:-]``), else a new UUID."""
    if supplied is not None and _WELL_FORMED.fullmatch(supplied):
        return supplied
    return str(uuid.uuid4())


# What the middleware and handlers store on a request.
REQUEST_ID = web.RequestKey("request_id", str)
CORRELATION_ID = web.RequestKey("correlation_id", str)
ACCOUNT_ID = web.RequestKey("account_id", uuid.UUID)
RESPONSE_STARTED = web.RequestKey("response_started", bool)
STARTED = web.RequestKey("started", float)  # time.perf_counter() when the request arrived
