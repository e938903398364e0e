"""``keys`` and ``limits``: an account's API keys and the throttle limits of it or a key."""

from __future__ import annotations

import argparse
import uuid

from creditgate import ledger
from creditgate.cli.db import connected, settings
from creditgate.cli.output import CliError, Outcome
from creditgate.config import LIMIT_NAMES, LimitName
from creditgate.logs import log


def _budget_args(args: argparse.Namespace, current: object = None) -> tuple[int | None, str | None]:
    """``--budget CREDITS|none`` and ``--period day|week|month|lifetime`` as
    (µc or None, period or None), through the API's own rules (``parse_budget``)."""
    from creditgate.http.keys import BudgetChange, parse_budget

    body: dict[str, object] = {}
    if args.budget is not None:
        body["budget"] = None if args.budget == "none" else args.budget
    if args.period is not None:
        body["budgetPeriod"] = None if args.period == "lifetime" else args.period
    problems: list[dict[str, str]] = []
    base = current if isinstance(current, BudgetChange) else None
    change = parse_budget(body, problems, current=base)
    if problems or change is None:
        flags = {"budget": "--budget", "budgetPeriod": "--period"}
        text = "; ".join(f"{flags.get(p['path'], p['path'])}: {p['message']}" for p in problems)
        raise CliError("VALIDATION_ERROR", text)
    return change.budget, change.period


async def cmd_keys_create(args: argparse.Namespace) -> Outcome:
    """``keys create ACCOUNT [--budget CREDITS --period P]``: a new API key (its
    secret shown this once), optionally with a spending budget."""
    from creditgate.auth import create_api_key

    budget, period = _budget_args(args)
    async with connected(settings().database_url) as conn:
        account = await ledger.resolve_account(conn, args.account)
        key = await create_api_key(
            conn,
            account.id,
            args.name,
            scope="admin" if args.admin else args.scope,
            budget=budget,
            budget_period=period,
        )
    return Outcome(key.as_json())


async def cmd_keys_list(args: argparse.Namespace) -> Outcome:
    """``keys list ACCOUNT``: the account's live keys (never their secrets), with
    each budget's spent, reserved and reset time."""
    from creditgate.auth import list_api_keys

    config = settings()
    async with connected(config.database_url) as conn:
        account = await ledger.resolve_account(conn, args.account)
        keys = await list_api_keys(conn, account.id, budget_zone=config.config.throttle.day_zone)
    return Outcome({"accountId": str(account.id), "keys": [k.as_json() for k in keys]})


async def cmd_keys_budget(args: argparse.Namespace) -> Outcome:
    """``keys budget KEY_ID [--budget CREDITS|none] [--period P|lifetime]``: change
    any key's budget (an option left out keeps its value); shows the key after."""
    from creditgate.auth import get_api_key
    from creditgate.http.keys import BudgetChange

    key_id = _key_id(args.key_id)
    if args.budget is None and args.period is None:
        raise CliError("VALIDATION_ERROR", "name --budget and/or --period")
    config = settings()
    zone = config.config.throttle.day_zone
    async with connected(config.database_url) as conn:
        found = await get_api_key(conn, key_id, budget_zone=zone)
        if found is None:
            raise CliError("NOT_FOUND", f"no API key {key_id}")
        now = found[1].budget
        budget, period = _budget_args(
            args, BudgetChange(now.budget, now.period) if now is not None else None
        )
        await ledger.set_key_budget(conn, key_id, budget, period)
        found = await get_api_key(conn, key_id, budget_zone=zone)
    assert found is not None
    account_id, info = found
    log.info("api key budget changed", extra={"key_id": str(key_id), "account_id": str(account_id)})
    return Outcome({**info.as_json(), "accountId": str(account_id)})


def _key_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise CliError("VALIDATION_ERROR", f"KEY_ID: {text!r} is not a key id") from None


async def cmd_keys_revoke(args: argparse.Namespace) -> Outcome:
    """``keys revoke KEY_ID``: revoke any account's key (idempotent)."""
    from creditgate.auth import revoke_key_by_id
    from creditgate.auth.api_keys import CACHE_TTL_SECONDS

    try:
        key_id = uuid.UUID(args.key_id)
    except ValueError:
        raise CliError("VALIDATION_ERROR", f"KEY_ID: {args.key_id!r} is not a key id") from None
    config = settings()
    async with connected(config.database_url) as conn:
        done = await revoke_key_by_id(conn, key_id, budget_zone=config.config.throttle.day_zone)
    if done is None:
        raise CliError("NOT_FOUND", f"no API key {key_id}")
    account_id, revoked = done
    log.info("api key revoked", extra={"key_id": str(key_id), "account_id": str(account_id)})
    return Outcome(
        {
            **revoked.info.as_json(),
            "accountId": str(account_id),
            "note": f"running servers stop accepting it within {CACHE_TTL_SECONDS:g} s",
        }
    )


def limit_flag(name: LimitName) -> str:
    """The option that sets limit ``name``: ``--requests-per-minute`` …"""
    return "--" + name.replace("_", "-")


async def cmd_limits(args: argparse.Namespace) -> Outcome:
    """``limits show|set ACCOUNT [--key KEY_ID]``: an account's or key's throttle limits."""
    from creditgate.throttle import overrides

    changes: dict[str, int | None] = {}
    for name in LIMIT_NAMES:
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = None if value == "none" else _positive(name, value)
    if args.sub == "set" and not changes:
        raise CliError("VALIDATION_ERROR", "name at least one limit to set (or 'none' to clear)")
    config = settings()
    key_id = None
    if args.key:
        try:
            key_id = uuid.UUID(args.key)
        except ValueError:
            raise CliError("VALIDATION_ERROR", f"--key: {args.key!r} is not a key id") from None
    async with connected(config.database_url) as conn:
        account = await ledger.resolve_account(conn, args.account)
        if key_id is not None and await overrides.key_account(conn, key_id) != account.id:
            raise CliError("NOT_FOUND", f"no API key {key_id} on account {account.id}")
        if changes:
            table, row = ("api_keys", key_id) if key_id else ("accounts", account.id)
            await overrides.set_overrides(conn, table, row, changes)
        return Outcome(await overrides.describe(conn, config.config, account.id, key_id))


def _positive(name: LimitName, text: str) -> int:
    from creditgate.throttle.limits import MAX_VALUE

    if not text.isdigit() or not 1 <= int(text) <= MAX_VALUE[name]:
        raise CliError(
            "VALIDATION_ERROR",
            f"{limit_flag(name)}: an integer from 1 to {MAX_VALUE[name]}, or 'none'",
        )
    return int(text)
