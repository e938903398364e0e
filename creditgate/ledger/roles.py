"""Two database roles: the owner that migrates, the application role that serves.

``creditgate migrate`` connects as the owner (``MIGRATE_DATABASE_URL``, alias
``DATABASE_OWNER_URL``) and, after the migrations, gives the application role
exactly the privileges the code's statements need (``grant_app_role``): it
owns nothing, so it cannot ``ALTER`` a table (disable a trigger), ``TRUNCATE``
or ``UPDATE``/``DELETE`` the money history. The grants are recomputed on every
migrate (revoke all, grant the table below), so tables a later migration adds
are covered and nothing granted by hand lingers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import asyncpg

# Money history and the tables the ledger's invariants live in. Append-only
# tables: read and add, never change (their triggers refuse it too). The
# others are updated only by statements the triggers and CHECKs police.
LEDGER_PRIVILEGES: Mapping[str, str] = {
    "ledger_entries": "SELECT, INSERT",
    # What must be unique across partitions (migration 0017), written with each entry.
    "ledger_entry_keys": "SELECT, INSERT",
    # The partitions made; only the owner (or its partition function) adds one.
    "ledger_partitions": "SELECT",
    "credit_lot_uses": "SELECT, INSERT",
    "ledger_reversals": "SELECT, INSERT",
    "refund_collections": "SELECT, INSERT",
    "usage_records": "SELECT, INSERT",
    "account_balances": "SELECT, INSERT, UPDATE",
    "holds": "SELECT, INSERT, UPDATE",
    "credit_lots": "SELECT, INSERT, UPDATE",
    # What each budgeted key has spent and holds: changed only by the hold statements.
    "key_budget_spend": "SELECT, INSERT, UPDATE",
    "accounts": "SELECT, INSERT, UPDATE",
    "schema_migrations": "SELECT",
    "ledger_guard_definitions": "SELECT",
    # verify's checkpoints: only the owner advances them (ledger/verify.py).
    "verify_checkpoint": "SELECT",
    "verify_account_checkpoints": "SELECT",
}
# Every other table of the schema is operational state (keys, webhook inbox,
# outboxes, preferences, Polar mirrors): full DML, never DDL or TRUNCATE.
OPERATIONAL_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"

# pg_advisory_xact_lock key: the first 8 bytes of sha256("creditgate.roles").
_GRANT_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"creditgate.roles").digest()[:8], "big", signed=True
)
_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class RoleError(Exception):
    """The role configuration cannot be used (bad name, missing user)."""


@dataclass(frozen=True, slots=True)
class MigrateTarget:
    """Where ``creditgate migrate`` connects and which role it grants to."""

    owner_url: str
    app_role: str | None  # None: one-URL deployment, no grants
    app_password: str | None  # used only when the role has to be created


def migrate_target(env: Mapping[str, str]) -> MigrateTarget:
    """Where migrate connects and whom it grants to, from the environment.

    The application role is ``DATABASE_APP_ROLE`` if set, else the user of
    ``DATABASE_URL`` when an owner URL is set and names another user. Without
    an owner URL and without ``DATABASE_APP_ROLE`` it is the one-URL
    deployment: migrate as ``DATABASE_URL``, no grants.
    """
    serve_url = env.get("DATABASE_URL") or None
    owner_url = env.get("MIGRATE_DATABASE_URL") or env.get("DATABASE_OWNER_URL") or serve_url
    if owner_url is None:
        raise RoleError("DATABASE_URL (or MIGRATE_DATABASE_URL) is not set")
    serve_user = serve_password = None
    if serve_url is not None:
        parts = urlsplit(serve_url)
        serve_user = unquote(parts.username) if parts.username else None
        serve_password = unquote(parts.password) if parts.password else None
    role = env.get("DATABASE_APP_ROLE") or None
    if role is None and owner_url != serve_url:
        if serve_user is None:
            raise RoleError(
                "DATABASE_URL names no user: set DATABASE_APP_ROLE to the role creditgate serves as"
            )
        owner_user = urlsplit(owner_url).username
        role = serve_user if serve_user != (unquote(owner_user) if owner_user else None) else None
    if role is not None and not _ROLE_NAME.match(role):
        raise RoleError(
            f"DATABASE_APP_ROLE: a lower-case SQL name ([a-z_][a-z0-9_]*), got {role!r}"
        )
    password = serve_password if role is not None and role == serve_user else None
    return MigrateTarget(owner_url, role, password)


async def ensure_app_role(conn: asyncpg.Connection, role: str, password: str | None) -> bool:
    """Create the login role if it does not exist yet; True if created.

    Needs CREATEROLE (or a superuser) only when it creates. Roles are
    cluster-wide: a concurrent creator of the same name is not an error.
    """
    if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
        return False
    sql = await conn.fetchval(
        "SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE"
        " NOREPLICATION NOBYPASSRLS' || CASE WHEN $2::text IS NULL THEN ''"
        " ELSE format(' PASSWORD %L', $2::text) END, $1::text)",
        role,
        password,
    )
    try:
        await conn.execute(sql)
    except (asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
        # Another session created it between the look and the CREATE (the
        # catalog's unique index can answer before the duplicate check does).
        return False
    return True


async def grant_app_role(conn: asyncpg.Connection, role: str) -> None:
    """Give ``role`` exactly the privileges serving needs here (one transaction)."""
    if not _ROLE_NAME.match(role):
        raise RoleError(f"not a role name creditgate uses: {role!r}")
    async with conn.transaction():
        # Concurrent GRANTs on one object fail ("tuple concurrently updated"):
        # several replicas may migrate at once, so they take turns.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _GRANT_LOCK_KEY)
        schema = await conn.fetchval("SELECT current_schema()")
        database = await conn.fetchval("SELECT current_database()")
        # Partitions get SELECT only: rows are written through their parent,
        # whose privileges PostgreSQL checks; a write grant on a partition
        # would let the role write it around the parent. (Reading one is
        # what verify does to count the DEFAULT partition's rows.)
        rows = await conn.fetch(
            "SELECT t.tablename, c.relispartition FROM pg_tables t"
            " JOIN pg_class c ON c.oid = format('%I.%I', t.schemaname, t.tablename)::regclass"
            " WHERE t.schemaname = $1 ORDER BY t.tablename",
            schema,
        )
        tables = [r["tablename"] for r in rows if not r["relispartition"]]
        partitions = [r["tablename"] for r in rows if r["relispartition"]]
        q_role: str = await conn.fetchval("SELECT quote_ident($1)", role)
        q_schema: str = await conn.fetchval("SELECT quote_ident($1)", schema)
        q_db: str = await conn.fetchval("SELECT quote_ident($1)", database)
        await conn.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA {q_schema} FROM {q_role}")
        await conn.execute(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {q_schema} FROM {q_role}")
        await conn.execute(f"REVOKE ALL ON ALL FUNCTIONS IN SCHEMA {q_schema} FROM {q_role}")
        await conn.execute(f"GRANT CONNECT ON DATABASE {q_db} TO {q_role}")
        await conn.execute(f"GRANT USAGE ON SCHEMA {q_schema} TO {q_role}")
        for table in tables:
            privileges = LEDGER_PRIVILEGES.get(table, OPERATIONAL_PRIVILEGES)
            q_table = await conn.fetchval("SELECT quote_ident($1)", table)
            await conn.execute(f"GRANT {privileges} ON {q_schema}.{q_table} TO {q_role}")
        for table in partitions:
            q_table = await conn.fetchval("SELECT quote_ident($1)", table)
            await conn.execute(f"GRANT SELECT ON {q_schema}.{q_table} TO {q_role}")
        await conn.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {q_schema} TO {q_role}")
        # Partitions made ahead by every server (ledger/partitions.py): the
        # function runs as the owner and only ever adds empty future months.
        # Retention of unbilled holds (migration 0018): the function runs as the
        # owner and deletes only holds that moved no money, ended over 7 days ago.
        for function in (
            "creditgate_ledger_partitions_ahead(integer)",
            "creditgate_prune_unbilled_holds(timestamptz, integer, boolean)",
        ):
            if await conn.fetchval("SELECT to_regprocedure($1) IS NOT NULL", function):
                await conn.execute(f"GRANT EXECUTE ON FUNCTION {q_schema}.{function} TO {q_role}")


def url_as(url: str, role: str) -> str:
    """``url`` as ``role``, without a password (trusted local setups: dev, tests)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{role}@{host}").geturl()
