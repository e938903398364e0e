"""Backpressure: a slow client slows the upstream read, and a 10 MB stream passes
through creditgate in bounded memory."""

from __future__ import annotations

import asyncio
import socket
import tracemalloc
from typing import Any

import aiohttp
import orjson
from aiohttp.test_utils import TestClient

from creditgate.proxy.mock_upstream import MockStats
from creditgate.proxy.relay import DONE_END, Relay
from creditgate.proxy.sse import EventSplitter, event_data
from tests.proxy.conftest import Debit, Outcome, cost, outcome

CHUNKS = 10_000
TOKEN = "x" * 1000  # 10,000 tokens of 1,000 bytes: 10 MB of content (11.6 MB of SSE)
MEMORY_BOUND = 4 * 1024 * 1024  # far below the stream, far above one read


def small_receive_buffer(addr_info: Any) -> socket.socket:
    """A client socket with a small, fixed receive buffer: the kernel cannot
    absorb the stream on the client's behalf, so a slow reader really is slow."""
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    return sock


async def test_10mb_stream_to_a_slow_client_uses_bounded_memory(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(100)
    messages = [{"role": "user", "content": "Write a lot."}]
    request = {
        "model": "big",
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": CHUNKS,
        "mock": {"key": key, "chunks": CHUNKS, "content": TOKEN, "send_buffer": 64 * 1024},
    }
    connector = aiohttp.TCPConnector(socket_factory=small_receive_buffer)
    tracemalloc.start()
    try:
        async with aiohttp.ClientSession(connector=connector, read_bufsize=16 * 1024) as client:
            resp = await client.post(
                gw.make_url("/v1/chat/completions"), json=request, headers=c.auth
            )
            assert resp.status == 200
            first = await resp.content.read(1024)
            # Stop reading until the upstream stops sending (or finishes), then
            # read the rest — as slowly as the buffer size makes us.
            last, still = -1, 0
            for _ in range(200):  # at most ~10 s
                await asyncio.sleep(0.05)
                now = mock_stats.chunks_sent[key]
                still = still + 1 if now == last else 0
                last = now
                if still >= 5 or now == CHUNKS:
                    break
            splitter = EventSplitter()
            events = splitter.feed(first)
            content_bytes = 0
            usage: dict[str, Any] | None = None
            done = False
            while chunk := await resp.content.read(16 * 1024):
                for event in events + splitter.feed(chunk):
                    data = event_data(event)
                    if data == b"[DONE]":
                        done = True
                    elif data is not None:
                        obj = orjson.loads(data)
                        usage = obj.get("usage") or usage
                        for choice in obj["choices"]:
                            content_bytes += len(choice["delta"].get("content") or "")
                events = []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert done and content_bytes == CHUNKS * len(TOKEN)
    assert mock_stats.completed[key] == 1
    assert peak < MEMORY_BOUND, f"peak traced memory {peak} bytes while relaying 10 MB"
    charged = cost("big", usage["prompt_tokens"], CHUNKS)
    assert usage["completion_tokens"] == CHUNKS and usage["cost_micros"] == charged
    assert await outcome(db, c.account.id) == Outcome(
        100_000_000 - charged,
        0,
        ["settled"],
        [Debit(charged, usage["prompt_tokens"], CHUNKS, False, 0)],
    )


class _Content:
    """An upstream body that counts how often it is read."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.reads = 0

    async def readany(self) -> bytes:
        self.reads += 1
        return self.chunks.pop(0) if self.chunks else b""

    def read_nowait(self) -> bytes:
        return b""  # nothing is buffered ahead: every chunk comes by readany

    def at_eof(self) -> bool:
        return False


class _SlowClient:
    """A client response whose writes complete only when the test lets them."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.go = asyncio.Event()

    async def write(self, data: bytes) -> None:
        await self.go.wait()
        self.go.clear()
        self.written.append(data)


class _Upstream:
    def __init__(self, content: _Content, head: bytes) -> None:
        self.response = type("R", (), {"content": content})()
        self.head = head
        self.deadline = asyncio.get_running_loop().time() + 60


async def test_relay_reads_the_upstream_only_as_fast_as_the_client_takes_it() -> None:
    event = b'data: {"choices":[{"index":0,"delta":{"content":"ab"}}]}\n\n'
    content = _Content([event] * 3 + [b"data: [DONE]\n\n"])
    client = _SlowClient()
    relay = Relay(_Upstream(content, event), client)  # type: ignore[arg-type]
    running = asyncio.create_task(relay.run(idle=60))
    for sent in range(1, 5):
        for _ in range(10):
            await asyncio.sleep(0)  # let the relay run as far as it can
        # Blocked on the client: nothing more read from the upstream.
        assert content.reads == sent - 1
        assert len(client.written) == sent - 1
        client.go.set()
    assert await asyncio.wait_for(running, 5) == DONE_END
    assert client.written == [event] * 4
    assert relay.text_bytes == 8
