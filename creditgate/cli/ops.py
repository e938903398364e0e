"""``doctor`` and ``reconcile``: checks that report a table and exit 1 when something is off.

Also ``prune``: the retention of operational tables, on demand.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

import asyncpg

from creditgate.cli.db import connected, settings
from creditgate.cli.output import CliError, Outcome


async def cmd_reconcile(args: argparse.Namespace) -> Outcome:
    """``reconcile``: Polar's usage meter against the ledger; exit 1 on drift beyond tolerance."""
    from polar import PolarError  # imported here: polar-sdk adds ~0.4 s to every command

    from creditgate.billing.client import make_polar
    from creditgate.billing.reconcile import ReconcileUnavailable, reconcile

    if args.since is not None and args.until is not None and args.until <= args.since:
        raise CliError("VALIDATION_ERROR", "--until must be later than --since")
    config = settings()
    polar = make_polar(config)
    if polar is None:
        raise CliError("CONFIG_ERROR", "POLAR_ACCESS_TOKEN is not set")
    try:
        async with connected(config.database_url) as conn:
            found = await reconcile(
                conn, polar, config.config.polar, since=args.since, until=args.until
            )
    except ReconcileUnavailable as e:
        raise CliError("CONFIG_ERROR", str(e)) from None
    except PolarError as e:
        raise CliError("POLAR_ERROR", f"Polar did not answer as expected: {e}") from None
    finally:
        await polar.__aexit__(None, None, None)
    # Without --json the table alone; with it, the report (and exit 1 on drift).
    return Outcome(found.as_json(), found.as_table(), 0 if found.ok else 1)


async def cmd_doctor(args: argparse.Namespace) -> Outcome:
    """``doctor``: one line per check; exit 1 if any check fails."""
    from creditgate.doctor import run_checks

    checks = await run_checks()
    ok = all(c.status != "fail" for c in checks)
    result = {"ok": ok, "checks": [c.as_json() for c in checks]}
    return Outcome(result, "\n".join(c.line() for c in checks), 0 if ok else 1)


async def cmd_prune(args: argparse.Namespace) -> Outcome:
    """``prune [--dry-run]``: delete operational rows past their ``[retention]`` period."""
    from creditgate.retention import RULES, prune

    config = settings()
    retention = config.config.retention
    async with connected(config.database_url) as conn:
        try:
            counts = await prune(conn, retention, now=datetime.now(UTC), dry_run=args.dry_run)
        except asyncpg.UndefinedTableError:
            raise CliError(
                "CONFIG_ERROR", "the database has no creditgate schema: run `creditgate migrate`"
            ) from None
    verb = "would delete" if args.dry_run else "deleted"
    lines = []
    for rule in RULES:
        days = rule.days(retention)
        if days == 0:
            lines.append(f"{rule.table}: kept forever (retention.{rule.setting} = 0)")
        else:
            lines.append(f"{rule.table}: {verb} {counts[rule.table]} row(s) older than {days} days")
    return Outcome(
        {"dryRun": args.dry_run, "deleted" if not args.dry_run else "wouldDelete": counts},
        "\n".join(lines),
    )
