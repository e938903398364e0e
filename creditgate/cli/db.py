"""The operator commands' settings and database connection, opened and closed in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from creditgate.cli.output import CliError
from creditgate.config import ConfigError, Settings, load_settings


def settings() -> Settings:
    """The environment's settings, or a CONFIG_ERROR naming the field."""
    try:
        return load_settings()
    except ConfigError as e:
        raise CliError("CONFIG_ERROR", str(e)) from None


@asynccontextmanager
async def connected(url: str | None) -> AsyncIterator[asyncpg.Connection]:
    """One connection to Postgres at ``url`` for a command, closed however it ends.

    No URL is a CONFIG_ERROR (DATABASE_URL is not set); a refused connection
    is SERVICE_UNAVAILABLE, in one line rather than a traceback.
    """
    if url is None:
        raise CliError("CONFIG_ERROR", "DATABASE_URL is not set")
    try:
        conn = await asyncpg.connect(url)
    except (OSError, asyncpg.PostgresError) as e:
        raise CliError("SERVICE_UNAVAILABLE", f"cannot connect to Postgres: {e}") from None
    try:
        yield conn
    finally:
        await conn.close()
