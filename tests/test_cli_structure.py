"""The CLI's shape: one connection helper, commands that return outcomes, no SQL of its own."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from creditgate.cli.db import connected
from creditgate.cli.output import CliError, Outcome, report
from tests.conftest import Services

CLI = Path(__file__).resolve().parent.parent / "creditgate" / "cli"
_SQL = re.compile(r"\b(SELECT|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM)\b", re.IGNORECASE)


async def test_connected_closes_its_connection_however_the_command_ends(
    services: Services,
) -> None:
    async with connected(services.database_url) as conn:
        first = conn
        assert not conn.is_closed()
    assert first.is_closed()
    with pytest.raises(CliError, match="no such account"):
        async with connected(services.database_url) as conn:
            second = conn
            raise CliError("NOT_FOUND", "no such account")
    assert second.is_closed()


async def test_connected_says_what_is_missing_or_unreachable() -> None:
    with pytest.raises(CliError) as missing:
        async with connected(None):
            pass
    assert (missing.value.code, missing.value.message) == (
        "CONFIG_ERROR",
        "DATABASE_URL is not set",
    )
    with pytest.raises(CliError) as refused:
        async with connected("postgresql://nobody@127.0.0.1:9/none"):
            pass
    assert refused.value.code == "SERVICE_UNAVAILABLE"
    assert refused.value.message.startswith("cannot connect to Postgres")


def test_report_prints_the_outcome_and_returns_its_exit_code(
    capsys: pytest.CaptureFixture[str],
) -> None:
    outcome = Outcome({"ok": False}, "1 check failed", 1, warnings=["weaker role"])
    assert report(argparse.Namespace(json=True), outcome) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ('{"ok":false}\n', "warning: weaker role\n")
    assert report(argparse.Namespace(json=False), outcome) == 1
    assert capsys.readouterr().out == "1 check failed\n"


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(CLI.glob("*.py"))]


def test_commands_return_outcomes_and_leave_exiting_to_main() -> None:
    """No command raises SystemExit or closes a connection itself; operator commands
    are coroutines annotated to return an Outcome."""
    commands = 0
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                raised = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                assert not (isinstance(raised, ast.Name) and raised.id == "SystemExit"), path
            # Opening and closing connections belongs to the db module alone.
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("connect", "close")
                and path.name != "db.py"
            ):
                target = ast.unparse(node.func)
                assert not target.startswith(("asyncpg.", "conn.")), (path, target)
            if isinstance(node, ast.AsyncFunctionDef) and node.name.startswith("cmd_"):
                commands += 1
                assert node.returns is not None and ast.unparse(node.returns) == "Outcome", (
                    path,
                    node.name,
                )
    assert commands >= 14


def test_the_cli_runs_no_sql_and_touches_no_private_attribute() -> None:
    modules = _modules()
    assert len(modules) >= 5  # the package, not one file
    for path, tree in modules:
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not _SQL.search(node.value), (path, node.value)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                assert node.attr.startswith("__"), (path, ast.unparse(node))
