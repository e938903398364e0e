"""The ledger's commands: migrate, accounts, credits, usage, balance, verify."""

from __future__ import annotations

import argparse
import contextlib
import os
import uuid

import asyncpg

from creditgate import ledger, migrations
from creditgate.cli.db import connected, settings
from creditgate.cli.output import CliError, Outcome
from creditgate.ledger.kinds import AccountKind
from creditgate.logs import log


async def cmd_migrate(args: argparse.Namespace) -> Outcome:
    """Apply migrations as the owner; then grant the application role what serving needs."""
    from creditgate.ledger import partitions, roles

    try:
        target = roles.migrate_target(os.environ)
    except roles.RoleError as e:
        raise CliError("CONFIG_ERROR", str(e)) from None
    async with connected(target.owner_url) as conn:
        try:
            applied = await migrations.migrate(conn)
            if target.app_role is not None:
                await roles.ensure_app_role(conn, target.app_role, target.app_password)
                await roles.grant_app_role(conn, target.app_role)
            made = await partitions.ensure_ahead(conn)
        except migrations.MigrationError as e:
            raise CliError("MIGRATION_ERROR", str(e)) from None
        except asyncpg.InsufficientPrivilegeError as e:
            raise CliError("MIGRATION_ERROR", f"the owner role may not do this: {e}") from None
    return Outcome({"applied": applied, "appRole": target.app_role, "partitionsMade": made})


async def cmd_accounts_create(args: argparse.Namespace) -> Outcome:
    """``accounts create --user|--org ID [--tier T]``: create (or find) an account."""
    config = settings()
    kind: AccountKind = "user" if args.user else "org"
    external_id = args.user or args.org
    if args.tier not in config.config.tiers:
        tiers = ", ".join(sorted(config.config.tiers))
        raise CliError("VALIDATION_ERROR", f"--tier: no tier named {args.tier!r}; tiers: {tiers}")
    async with connected(config.database_url) as conn:
        account = await ledger.ensure_account(conn, kind, external_id, args.tier)
    out = account.as_json()
    del out["status"]
    return Outcome(out)


def check(problems: list[dict[str, str]]) -> None:
    """Raise the first argument problem as a CLI validation error."""
    if problems:
        p = problems[0]
        raise CliError("VALIDATION_ERROR", f"{p['path']}: {p['message']}")


async def cmd_credits_grant(args: argparse.Namespace) -> Outcome:
    """``credits grant ACCOUNT AMOUNT --reason R``: grant (or, negative, adjust) credits."""
    from creditgate.http.admin import admin_idempotency_key, parse_amount, parse_expiry

    problems: list[dict[str, str]] = []
    amount = parse_amount(args.amount, problems, "AMOUNT")
    expires_at = parse_expiry(args.expires_at, amount, problems)
    if not args.reason.strip():
        problems.append({"path": "--reason", "message": "must not be empty"})
    check(problems)
    assert amount is not None
    async with connected(settings().database_url) as conn:
        account = await ledger.resolve_account(conn, args.account)
        posted = await ledger.post_entry(
            conn,
            account_id=account.id,
            amount=amount,
            kind="grant" if amount > 0 else "adjustment",
            idempotency_key=admin_idempotency_key(args.idempotency_key or os.urandom(16).hex()),
            reason=args.reason,
            expires_at=expires_at,
        )
    return Outcome({**posted.as_json(), "replayed": posted.replayed})


async def cmd_accounts_set_overdraft(args: argparse.Namespace) -> Outcome:
    """``accounts set-overdraft ACCOUNT LIMIT``: let available credits go down to -LIMIT."""
    try:
        limit = ledger.credits_to_micros(args.limit)
    except ValueError as e:
        raise CliError("VALIDATION_ERROR", f"LIMIT: {e}") from None
    if limit < 0:
        raise CliError("VALIDATION_ERROR", "LIMIT: must be 0 or more (credits below zero allowed)")
    async with connected(settings().database_url) as conn:
        account = await ledger.resolve_account(conn, args.account)
        await ledger.set_overdraft_limit(conn, account.id, limit)
        bal = await ledger.get_balance(conn, account.id)
    log.info("overdraft limit set", extra={"account_id": str(account.id), "limit_micros": limit})
    return Outcome(
        {
            "accountId": str(account.id),
            "overdraftLimit": ledger.micros_to_credits(limit),
            "overdraftLimitMicros": limit,
            "availableMicros": bal.available,
        }
    )


async def cmd_usage(args: argparse.Namespace) -> Outcome:
    """``usage ACCOUNT``: the account's ledger entries, newest first, a page at a time."""
    from creditgate.http.params import parse_kinds, parse_time

    problems: list[dict[str, str]] = []
    if not 1 <= args.limit <= ledger.history.MAX_PAGE:
        problems.append({"path": "--limit", "message": f"must be 1..{ledger.history.MAX_PAGE}"})
    kinds = parse_kinds(args.kind, ledger.ENTRY_KINDS, problems)
    since = parse_time(args.since, "--since", problems) if args.since else None
    until = parse_time(args.until, "--until", problems) if args.until else None
    check(problems)
    async with connected(settings().database_url) as conn:
        account = await ledger.resolve_account(conn, args.account)
        page = await ledger.list_entries(
            conn,
            account.id,
            limit=args.limit,
            cursor=args.cursor,
            kinds=kinds,
            since=since,
            until=until,
        )
    return Outcome(page.as_json())


async def cmd_accounts_list(args: argparse.Namespace) -> Outcome:
    """``accounts list``: accounts with their balances, by id, a page at a time."""
    if not 1 <= args.limit <= 1000:
        raise CliError("VALIDATION_ERROR", "--limit: must be 1..1000")
    after = None
    if args.cursor:
        try:
            after = uuid.UUID(args.cursor)
        except ValueError:
            raise CliError("VALIDATION_ERROR", "--cursor: not a nextCursor value") from None
    async with connected(settings().database_url) as conn:
        rows = await ledger.list_accounts(conn, args.limit + 1, after)
    page = rows[: args.limit]
    more = len(rows) > args.limit
    return Outcome(
        {
            "accounts": [r.as_json() for r in page],
            "nextCursor": str(page[-1].account.id) if more else None,
        }
    )


async def cmd_accounts_show(args: argparse.Namespace) -> Outcome:
    """``accounts show ACCOUNT``: the account, its balance and its live keys."""
    from creditgate.auth import list_api_keys

    async with connected(settings().database_url) as conn:
        account = await ledger.resolve_account(conn, args.account)
        bal = await ledger.get_balance(conn, account.id)
        keys = await list_api_keys(conn, account.id)
    return Outcome(
        {
            **account.as_json(),
            "balance": bal.as_json(),
            "keys": [k.as_json() for k in keys],
        }
    )


async def cmd_balance(args: argparse.Namespace) -> Outcome:
    """``balance ACCOUNT``: the account's balance."""
    async with connected(settings().database_url) as conn:
        account = await ledger.resolve_account(conn, args.account)
        bal = await ledger.get_balance(conn, account.id)
    return Outcome(bal.as_json())


async def cmd_verify(args: argparse.Namespace) -> Outcome:
    """``verify [--full]``: check the ledger's invariants; exit 1 on any problem.

    By default only what is new since the last checkpoint (the first run is a
    full one); ``--full`` re-reads every entry and hold.
    """
    url = settings().database_url
    # The checkpoint is the owner's to write: through the owner's URL when one
    # is set (the checks themselves run as DATABASE_URL, whose role the
    # report's warnings are about).
    owner_url = os.environ.get("MIGRATE_DATABASE_URL") or os.environ.get("DATABASE_OWNER_URL")
    async with contextlib.AsyncExitStack() as stack:
        conn = await stack.enter_async_context(connected(url))
        writer = None
        if owner_url and owner_url != url:
            writer = await stack.enter_async_context(connected(owner_url))
        if args.full:
            found = await ledger.verify_ledger(conn, checkpoint=True, writer=writer)
        else:
            found = await ledger.verify_incremental(conn, writer=writer)
    # A weaker deployment, not a broken ledger: a warning, the exit code unchanged.
    warnings = [f"{w['warning']} (role {w['role']})" for w in found.warnings]
    if found.ok:
        return Outcome(found.as_json(), warnings=warnings)
    n = len(found.problems)
    error = {"code": "LEDGER_MISMATCH", "message": f"{n} invariant problem(s) found"}
    return Outcome({**found.as_json(), "error": error}, exit_code=1, warnings=warnings)
