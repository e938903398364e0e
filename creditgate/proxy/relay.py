"""Relaying an upstream SSE stream to the client, event by event, as it arrives.

Each network read from the upstream is split into complete events (cut
events wait for their rest); the events of one read go to the client in one
write, byte for byte — comments and heartbeats included. Two kinds are held
back: the final usage chunk (sent after settling, with the cost in it) and
``[DONE]`` (sent only once the charge is committed). ``resp.write`` waits
while the client's socket is full, and nothing is read from the upstream
meanwhile, so a slow client slows the upstream and memory stays bounded by
one read plus the socket buffers — but never longer than the send timeout
per write nor past the call's deadline: a client that stops reading cannot
keep a call (and its hold) alive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final, Literal

import aiohttp
from aiohttp import web

from creditgate.proxy.sse import DONE, EventSplitter, event_data, inspect_chunk, sse_event
from creditgate.proxy.upstream import Stream

SEND_TIMEOUT = 60.0  # seconds one write to the client may wait (the proxy passes the model's idle)

# How a relayed stream ended (the stream_ends metric's label, the logs' "end");
# "shutdown" is the drain's cut (webkit.drain.SHUTDOWN_END).
StreamEnd = Literal[
    "done",
    "eof",
    "read_error",
    "idle_timeout",
    "total_timeout",
    "malformed",
    "error_event",
    "client_gone",
    "stalled",
    "shutdown",
    "cancelled",
]
DONE_END: Final = "done"  # the upstream sent [DONE]
EOF_END: Final = "eof"  # the upstream closed the stream without [DONE]
READ_ERROR: Final = "read_error"  # the upstream connection failed
IDLE_TIMEOUT: Final = "idle_timeout"
TOTAL_TIMEOUT: Final = "total_timeout"
MALFORMED: Final = "malformed"  # an event whose data is not JSON
ERROR_EVENT: Final = "error_event"  # the upstream sent an error object
CLIENT_GONE: Final = "client_gone"  # a write to the client failed
STALLED: Final = "stalled"  # a write to the client timed out: it stopped reading
CANCELLED: Final = "cancelled"  # aiohttp cancelled the handler: the client left


class Relay:
    """One stream's relay; its fields survive an interrupted ``run``."""

    __slots__ = (
        "_writing",
        "end",
        "error",
        "last_chunk",
        "progress",
        "resp",
        "stream",
        "text_bytes",
        "usage",
        "usage_chunk",
    )

    def __init__(
        self,
        stream: Stream,
        resp: web.StreamResponse,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.stream = stream
        self.progress = progress  # told the generated text bytes after each write
        self.resp = resp
        self.usage: dict[str, Any] | None = None
        self.usage_chunk: dict[str, Any] | None = None  # OpenAI's final chunk, held back
        self.last_chunk: dict[str, Any] | None = None  # for the ids of a chunk we make
        self.text_bytes = 0  # generated text received, for an estimate without usage
        self.error: dict[str, Any] | None = None  # the upstream's mid-stream error object
        self.end: StreamEnd | Literal[""] = ""  # "": still running
        self._writing = False

    async def run(self, idle: float, *, send_timeout: float = SEND_TIMEOUT) -> StreamEnd:
        """Relay until the stream ends; returns (and records) how it ended.

        Bounded in time as a whole: the stream's deadline (the call's, which
        its hold outlives) is enforced around reads *and* writes, and a single
        write to a client that stopped reading waits at most ``send_timeout``.
        """
        try:
            async with asyncio.timeout_at(self.stream.deadline):
                return await self._relay(idle, send_timeout)
        except TimeoutError:
            # The deadline ran out: while a write was blocked (the response is
            # half-written: STALLED), or while waiting on the upstream.
            self.end = STALLED if self._writing else TOTAL_TIMEOUT
            return self.end

    async def _relay(self, idle: float, send_timeout: float) -> StreamEnd:
        loop = asyncio.get_running_loop()
        content = self.stream.response.content
        deadline = self.stream.deadline
        splitter = EventSplitter()
        chunk = self.stream.head
        failed = False
        while True:
            out = self._take(splitter.feed(chunk))
            if out:
                self._writing = True
                try:
                    async with asyncio.timeout(send_timeout):
                        await self.resp.write(out)
                except ConnectionResetError:
                    self.end = CLIENT_GONE
                except TimeoutError:
                    self.end = STALLED
                self._writing = False
                if self.progress is not None:
                    self.progress(self.text_bytes)
            if self.end:
                return self.end
            if failed:
                self.end = READ_ERROR
                return self.end
            now = loop.time()
            if now >= deadline:
                self.end = TOTAL_TIMEOUT
                return self.end
            try:
                # What arrived while we wrote is taken without a timer; only an
                # actual wait is bounded (idle; the total bounds the whole run).
                chunk = content.read_nowait()
                if not chunk and not content.at_eof():
                    async with asyncio.timeout(idle):
                        chunk = await content.readany()
            except TimeoutError:
                self.end = IDLE_TIMEOUT
                return self.end
            except aiohttp.ClientError:
                # aiohttp raises a connection's error before handing out the
                # bytes that arrived before it: those are relayed (and billed)
                # first, then the stream ends as a read error.
                chunk = _buffered(content)
                failed = True
                continue
            if not chunk:
                self.end = EOF_END
                return self.end

    def _take(self, events: list[bytes]) -> bytes:
        """The bytes of ``events`` to forward now; notes usage, text and the end."""
        out: list[bytes] = []
        for event in events:
            data = event_data(event)
            if data is None:  # a comment or heartbeat: passed through
                out.append(event)
                continue
            if data.strip() == DONE:
                self.end = DONE_END
                break
            info = inspect_chunk(data)
            if info is None:
                self.end = MALFORMED
                break
            if info.error is not None:
                self.error = info.error
                self.end = ERROR_EVENT
                break
            self.text_bytes += info.text_bytes
            self.last_chunk = info.obj
            if info.usage is None:
                out.append(event)
                continue
            self.usage = info.usage
            if info.usage_only:
                self.usage_chunk = info.obj  # sent after settling, with the cost
                continue
            # Usage inside a content chunk (LiteLLM does this): forward the
            # content; the usage goes out once, in the final chunk, with its cost.
            out.append(sse_event({**info.obj, "usage": None}))
        return out[0] if len(out) == 1 else b"".join(out)


def _buffered(content: aiohttp.StreamReader) -> bytes:
    """The bytes a failed response had already received (its read methods raise
    the stored error first; ``_read_nowait`` is the buffer's own, unchecked, read)."""
    try:
        return content._read_nowait(-1)
    except Exception:
        return b""
