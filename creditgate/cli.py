"""``creditgate``: serve, dev, migrate, mock-upstream, and the operator commands.

Every command takes ``--json`` and then prints exactly one JSON object on
stdout. Exit 0 on success (and on an identical idempotent replay), 1 on an
error (``{"error": {code, message}}``), 2 on a usage error. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from creditgate import ledger, migrations
from creditgate.auth.api_keys import SCOPES
from creditgate.config import ConfigError, Settings, load_settings
from creditgate.errors import ApiError
from creditgate.logs import log, setup_logging

Command = Callable[[argparse.Namespace], Awaitable[dict[str, Any]]]


class CliError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _emit(args: argparse.Namespace, result: dict[str, Any], text: str | None = None) -> None:
    from creditgate.http.envelope import dumps

    if args.json:
        sys.stdout.write(dumps(result).decode() + "\n")
    else:
        sys.stdout.write((text if text is not None else dumps(result).decode()) + "\n")
    sys.stdout.flush()


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as e:
        raise CliError("CONFIG_ERROR", str(e)) from None


async def _connect(settings: Settings) -> asyncpg.Connection:
    if settings.database_url is None:
        raise CliError("CONFIG_ERROR", "DATABASE_URL is not set")
    try:
        return await asyncpg.connect(settings.database_url)
    except (OSError, asyncpg.PostgresError) as e:
        raise CliError("SERVICE_UNAVAILABLE", f"cannot connect to Postgres: {e}") from None


# ---------------------------------------------------------------- commands


async def cmd_migrate(args: argparse.Namespace) -> dict[str, Any]:
    conn = await _connect(_settings())
    try:
        applied = await migrations.migrate(conn)
    except migrations.MigrationError as e:
        raise CliError("MIGRATION_ERROR", str(e)) from None
    finally:
        await conn.close()
    return {"applied": applied}


async def cmd_accounts_create(args: argparse.Namespace) -> dict[str, Any]:
    settings = _settings()
    kind, external_id = ("user", args.user) if args.user else ("org", args.org)
    if args.tier not in settings.config.tiers:
        raise CliError("VALIDATION_ERROR", f"no tier named {args.tier!r}")
    conn = await _connect(settings)
    try:
        account = await ledger.ensure_account(conn, kind, external_id, args.tier)
    finally:
        await conn.close()
    out = account.as_json()
    del out["status"]
    return out


def _check(problems: list[dict[str, str]]) -> None:
    """Raise the first argument problem as a CLI validation error."""
    if problems:
        p = problems[0]
        raise CliError("VALIDATION_ERROR", f"{p['path']}: {p['message']}")


async def cmd_credits_grant(args: argparse.Namespace) -> dict[str, Any]:
    from creditgate.http.admin import admin_idempotency_key, parse_amount, parse_expiry

    problems: list[dict[str, str]] = []
    amount = parse_amount(args.amount, problems, "AMOUNT")
    expires_at = parse_expiry(args.expires_at, amount, problems)
    if not args.reason.strip():
        problems.append({"path": "--reason", "message": "must not be empty"})
    _check(problems)
    assert amount is not None
    conn = await _connect(_settings())
    try:
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
    finally:
        await conn.close()
    return {**posted.as_json(), "replayed": posted.replayed}


async def cmd_accounts_set_overdraft(args: argparse.Namespace) -> dict[str, Any]:
    try:
        limit = ledger.credits_to_micros(args.limit)
    except ValueError as e:
        raise CliError("VALIDATION_ERROR", f"LIMIT: {e}") from None
    if limit < 0:
        raise CliError("VALIDATION_ERROR", "LIMIT: must be 0 or more (credits below zero allowed)")
    conn = await _connect(_settings())
    try:
        account = await ledger.resolve_account(conn, args.account)
        await ledger.set_overdraft_limit(conn, account.id, limit)
        bal = await ledger.get_balance(conn, account.id)
    finally:
        await conn.close()
    log.info("overdraft limit set", extra={"account_id": str(account.id), "limit_micros": limit})
    return {
        "accountId": str(account.id),
        "overdraftLimit": ledger.micros_to_credits(limit),
        "overdraftLimitMicros": limit,
        "availableMicros": bal.available,
    }


async def cmd_usage(args: argparse.Namespace) -> dict[str, Any]:
    from creditgate.http.params import parse_kinds, parse_time

    problems: list[dict[str, str]] = []
    if not 1 <= args.limit <= ledger.history.MAX_PAGE:
        problems.append({"path": "--limit", "message": f"must be 1..{ledger.history.MAX_PAGE}"})
    kinds = parse_kinds(args.kind, ledger.ENTRY_KINDS, problems)
    since = parse_time(args.since, "--since", problems) if args.since else None
    until = parse_time(args.until, "--until", problems) if args.until else None
    _check(problems)
    conn = await _connect(_settings())
    try:
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
    finally:
        await conn.close()
    return page.as_json()


async def cmd_keys_create(args: argparse.Namespace) -> dict[str, Any]:
    from creditgate.auth import create_api_key

    conn = await _connect(_settings())
    try:
        account = await ledger.resolve_account(conn, args.account)
        key = await create_api_key(
            conn, account.id, args.name, scope="admin" if args.admin else args.scope
        )
    finally:
        await conn.close()
    return key.as_json()


async def cmd_balance(args: argparse.Namespace) -> dict[str, Any]:
    conn = await _connect(_settings())
    try:
        account = await ledger.resolve_account(conn, args.account)
        bal = await ledger.get_balance(conn, account.id)
    finally:
        await conn.close()
    return bal.as_json()


async def cmd_verify(args: argparse.Namespace) -> dict[str, Any]:
    conn = await _connect(_settings())
    try:
        report = await ledger.verify_ledger(conn)
    finally:
        await conn.close()
    if not report.ok:
        n = len(report.problems)
        _emit(
            args,
            {
                **report.as_json(),
                "error": {"code": "LEDGER_MISMATCH", "message": f"{n} invariant problem(s) found"},
            },
        )
        raise SystemExit(1)
    return report.as_json()


async def cmd_limits(args: argparse.Namespace) -> dict[str, Any]:
    """``limits show|set ACCOUNT [--key KEY_ID]``: an account's or key's throttle limits."""
    import uuid

    from creditgate.throttle import overrides

    changes: dict[str, int | None] = {}
    for name in ("requests_per_minute", "tokens_per_minute", "max_parallel", "messages_per_day"):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = None if value == "none" else _positive(name, value)
    if args.sub == "set" and not changes:
        raise CliError("VALIDATION_ERROR", "name at least one limit to set (or 'none' to clear)")
    settings = _settings()
    key_id = None
    if args.key:
        try:
            key_id = uuid.UUID(args.key)
        except ValueError:
            raise CliError("VALIDATION_ERROR", f"--key: {args.key!r} is not a key id") from None
    conn = await _connect(settings)
    try:
        account = await ledger.resolve_account(conn, args.account)
        if key_id is not None and await overrides.key_account(conn, key_id) != account.id:
            raise CliError("NOT_FOUND", f"no API key {key_id} on account {account.id}")
        if changes:
            table, row = ("api_keys", key_id) if key_id else ("accounts", account.id)
            await overrides.set_overrides(conn, table, row, changes)
        return await overrides.describe(conn, settings.config, account.id, key_id)
    finally:
        await conn.close()


def _positive(name: str, text: str) -> int:
    from creditgate.throttle.limits import MAX_VALUE

    if not text.isdigit() or not 1 <= int(text) <= MAX_VALUE[name]:
        flag = "--" + name.replace("_", "-")
        raise CliError(
            "VALIDATION_ERROR", f"{flag}: an integer from 1 to {MAX_VALUE[name]}, or 'none'"
        )
    return int(text)


async def cmd_reconcile(args: argparse.Namespace) -> dict[str, Any]:
    from polar import PolarError  # imported here: polar-sdk adds ~0.4 s to every command

    from creditgate.billing.client import make_polar
    from creditgate.billing.reconcile import ReconcileUnavailable, reconcile

    settings = _settings()
    polar = make_polar(settings)
    if polar is None:
        raise CliError("CONFIG_ERROR", "POLAR_ACCESS_TOKEN is not set")
    conn = await _connect(settings)
    try:
        report = await reconcile(conn, polar, settings.config.polar, since=args.since)
    except ReconcileUnavailable as e:
        raise CliError("CONFIG_ERROR", str(e)) from None
    except PolarError as e:
        raise CliError("POLAR_ERROR", f"Polar did not answer as expected: {e}") from None
    finally:
        await conn.close()
        await polar.__aexit__(None, None, None)
    if not report.ok:
        _emit(args, report.as_json(), report.as_table())
        raise SystemExit(1)
    if not args.json:
        _emit(args, {}, report.as_table())
        raise SystemExit(0)
    return report.as_json()


def _timestamp(text: str) -> datetime:
    """An ISO 8601 date or date-time; UTC when it names no zone."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {text!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# ---------------------------------------------------------------- servers


def cmd_serve(args: argparse.Namespace) -> int:
    from creditgate.http import serving
    from creditgate.http.app import create_app

    settings = _settings()
    setup_logging(settings.log_level)
    host = args.host or settings.host
    port = args.port or settings.port
    grace = settings.config.shutdown_timeout_seconds
    if args.workers > 1:
        from creditgate.supervisor import supervise

        return supervise(args.workers, host, port, grace)
    _use_uvloop()
    log.info("serving", extra={"host": host, "port": port, "pid": os.getpid()})
    # SIGTERM/SIGINT: stop accepting, let in-flight requests finish for up to
    # `grace` seconds, then cancel them (a cut stream is still billed).
    app = create_app(settings)
    _freeze_heap()
    # run_app's graceful stop, plus the [http] limits on slow and numerous clients.
    limits = settings.config.http_limits
    serving.run(
        app,
        host,
        port,
        shutdown_timeout=grace,
        header_timeout=limits.header_timeout_seconds,
        max_connections=limits.max_connections,
    )
    log.info("stopped", extra={"pid": os.getpid()})
    return 0


def cmd_mock_upstream(args: argparse.Namespace) -> int:
    from aiohttp import web

    from creditgate.proxy.mock_faults import FAULT_MODES
    from creditgate.proxy.mock_upstream import create_mock_app

    setup_logging("warning")
    _use_uvloop()
    app = create_mock_app(**{m.name: getattr(args, m.name) for m in FAULT_MODES})
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from creditgate.embedded import EmbeddedPostgres, EmbeddedRedis

    setup_logging(os.environ.get("LOG_LEVEL", "info"))
    data_dir = Path(args.data_dir).resolve()
    env = dict(os.environ)
    stops: list[Callable[[], None]] = []
    try:
        if not env.get("DATABASE_URL"):
            pg = EmbeddedPostgres(data_dir)
            stops.append(pg.stop)
            env["DATABASE_URL"] = pg.url
        if not env.get("REDIS_URL"):
            rd = EmbeddedRedis(data_dir)
            stops.append(rd.stop)
            env["REDIS_URL"] = rd.url
        _use_uvloop()
        return asyncio.run(_dev(args, env))
    finally:
        for stop in reversed(stops):
            stop()


async def _dev(args: argparse.Namespace, env: dict[str, str]) -> int:
    from aiohttp import web

    from creditgate.auth import create_api_key
    from creditgate.http.app import create_app
    from creditgate.proxy.mock_upstream import create_mock_app

    runners: list[web.AppRunner] = []
    try:
        if not env.get("UPSTREAM_BASE_URL"):
            mock = web.AppRunner(create_mock_app(), access_log=None)
            await mock.setup()
            runners.append(mock)
            site = web.TCPSite(mock, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            env["UPSTREAM_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
        try:
            settings = load_settings(env)
        except ConfigError as e:
            raise CliError("CONFIG_ERROR", str(e)) from None
        conn = await asyncpg.connect(settings.database_url)
        try:
            await migrations.migrate(conn)
            account = await ledger.ensure_account(conn, "user", "user_demo")
            await ledger.post_entry(
                conn,
                account_id=account.id,
                amount=100 * ledger.money.MICROS_PER_CREDIT,
                kind="grant",
                idempotency_key="dev:demo-grant",
                reason="creditgate dev demo credits",
            )
            # One live demo key at a time: revoke the previous runs' keys.
            await conn.execute(
                "UPDATE api_keys SET revoked_at = now()"
                " WHERE account_id = $1 AND name = 'dev' AND revoked_at IS NULL",
                account.id,
            )
            key = await create_api_key(conn, account.id, "dev")
        finally:
            await conn.close()

        app = web.AppRunner(
            create_app(settings),
            access_log=None,
            keepalive_timeout=settings.config.http_limits.header_timeout_seconds,
        )
        await app.setup()
        runners.append(app)
        await web.TCPSite(app, args.host, args.port).start()
        url = f"http://{args.host}:{args.port}"
        info: dict[str, str] = {
            "url": url,
            "apiKey": key.key,
            "accountId": str(account.id),
            "databaseUrl": env["DATABASE_URL"],
            "redisUrl": env["REDIS_URL"],
            "upstreamBaseUrl": env["UPSTREAM_BASE_URL"],
        }
        _emit(args, info, _dev_banner(info))

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping")
        return 0
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def _dev_banner(info: dict[str, str]) -> str:
    return f"""
creditgate dev is running at {info["url"]}  (Ctrl-C stops it)

  demo account  {info["accountId"]}  (100 credits)
  API key       {info["apiKey"]}

  curl {info["url"]}/v1/chat/completions \\
    -H "Authorization: Bearer {info["apiKey"]}" -H "Content-Type: application/json" \\
    -d '{{"model": "mock-model", "messages": [{{"role": "user", "content": "Hi"}}]}}'

  curl {info["url"]}/api/user/balance -H "Authorization: Bearer {info["apiKey"]}"

For the operator commands in another shell:
  export DATABASE_URL='{info["databaseUrl"]}'
  export REDIS_URL='{info["redisUrl"]}'
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be ≥ 1")
    return value


def _freeze_heap() -> None:
    """Keep the start-up heap out of the cyclic GC's full collections.

    After the imports a worker holds ~180k tracked objects; a full collection
    walks them all (tens of ms here, measured), which a request caught behind
    it would see as a pause. Frozen, they are never collected (they live as
    long as the process anyway), and full collections walk only what requests
    leave behind (``gc.freeze``'s documented use).
    """
    gc.collect()
    gc.freeze()


def _use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# ---------------------------------------------------------------- parsing


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="creditgate", description=__doc__.split("\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", parents=[common], help="run the server (production)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
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
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--data-dir", default=".creditgate-dev", help="where embedded data lives")
    s.set_defaults(server=cmd_dev)

    _add_mock_upstream(sub, common)

    s = sub.add_parser("migrate", parents=[common], help="apply pending database migrations")
    s.set_defaults(run=cmd_migrate)

    accounts = sub.add_parser("accounts", help="accounts").add_subparsers(dest="sub", required=True)
    s = accounts.add_parser("create", parents=[common], help="create (or find) an account")
    who = s.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="Clerk user id")
    who.add_argument("--org", help="Clerk organization id")
    s.add_argument("--tier", default="free")
    s.set_defaults(run=cmd_accounts_create)
    s = accounts.add_parser(
        "set-overdraft",
        parents=[common],
        help="let an account's available credits go down to -LIMIT (0 by default)",
    )
    s.add_argument("account", help="account id or Clerk user/org id")
    s.add_argument("limit", help="credits, decimals allowed, ≥ 0")
    s.set_defaults(run=cmd_accounts_set_overdraft)

    credits = sub.add_parser("credits", help="credits").add_subparsers(dest="sub", required=True)
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

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="sub", required=True)
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
    s.set_defaults(run=cmd_keys_create)

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
    for flag in ("requests-per-minute", "tokens-per-minute", "max-parallel", "messages-per-day"):
        s.add_argument(f"--{flag}", metavar="N|none")
    s.set_defaults(run=cmd_limits)

    s = sub.add_parser("balance", parents=[common], help="an account's balance")
    s.add_argument("account", help="account id or Clerk user/org id")
    s.set_defaults(run=cmd_balance)

    s = sub.add_parser(
        "verify", parents=[common], help="recompute every balance from the ledger; exit 1 on drift"
    )
    s.set_defaults(run=cmd_verify)

    s = sub.add_parser(
        "reconcile",
        parents=[common],
        help="compare Polar's usage meter with the ledger; exit 1 on drift beyond tolerance",
    )
    s.add_argument(
        "--since",
        type=_timestamp,
        help="only usage Polar acknowledged from then on (ISO 8601; the meter's window start)",
    )
    s.set_defaults(run=cmd_reconcile)
    return p


def _add_mock_upstream(sub: Any, common: argparse.ArgumentParser) -> None:
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
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8081)
    for mode in FAULT_MODES:
        if mode.type is bool:
            s.add_argument(
                mode.flag, dest=mode.name, action="store_true", default=None, help=mode.help
            )
        else:
            s.add_argument(mode.flag, dest=mode.name, type=mode.type, help=mode.help)
    s.set_defaults(server=cmd_mock_upstream)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``creditgate`` command."""
    # argparse reads "-5" as a positional (a negative AMOUNT), not as an option.
    args = _parser().parse_args(argv)
    if hasattr(args, "server"):
        try:
            return int(args.server(args))
        except CliError as e:
            _emit(args, {"error": {"code": e.code, "message": e.message}}, f"error: {e.message}")
            return 1
    setup_logging(os.environ.get("LOG_LEVEL", "warning"))
    try:
        result = asyncio.run(args.run(args))
    except CliError as e:
        _emit(args, {"error": {"code": e.code, "message": e.message}}, f"error: {e.message}")
        return 1
    except ApiError as e:
        _emit(args, {"error": {"code": e.code, "message": e.message}}, f"error: {e.message}")
        return 1
    _emit(args, result)
    return 0
