"""A multiplexed Redis connection for the throttle's hot path.

Every request of a process makes one script call; redis-py gives each
concurrent call a connection of its own and spends ~100 µs of CPU on it. Here
all concurrent calls share one connection: commands issued in the same event
loop tick are written in one ``send``, and replies (parsed by hiredis, in C)
are matched to callers in order. A caller that stops waiting (its time budget
ran out) only abandons its reply: the connection stays in step, so a slow
moment never costs a reconnect, and a burst never opens a connection storm.

It speaks to one Redis node (``redis://``, ``rediss://``, ``unix://`` URLs,
with user/password and database number); it does not follow Cluster
redirections.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis


class RedisDown(ConnectionError):
    """The connection failed or was closed; a later call reconnects."""


class RedisReplyError(Exception):
    """Redis answered an error (``NOSCRIPT …``, ``ERR …``)."""


def encode_args(args: tuple[Any, ...] | list[Any]) -> bytes:
    """RESP bulk strings of ``args`` (str, bytes or int), without the array header."""
    out = []
    for arg in args:
        data = arg if type(arg) is bytes else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _encode(args: tuple[Any, ...]) -> bytes:
    return b"*%d\r\n" % len(args) + encode_args(args)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.reader = hiredis.Reader(replyError=RedisReplyError)
        self.lost = asyncio.get_running_loop().create_future()
        self._buffer: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, command: bytes) -> asyncio.Future[Any]:
        if self.lost.done() or self.transport is None:
            raise RedisDown("the Redis connection is closed")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        if not self._buffer:
            asyncio.get_running_loop().call_soon(self._flush)
        self._buffer.append(command)
        return fut

    def _flush(self) -> None:
        data, self._buffer = b"".join(self._buffer), []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.waiting:
                self.abort(RedisDown("a reply nobody asked for"))
                return
            fut = self.waiting.popleft()
            if fut.done():  # its caller gave up waiting
                continue
            if isinstance(reply, RedisReplyError):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.abort(RedisDown(f"connection lost: {exc or 'closed'}"))

    def abort(self, exc: Exception) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


class RedisPipe:
    """One shared, pipelined connection to a Redis node, (re)opened on demand."""

    def __init__(self, url: str, *, connect_timeout: float = 1.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r}")
        query = parse_qs(parts.query)
        self._unix = parts.path if parts.scheme == "unix" else None
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._ssl = ssl.create_default_context() if parts.scheme == "rediss" else None
        db_text = query.get("db", [""])[0] or (parts.path.strip("/") if not self._unix else "")
        self._db = int(db_text or 0)
        self._user = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None

    async def execute(self, *args: Any) -> Any:
        """Send one command and wait for its reply (wrap in a timeout to bound the wait)."""
        return await self.execute_encoded(len(args), encode_args(args))

    def request(self, count: int, encoded: bytes) -> asyncio.Future[Any]:
        """Send a command now (connecting first if need be); its reply's future.

        The future outlives a caller that stops waiting for it, so the caller
        can still learn what the command did.
        """
        protocol = self._protocol
        if protocol is not None and not protocol.lost.done():
            return protocol.send(b"*%d\r\n" % count + encoded)
        return asyncio.ensure_future(self.execute_encoded(count, encoded))

    async def execute_encoded(self, count: int, encoded: bytes) -> Any:
        """``execute`` of ``count`` arguments already encoded by ``encode_args``."""
        protocol = self._protocol
        if protocol is None or protocol.lost.done():
            protocol = await self._connect()
        return await protocol.send(b"*%d\r\n" % count + encoded)

    def reset(self) -> None:
        """Drop the connection (its pending calls fail); the next call reconnects."""
        if self._protocol is not None:
            self._protocol.abort(RedisDown("connection reset"))
            self._protocol = None

    async def aclose(self) -> None:
        """Close the connection."""
        self.reset()

    async def _connect(self) -> _Protocol:
        # Concurrent callers share one attempt.
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.create_task(self._open())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._unix is not None:
                    _, protocol = await loop.create_unix_connection(_Protocol, self._unix)
                else:
                    _, protocol = await loop.create_connection(
                        _Protocol, self._host, self._port, ssl=self._ssl
                    )
                # Queued first, so no command can run before them.
                setup = []
                if self._password is not None:
                    auth = (self._user, self._password) if self._user else (self._password,)
                    setup.append(protocol.send(_encode(("AUTH", *auth))))
                if self._db:
                    setup.append(protocol.send(_encode(("SELECT", self._db))))
                for reply in setup:
                    await reply
        except (OSError, TimeoutError, RedisReplyError) as exc:
            if protocol is not None:
                protocol.abort(RedisDown("connection set-up failed"))
            raise RedisDown(f"cannot connect to Redis: {type(exc).__name__}") from exc
        self._protocol = protocol
        return protocol
