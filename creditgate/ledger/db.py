"""The database handle the ledger functions accept."""

from __future__ import annotations

from typing import TypeAlias

import asyncpg

# A pool (each call takes a connection) or a connection (the caller's
# transaction). Every ledger write is one statement, so either is atomic.
Db: TypeAlias = asyncpg.Pool | asyncpg.Connection
