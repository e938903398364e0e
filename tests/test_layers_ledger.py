"""One posting rule: every ledger write is built by ``creditgate/ledger/posting.py``.

The rule (lock the balance rows first, account_id and balance_after from the
locked row, the balance from the entries inserted, every CHECK column from the
lock) is written once; these tests fail when a write path spells it out again
(a second ``INSERT INTO ledger_entries``) or when a statement built by the
template tries to set what the template owns. The invariants themselves are
checked on the database by tests/test_ledger_property.py (chain and balance
after every step) and ``verify``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import creditgate
from creditgate.ledger import entries, expiry, external, group_commit, holds, reversals
from creditgate.ledger.posting import Entries, posting_statement

PACKAGE = Path(creditgate.__file__).parent
# Whitespace and case as SQL allows them; "INTO" may even be on its own line.
INSERT = re.compile(r"insert\s+into\s+(?:public\s*\.\s*)?\"?ledger_entries\b", re.IGNORECASE)
# The database's own posting: 0008's refund-collection trigger, which runs in
# a statement that already holds the row lock (ARCHITECTURE.md, the ledger).
# Migrations are history (applied, recorded in ledger_guard_definitions), so
# this list only ever shrinks; a new migration may not add a posting.
# 0017 partitions the ledger: it copies the existing rows into the new table
# (values unchanged, no posting) and redefines 0008's refund collection
# (the same posting, now writing its key row first) — no new posting.
SQL_POSTINGS = {"0008_refund_holds_and_guards.sql": 1, "0017_partition_ledger_entries.sql": 2}

GOOD = {
    "id": "$1",
    "kind": "'grant'",
    "amount": "$2::bigint",
    "idempotency_key": "$3",
    "fingerprint": "$4",
}


def _inserts(path: Path) -> int:
    return len(INSERT.findall(path.read_text(encoding="utf-8")))


def test_the_posting_module_holds_the_only_insert_into_ledger_entries() -> None:
    found = {
        str(p.relative_to(PACKAGE)): n
        for p in sorted(PACKAGE.rglob("*.py"))
        if (n := _inserts(p)) and p.name != "posting.py"
    }
    assert found == {}, f"ledger entries inserted outside ledger/posting.py: {found}"
    # The template's own statement, exactly once (its docstring names it in
    # backquotes, which the pattern does not match as SQL).
    assert len(re.findall(r"^\s*INSERT INTO ledger_entries", _posting_source(), re.M)) == 1


def test_no_migration_adds_a_posting_of_its_own() -> None:
    found = {
        p.name: n for p in sorted((PACKAGE / "migrations").glob("*.sql")) if (n := _inserts(p))
    }
    assert found == SQL_POSTINGS


def _posting_source() -> str:
    return (PACKAGE / "ledger" / "posting.py").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "statement",
    [
        holds._SETTLE,
        holds._LATE_DEBIT,
        group_commit._SETTLE_BATCH,
        entries._POST,
        expiry._WRITE_OFF,
        reversals._REVERSE,
        external._RECORD,
    ],
    ids=["settle", "late_debit", "settle_batch", "post", "write_off", "reverse", "record"],
)
def test_every_write_path_runs_the_template(statement: str) -> None:
    # The template's shape: the lock before the insert, the insert before the
    # balance update, balance and balance_after from the locked row.
    lock = statement.index("locked AS (")
    post = statement.index("posted AS (")
    update = statement.index("balanced AS (")
    assert lock < post < update
    assert "FOR UPDATE" in statement[lock:post]
    assert "balance_after)" in statement and "SELECT locked.account_id," in statement
    assert "SET balance = locked.balance + COALESCE(posted_sum.amount, 0)" in statement
    assert "overdraft_limit = locked.overdraft_limit" in statement


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({**GOOD, "account_id": "$9"}, "not a caller's to set"),
        ({**GOOD, "balance_after": "$9"}, "not a caller's to set"),
        ({k: v for k, v in GOOD.items() if k != "fingerprint"}, "missing"),
        ({**GOOD, "kind": "'gift'"}, "unknown entry kind"),
    ],
)
def test_the_template_refuses_to_let_a_caller_break_the_rule(
    values: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        posting_statement(lock_where="account_id = $5", entries=Entries(values), result="SELECT 1")


def test_the_template_owns_the_check_columns_and_running_balances() -> None:
    with pytest.raises(ValueError, match="set by the template"):
        posting_statement(
            lock_where="account_id = $5",
            entries=Entries(GOOD),
            also_set=["overdraft_limit = 0"],
            result="SELECT 1",
        )
    # A skipped conflicting row inside a run would break the running balance_after.
    with pytest.raises(ValueError, match="one entry per account"):
        posting_statement(
            lock_where="account_id = $5",
            entries=Entries(GOOD, source="x", running_order="x.ord", on_conflict_do_nothing=True),
            result="SELECT 1",
        )
