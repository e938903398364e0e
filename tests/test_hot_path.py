"""The hot path's cheaper equivalents keep the guarantees of what they replaced (issue 9).

* cached metric children are the very children ``labels()`` exports;
* the throttle's reply wait (``_within``) times out like ``asyncio.timeout``
  around ``asyncio.shield``: the reply itself is never cancelled, so a late
  one can still be read, and a cancelled caller leaves it alone;
* a settle queued with ``settle_soon`` is committed even when its future is
  cancelled (the caller left) before the statement ran;
* without an ``x-correlation-id`` the correlation id is the request id;
* the SSE splitter's and ``event_data``'s fast paths give what the general
  (regex) parser gives, on any bytes cut anywhere;
* the relay takes what is already buffered without a timer, and still ends
  at the model's total timeout while data keeps coming.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from creditgate import ledger
from creditgate.http.labelled import cached_labels
from creditgate.ledger.group_commit import GroupCommit
from creditgate.proxy.relay import DONE_END, TOTAL_TIMEOUT, Relay
from creditgate.proxy.sse import EventSplitter, event_data
from creditgate.throttle.core import _within


def test_cached_children_are_the_exported_ones() -> None:
    registry = CollectorRegistry()
    metric = Counter("hot_path_total", "test", ["route", "status"], registry=registry)
    child = cached_labels(metric)
    child("/v1/chat/completions", 200).inc()
    child("/v1/chat/completions", 200).inc(2)
    child("/v1/models", 404).inc()
    assert child("/v1/chat/completions", 200) is metric.labels("/v1/chat/completions", "200")
    value = registry.get_sample_value
    assert value("hot_path_total", {"route": "/v1/chat/completions", "status": "200"}) == 3
    assert value("hot_path_total", {"route": "/v1/models", "status": "404"}) == 1


async def test_within_returns_a_reply_that_comes_in_time() -> None:
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[str] = loop.create_future()
    loop.call_later(0.01, reply.set_result, "OK")
    assert await _within(reply, loop.time() + 5) == "OK"
    done: asyncio.Future[str] = loop.create_future()
    done.set_result("already")
    assert await _within(done, loop.time() - 1) == "already"  # no wait, whatever the deadline


async def test_within_times_out_without_cancelling_the_reply() -> None:
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[str] = loop.create_future()
    seen: list[str] = []
    try:
        await _within(reply, loop.time() + 0.02)
    except TimeoutError:
        seen.append("timeout")
    assert seen == ["timeout"]
    assert not reply.cancelled()  # a late reply can still be read (the throttle's undo)
    reply.set_result("late")
    assert reply.result() == "late"


async def test_within_leaves_the_reply_alone_when_its_caller_is_cancelled() -> None:
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[str] = loop.create_future()
    waiting = asyncio.ensure_future(_within(reply, loop.time() + 5))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    assert waiting.cancelled() and not reply.cancelled()
    reply.set_exception(ConnectionError("gone"))  # and a failure is the reply's own
    try:
        await _within(reply, loop.time() + 5)
    except ConnectionError as e:
        assert str(e) == "gone"
    else:
        raise AssertionError("the reply's exception was not raised")


async def test_a_settle_whose_caller_left_is_still_committed(db: asyncpg.Pool) -> None:
    acct = await ledger.ensure_account(db, "user", f"user_{uuid.uuid4().hex}")
    await ledger.post_entry(
        db,
        account_id=acct.id,
        amount=1_000_000,
        kind="grant",
        idempotency_key=f"t:{uuid.uuid4()}",
        reason="test",
    )
    holds = GroupCommit(db, lanes=1)
    hold = await holds.reserve(
        hold_id=uuid.uuid4(), account_id=acct.id, amount=50_000, ttl_seconds=60
    )
    settling = holds.settle_soon(hold.id, ledger.Usage(10, 20, 12_345))
    settling.cancel()  # the caller stopped waiting before the statement ran
    for _ in range(200):  # at most ~10 s for the lane to finish
        row = await db.fetchrow(
            "SELECT balance, reserved FROM account_balances WHERE account_id = $1", acct.id
        )
        if row["reserved"] == 0:
            break
        await asyncio.sleep(0.05)
    assert (row["balance"], row["reserved"]) == (1_000_000 - 12_345, 0)
    debits = await db.fetch(
        "SELECT amount FROM ledger_entries WHERE hold_id = $1 AND kind = 'debit'", hold.id
    )
    assert [d["amount"] for d in debits] == [-12_345]


async def test_correlation_id_defaults_to_the_request_id(cg: TestClient) -> None:
    resp = await cg.get("/health")
    made = resp.headers["x-request-id"]
    assert uuid.UUID(made) and resp.headers["x-correlation-id"] == made
    resp = await cg.get("/health", headers={"x-request-id": "req-1"})
    assert resp.headers["x-request-id"] == resp.headers["x-correlation-id"] == "req-1"
    resp = await cg.get("/health", headers={"x-request-id": "req-2", "x-correlation-id": "c.2"})
    assert (resp.headers["x-request-id"], resp.headers["x-correlation-id"]) == ("req-2", "c.2")
    # A malformed correlation id is replaced by a new id of its own.
    resp = await cg.get("/health", headers={"x-request-id": "req-3", "x-correlation-id": "a b"})
    assert resp.headers["x-request-id"] == "req-3"
    assert uuid.UUID(resp.headers["x-correlation-id"])


# ---------------------------------------------------------------- SSE fast paths

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\n|\r")


def _reference_split(chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    """The splitter as it was before its \\n-only fast path: the regex, always."""
    buf, events = b"", []
    for chunk in chunks:
        buf += chunk
        start = 0
        while (m := _EVENT_END.search(buf, start)) is not None:
            events.append(buf[start : m.end()])
            start = m.end()
        buf = buf[start:]
    return events, buf


def _reference_data(event: bytes) -> bytes | None:
    if b"data:" not in event:
        return None
    parts = []
    for line in _LINE.split(event):
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts) if parts else None


_PIECES = st.sampled_from(
    [b"data: ", b"data:", b'{"a":1}', b"[DONE]", b"\n", b"\r", b"\r\n", b"\n\n", b": ping", b"x"]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=40), st.lists(st.integers(0, 400), max_size=6))
def test_sse_fast_paths_match_the_general_parser(pieces: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(pieces)
    bounds = sorted({min(c, len(stream)) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *bounds], [*bounds, len(stream)], strict=True)]
    splitter = EventSplitter()
    events = [e for chunk in chunks for e in splitter.feed(chunk)]
    assert (events, splitter.rest()) == _reference_split(chunks)
    for event in events:
        assert event_data(event) == _reference_data(event)


def test_sse_fast_paths_on_openai_shaped_events() -> None:
    splitter = EventSplitter()
    events = splitter.feed(b'data: {"x": 1}\n\ndata:{"y": 2}\n\n: keep-alive\n\ndata: [DO')
    assert events == [b'data: {"x": 1}\n\n', b'data:{"y": 2}\n\n', b": keep-alive\n\n"]
    assert [event_data(e) for e in events] == [b'{"x": 1}', b'{"y": 2}', None]
    assert splitter.feed(b"NE]\n\n") == [b"data: [DONE]\n\n"] and splitter.rest() == b""
    assert event_data(b"data: a\ndata: b\n\n") == b"a\nb"  # several data lines: joined


# ---------------------------------------------------------------- relay: data already buffered


class _Buffered:
    """aiohttp's StreamReader as the relay sees it when the upstream is ahead of
    the client: every chunk is already buffered (``read_nowait`` has it)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.waits = 0

    def read_nowait(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    def at_eof(self) -> bool:
        return not self.chunks

    async def readany(self) -> bytes:
        self.waits += 1
        return b""


class _Client:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.written.append(data)


def _upstream(content: _Buffered, head: bytes, deadline: float) -> Any:
    response = type("R", (), {"content": content})()
    return type("S", (), {"response": response, "head": head, "deadline": deadline})()


_EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"ab"}}]}\n\n'


async def test_relay_takes_buffered_data_without_waiting() -> None:
    content = _Buffered([_EVENT, _EVENT, b"data: [DONE]\n\n"])
    client = _Client()
    loop = asyncio.get_running_loop()
    relay = Relay(_upstream(content, _EVENT, loop.time() + 60), client)  # type: ignore[arg-type]
    assert await relay.run(idle=60) == DONE_END
    assert client.written == [_EVENT] * 3 and relay.text_bytes == 6 and content.waits == 0


async def test_relay_ends_at_the_total_timeout_even_while_data_keeps_coming() -> None:
    content = _Buffered([_EVENT] * 5)
    client = _Client()
    loop = asyncio.get_running_loop()
    relay = Relay(_upstream(content, _EVENT, loop.time() - 0.001), client)  # type: ignore[arg-type]
    assert await relay.run(idle=60) == TOTAL_TIMEOUT
    assert client.written == [_EVENT]  # what came before the deadline was checked
