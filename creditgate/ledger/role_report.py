"""What the connected database role may do, for ``creditgate doctor``."""

from __future__ import annotations

from dataclasses import dataclass

from creditgate.ledger.db import Db

# The statements a serving process runs on the ledger; a role lacking one of
# these fails on the first request that needs it, not at start.
_NEEDED = (
    ("accounts", "SELECT"),
    ("accounts", "INSERT"),
    ("account_balances", "UPDATE"),
    ("ledger_entries", "INSERT"),
    ("ledger_entries", "SELECT"),
    ("ledger_entry_keys", "INSERT"),
    ("ledger_entry_keys", "SELECT"),
    ("holds", "INSERT"),
    ("api_keys", "SELECT"),
)


@dataclass(frozen=True, slots=True)
class RoleReport:
    name: str
    superuser: bool
    missing: tuple[str, ...]  # "INSERT on ledger_entries", … the role lacks


async def role_report(db: Db) -> RoleReport:
    """The current role, whether it is a superuser, and the ledger privileges it lacks.

    Tables that do not exist yet (migrations not applied) are not reported
    here: the migrations check says so.
    """
    row = await db.fetchrow(
        "SELECT current_user AS name, rolsuper FROM pg_roles WHERE rolname = current_user"
    )
    assert row is not None
    missing = []
    for table, privilege in _NEEDED:
        allowed = await db.fetchval(
            "SELECT CASE WHEN to_regclass($1) IS NULL THEN NULL"
            " ELSE has_table_privilege($1, $2) END",
            table,
            privilege,
        )
        if allowed is False:
            missing.append(f"{privilege} on {table}")
    return RoleReport(row["name"], bool(row["rolsuper"]), tuple(missing))
