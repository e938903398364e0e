"""``serve`` and ``mock-upstream``: the long-running commands, and what they check first."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import os
import socket
from collections.abc import Callable

from creditgate.cli.db import database_problem
from creditgate.cli.db import settings as load_cli_settings
from creditgate.cli.output import CliError, emit
from creditgate.config import Settings
from creditgate.logs import log, setup_logging


def cmd_serve(args: argparse.Namespace) -> int:
    from creditgate.http import serving
    from creditgate.http.app import create_app
    from creditgate.webkit.drain import AIOHTTP_SHUTDOWN_TIMEOUT, ignore_repeated_signals

    settings = load_cli_settings()
    setup_logging(settings.log_level)
    host = args.host or settings.host
    port = args.port or settings.port
    grace = settings.config.shutdown_timeout_seconds
    _preflight(settings)
    _probe_port(host, port)
    if args.workers > 1:
        from creditgate.supervisor import supervise

        return supervise(args.workers, host, port, grace)
    use_uvloop()
    log.info("serving", extra={"host": host, "port": port, "pid": os.getpid()})
    # SIGTERM/SIGINT: stop accepting, let in-flight requests finish for up to
    # `grace` seconds, then cut them (webkit.drain: a cut stream is still billed).
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
            on_listening=announce(args, host, port),
        )
    except OSError as e:
        if e.errno not in _BIND_ERRNOS:
            raise
        raise _port_error(host, port, e) from None
    log.info("stopped", extra={"pid": os.getpid()})
    return 0


def announce(args: argparse.Namespace, host: str, port: int) -> Callable[[str], None]:
    """What a server prints on stdout once it listens: ``{url, pid}`` with --json, else a line."""

    def announce(_: str) -> None:
        url = f"http://{host}:{port}"
        emit(args, {"url": url, "pid": os.getpid()}, f"{args.command} listening on {url}")

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
    problem = asyncio.run(database_problem(settings.database_url))
    if problem is not None:
        raise CliError("SERVICE_UNAVAILABLE", problem)
    for upstream in missing_upstream_keys(settings.config):
        log.warning(
            "upstream API key variable is not set; calls to this upstream will fail",
            extra={"upstream": upstream.name, "variable": upstream.api_key_env},
        )


def cmd_mock_upstream(args: argparse.Namespace) -> int:
    from aiohttp import web

    from creditgate.proxy.mock_faults import FAULT_MODES
    from creditgate.proxy.mock_upstream import create_mock_app

    setup_logging("warning")
    use_uvloop()
    app = create_mock_app(**{m.name: getattr(args, m.name) for m in FAULT_MODES})
    try:
        web.run_app(
            app,
            host=args.host,
            port=args.port,
            print=announce(args, args.host, args.port),
            access_log=None,
        )
    except OSError as e:
        if e.errno not in _BIND_ERRNOS:
            raise
        raise _port_error(args.host, args.port, e) from None
    return 0


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


def use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# ---------------------------------------------------------------- parsing
