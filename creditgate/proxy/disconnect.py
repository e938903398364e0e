"""Noticing that the client went away while we wait on the upstream.

aiohttp does not cancel a handler when its client disconnects (and must not:
a cancelled ledger statement could leave a hold half-known). But while the
handler waits on the upstream — for the first byte, or between chunks of a
stream — a client that has gone should stop the upstream call at once, so it
stops generating (and costing) tokens. ``ClientWatch`` checks the client's
connection on a timer *only* during those waits and cancels the handler's
task when the connection has closed; leaving the block swallows that one
cancellation and records it in ``gone``.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from aiohttp import web

CHECK_INTERVAL = 0.5  # seconds between looks at the client's connection


class ClientWatch:
    """``with ClientWatch(request) as watch: await …`` — then ``watch.gone``."""

    __slots__ = ("_handle", "_interval", "_request", "_task", "gone")

    def __init__(self, request: web.Request, interval: float = CHECK_INTERVAL) -> None:
        self._request = request
        self._interval = interval
        self._task: asyncio.Task[object] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self.gone = False

    def client_gone(self) -> bool:
        """True once the client's connection is closed or closing."""
        transport = self._request.transport
        return transport is None or transport.is_closing()

    def __enter__(self) -> ClientWatch:
        self._task = asyncio.current_task()
        self._handle = asyncio.get_running_loop().call_later(self._interval, self._check)
        return self

    def _check(self) -> None:
        assert self._task is not None
        if self.client_gone():
            self.gone = True
            self._handle = None
            self._task.cancel()
            return
        self._handle = asyncio.get_running_loop().call_later(self._interval, self._check)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.gone and exc_type is asyncio.CancelledError:
            assert self._task is not None
            self._task.uncancel()  # our own cancellation: handled by the caller via `gone`
            return True
        return False
