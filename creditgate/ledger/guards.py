"""The database's guards of the ledger: which triggers, as installed, and who may change them.

Append-only is enforced by triggers; a role that owns the tables (or a
superuser) can disable or replace them. So:

* the migration runner records each guard trigger's definition and its
  function's (``record_definitions``, in the transaction of every migration
  it applies) and ``verify`` compares the live ones against that record;
* ``serving_role_warnings`` says when the role a process connects as could
  change them itself — the one-URL deployment, which keeps working but is
  told about it at start (``creditgate serve``) and in ``verify``'s report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from creditgate.ledger.db import Db

# The triggers the invariants rest on: disabled, dropped or replaced, the
# database would no longer refuse what it must.
REQUIRED_TRIGGERS = (
    ("ledger_entries", "ledger_entries_append_only"),
    ("ledger_entries", "ledger_entries_no_truncate"),
    ("ledger_entries", "ledger_entries_allocate_lots"),
    # Migration 0017: the keys that make an entry unique for all time.
    ("ledger_entry_keys", "ledger_entry_keys_append_only"),
    ("ledger_entry_keys", "ledger_entry_keys_no_truncate"),
    ("holds", "holds_end_once"),
    ("holds", "holds_no_delete"),
    ("holds", "holds_no_truncate"),
    ("accounts", "accounts_balance_row"),
    ("account_balances", "account_balances_collect_refund"),
    ("credit_lots", "credit_lots_only_shrink"),
    ("credit_lots", "credit_lots_no_delete"),
    ("credit_lots", "credit_lots_no_truncate"),
    ("credit_lot_uses", "credit_lot_uses_append_only"),
    ("credit_lot_uses", "credit_lot_uses_no_truncate"),
    ("ledger_reversals", "ledger_reversals_append_only"),
    ("ledger_reversals", "ledger_reversals_no_truncate"),
    ("refund_collections", "refund_collections_append_only"),
    ("refund_collections", "refund_collections_no_truncate"),
    ("usage_records", "usage_records_append_only"),
    ("usage_records", "usage_records_no_truncate"),
)
TRIGGER_ARGS = ([t for t, _ in REQUIRED_TRIGGERS], [n for _, n in REQUIRED_TRIGGERS])

# The live definition of each required trigger that exists.
_LIVE = """
SELECT want.tbl AS table_name, want.name AS trigger_name,
       pg_get_triggerdef(t.oid) AS trigger_definition,
       pg_get_functiondef(t.tgfoid) AS function_definition
FROM unnest($1::text[], $2::text[]) AS want(tbl, name)
JOIN pg_trigger t ON t.tgname = want.name AND t.tgrelid = to_regclass(want.tbl)
"""

# verify: a required trigger that is missing, not enabled in the normal way
# ('O'; 'D' is disabled, 'R' fires only under session_replication_role =
# replica, 'A' is not what the migrations installed), or whose definition or
# function differs from what the migrations recorded.
CHANGED_TRIGGERS_SQL = """
SELECT want.tbl AS table_name, want.name AS trigger_name,
       CASE WHEN t.oid IS NULL THEN 'missing'
            WHEN t.tgenabled <> 'O' THEN 'not enabled (tgenabled = ' || t.tgenabled::text || ')'
            WHEN g.trigger_name IS NULL THEN 'no recorded definition (run creditgate migrate)'
            WHEN pg_get_triggerdef(t.oid) <> g.trigger_definition THEN 'trigger replaced'
            ELSE 'function replaced'
       END AS state
FROM unnest($1::text[], $2::text[]) AS want(tbl, name)
LEFT JOIN pg_trigger t ON t.tgname = want.name AND t.tgrelid = to_regclass(want.tbl)
LEFT JOIN ledger_guard_definitions g ON g.table_name = want.tbl AND g.trigger_name = want.name
WHERE t.oid IS NULL OR t.tgenabled <> 'O' OR g.trigger_name IS NULL
   OR pg_get_triggerdef(t.oid) <> g.trigger_definition
   OR pg_get_functiondef(t.tgfoid) <> g.function_definition
LIMIT $3
"""


async def record_definitions(conn: asyncpg.Connection) -> None:
    """Record the guard triggers as they are now (the runner, in a migration's transaction)."""
    if not await conn.fetchval("SELECT to_regclass('ledger_guard_definitions') IS NOT NULL"):
        return  # before migration 0008
    await conn.execute("DELETE FROM ledger_guard_definitions")
    await conn.execute(
        "INSERT INTO ledger_guard_definitions"
        " (table_name, trigger_name, trigger_definition, function_definition) " + _LIVE,
        *TRIGGER_ARGS,
    )


@dataclass(frozen=True, slots=True)
class RoleWarning:
    message: str  # static: safe as a log message
    role: str
    tables: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"warning": self.message, "role": self.role, "tables": list(self.tables)}


SUPERUSER = (
    "the serving role is a superuser: it can disable or replace the ledger's append-only"
    " triggers; serve with an application role (docs/operations.md#database-roles)"
)
OWNER = (
    "the serving role owns ledger tables (or can act as their owner, or truncate them): it"
    " can disable or replace the append-only triggers; serve with an application role"
    " (docs/operations.md#database-roles)"
)


async def serving_role_warnings(db: Db) -> list[RoleWarning]:
    """What the connected role could do to the guards itself (empty for an application role)."""
    row = await db.fetchrow(
        """
        SELECT current_user AS role,
               (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser,
               ARRAY(SELECT DISTINCT want.tbl
                     FROM unnest($1::text[]) AS want(tbl)
                     JOIN pg_class c ON c.oid = to_regclass(want.tbl)
                     WHERE pg_has_role(current_user, c.relowner, 'MEMBER')
                        OR has_table_privilege(c.oid, 'TRUNCATE')
                        OR has_table_privilege(c.oid, 'TRIGGER')
                     ORDER BY want.tbl) AS owned
        """,
        TRIGGER_ARGS[0],
    )
    assert row is not None
    if row["superuser"]:
        return [RoleWarning(SUPERUSER, row["role"])]
    if row["owned"]:
        return [RoleWarning(OWNER, row["role"], tuple(row["owned"]))]
    return []
