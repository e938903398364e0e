"""The ``creditgate`` command line: every command's flags, help and handler."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from creditgate.auth.api_keys import SCOPES
from creditgate.cli.accounts import (
    cmd_accounts_create,
    cmd_accounts_list,
    cmd_accounts_set_overdraft,
    cmd_accounts_show,
    cmd_balance,
    cmd_credits_grant,
    cmd_migrate,
    cmd_usage,
    cmd_verify,
)
from creditgate.cli.dev import cmd_dev
from creditgate.cli.keys import (
    cmd_keys_budget,
    cmd_keys_create,
    cmd_keys_list,
    cmd_keys_revoke,
    cmd_limits,
    limit_flag,
)
from creditgate.cli.ops import cmd_doctor, cmd_prune, cmd_reconcile
from creditgate.cli.servers import cmd_mock_upstream, cmd_serve
from creditgate.config import LIMIT_NAMES


def _timestamp(text: str) -> datetime:
    """An ISO 8601 date or date-time; UTC when it names no zone."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {text!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be ≥ 1")
    return value


def _budget_options(s: argparse.ArgumentParser, *, change: bool = False) -> None:
    """``--budget`` and ``--period`` of ``keys create`` / ``keys budget``."""
    s.add_argument(
        "--budget",
        metavar="CREDITS",
        help="cap on what the key's calls may spend per period, in credits (decimals allowed)"
        + ("; 'none' removes the budget" if change else ""),
    )
    s.add_argument(
        "--period",
        choices=["day", "week", "month", "lifetime"],
        help="the budget's period in [throttle] day_zone (default lifetime: never resets)",
    )


def parser() -> argparse.ArgumentParser:
    """The command line's parser: each command sets ``run`` (async, an Outcome) or ``server``."""
    p = argparse.ArgumentParser(
        prog="creditgate",
        description="creditgate: a metered LLM proxy with a credit ledger.",
        epilog=(
            "Every command takes --json and then prints one JSON object on stdout."
            " Exit 0 on success, 1 on an error, 2 on a usage error; logs go to stderr."
            " 'creditgate COMMAND -h' describes a command."
        ),
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", parents=[common], help="run the server (production)")
    s.add_argument("--host", help="address to listen on (default: CREDITGATE_HOST or 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to listen on (default: CREDITGATE_PORT or 8080)")
    s.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="worker processes sharing the port (SO_REUSEPORT), supervised",
    )
    s.set_defaults(server=cmd_serve)

    s = sub.add_parser(
        "dev",
        parents=[common],
        help="run everything on this machine: embedded Postgres and Redis, a mock upstream",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    s.add_argument("--port", type=int, default=8080, help="port to listen on (8080)")
    s.add_argument("--data-dir", default=".creditgate-dev", help="where embedded data lives")
    s.set_defaults(server=cmd_dev)

    add_mock_upstream(sub, common)

    s = sub.add_parser("migrate", parents=[common], help="apply pending database migrations")
    s.set_defaults(run=cmd_migrate)

    group = sub.add_parser("accounts", help="create, list, show accounts; set an overdraft")
    accounts = group.add_subparsers(dest="sub", required=True)
    s = accounts.add_parser("create", parents=[common], help="create (or find) an account")
    who = s.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="Clerk user id")
    who.add_argument("--org", help="Clerk organization id")
    s.add_argument("--tier", default="free", help="a tier of the config's [tiers] (default: free)")
    s.set_defaults(run=cmd_accounts_create)
    s = accounts.add_parser(
        "set-overdraft",
        parents=[common],
        help="let an account's available credits go down to -LIMIT (0 by default)",
    )
    s.add_argument("account", help="account id or Clerk user/org id")
    s.add_argument("limit", help="credits, decimals allowed, ≥ 0")
    s.set_defaults(run=cmd_accounts_set_overdraft)
    s = accounts.add_parser("list", parents=[common], help="accounts with their balances")
    s.add_argument("--limit", type=int, default=100, help="accounts per page, 1..1000")
    s.add_argument("--cursor", help="nextCursor of the previous page")
    s.set_defaults(run=cmd_accounts_list)
    s = accounts.add_parser("show", parents=[common], help="an account, its balance and keys")
    s.add_argument("account", help="account id or Clerk user/org id")
    s.set_defaults(run=cmd_accounts_show)

    group = sub.add_parser("credits", help="grant or adjust credits")
    credits = group.add_subparsers(dest="sub", required=True)
    s = credits.add_parser("grant", parents=[common], help="grant (or, negative, adjust) credits")
    s.add_argument("account", help="account id or Clerk user/org id")
    s.add_argument("amount", help="credits, decimals allowed; negative adjusts down")
    s.add_argument("--reason", required=True)
    s.add_argument("--idempotency-key", help="repeat it to make the grant exactly once")
    s.add_argument(
        "--expires-at", help="a grant's credits expire then (ISO 8601 date or time, UTC default)"
    )
    s.set_defaults(run=cmd_credits_grant)

    s = sub.add_parser("usage", parents=[common], help="an account's ledger entries, newest first")
    s.add_argument("account", help="account id or Clerk user/org id")
    s.add_argument("--limit", type=int, default=50, help="entries per page, 1..200")
    s.add_argument("--cursor", help="nextCursor of the previous page")
    s.add_argument("--kind", action="append", default=[], help="only these kinds (repeatable)")
    s.add_argument("--since", help="from this time (inclusive, ISO 8601)")
    s.add_argument("--until", help="before this time (exclusive, ISO 8601)")
    s.set_defaults(run=cmd_usage)

    group = sub.add_parser("keys", help="create, list, revoke API keys")
    keys = group.add_subparsers(dest="sub", required=True)
    s = keys.add_parser("create", parents=[common], help="create an API key (shown once)")
    s.add_argument("account", help="account id or Clerk user/org id")
    s.add_argument("--name", default="")
    scope = s.add_mutually_exclusive_group()
    scope.add_argument(
        "--admin", action="store_true", help="an admin key: may also call the admin routes"
    )
    scope.add_argument(
        "--scope",
        choices=SCOPES,
        default="account",
        help="account (default); usage:write: may also record usage (POST /api/usage/record)"
        " for its account; admin: as --admin",
    )
    _budget_options(s)
    s.set_defaults(run=cmd_keys_create)
    s = keys.add_parser("list", parents=[common], help="an account's live API keys (no secrets)")
    s.add_argument("account", help="account id or Clerk user/org id")
    s.set_defaults(run=cmd_keys_list)
    s = keys.add_parser("budget", parents=[common], help="change an API key's spending budget")
    s.add_argument("key_id", metavar="KEY_ID", help="the key's id (from keys list)")
    _budget_options(s, change=True)
    s.set_defaults(run=cmd_keys_budget)
    s = keys.add_parser("revoke", parents=[common], help="revoke an API key by its id")
    s.add_argument("key_id", metavar="KEY_ID", help="the key's id (from keys list)")
    s.set_defaults(run=cmd_keys_revoke)

    limits = sub.add_parser("limits", help="throttle limits of an account or API key")
    limits_sub = limits.add_subparsers(dest="sub", required=True)
    s = limits_sub.add_parser("show", parents=[common], help="tier, overrides, effective limits")
    s.add_argument("account", help="account id or Clerk user/org id")
    s.add_argument("--key", help="an API key id of the account: its limits instead")
    s.set_defaults(run=cmd_limits)
    s = limits_sub.add_parser(
        "set",
        parents=[common],
        help="override limits ('none' clears one); a key's can only tighten its account's",
    )
    s.add_argument("account", help="account id or Clerk user/org id")
    s.add_argument("--key", help="an API key id of the account: override the key's limits")
    for name in LIMIT_NAMES:
        s.add_argument(limit_flag(name), metavar="N|none")
    s.set_defaults(run=cmd_limits)

    s = sub.add_parser("balance", parents=[common], help="an account's balance")
    s.add_argument("account", help="account id or Clerk user/org id")
    s.set_defaults(run=cmd_balance)

    s = sub.add_parser(
        "verify",
        parents=[common],
        help="check the ledger since its last checkpoint (--full: all of it); exit 1 on drift",
    )
    s.add_argument(
        "--full",
        action="store_true",
        help="re-read every entry and hold instead of only what is new since the checkpoint",
    )
    s.set_defaults(run=cmd_verify)

    s = sub.add_parser(
        "doctor",
        parents=[common],
        help="check configuration, database, migrations, Redis, upstreams, Polar, Clerk",
    )
    s.set_defaults(run=cmd_doctor)

    s = sub.add_parser(
        "prune",
        parents=[common],
        help="delete operational rows (webhook ids, sent notifications) past their retention",
    )
    s.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted; delete nothing"
    )
    s.set_defaults(run=cmd_prune)

    s = sub.add_parser(
        "reconcile",
        parents=[common],
        help="compare Polar's usage meter with the ledger; exit 1 on drift beyond tolerance",
    )
    s.add_argument(
        "--since",
        type=_timestamp,
        help="start of the window of event time, both sides (ISO 8601, UTC unless zoned;"
        " rounded down to the hour; default: the first exported event)",
    )
    s.add_argument(
        "--until",
        type=_timestamp,
        help="end of the window of event time (rounded up to the hour; default: now)",
    )
    s.set_defaults(run=cmd_reconcile)
    return p


def add_mock_upstream(sub: Any, common: argparse.ArgumentParser) -> None:
    """``mock-upstream``: its flags are the fault modes'."""
    from creditgate.proxy.mock_faults import FAULT_MODES, describe

    s = sub.add_parser(
        "mock-upstream",
        parents=[common],
        help="a mock OpenAI-compatible upstream (a dev/test tool, not a provider)",
        description=(
            "A mock OpenAI-compatible upstream for development, tests and benchmarks. "
            "It is not a model provider: it answers deterministic text, tool calls when "
            "offered tools, and misbehaves on purpose in the fault modes below. "
            "GET /mock/stats counts requests, finished answers and cut streams per key."
        ),
        epilog=describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    s.add_argument("--port", type=int, default=8081, help="port to listen on (8081)")
    for mode in FAULT_MODES:
        if mode.type is bool:
            s.add_argument(
                mode.flag, dest=mode.name, action="store_true", default=None, help=mode.help
            )
        else:
            # --latency-ms is the walking skeleton's name for --first-byte-ms; it keeps working.
            flags = [mode.flag, *(["--latency-ms"] if mode.name == "first_byte_ms" else [])]
            s.add_argument(*flags, dest=mode.name, type=mode.type, help=mode.help)
    s.set_defaults(server=cmd_mock_upstream)
