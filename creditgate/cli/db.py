"""The operator commands' settings and database connection, opened and closed in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import asyncpg

from creditgate.cli.output import CliError
from creditgate.config import ConfigError, Settings, load_settings

DB_CONNECT_TIMEOUT = 10.0  # seconds serve waits for Postgres at start


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


async def database_problem(url: str) -> str | None:
    """None if Postgres at ``url`` answers, else a one-line description and fix.

    The message names host and port, never the URL (it may hold a password).
    """
    try:
        parts = urlsplit(url)
        where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
    except ValueError:
        return "DATABASE_URL is not a valid URL: postgresql://USER:PASSWORD@HOST:5432/DB"
    try:
        conn = await asyncpg.connect(url, timeout=DB_CONNECT_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        reason = type(e).__name__ if isinstance(e, TimeoutError) else str(e).splitlines()[0]
        return (
            f"cannot connect to the database at {where} ({reason}):"
            " check DATABASE_URL and that Postgres is running and reachable"
        )
    await conn.close()
    return None
