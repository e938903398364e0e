"""Serving the app with limits on slow and numerous clients (``[http]`` in the config).

``web.run_app`` offers no connection cap, and its keep-alive timer is the only
bound on a client that never finishes its headers. This module runs the app as
``run_app`` does (graceful shutdown on SIGTERM/SIGINT) with:

* ``keepalive_timeout = header_timeout_seconds``: aiohttp arms that timer when
  a connection opens and after each response, and closes the connection when
  it fires while no complete request has arrived — so it bounds unfinished
  headers and idle keep-alive connections alike;
* a cap on open connections per process: one past it is answered 503 at once
  and closed, before any byte of it is parsed;
* requests aiohttp refuses before any handler runs (a request line or header
  over 8,190 bytes, a control character in a header) answered in the error
  envelope like every other error, not in aiohttp's plain text.

Bodies are bounded where they are read (``webkit.envelope.read_body``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from creditgate import errors
from creditgate.http.metrics import CONNECTIONS_REFUSED


def _refusal() -> bytes:
    body = orjson.dumps(
        {
            "error": {
                "code": "SERVICE_UNAVAILABLE",
                "message": "This server has too many open connections; retry shortly.",
                "type": "api_error",
            },
            "correlationId": None,
        }
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


REFUSAL = _refusal()


def _unparsable(status: int) -> web.Response:
    """The envelope for a request aiohttp could not parse (almost always a 400)."""
    if status == 400:
        error: errors.ApiError = errors.ValidationError(
            "The request line or a header could not be parsed: each must be at most"
            " 8,190 bytes, and header values may not hold control characters."
        )
    elif status == 413:
        error = errors.PayloadTooLarge("The request is too large.")
    else:
        error = errors.InternalError("The request could not be handled.")
    body = orjson.dumps({"error": error.body(), "correlationId": None})
    resp = web.Response(status=status, body=body, content_type="application/json")
    resp.force_close()
    return resp


class EnvelopeRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own refusals in the envelope."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Log as aiohttp does (through the redacting formatter), answer in JSON."""
        super().handle_error(request, status, exc, message)  # logs; raises if sent
        return _unparsable(status)


class CappedServer(web.Server):
    """aiohttp's protocol factory, refusing connections past ``max_connections``."""

    def __init__(self, *args: Any, max_connections: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections

    def __call__(self) -> RequestHandler:
        """A connection's handler: aiohttp's, with envelope refusals."""
        return EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        """Register the connection; answer 503 and close it when it is one too many."""
        super().connection_made(handler, transport)
        if len(self.connections) > self.max_connections:
            # Not logged per connection: a flood would flood the log too.
            CONNECTIONS_REFUSED.inc()
            transport.write(REFUSAL)  # flushed by the close below
            # Soon, not now: the handler's own connection_made still runs after
            # this, and its request loop must find the connection closing, not gone.
            asyncio.get_running_loop().call_soon(handler.force_close)


class CappedRunner(web.AppRunner):
    """``web.AppRunner`` whose server is a ``CappedServer``."""

    def __init__(self, app: web.Application, *, max_connections: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._max_connections = max_connections

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's startup
        return CappedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            max_connections=self._max_connections,
            **plain._kwargs,
        )


async def _serve(
    runner: web.AppRunner, host: str, port: int, on_listening: Callable[[str], None] | None
) -> None:
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_port=True).start()
        if on_listening is not None:
            on_listening(f"listening on http://{host}:{port}")
        await asyncio.Event().wait()  # until SIGTERM/SIGINT raises GracefulExit
    finally:
        await runner.cleanup()  # stops accepting, waits for in-flight requests


def run(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout: float,
    header_timeout: float,
    max_connections: int,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, as ``web.run_app`` does, with the limits above.

    ``on_listening`` is called once the socket listens (``run_app``'s ``print``).
    """
    runner = CappedRunner(
        app,
        max_connections=max_connections,
        handle_signals=True,
        access_log=None,
        keepalive_timeout=header_timeout,
        shutdown_timeout=shutdown_timeout,
    )
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(runner, host, port, on_listening))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        # The main task first: its runner.cleanup() is the graceful part
        # (in-flight requests get shutdown_timeout), then whatever is left.
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(main)
        rest = asyncio.all_tasks(loop)
        for task in rest:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        asyncio.set_event_loop(None)
