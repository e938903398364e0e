"""The database handle the ledger functions accept."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TypeAlias

import asyncpg

# A pool (each call takes a connection) or a connection. Every hot-path write is
# one statement, so either is atomic; the few multi-statement writes (expiry)
# open their own transaction with ``transaction``.
Db: TypeAlias = asyncpg.Pool | asyncpg.Connection


@contextlib.asynccontextmanager
async def transaction(db: Db) -> AsyncIterator[asyncpg.Connection]:
    """A connection inside a transaction: the pool's (acquired for it) or ``db`` itself."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn, conn.transaction():
            yield conn
    else:
        async with db.transaction():
            yield db


@contextlib.asynccontextmanager
async def connection(db: Db) -> AsyncIterator[asyncpg.Connection]:
    """One connection for several statements: acquired from the pool, or ``db`` itself."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            yield conn
    else:
        yield db
