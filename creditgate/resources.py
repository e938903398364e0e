"""The narrow view of the application's state that route modules below ``http/`` use.

``http.state.State`` (the outermost layer) satisfies it; ``http.app`` stores
the same object under ``RESOURCES`` too, so billing, webhooks, notify and the
throttle's admin routes read the settings and the pool without importing
``http/`` (the import rule in ARCHITECTURE.md).
"""

from __future__ import annotations

from typing import Protocol

import asyncpg
from aiohttp import web

from creditgate.config import Settings


class Resources(Protocol):
    """What those routes and workers need: the settings and the database pool."""

    @property
    def settings(self) -> Settings:
        """The validated settings."""
        ...

    @property
    def db(self) -> asyncpg.Pool:
        """The serving pool (made at the app's start)."""
        ...


RESOURCES: web.AppKey[Resources] = web.AppKey("creditgate.resources")
