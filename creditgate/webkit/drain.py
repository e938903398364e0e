"""Graceful drain: on SIGTERM, finish what is in flight, then cut it at the timeout.

aiohttp's own shutdown (3.14: ``web_protocol.RequestHandler.shutdown``) waits
``shutdown_timeout`` for a busy connection, then cancels only the request's
body reader, waits ``shutdown_timeout`` again, and only then cancels the
handler: a stream is cut at twice the timeout (more above 5 s, where its
``ceil_timeout`` rounds up). So the drain runs first, in ``on_shutdown``
(after the listening sockets are closed and idle keep-alive connections told
to close, before aiohttp's wait):

1. wait until every tracked handler has finished, up to ``timeout`` seconds;
2. then mark each handler still running as cut (``shutdown_cut``) and cancel
   them all at once. The proxy's cancellation path sees the mark and ends a
   stream as it ends any stream cut short: settled for what it delivered
   (estimated where the upstream sent no usage), the usage chunk when asked
   for, and an error event with code ``SERVER_SHUTTING_DOWN``. A request cut
   before its response started gets a 503 and is not charged;
3. wait up to ``CUT_SETTLE_SECONDS`` for the cut handlers to settle.

aiohttp's wait then finds nothing busy; ``AIOHTTP_SHUTDOWN_TIMEOUT`` (what
``serve`` passes it) bounds what it could add for a handler that ignored the
cut. SIGTERM to exit is thus at most ``timeout + SHUTDOWN_MARGIN_SECONDS``,
which the supervisor and the Kubernetes grace are sized around.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from creditgate.errors import ServiceUnavailable
from creditgate.logs import log
from creditgate.webkit.ids import RESPONSE_STARTED

CUT_SETTLE_SECONDS = 3.0  # after the cut: cut handlers settle and send their last event
AIOHTTP_SHUTDOWN_TIMEOUT = 0.5  # aiohttp's own wait (twice, at most): only for stragglers
# SIGTERM to process exit is at most shutdown_timeout_seconds + this: the cut's
# settling (3 s), aiohttp's wait (2 × 0.5 s) and closing the pools (< 1 s).
SHUTDOWN_MARGIN_SECONDS = 5
SHUTDOWN_END: Final = "shutdown"  # how a stream cut by the drain ended (the stream_ends label)

_CUT = web.RequestKey("shutdown_cut", bool)


def termination_grace_seconds(pre_stop: float, shutdown_timeout: float) -> float:
    """The least grace an orchestrator must give between its stop and its SIGKILL.

    Its pre-stop wait (the load balancer stops sending), then the drain: the
    cut at ``shutdown_timeout``, then at most the margin to settle and exit.
    The supervisor kills a worker only past ``shutdown_timeout`` + the margin,
    so this covers ``serve --workers N`` too. ``deploy/k8s`` is checked against it.
    """
    return pre_stop + shutdown_timeout + SHUTDOWN_MARGIN_SECONDS


class Drain:
    """The handlers in flight in one process, and the shutdown that drains them."""

    __slots__ = ("_in_flight", "settle", "timeout")

    def __init__(self, timeout: float, settle: float = CUT_SETTLE_SECONDS) -> None:
        self.timeout = timeout
        self.settle = settle
        self._in_flight: dict[asyncio.Task[object], web.Request] = {}

    def track(self, task: asyncio.Task[object], request: web.Request) -> None:
        """Track ``task`` (one request's handler) until it is done."""
        self._in_flight[task] = request
        # The task also writes a whole response after the handler returns:
        # done means its last byte is out.
        task.add_done_callback(self._in_flight.pop)

    @property
    def in_flight(self) -> int:
        """How many handlers are running."""
        return len(self._in_flight)

    async def run(self) -> tuple[int, int]:
        """Wait for the handlers up to the timeout, then cut the rest; (cut, left over)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        started = time.perf_counter()
        log.info("draining", extra={"in_flight": self.in_flight, "timeout_seconds": self.timeout})
        # A loop: a request already read on an open connection may still start.
        while self._in_flight and (left := deadline - loop.time()) > 0:
            await asyncio.wait(list(self._in_flight), timeout=left)
        cut = list(self._in_flight.items())
        for task, request in cut:
            request[_CUT] = True
            task.cancel()
        left_over = 0
        if cut:
            _, pending = await asyncio.wait([t for t, _ in cut], timeout=self.settle)
            left_over = len(pending)
        log.info(
            "drained",
            extra={
                "cut": len(cut),
                "left_over": left_over,
                "seconds": round(time.perf_counter() - started, 3),
            },
        )
        return len(cut), left_over


DRAIN = web.AppKey("drain", Drain)


def install_drain(app: web.Application, timeout: float) -> None:
    """Track ``app``'s handlers and drain them first thing at shutdown."""
    drain = app[DRAIN] = Drain(timeout)

    async def on_shutdown(_: web.Application) -> None:
        await drain.run()

    app.on_shutdown.insert(0, on_shutdown)


def ignore_repeated_signals(app: web.Application) -> None:
    """Once the drain has begun, a second SIGTERM/SIGINT must not abort it.

    ``web.run_app``'s handlers raise ``GracefulExit`` (a ``SystemExit``) on
    every signal; a second one, mid-drain, stops the loop and cancels the
    drain and the handlers with it (unannounced cuts). A second signal is
    common: Ctrl-C reaches every worker of a terminal's process group while
    the supervisor forwards its own SIGTERM. For processes that own the
    signals (``serve``); a test server's loop must keep its own.
    """

    def repeated(signum: int) -> None:
        log.info("already draining; signal ignored", extra={"signal": signum})

    async def on_shutdown(_: web.Application) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, repeated, int(sig))

    app.on_shutdown.insert(0, on_shutdown)


def shutdown_cut(request: web.Request) -> bool:
    """True when the drain cancelled this request's handler (not a client leaving)."""
    return bool(request.get(_CUT, False))


def uncancel_cut() -> None:
    """Take back the drain's cancellation: the handler ends its response itself."""
    task = asyncio.current_task()
    assert task is not None
    task.uncancel()


@web.middleware
async def drain_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Track the handler; a request cut before its response started gets a 503."""
    task = asyncio.current_task()
    assert task is not None
    request.app[DRAIN].track(task, request)
    try:
        return await handler(request)
    except asyncio.CancelledError:
        if not shutdown_cut(request) or request.get(RESPONSE_STARTED):
            raise
        uncancel_cut()
    raise ServiceUnavailable(
        "The server is shutting down; retry the request.", headers={"Retry-After": "1"}
    )
